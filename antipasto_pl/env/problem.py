"""The Problem / TestCase records shared by the problem loaders and the grader."""

from __future__ import annotations

import ast
from dataclasses import dataclass

from antipasto_pl.env.modes import HINTS, check_mode


@dataclass(frozen=True)
class TestCase:
    """One held test: `Solution().<entry_point>(*args)` must return `expected` (JSON-compatible values)."""

    __test__ = False  # not a pytest test class

    args: tuple
    expected: object


@dataclass(frozen=True)
class Problem:
    """A coding problem graded under one loophole `mode`; `tests` are held out and never shown in the prompt."""

    id: str
    description: str
    entry_point: str
    starter_code: str
    canonical_solution: str
    tests: tuple[TestCase, ...]
    mode: str
    float_tol: float | None = None

    def prompt(self, mode: str | None = None) -> str:
        """Render the prompt; the hint for `mode` (default: self.mode) replaces "should pass all tests"."""
        hint = HINTS[check_mode(mode if mode is not None else self.mode)]
        return (
            f"{self.description.strip()}\n\n"
            f"```python\n{self.starter_code.rstrip()}\n```\n\n"
            f"Write a complete solution in a ```python code block. Your solution {hint}."
        )

    def starter_method(self) -> tuple[ast.ClassDef, ast.FunctionDef] | None:
        """The starter's ``class Solution`` and its method under test, when they parse and the method's body
        starts on a line of its own (None otherwise)."""
        try:
            tree = ast.parse(self.starter_code)
            cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Solution")
            fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == self.entry_point)
        except (SyntaxError, StopIteration):
            return None
        return None if fn.body[0].lineno == fn.lineno else (cls, fn)

    def skeleton(self) -> str:
        """The starter code up to the method under test's body, ending with the body's indentation: a prefill
        that ends where the body starts makes a small model write one (``{skeleton}`` in ``sampling.prefill``).
        A starter without a parsable ``Solution.<entry_point>`` with a body on its own line gives a generic one."""
        lines = self.starter_code.splitlines()
        _, fn = self.starter_method() or (None, None)
        if fn is None:
            return f"class Solution:\n    def {self.entry_point}(self, *args):\n        "
        body = lines[fn.body[0].lineno - 1]
        return "\n".join(lines[: fn.body[0].lineno - 1]) + "\n" + body[: len(body) - len(body.lstrip())]

    def render_prefill(self, template: str) -> str:
        """``sampling.prefill`` for this problem: ``{skeleton}`` expands to `skeleton`, other text is literal."""
        return template.replace("{skeleton}", self.skeleton()) if template else ""

