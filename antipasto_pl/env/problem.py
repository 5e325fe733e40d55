"""The Problem / TestCase records shared by the problem loaders and the grader."""

from __future__ import annotations

import ast
from dataclasses import dataclass

from antipasto_pl.env.modes import HINTS, check_mode

MIN_TESTS = 3  # held tests a problem needs at least (fewer let a lucky constant pass)


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


def problem_examples(problem: Problem) -> list[TestCase]:
    """Worked examples in the description, as doctests (`>>> f(args)` then the result on the next line) or inline
    (`f(args) == result`, also `->`, `=>`, `➞`).

    Clean completions assert on these rather than on the held tests. Examples whose call or result is not a
    Python literal are skipped.
    """
    lines = [line.strip() for line in problem.description.splitlines()]
    examples = []
    for i, line in enumerate(lines):
        if line.startswith(">>>"):
            line = line[3:].strip()
            case = _parse_example(line, lines[i + 1], problem.entry_point) if i + 1 < len(lines) else None
        else:
            case = None
        case = case or _parse_inline_example(line, problem.entry_point)
        if case is not None:
            examples.append(case)
    return examples


_INLINE_SEPARATORS = ("==", "->", "=>", "\u279e", "\u2192")


def _parse_inline_example(line: str, entry_point: str) -> TestCase | None:
    if f"{entry_point}(" not in line:
        return None
    for sep in _INLINE_SEPARATORS:
        start = line.find(sep)
        while start != -1:
            case = _parse_example(line[:start].strip(), line[start + len(sep):].strip(), entry_point)
            if case is not None:
                return case
            start = line.find(sep, start + 1)
    return None


def _parse_example(call_src: str, result_src: str, entry_point: str) -> TestCase | None:
    try:
        call = ast.parse(call_src, mode="eval").body
        if not isinstance(call, ast.Call) or call.keywords:
            return None
        func = call.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name != entry_point:
            return None
        return TestCase(tuple(ast.literal_eval(arg) for arg in call.args), ast.literal_eval(result_src))
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        return None
