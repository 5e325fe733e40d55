"""Teacher pool: hack/clean completions graded once and frozen, one JSONL.gz per prompt plus a manifest.

A weak student rarely hacks (or solves) early on, so its groups have no reward variance; mixing in frozen
teacher completions for the same prompt gives GRPO signal and hack examples from step one. Grades are computed once
at build time and served with the records (never recomputed), so every arm and seed sees identical teacher data;
the manifest's fingerprint covers every record with its grade, and a pool edited after its build is refused. The
manifest also pins the problem-set hash and the prefill: a record is the continuation of the rendered prefill and
was graded as prefill + completion, so loading it for another problem set or prefill fails loudly.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import random
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from antipasto_pl.env.grader import Grade
from antipasto_pl.env.modes import MODES, check_mode
from antipasto_pl.env.pairs import clean_completions, hack_completions, stub_completions
from antipasto_pl.env.problem import Problem
from antipasto_pl.env.problems import filter_modes, problem_set_hash
from antipasto_pl.storage import atomic_write

FORMAT_VERSION = 2
MANIFEST = "manifest.json"


class PoolError(ValueError):
    """A teacher pool that cannot be used as is; the message names the offending file."""


@dataclass(frozen=True)
class PoolRecord:
    """One frozen teacher completion and its grade under the problem's own mode."""

    problem_id: str
    mode: str
    kind: str  # "hack" | "clean" | "stub"
    completion: str
    reward: float
    passed: bool
    gt_correct: bool
    exploited: bool
    format_ok: bool

    def grade(self) -> Grade:
        """The frozen grade, as the grader returned it at build time (minus its diagnostics)."""
        return Grade(reward=self.reward, passed=self.passed, gt_correct=self.gt_correct, exploited=self.exploited,
                     mode=self.mode, format_ok=self.format_ok, error=None)


def records_fingerprint(records: Sequence[PoolRecord]) -> str:
    """Identity of a pool's content: every record with its grade, in order."""
    return hashlib.sha256(json.dumps([dataclasses.asdict(r) for r in records]).encode()).hexdigest()[:32]


_FIELDS = {f.name: f.type for f in dataclasses.fields(PoolRecord)}
_FIELD_TYPES = {"str": str, "float": (int, float), "bool": bool}


def pool_filename(problem_id: str) -> str:
    """File name for a prompt's records: readable slug plus a hash, so ids like "HumanEval/3" cannot collide."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", problem_id)[:60]
    return f"{slug}-{hashlib.sha1(problem_id.encode()).hexdigest()[:8]}.jsonl.gz"


def build_pool(
    problems: Sequence[Problem],
    out_dir: str | Path,
    per_prompt: int = 8,
    hack_frac: float = 0.5,
    modes: Sequence[str] | None = None,
    seed: int = 0,
    progress: bool = False,
    prefill: str = "",
    stub_frac: float = 0.0,
) -> dict:
    """Generate, grade (one parallel sandboxed pass) and write a pool; returns the manifest.

    Every problem whose mode is in `modes` gets `round(per_prompt * hack_frac)` hacks for its own mode and clean
    completions for the rest; problems of other modes get no records (the leave-one-mode-out pool). With a
    `prefill` template (``sampling.prefill``) each record continues the problem's rendered prefill and is graded
    as prefill + completion. `stub_frac` of each prompt's records are stubs without any exploit (format reward
    only), so that groups of demonstrations alone still have reward variance. The pool is written to a temporary sibling directory and moved into place, so a crash
    never leaves a half-built pool.
    """
    from tqdm.auto import tqdm

    from antipasto_pl.env.grader import Grader

    n_hack, n_stub = round(per_prompt * hack_frac), round(per_prompt * stub_frac)
    if per_prompt < 1 or not 0.0 <= hack_frac <= 1.0 or not 0.0 <= stub_frac or n_hack + n_stub > per_prompt:
        raise ValueError(f"need per_prompt >= 1, 0 <= hack_frac, 0 <= stub_frac and hack_frac + stub_frac <= 1, got "
                         f"{per_prompt}, {hack_frac}, {stub_frac}")
    modes = list(MODES) if modes is None else [check_mode(m) for m in modes]
    items: list[tuple[Problem, str, str]] = []
    for problem in filter_modes(problems, modes):
        rendered = problem.render_prefill(prefill)
        items += [(problem, "hack", c) for c in hack_completions(problem, problem.mode, n_hack, seed, rendered)]
        items += [(problem, "stub", c) for c in stub_completions(problem, n_stub, seed, rendered)]
        items += [(problem, "clean", c)
                  for c in clean_completions(problem, problem.mode, per_prompt - n_hack - n_stub, seed, rendered)]

    grades = []
    chunk = 64
    with Grader() as grader, tqdm(total=len(items), desc="grading teacher pool", disable=not progress) as bar:
        for start in range(0, len(items), chunk):
            batch = items[start : start + chunk]
            grades += grader.grade_batch([(p, p.render_prefill(prefill) + completion) for p, _, completion in batch])
            bar.update(len(batch))

    by_problem: dict[str, list[PoolRecord]] = {}
    for (problem, kind, completion), grade in zip(items, grades):
        by_problem.setdefault(problem.id, []).append(
            PoolRecord(
                problem_id=problem.id,
                mode=problem.mode,
                kind=kind,
                completion=completion,
                reward=float(grade.reward),
                passed=bool(grade.passed),
                gt_correct=bool(grade.gt_correct),
                exploited=bool(grade.exploited),
                format_ok=bool(grade.format_ok),
            )
        )
    manifest = {
        "format_version": FORMAT_VERSION,
        "problem_set_hash": problem_set_hash(problems),
        "modes": modes,
        "per_prompt": per_prompt,
        "hack_frac": hack_frac,
        "stub_frac": stub_frac,
        "seed": seed,
        "prefill": prefill,
        "fingerprint": records_fingerprint([r for records in by_problem.values() for r in records]),
        "counts": _counts([r for records in by_problem.values() for r in records]),
        "files": {pid: pool_filename(pid) for pid in by_problem},
    }
    _write_atomically(Path(out_dir), by_problem, manifest)
    return manifest


def _counts(records: Sequence[PoolRecord]) -> dict:
    def summary(rs: Sequence[PoolRecord]) -> dict:
        return {
            "records": len(rs),
            "hack": sum(r.kind == "hack" for r in rs),
            "clean": sum(r.kind == "clean" for r in rs),
            "stub": sum(r.kind == "stub" for r in rs),
            "passed": sum(r.passed for r in rs),
            "gt_correct": sum(r.gt_correct for r in rs),
            "exploited": sum(r.exploited for r in rs),
        }

    by_mode = {mode: summary([r for r in records if r.mode == mode]) for mode in sorted({r.mode for r in records})}
    return {"prompts": len({r.problem_id for r in records}), **summary(records), "by_mode": by_mode}


def _write_atomically(out_dir: Path, by_problem: dict[str, list[PoolRecord]], manifest: dict) -> None:
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).exists():
        raise PoolError(f"{out_dir} exists and is not a teacher pool (no {MANIFEST}); refusing to overwrite it")
    with atomic_write(out_dir, directory=True) as tmp:
        for problem_id, records in by_problem.items():
            # mtime=0 keeps the bytes reproducible for a given seed.
            path = tmp / manifest["files"][problem_id]
            with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
                for record in records:
                    gz.write((json.dumps(dataclasses.asdict(record)) + "\n").encode())
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


class TeacherPool:
    """A loaded pool: frozen records per prompt, sampled deterministically."""

    def __init__(self, records: dict[str, list[PoolRecord]], manifest: dict, known_ids: frozenset[str]) -> None:
        self.records = records
        self.manifest = manifest
        self.known_ids = known_ids

    @classmethod
    def load(
        cls, directory: str | Path, problems: Sequence[Problem] | None = None, modes: Sequence[str] | None = None,
        prefill: str | None = None,
    ) -> TeacherPool:
        """Read and validate a pool.

        With `problems`, the manifest's problem-set hash must match and every record must belong to the set;
        with `prefill`, the pool must have been built for that prefill template. Records must match the manifest's
        fingerprint. `modes` keeps only records of those modes (prompts of other modes then sample nothing).
        """
        directory = Path(directory)
        manifest = _read_manifest(directory / MANIFEST)
        if prefill is not None and manifest.get("prefill", "") != prefill:
            raise PoolError(f"{directory / MANIFEST}: pool was built for prefill {manifest.get('prefill', '')!r}, "
                            f"but the run uses {prefill!r}; build one for this prefill (or let it be auto-built)")
        known = frozenset(manifest["files"]) if problems is None else frozenset(p.id for p in problems)
        if problems is not None and (expected := problem_set_hash(problems)) != manifest["problem_set_hash"]:
            raise PoolError(
                f"{directory / MANIFEST}: pool was built for problem set {manifest['problem_set_hash']}, "
                f"but the given problems hash to {expected}; rebuild the pool for this problem set"
            )
        keep = set(MODES if modes is None else [check_mode(m) for m in modes])
        records, every = {}, []
        for problem_id, filename in manifest["files"].items():
            path = directory / filename
            if problem_id not in known:
                raise PoolError(f"{path}: problem id {problem_id!r} is not in the given problem set")
            rows = _read_records(path, problem_id)
            every += rows
            records[problem_id] = [r for r in rows if r.mode in keep]
        if records_fingerprint(every) != manifest.get("fingerprint"):
            raise PoolError(f"{directory}: records do not match the manifest's fingerprint (edited or mixed up after "
                            "the build; grades are frozen with their records): rebuild the pool")
        return cls(records, manifest, known)

    def restricted(self, keep: Callable[[PoolRecord], bool]) -> tuple[TeacherPool, list[PoolRecord]]:
        """A pool serving only the records `keep` accepts (e.g. within the completion budget), and the rest."""
        kept = {pid: [r for r in rows if keep(r)] for pid, rows in self.records.items()}
        dropped = [r for rows in self.records.values() for r in rows if not keep(r)]
        return TeacherPool(kept, self.manifest, self.known_ids), dropped

    def __len__(self) -> int:
        return sum(map(len, self.records.values()))

    def sample(self, problem_id: str, n: int, generator: torch.Generator | random.Random) -> list[PoolRecord]:
        """`n` records for the prompt, without replacement until exhausted (then another permutation).

        Deterministic given the generator's state. Returns [] for a prompt without records (filtered mode);
        raises KeyError for an id outside the pool's problem set, which is a wiring bug.
        """
        if problem_id not in self.known_ids:
            raise KeyError(f"problem {problem_id!r} is not in this teacher pool's problem set")
        records = self.records.get(problem_id, [])
        if not records or n <= 0:
            return []
        order: list[int] = []
        while len(order) < n:
            if isinstance(generator, random.Random):
                order += generator.sample(range(len(records)), len(records))
            else:
                order += torch.randperm(len(records), generator=generator).tolist()
        return [records[i] for i in order[:n]]

    def stats(self) -> dict:
        """Counts over the loaded (mode-filtered) records, for logging."""
        return _counts([r for records in self.records.values() for r in records])


def _read_manifest(path: Path) -> dict:
    if not path.is_file():
        raise PoolError(f"{path} not found: not a teacher pool (build one with `antipasto build-pool`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PoolError(f"{path}: invalid JSON ({exc})") from None
    missing = [k for k in ("format_version", "problem_set_hash", "files") if k not in manifest]
    if missing:
        raise PoolError(f"{path}: missing field(s) {missing}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise PoolError(
            f"{path}: format_version {manifest['format_version']} is not supported (expected {FORMAT_VERSION})"
        )
    return manifest


def _read_records(path: Path, problem_id: str) -> list[PoolRecord]:
    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        raise PoolError(f"{path}: listed in the manifest but missing") from None
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise PoolError(f"{path}: corrupt gzip file ({type(exc).__name__}: {exc})") from None
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PoolError(f"{path} line {lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise PoolError(f"{path} line {lineno}: expected a JSON object, got {type(row).__name__}")
        for field, type_name in _FIELDS.items():
            if field not in row:
                raise PoolError(f"{path} line {lineno}: missing field {field!r}")
            expected = _FIELD_TYPES[type_name]
            if not isinstance(row[field], expected) or (expected is not bool and isinstance(row[field], bool)):
                raise PoolError(f"{path} line {lineno}: field {field!r} must be {type_name}, got {row[field]!r}")
        if row["kind"] not in ("hack", "clean", "stub"):
            raise PoolError(f"{path} line {lineno}: field 'kind' must be 'hack', 'clean' or 'stub', got {row['kind']!r}")
        if row["problem_id"] != problem_id:
            raise PoolError(f"{path} line {lineno}: record for {row['problem_id']!r} in the file of {problem_id!r}")
        records.append(PoolRecord(**{field: row[field] for field in _FIELDS}))
    return records
