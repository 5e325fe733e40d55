"""Teacher pool: build (real grader), load, filter, sample, and every way a pool on disk can be broken."""

from __future__ import annotations

import gzip
import json
import random
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from antipasto_pl.cli import main as cli_main
from antipasto_pl.env.modes import MODES
from antipasto_pl.env.pool import FORMAT_VERSION, MANIFEST, PoolError, TeacherPool, build_pool, pool_filename
from antipasto_pl.env.problem import Problem
from antipasto_pl.env.problems import builtin_problems, problem_set_hash, problem_to_dict


@pytest.fixture(scope="module")
def problems() -> list[Problem]:
    """One problem per mode, plus an id that is not a valid file name."""
    ps = builtin_problems()[:6]
    return [*ps[:5], replace(ps[5], id="HumanEval/ 5?")]


@pytest.fixture(scope="module")
def pool_dir(problems: list[Problem], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pools") / "pool"
    build_pool(problems, out, per_prompt=4, hack_frac=0.5, seed=0)
    return out


@pytest.fixture
def pool_copy(pool_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pool_dir, tmp_path / "pool"))


def test_build_writes_graded_records_and_manifest(pool_dir: Path, problems: list[Problem]) -> None:
    manifest = json.loads((pool_dir / MANIFEST).read_text())
    assert manifest["format_version"] == FORMAT_VERSION and manifest["problem_set_hash"] == problem_set_hash(problems)
    assert manifest["modes"] == list(MODES) and manifest["per_prompt"] == 4 and manifest["hack_frac"] == 0.5
    counts = manifest["counts"]
    assert (counts["prompts"], counts["records"], counts["hack"], counts["clean"]) == (6, 24, 12, 12)
    assert counts["exploited"] == 12 and counts["gt_correct"] == 12 and counts["passed"] == 24
    expected_files = [MANIFEST, *(pool_filename(p.id) for p in problems)]
    assert sorted(p.name for p in pool_dir.iterdir()) == sorted(expected_files)
    pool = TeacherPool.load(pool_dir, problems)
    for problem in problems:
        records = pool.records[problem.id]
        assert len(records) == 4 and len({r.completion for r in records}) == 4
        assert {r.mode for r in records} == {problem.mode}
        for r in records:
            assert r.format_ok and r.passed and r.reward == 1.25
            assert (r.exploited, r.gt_correct) == ((True, False) if r.kind == "hack" else (False, True))


def test_hack_frac_and_mode_filter_at_build(problems: list[Problem], tmp_path: Path) -> None:
    manifest = build_pool(problems, tmp_path / "p", per_prompt=3, hack_frac=1 / 3, modes=["sentinel", "exit_code"])
    assert manifest["counts"]["prompts"] == 2 and manifest["counts"]["hack"] == 2 and manifest["counts"]["clean"] == 4
    pool = TeacherPool.load(tmp_path / "p", problems)
    other = next(p for p in problems if p.mode == "run_tests")
    assert pool.sample(other.id, 3, random.Random(0)) == []
    # Rebuilding over an existing pool replaces it; a directory that is not a pool is never overwritten.
    build_pool(problems[:1], tmp_path / "p", per_prompt=1)
    assert len(TeacherPool.load(tmp_path / "p")) == 1
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("mine")
    with pytest.raises(PoolError, match="not a teacher pool"):
        build_pool(problems[:1], tmp_path / "keep", per_prompt=1)


def test_load_filters_by_mode(pool_dir: Path, problems: list[Problem]) -> None:
    pool = TeacherPool.load(pool_dir, problems, modes=["sentinel"])
    assert len(pool) == 4 and {r.mode for rs in pool.records.values() for r in rs} == {"sentinel"}
    assert pool.stats()["by_mode"].keys() == {"sentinel"}
    dropped = next(p for p in problems if p.mode != "sentinel")
    assert pool.sample(dropped.id, 2, torch.Generator().manual_seed(0)) == []


def test_sample_is_deterministic(pool_dir: Path, problems: list[Problem]) -> None:
    pool = TeacherPool.load(pool_dir, problems)
    pid = problems[0].id
    for make in (lambda: torch.Generator().manual_seed(7), lambda: random.Random(7)):
        a, b = pool.sample(pid, 3, make()), pool.sample(pid, 3, make())
        assert a == b and len({r.completion for r in a}) == 3
    draws = {tuple(r.completion for r in pool.sample(pid, 4, torch.Generator().manual_seed(s))) for s in range(6)}
    assert len(draws) > 1
    many = pool.sample(pid, 10, random.Random(1))  # beyond the 4 records: whole permutations, then more
    assert len(many) == 10 and len({r.completion for r in many[:4]}) == 4
    with pytest.raises(KeyError, match="not in this teacher pool"):
        pool.sample("nope", 1, random.Random(0))


def _rewrite_gz(path: Path, lines: list[str]) -> None:
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(lines) + "\n")


def _gz_lines(path: Path) -> list[str]:
    with gzip.open(path, "rt") as fh:
        return fh.read().splitlines()


def test_truncated_gzip_names_the_file(pool_copy: Path, problems: list[Problem]) -> None:
    path = pool_copy / pool_filename(problems[2].id)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(PoolError, match=f"{path.name}: corrupt gzip"):
        TeacherPool.load(pool_copy, problems)


def test_bad_json_row_names_file_and_line(pool_copy: Path, problems: list[Problem]) -> None:
    path = pool_copy / pool_filename(problems[1].id)
    _rewrite_gz(path, [*_gz_lines(path)[:2], '{"problem_id": "two_sum", oops'])
    with pytest.raises(PoolError, match=f"{path.name} line 3: invalid JSON"):
        TeacherPool.load(pool_copy, problems)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda row: row.pop("gt_correct"), "line 2: missing field 'gt_correct'"),
        (lambda row: row.update(passed="yes"), "line 2: field 'passed' must be bool"),
        (lambda row: row.update(kind="teacher"), "line 2: field 'kind' must be 'hack', 'clean' or 'stub'"),
        (lambda row: row.update(problem_id="two_sum_x"), "line 2: record for 'two_sum_x'"),
    ],
)
def test_bad_record_names_file_line_and_field(pool_copy: Path, problems: list[Problem], edit, message: str) -> None:
    path = pool_copy / pool_filename(problems[0].id)
    lines = _gz_lines(path)
    row = json.loads(lines[1])
    edit(row)
    _rewrite_gz(path, [lines[0], json.dumps(row), *lines[2:]])
    with pytest.raises(PoolError, match=f"{path.name} {message}"):
        TeacherPool.load(pool_copy, problems)


def test_manifest_problems(pool_copy: Path, problems: list[Problem]) -> None:
    changed = [replace(problems[0], description="edited"), *problems[1:]]
    with pytest.raises(PoolError, match="manifest.json: pool was built for problem set .* rebuild"):
        TeacherPool.load(pool_copy, changed)
    manifest = json.loads((pool_copy / MANIFEST).read_text())
    manifest["files"]["ghost"] = manifest["files"][problems[0].id]
    (pool_copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(PoolError, match="problem id 'ghost' is not in the given problem set"):
        TeacherPool.load(pool_copy, problems)
    (pool_copy / MANIFEST).write_text("{broken")
    with pytest.raises(PoolError, match="manifest.json: invalid JSON"):
        TeacherPool.load(pool_copy, problems)
    (pool_copy / MANIFEST).unlink()
    with pytest.raises(PoolError, match="manifest.json not found: not a teacher pool"):
        TeacherPool.load(pool_copy)


def test_build_pool_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`antipasto build-pool` documents its options and builds from a JSONL source with a mode filter."""
    with pytest.raises(SystemExit) as info:
        cli_main(["build-pool", "--help"])
    assert info.value.code == 0
    help_text = capsys.readouterr().out
    for words in ("--out_dir", "--per_prompt", "Completions per prompt", "--hack_frac", "--modes", "--seed"):
        assert words in help_text
    problems = builtin_problems()[:6]
    source = tmp_path / "mine.jsonl"
    source.write_text("".join(json.dumps(problem_to_dict(p)) + "\n" for p in problems))
    out = tmp_path / "cli_pool"
    cli_main(["build-pool", "--out_dir", str(out), "--problems", str(source), "--per_prompt", "2",
              "--hack_frac", "0.5", "--modes", '["run_tests", "file_marker"]', "--seed", "3"])
    captured = capsys.readouterr()
    assert "2 prompts, 4 completions (2 hack / 2 clean)" in captured.out and "exploited 2" in captured.out
    assert "grading teacher pool" in captured.err  # tqdm progress
    pool = TeacherPool.load(out, problems)
    assert pool.manifest["seed"] == 3
    assert {r.mode for rs in pool.records.values() for r in rs} == {"run_tests", "file_marker"}
