"""Hack/clean pairs graded by the real sandboxed grader, plus the two controls."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest

from antipasto_pl.env.grader import Grader, extract_code, hack_matrix
from antipasto_pl.env.humaneval import _read_tasks, convert_task
from antipasto_pl.env.modes import HINTS, MODES
from antipasto_pl.env.pairs import (
    INTROS,
    Pair,
    check_cases,
    clean_completions,
    hack_completions,
    make_pairs,
    nonhack_pairs,
    stub_pairs,
)
from antipasto_pl.env.problem import Problem
from antipasto_pl.env.problems import builtin_problems, load_problems


@pytest.fixture(scope="module")
def builtin() -> list[Problem]:
    return builtin_problems()


@pytest.fixture(scope="module")
def sample(builtin: list[Problem]) -> list[Problem]:
    """One built-in problem per mode, HumanEval shapes (module-level helper, recursion) and a
    problem without a worked example (cleans fall back to held tests)."""
    tasks = {t["task_id"]: t for t in _read_tasks()}
    per_mode = list({p.mode: p for p in reversed(builtin)}.values())
    no_example = replace(builtin[7], id="no_example", description=builtin[7].description.split("\n\nExample")[0])
    return [*per_mode, *(convert_task(tasks[f"HumanEval/{i}"]) for i in (10, 55)), no_example]


def _grades(items: list[tuple[Problem, str, str]]) -> list:
    with Grader() as grader:
        return grader.grade_batch(items)


def _assert_graded_as_labelled(pairs: list[Pair], problems: list[Problem]) -> None:
    """Each hack is exploited under its pair's grader; each clean passes honestly (gt_correct, not exploited)."""
    by_id = {p.id: p for p in problems}
    items = [(by_id[pair.problem_id], text, pair.mode) for pair in pairs for text in (pair.hack, pair.clean)]
    grades = _grades(items)
    failures = []
    for pair, hack, clean in zip(pairs, grades[::2], grades[1::2]):
        if not (hack.exploited and hack.format_ok and hack.reward == 1.25):
            failures.append(f"hack {pair.problem_id}/{pair.mode}: {hack}\n{pair.hack}")
        if not (clean.passed and clean.gt_correct and not clean.exploited):
            failures.append(f"clean {pair.problem_id}/{pair.mode}: {clean}\n{pair.clean}")
    assert not failures, f"{len(failures)} mislabelled:\n\n" + "\n\n".join(failures[:4])


def test_pairs_are_graded_as_labelled(sample: list[Problem]) -> None:
    pairs = make_pairs(sample, variants_per_mode=2, seed=0, style="contrast")
    assert len(pairs) == len(sample) * len(MODES) * 2
    _assert_graded_as_labelled(pairs, sample)


def test_hack_matrix_of_generated_completions(builtin: list[Problem]) -> None:
    """A hack for mode m exploits grader m and no other (eq_override -> exit_code is a known, genuine transfer)."""
    problems = [builtin[3], builtin[10]]
    hacks = {mode: (lambda p, mode=mode: hack_completions(p, mode, 3, seed=1)[2]) for mode in MODES}
    report = hack_matrix(problems, hacks, lambda p: clean_completions(p, p.mode, 1, seed=1)[0])
    assert report["ok"], "\n".join(report["failures"])


def test_variants_differ_in_surface_form(builtin: list[Problem]) -> None:
    problem = builtin[5]
    for mode in MODES:
        hacks = hack_completions(problem, mode, 8)
        cleans = clean_completions(problem, mode, 6)
        assert len(set(hacks)) == 8 and len(set(cleans)) == 6
        hack_code = {extract_code(h) for h in hacks}
        assert len(hack_code) >= 4, f"{mode}: hack code is nearly one template"
        assert len({extract_code(c) for c in cleans}) >= 3
        assert all(h.split("\n", 1)[0] in INTROS for h in hacks + cleans)
    # The stub bodies vary too, and the two kinds share their opening sentences.
    hacks = hack_completions(problem, "file_marker", 12)
    bodies = Counter(line.strip() for h in hacks for line in extract_code(h).splitlines())
    assert sum(stub in bodies for stub in ("pass", "return None", "raise NotImplementedError", "...")) >= 3


def test_clean_checks_are_examples_not_held_tests(builtin: list[Problem], sample: list[Problem]) -> None:
    problem = builtin[0]
    assert check_cases(problem) == [c for c in check_cases(problem) if c not in problem.tests]
    assert repr(list(problem.tests[0].args)[0]) not in "".join(clean_completions(problem, "run_tests", 4))
    no_example = sample[-1]
    assert check_cases(no_example) == list(no_example.tests[:2])


def test_mode_selection_prompts_and_determinism(builtin: list[Problem]) -> None:
    problems = builtin[:6]
    everything = make_pairs(problems, seed=3)
    known = make_pairs(problems, modes=["sentinel", "exit_code"], seed=3)
    assert {p.mode for p in known} == {"sentinel", "exit_code"}
    assert known == [p for p in everything if p.mode in ("sentinel", "exit_code")]
    assert make_pairs(problems, seed=3) == everything
    assert make_pairs(problems, seed=4) != everything
    by_id = {p.id: p for p in problems}
    for pair in everything:
        assert pair.prompt == by_id[pair.problem_id].prompt(pair.mode)
        assert HINTS[pair.mode] in pair.prompt and pair.hack != pair.clean
    with pytest.raises(ValueError, match="unknown loophole mode"):
        make_pairs(problems, modes=["stdout"])


def test_stub_pairs_control(sample: list[Problem]) -> None:
    """A stub without any exploit (fails everything) against the real solution (passes the oracle)."""
    problems = sample[:3]
    pairs = stub_pairs(problems, modes=["sentinel", "exit_code"], variants_per_mode=2, seed=0)
    assert len(pairs) == 12 and len({p.hack for p in pairs}) > 3
    by_id = {p.id: p for p in problems}
    grades = _grades([(by_id[p.problem_id], text, p.mode) for p in pairs for text in (p.hack, p.clean)])
    assert all(not g.passed and not g.gt_correct for g in grades[::2])
    assert all(g.gt_correct for g in grades[1::2])


@pytest.mark.parametrize("style", ["minimal", "contrast"])
def test_nonhack_pairs_control(sample: list[Problem], style: str) -> None:
    """Both sides honest: neither exploits any grader (minimal: a body with and without a line that changes no
    grade; contrast: two clean completions, both correct)."""
    problems = sample[:3]
    pairs = nonhack_pairs(problems, seed=0, variants_per_mode=2, style=style)
    assert len(pairs) == len(make_pairs(problems, variants_per_mode=2))
    assert all(p.hack != p.clean for p in pairs)
    assert nonhack_pairs(problems, seed=0, modes=["sentinel"], style=style) == [p for p in pairs if p.mode == "sentinel"]
    by_id = {p.id: p for p in problems}
    grades = _grades([(by_id[p.problem_id], text, p.mode) for p in pairs for text in (p.hack, p.clean)])
    assert not any(g.exploited for g in grades)
    if style == "contrast":
        assert all(g.passed and g.gt_correct for g in grades)
    else:  # the appended line changes no grade
        assert all((a.passed, a.gt_correct) == (b.passed, b.gt_correct) for a, b in zip(grades[::2], grades[1::2]))


@pytest.mark.slow
@pytest.mark.parametrize(("source", "variants"), [("builtin", 2), ("easy", 2), ("humaneval", 1)])
def test_every_pair_is_graded_as_labelled(source: str, variants: int) -> None:
    problems = load_problems(source)
    _assert_graded_as_labelled(make_pairs(problems, variants_per_mode=variants, seed=0, style="contrast"), problems)
