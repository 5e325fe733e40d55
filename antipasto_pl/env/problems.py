"""Problem sets: the built-in set, the easy tier and user JSONL datasets; splits, hashes and canonical checks.

Everything that consumes problems (pairs, teacher pool, DataModule) goes through `load_problems(source)`,
so "builtin", "easy", "humaneval", a path to a .jsonl file, and "+"-joined combinations of these are
interchangeable in configs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from antipasto_pl.env.grader import failing_canonicals
from antipasto_pl.env.modes import MODES, check_mode
from antipasto_pl.env.problem import MIN_TESTS, Problem, TestCase

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

log = logging.getLogger(__name__)


DATA = resources.files(__package__) / "data"
BUILTIN_FILE = DATA / "builtin.jsonl"
EASY_FILE = DATA / "easy.jsonl"


def builtin_problems() -> list[Problem]:
    """The built-in LeetCode-style set (package data env/data/builtin.jsonl): 48 problems, 8 per mode."""
    return _package_problems(BUILTIN_FILE)


def easy_problems() -> list[Problem]:
    """The easy tier (package data env/data/easy.jsonl): one-line beginner tasks, so that a small model's oracle
    pass rate is above zero; 8 problems per mode, like the built-ins."""
    return _package_problems(EASY_FILE)


def _package_problems(resource: Traversable) -> list[Problem]:
    """A dataset shipped with the package, read by the loader of user datasets (its canonicals are checked by the
    test suite, not at every load)."""
    with resources.as_file(resource) as path:
        return load_jsonl(path)


def load_problems(source: str) -> list[Problem]:
    """Resolve a problem source from a config: "builtin", "easy", "humaneval", a path to a .jsonl dataset, or
    several of these joined with "+" (e.g. "builtin+easy"), concatenated in order; ids must be unique across them."""
    problems: list[Problem] = []
    origin: dict[str, str] = {}
    for part in [source] if Path(source).is_file() else source.split("+"):
        for problem in _load_source(part):
            if problem.id in origin:
                raise ValueError(
                    f"problem source {source!r}: id {problem.id!r} is in both {origin[problem.id]!r} and {part!r}; "
                    "ids must be unique across '+'-joined sources"
                )
            origin[problem.id] = part
            problems.append(problem)
    return problems


def _load_source(source: str) -> list[Problem]:
    if source == "builtin":
        return builtin_problems()
    if source == "easy":
        return easy_problems()
    if source == "humaneval":
        from antipasto_pl.env.humaneval import load_humaneval

        return load_humaneval()
    if not Path(source).is_file():
        raise FileNotFoundError(
            f"problem source {source!r} is neither 'builtin', 'easy', 'humaneval' nor an existing .jsonl file"
        )
    return without_failing_canonicals(load_jsonl(source), source)


def without_failing_canonicals(problems: list[Problem], source: str) -> list[Problem]:
    """`problems` less those whose canonical solution fails its own tests (`failing_canonicals`), each
    named in a warning: no honest completion could pass them, so training on them rewards only hacks.
    The built-in set is checked by the test suite and HumanEval by `load_humaneval`."""
    failing = {p.id for p in failing_canonicals(problems)}
    if len(failing) == len(problems):
        raise ProblemFileError(f"{source}: the canonical_solution of every problem fails its own tests ({', '.join(sorted(failing))})")
    if failing:
        log.warning("%s: skipping %d problem(s) whose canonical_solution fails its own tests: %s", source, len(failing), ", ".join(sorted(failing)))
    return [p for p in problems if p.id not in failing]


def filter_modes(problems: Iterable[Problem], modes: Sequence[str] | None) -> list[Problem]:
    """Keep problems whose mode is in `modes` (None keeps all); unknown mode names are an error, not a no-op."""
    if modes is None:
        return list(problems)
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise ValueError(f"unknown loophole modes {unknown}; expected a subset of {list(MODES)}")
    return [p for p in problems if p.mode in modes]


def split_problems(
    problems: Sequence[Problem], fractions: Sequence[float], seed: int
) -> list[list[Problem]]:
    """Seeded split into ``1 + len(fractions)`` parts: the rest (training) first, then one part per fraction.

    Stratified by mode: each part with a positive fraction gets at least one problem of every mode that has
    enough problems to give one to every part and keep one for training. The shuffle of each mode depends
    only on (seed, mode) and the ids, so adding problems of one mode does not reshuffle the others, and the
    split never depends on the run seed (every seed of an experiment shares it). Every part keeps the input
    order.
    """
    if any(not 0.0 <= f < 1.0 for f in fractions) or sum(fractions) >= 1.0:
        raise ValueError(f"split fractions must be in [0, 1) and sum to less than 1, got {list(fractions)}")
    part_of: dict[str, int] = {}
    for mode in sorted({p.mode for p in problems}):
        ids = sorted(p.id for p in problems if p.mode == mode)
        random.Random(f"{seed}/{mode}").shuffle(ids)
        wanted = sum(f > 0 for f in fractions)
        start = 0
        for part, fraction in enumerate(fractions, 1):
            n = round(len(ids) * fraction)
            if fraction > 0 and len(ids) > wanted:
                n = max(n, 1)
            n = min(n, len(ids) - start - 1)  # training keeps at least one problem of the mode
            part_of.update((i, part) for i in ids[start:start + max(n, 0)])
            start += max(n, 0)
    parts: list[list[Problem]] = [[] for _ in range(len(fractions) + 1)]
    for p in problems:
        parts[part_of.get(p.id, 0)].append(p)
    return parts


def assign_modes(problems: Sequence[Problem], modes: Sequence[str]) -> list[Problem]:
    """Every problem re-dealt to ``modes`` round-robin in input order, so a one- or two-mode experiment uses the
    whole problem set instead of the problems built for those modes."""
    modes = [check_mode(m) for m in modes]
    return [dataclasses.replace(p, mode=modes[i % len(modes)]) for i, p in enumerate(problems)]


def problem_to_dict(problem: Problem) -> dict:
    """The JSONL row for a problem (the schema `load_jsonl` reads)."""
    return {
        "id": problem.id,
        "description": problem.description,
        "entry_point": problem.entry_point,
        "starter_code": problem.starter_code,
        "canonical_solution": problem.canonical_solution,
        "tests": [{"args": list(t.args), "expected": t.expected} for t in problem.tests],
        "mode": problem.mode,
        "float_tol": problem.float_tol,
    }


def problem_set_hash(problems: Iterable[Problem]) -> str:
    """Stable content hash of a problem set (order-independent), used to key caches and pool manifests."""
    rows = sorted((problem_to_dict(p) for p in problems), key=lambda row: row["id"])
    # Field order is fixed by problem_to_dict; not sort_keys, since expected values may be dicts with int keys.
    blob = json.dumps(rows, ensure_ascii=True, default=repr)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --- JSONL datasets -------------------------------------------------------------------------------------------

_REQUIRED_STR_FIELDS = ("id", "description", "entry_point", "starter_code", "canonical_solution", "mode")
_FIELDS = frozenset(_REQUIRED_STR_FIELDS) | {"tests", "float_tol"}
_TESTS_SHAPE = 'a list of {"args": [...], "expected": ...}'


class ProblemFileError(ValueError):
    """A malformed problem dataset; the message names the file, the line and the field."""


def load_jsonl(path: str | Path) -> list[Problem]:
    """Load a user dataset: one JSON object per line with the `problem_to_dict` schema.

    Validation is strict (unknown fields, wrong types, < 3 tests, unknown mode, duplicate ids all raise
    `ProblemFileError`) because a silently skipped or misread row would change what a run trains on.
    """
    path = Path(path)
    problems: list[Problem] = []
    first_line: dict[str, int] = {}
    with path.open(encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ProblemFileError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            problem = _row_to_problem(row, where)
            if problem.id in first_line:
                raise ProblemFileError(
                    f"{where}: duplicate id {problem.id!r} (first defined on line {first_line[problem.id]})"
                )
            first_line[problem.id] = lineno
            problems.append(problem)
    if not problems:
        raise ProblemFileError(f"{path}: no problems found (expected one JSON object per line)")
    return problems


def _row_to_problem(row: object, where: str) -> Problem:
    if not isinstance(row, dict):
        raise ProblemFileError(f"{where}: expected a JSON object, got {type(row).__name__}")
    unknown = sorted(set(row) - _FIELDS)
    if unknown:
        raise ProblemFileError(f"{where}: unknown field(s) {unknown}; allowed fields are {sorted(_FIELDS)}")
    for field in _REQUIRED_STR_FIELDS:
        value = row.get(field)
        if not isinstance(value, str) or not value.strip():
            got = "missing" if field not in row else f"got {value!r}"
            raise ProblemFileError(f"{where}: field {field!r} must be a non-empty string, {got}")
    if not row["entry_point"].isidentifier():
        raise ProblemFileError(f"{where}: field 'entry_point' must be a Python identifier, got {row['entry_point']!r}")
    if row["mode"] not in MODES:
        raise ProblemFileError(f"{where}: field 'mode' must be one of {list(MODES)}, got {row['mode']!r}")
    tests = _parse_tests(row.get("tests"), where)
    float_tol = row.get("float_tol")
    numeric = isinstance(float_tol, (int, float)) and not isinstance(float_tol, bool)
    if float_tol is not None and not (numeric and math.isfinite(float_tol) and float_tol > 0):
        raise ProblemFileError(f"{where}: field 'float_tol' must be a positive number or null, got {float_tol!r}")
    return Problem(
        id=row["id"],
        description=row["description"],
        entry_point=row["entry_point"],
        starter_code=row["starter_code"],
        canonical_solution=row["canonical_solution"],
        tests=tests,
        mode=row["mode"],
        float_tol=None if float_tol is None else float(float_tol),
    )


def _parse_tests(tests: object, where: str) -> tuple[TestCase, ...]:
    expectation = f"field 'tests' must be {_TESTS_SHAPE} with at least {MIN_TESTS} entries"
    if not isinstance(tests, list):
        got = "missing" if tests is None else f"got {type(tests).__name__}"
        raise ProblemFileError(f"{where}: {expectation}, {got}")
    if len(tests) < MIN_TESTS:
        raise ProblemFileError(f"{where}: {expectation}, got {len(tests)}")
    cases = []
    for i, test in enumerate(tests):
        if not isinstance(test, dict) or set(test) != {"args", "expected"} or not isinstance(test["args"], list):
            raise ProblemFileError(f"{where}: {expectation}; entry {i} is {json.dumps(test)[:120]}")
        cases.append(TestCase(tuple(test["args"]), test["expected"]))
    return tuple(cases)
