"""The Problem / TestCase records shared by the problem loaders and the grader."""

from __future__ import annotations

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

