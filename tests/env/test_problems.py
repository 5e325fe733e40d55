"""Built-in problems, splits, hashes, the JSONL loader and the HumanEval conversion."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import subprocess
import sys
from collections import Counter
from importlib import resources
from pathlib import Path

import pytest

from antipasto_pl.env.grader import Grader, as_completion, failing_canonicals
from antipasto_pl.env.humaneval import _read_tasks, convert_task, load_humaneval
from antipasto_pl.env.modes import MODES
from antipasto_pl.env.problem import Problem, TestCase, problem_examples
from antipasto_pl.env.problems import (
    ProblemFileError,
    builtin_problems,
    easy_problems,
    filter_modes,
    load_jsonl,
    load_problems,
    problem_set_hash,
    problem_to_dict,
    split_problems,
    assign_modes,
)


@pytest.fixture(scope="module")
def builtin() -> list[Problem]:
    return builtin_problems()


def _method_names(source: str) -> set[str]:
    cls = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "Solution")
    return {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}


def test_builtin_set_shape(builtin: list[Problem]) -> None:
    assert len(builtin) >= 48
    assert len({p.id for p in builtin}) == len(builtin)
    assert Counter(p.mode for p in builtin) == {mode: 8 for mode in MODES}
    for p in builtin:
        assert len(p.tests) >= 3, p.id
        assert len(problem_examples(p)) == 1, p.id  # the one worked example, parsed back from the description
        assert p.entry_point in _method_names(p.starter_code) and p.entry_point in _method_names(p.canonical_solution)
        assert p.description not in p.starter_code
    assert [p.mode for p in builtin] == [p.mode for p in builtin_problems()]


def test_builtin_tests_are_json_round_trippable(builtin: list[Problem]) -> None:
    for p in builtin:
        for case in (*p.tests, *problem_examples(p)):
            blob = json.dumps({"args": list(case.args), "expected": case.expected})
            back = json.loads(blob)
            assert back == {"args": list(case.args), "expected": case.expected}, p.id
            # Type-exact: the strict oracle would tell 2 from 2.0 and a tuple from a list apart.
            assert json.dumps(back) == blob, p.id


def test_builtin_canonicals_and_examples_pass_the_oracle(builtin: list[Problem]) -> None:
    """Every canonical solution is gt_correct on its held tests and on the example shown in its description."""
    with_examples = [dataclasses.replace(p, id=f"{p.id}#example", tests=tuple(problem_examples(p))) for p in builtin]
    assert [p.id for p in failing_canonicals(builtin + with_examples)] == []


def test_wrong_canonical_is_caught(builtin: list[Problem]) -> None:
    """The check above can fail: a canonical solution contradicting its tests is reported."""
    broken = dataclasses.replace(builtin[0], tests=(*builtin[0].tests[:2], TestCase(builtin[0].tests[2].args, [9, 9])))
    assert failing_canonicals([broken, builtin[1]]) == [broken]


def test_split_is_stratified_disjoint_and_seeded(builtin: list[Problem]) -> None:
    train, val = split_problems(builtin, [0.25], seed=0)
    assert {p.id for p in train}.isdisjoint(p.id for p in val)
    assert len(train) + len(val) == len(builtin)
    assert Counter(p.mode for p in val) == {mode: 2 for mode in MODES}
    assert {p.mode for p in train} == set(MODES)
    again_train, again_val = split_problems(list(reversed(builtin)), [0.25], seed=0)
    assert {p.id for p in again_val} == {p.id for p in val}  # depends on ids, not input order
    other = {frozenset(p.id for p in split_problems(builtin, [0.25], seed=s)[1]) for s in range(5)}
    assert len(other) > 1
    assert split_problems(builtin, [0.0], seed=0) == [builtin, []]
    tiny_train, tiny_val = split_problems(builtin[:12], [0.01], seed=3)  # rounds to 0 but every mode still in val
    assert {p.mode for p in tiny_val} == set(MODES) == {p.mode for p in tiny_train}
    with pytest.raises(ValueError, match="fractions"):
        split_problems(builtin, [0.5, 0.5], seed=0)


def test_three_way_split_gives_every_part_every_mode(builtin: list[Problem]) -> None:
    """Train / pairs / validation / test: four disjoint parts covering the set, each with every mode."""
    parts = split_problems(builtin, [0.125, 0.125, 0.25], seed=0)
    ids = [{p.id for p in part} for part in parts]
    assert sum(map(len, ids)) == len(builtin) == len(set().union(*ids))
    assert all({p.mode for p in part} == set(MODES) for part in parts)
    assert [len(part) for part in parts] == [24, 6, 6, 12]


def test_assign_modes_deals_every_problem_to_the_given_modes(builtin: list[Problem]) -> None:
    dealt = assign_modes(builtin, ["sentinel", "run_tests"])
    assert [p.id for p in dealt] == [p.id for p in builtin]
    assert Counter(p.mode for p in dealt) == {"sentinel": 24, "run_tests": 24}
    with pytest.raises(ValueError, match="sentinal"):
        assign_modes(builtin, ["sentinal"])


def test_filter_modes(builtin: list[Problem]) -> None:
    assert {p.mode for p in filter_modes(builtin, ["sentinel", "exit_code"])} == {"sentinel", "exit_code"}
    assert filter_modes(builtin, None) == builtin
    with pytest.raises(ValueError, match="sentinal"):
        filter_modes(builtin, ["sentinal"])


def test_problem_set_hash_is_stable_and_content_sensitive(builtin: list[Problem]) -> None:
    h = problem_set_hash(builtin)
    assert h == problem_set_hash(list(reversed(builtin)))
    changed = [dataclasses.replace(builtin[0], description=builtin[0].description + " ")] + builtin[1:]
    assert problem_set_hash(changed) != h
    assert problem_set_hash(builtin[1:]) != h
    # A fresh interpreter (different hash randomisation) agrees.
    code = "import antipasto_pl.env.problems as m; print(m.problem_set_hash(m.builtin_problems()))"
    env = {"PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == h


def test_problem_examples_formats() -> None:
    p = Problem("x", "", "f", "", "", (), "run_tests")
    desc = "\n".join(
        ["Doc.", ">>> f([1, 2], 'a')", "3", "    f(4) == [5]", "    f(6) \u279e True", "  f(n) == f(n - 1)",
         ">>> f(x)", "1", ">>> g(1)", "2"]
    )
    assert problem_examples(dataclasses.replace(p, description=desc)) == [
        TestCase(([1, 2], "a"), 3),
        TestCase((4,), [5]),
        TestCase((6,), True),
    ]


# --- JSONL ----------------------------------------------------------------------------------------------------


def _write_rows(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_round_trip(tmp_path: Path, builtin: list[Problem]) -> None:
    path = _write_rows(tmp_path / "problems.jsonl", [problem_to_dict(p) for p in builtin] + [""])
    assert load_jsonl(path) == builtin
    assert load_problems(str(path)) == builtin


def _row(builtin: list[Problem], **changes: object) -> dict:
    row = problem_to_dict(builtin[0])
    for key, value in changes.items():
        if value is None:
            row.pop(key)
        else:
            row[key] = value
    return row


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"tests": [{"args": [[1, 2], 3], "expected": [0, 1]}] * 2},
            re.escape(
                "problems.jsonl line 2: field 'tests' must be a list of {\"args\": [...], \"expected\": ...} "
                "with at least 3 entries, got 2"
            ),
        ),
        ({"tests": None}, "line 2: field 'tests' must be a list .* missing"),
        (
            {"tests": [{"args": [1], "expected": 1}] * 2 + [{"args": 1, "expected": 2}]},
            "line 2: field 'tests'.*entry 2",
        ),
        ({"mode": "sentinal"}, "line 2: field 'mode' must be one of .*got 'sentinal'"),
        ({"entry_point": None}, "line 2: field 'entry_point' must be a non-empty string, missing"),
        ({"entry_point": "two sum"}, "line 2: field 'entry_point' must be a Python identifier"),
        ({"description": 3}, "line 2: field 'description' must be a non-empty string, got 3"),
        ({"float_tol": -1}, "line 2: field 'float_tol' must be a positive number or null"),
        ({"float_tolerance": 1e-6}, r"line 2: unknown field\(s\) \['float_tolerance'\]"),
    ],
)
def test_jsonl_field_errors(tmp_path: Path, builtin: list[Problem], changes: dict, message: str) -> None:
    path = _write_rows(tmp_path / "problems.jsonl", [problem_to_dict(builtin[1]), _row(builtin, **changes)])
    with pytest.raises(ProblemFileError, match=message) as info:
        load_jsonl(path)
    assert str(path) in str(info.value)


def test_jsonl_row_errors(tmp_path: Path, builtin: list[Problem]) -> None:
    good = [problem_to_dict(p) for p in builtin[:2]]
    cases = {
        "dup.jsonl": (good + [good[0]], r"dup.jsonl line 3: duplicate id 'two_sum' \(first defined on line 1\)"),
        "json.jsonl": ([good[0], "{not json"], "json.jsonl line 2: invalid JSON"),
        "list.jsonl": ([[1, 2]], "list.jsonl line 1: expected a JSON object, got list"),
        "empty.jsonl": ([""], "empty.jsonl: no problems found"),
    }
    for name, (rows, message) in cases.items():
        with pytest.raises(ProblemFileError, match=message):
            load_jsonl(_write_rows(tmp_path / name, rows))
    with pytest.raises(FileNotFoundError, match="neither 'builtin'"):
        load_problems(str(tmp_path / "missing.jsonl"))


# --- Easy tier ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def easy() -> list[Problem]:
    return easy_problems()


def test_easy_tier_shape(easy: list[Problem]) -> None:
    """48 problems dealt round-robin over the modes, each with a skeleton-prefixed canonical and one example."""
    assert len(easy) == 48 and all(p.id.startswith("easy_") for p in easy)
    assert [p.mode for p in easy] == [MODES[i % len(MODES)] for i in range(len(easy))]
    for p in easy:
        assert len(p.tests) >= 4, p.id
        assert p.starter_code == p.skeleton() + "pass\n", p.id  # a parsable signature, not the generic skeleton
        assert p.canonical_solution.startswith(p.skeleton()), p.id
        assert re.fullmatch(rf".+\n\nExample:\n>>> Solution\(\)\.{p.entry_point}\(.*\)\n.+", p.description), p.id
        assert len(problem_examples(p)) == 1, p.id


def test_easy_canonicals_and_examples_pass_the_oracle(easy: list[Problem]) -> None:
    """Each canonical passes the oracle and the exit_code grader on its held tests and on its worked example."""
    with_examples = [dataclasses.replace(p, id=f"{p.id}#example", tests=tuple(problem_examples(p))) for p in easy]
    assert [p.id for p in failing_canonicals(easy + with_examples)] == []


def test_easy_stubs_fail_the_oracle(easy: list[Problem]) -> None:
    """The starter code as submitted (`pass`, returning None) gets no held test right on any problem."""
    with Grader() as grader:
        grades = grader.grade_batch([(p, as_completion(p.starter_code)) for p in easy])
    assert [(p.id, g.gt_correct, g.tests_correct, g.gt_error) for p, g in zip(easy, grades)] == [
        (p.id, False, 0, "wrong_answer") for p in easy
    ]


def test_easy_tier_is_package_data() -> None:
    """The data file sits where importlib.resources finds it and pyproject's package-data globs ship it."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    package = Path(str(resources.files("antipasto_pl")))
    assert (package / "env/data/easy.jsonl").is_file()
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["antipasto_pl"]
    assert package / "env/data/easy.jsonl" in {path for glob in globs for path in package.glob(glob)}


def test_combined_sources(tmp_path: Path, builtin: list[Problem], easy: list[Problem]) -> None:
    assert load_problems("easy") == easy
    combined = load_problems("builtin+easy")
    assert combined == builtin + easy and len({p.id for p in combined}) == 96
    extra = _write_rows(tmp_path / "extra.jsonl", [problem_to_dict(dataclasses.replace(easy[0], id="extra"))])
    assert [p.id for p in load_problems(f"easy+{extra}")] == [p.id for p in easy] + ["extra"]
    plus = _write_rows(tmp_path / "a+b.jsonl", [problem_to_dict(builtin[0])])
    assert load_problems(str(plus)) == builtin[:1]  # an existing path containing "+" is one source
    clash = _write_rows(tmp_path / "clash.jsonl", [problem_to_dict(easy[3])])
    with pytest.raises(ValueError, match=rf"id 'easy_max_of_list' is in both 'easy' and '{re.escape(str(clash))}'"):
        load_problems(f"builtin+easy+{clash}")
    with pytest.raises(FileNotFoundError, match="'bultin' is neither"):
        load_problems("easy+bultin")


# --- HumanEval ------------------------------------------------------------------------------------------------


def test_humaneval_conversion_fast_subset() -> None:
    """Conversion shapes: floats with tolerance, recursion, helper functions, tuples."""
    tasks = {t["task_id"]: t for t in _read_tasks()}
    assert len(tasks) == 164
    converted = [convert_task(t) for t in tasks.values()]
    assert sum(p is not None for p in converted) >= 140
    picked = [convert_task(tasks[f"HumanEval/{i}"]) for i in (2, 8, 10, 55, 0)]
    assert all(p is not None for p in picked)
    truncate, sum_product, make_palindrome, fib, close = picked
    assert truncate.float_tol == 1e-6 and truncate.tests[0] == TestCase((3.5,), 0.5)
    assert sum_product.tests[0] == TestCase(([],), (0, 1))
    assert "def is_palindrome" in make_palindrome.starter_code.split("class Solution")[0]
    assert "self.fib(n - 1)" in fib.canonical_solution
    assert close.mode == MODES[0] and fib.mode == MODES[55 % len(MODES)]
    # Dropped by load_humaneval: a result off by float rounding and a tuple fail the `==` graders.
    assert {p.id for p in failing_canonicals(picked)} == {"HumanEval/2", "HumanEval/8"}


def test_humaneval_full_conversion() -> None:
    problems = load_humaneval()
    print(f"\nHumanEval: {len(problems)} of 164 problems converted with the canonical solution passing the oracle")
    assert len(problems) >= 140
    assert {p.mode for p in problems} == set(MODES)
    assert len({p.id for p in problems}) == len(problems)
