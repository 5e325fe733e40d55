"""Loophole coding environment: problems, grader modes, strict oracle, sandbox, pairs, teacher pool."""
