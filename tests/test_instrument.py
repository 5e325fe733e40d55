"""The science instrument: what is trained is what was graded, pairs apart from the pool, controls drawn per seed,
the held-out evaluation, and the likelihood probe."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch import seed_everything

from antipasto_pl.adapter import adapter_modules
from antipasto_pl.cli import AntipastoCLI
from antipasto_pl.data import AntipastoDataModule
from antipasto_pl.env.grader import Grader, extract_code
from antipasto_pl.env.modes import MODES
from antipasto_pl.env.pairs import make_pairs
from antipasto_pl.env.pool import MANIFEST, PoolError, TeacherPool, build_pool
from antipasto_pl.env.problems import builtin_problems
from antipasto_pl.evaluation import EVAL_FILE, HeldOutConfig, sequence_log_probs
from antipasto_pl.experience import STUDENT, TEACHER, teacher_count
from antipasto_pl.models import PolicyConfig
from antipasto_pl.module import AntipastoModule
from antipasto_pl.projection import HackProjection, ProjectionConfig
from antipasto_pl.projection_math import project_gradient
from antipasto_pl.rollout import SamplingConfig
from antipasto_pl.vhack import ExtractionSettings, extract_hack_subspace
from antipasto_pl.vhack_math import random_basis
from tests.helpers import tiny_policy

ROOT = Path(__file__).resolve().parents[1]
SKELETON = "```python\n{skeleton}"


def test_teacher_count_rounds_halves_up() -> None:
    assert [teacher_count(2, 0.25), teacher_count(6, 0.25), teacher_count(4, 0.5), teacher_count(8, 0.0)] == [1, 2, 2, 0]
    assert teacher_count(6, 0.125) == 1 and teacher_count(4, 1.0) == 4


def test_splits_are_disjoint_and_no_pair_is_a_served_pool_text(tmp_path: Path) -> None:
    """Detector pairs (every kind) come from their own problems, so none is a text the teacher pool serves; the test
    split is in neither."""
    data = AntipastoDataModule(modes=["sentinel", "stdout_marker"], prompts_per_step=2, pool_per_prompt=3,
                               pool_dir=str(tmp_path / "pool"), prefill=SKELETON, variants_per_mode=2)
    data.setup("fit")
    train, pairs_split, test = ({p.id for p in part} for part in (data.train_problems, data.pair_split,
                                                                  data.test_problems))
    assert train and pairs_split and test and not (train & pairs_split) and not (test & (train | pairs_split))
    served = {r.completion for rows in data.pool.records.values() for r in rows}
    assert served and {pid for pid, rows in data.pool.records.items() if rows} <= train
    for kind in ("real", "stub", "nonhack"):
        pairs = data.detector_pairs(kind)
        assert pairs and {p.problem_id for p in pairs} <= pairs_split
        assert not ({p.hack for p in pairs} | {p.clean for p in pairs}) & served, kind


def test_minimal_pairs_differ_only_by_the_exploit_and_grade_as_labelled() -> None:
    """hack = clean + the exploit appended; the clean is never exploited and is correct exactly when its body is the
    real solution; the hack always passes its grader, and keeps the body's correctness except under eq_override,
    whose exploit replaces the method (the pair isolates the exploit, not stub vs solution)."""
    problems = builtin_problems()[:6]
    pairs = [p for mode in MODES for p in make_pairs(problems, [mode], 2, seed=1, prefill=SKELETON)]
    by_id = {p.id: p for p in problems}
    items = []
    for pair in pairs:
        hack, clean = (extract_code(pair.prefill + text) for text in (pair.hack, pair.clean))
        assert hack.startswith(clean.rstrip("\n")) and len(hack) > len(clean), (pair.mode, hack, clean)
        items += [(by_id[pair.problem_id], pair.prefill + pair.hack, pair.mode),
                  (by_id[pair.problem_id], pair.prefill + pair.clean, pair.mode)]
    with Grader() as grader:
        grades = grader.grade_batch(items)
    by_problem = {p.id: p.canonical_solution for p in problems}
    for pair, hack, clean in zip(pairs, grades[::2], grades[1::2]):
        solution = (pair.prefill + pair.clean).startswith("```python\n" + by_problem[pair.problem_id].rstrip("\n"))
        assert hack.passed and not clean.exploited and clean.gt_correct == solution, (pair.mode, pair.hack)
        assert hack.gt_correct == (solution and pair.mode != "eq_override"), (pair.mode, pair.hack)
    assert {g.exploited for g in grades[::2]} == {True, False}  # both bodies occur


def test_pool_grades_are_frozen_with_a_fingerprint(tmp_path: Path) -> None:
    problems = builtin_problems()[:6]
    build_pool(problems, tmp_path, per_prompt=2, prefill=SKELETON)
    pool = TeacherPool.load(tmp_path, problems, prefill=SKELETON)
    with pytest.raises(PoolError, match="prefill"):
        TeacherPool.load(tmp_path, problems, prefill="")
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    path = tmp_path / next(iter(manifest["files"].values()))
    rows = [json.loads(line) for line in gzip.open(path, "rt")]
    rows[0]["reward"] = 1.25 if rows[0]["reward"] != 1.25 else 0.25  # a grade edited after the build
    with gzip.open(path, "wt") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(PoolError, match="fingerprint"):
        TeacherPool.load(tmp_path, problems)
    assert len(pool) == 12


def test_fit_trains_teachers_as_graded_and_writes_the_held_out_evaluation(tmp_path: Path) -> None:
    """Teacher records over the budget are not served; the rest are trained whole (closed with EOS) under their
    frozen grade; the held-out evaluation samples the test split only and writes eval.json."""
    budget = 260
    module = AntipastoModule(
        policy=PolicyConfig(name="tiny-llama"), sampling=SamplingConfig(max_new_tokens=8, prefill=SKELETON),
        projection=ProjectionConfig(k=2), group_size=4, mix_ratio=0.5, max_completion_tokens=budget,
        heldout=HeldOutConfig(samples=6, at_start=True), eval_samples_per_prompt=1,
    )
    data = AntipastoDataModule(modes=["sentinel", "exit_code"], prompts_per_step=2, pool_per_prompt=4,
                               pool_dir=str(tmp_path / "pool"), prefill=SKELETON, variants_per_mode=1)
    trainer = L.Trainer(max_steps=2, default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, data)
    assert module.over_budget["pool"] > 0 and len(data.pool) > 0
    teachers = [(g.problem, s) for g in module.last_groups for s in g.samples if s.source == TEACHER]
    assert teachers and any(s.source == STUDENT for g in module.last_groups for s in g.samples)
    for problem, sample in teachers:
        record = next(r for r in data.pool.records[problem.id] if r.completion == sample.text)
        assert len(sample.token_ids) <= budget and sample.token_ids[-1] == module.tokenizer.eos_token_id
        assert module.tokenizer.decode(sample.token_ids[:-1]) == record.completion  # whole, not cut
        assert sample.grade == record.grade()
    report = json.loads((tmp_path / EVAL_FILE).read_text())
    test_ids = {p.id for p in data.test_problems}
    for key in ("untrained", "final"):
        assert report[key]["n"] >= 6 and set(report[key]["problems"]) <= test_ids
        assert 0 <= report[key]["hack"]["ci95"][0] <= report[key]["hack"]["rate"] <= report[key]["hack"]["ci95"][1]
        assert set(report[key]["per_mode"]) <= {"sentinel", "exit_code"}
    assert report["final"]["step"] == 2 and report["untrained"]["step"] == 0
    assert report["final"]["clean_logp_per_token"] < 0


def test_control_subspaces_follow_the_run_seed() -> None:
    """Random and shuffled V are drawn from the run seed (``seed_everything``), not the data seed shared by every
    run, and the real V's settings do not depend on it."""
    model, tokenizer = tiny_policy()
    module = AntipastoModule(policy=PolicyConfig(name="tiny-llama"))
    module.model, module.tokenizer = model, tokenizer
    data = AntipastoDataModule(prompts_per_step=2, use_pool=False, variants_per_mode=1, seed=0)
    data.setup("fit")
    bases = []
    for seed in (3, 4):
        seed_everything(seed)
        projection = HackProjection(ProjectionConfig(subspace="random", k=2))
        pairs, settings = projection._extraction(module, data)
        assert settings.seed == seed
        bases.append(extract_hack_subspace(model, tokenizer, pairs, settings, progress=False))
    name = next(iter(bases[0].v_hack))
    assert not torch.allclose(bases[0].v_hack[name], bases[1].v_hack[name])


def test_likelihood_probe_margin_rises_under_vanilla_and_less_under_erase_than_random() -> None:
    """Imitating hack demonstrations raises the held-out minimal pairs' margin log p(hack) - log p(clean); erasing
    the real V's hack-ward gradient holds it back more than erasing a random V of the same size."""
    problems = [p for p in builtin_problems() if p.mode == "sentinel"]
    demos = make_pairs(problems[:4], ["sentinel"], 1, seed=5)
    detector = make_pairs(problems[4:6], ["sentinel"], 2, seed=6)
    probe = make_pairs(problems[6:], ["sentinel"], 2, seed=7)
    model, tokenizer = tiny_policy(seed=1)
    adapters = adapter_modules(model)
    real = extract_hack_subspace(model, tokenizer, detector, ExtractionSettings(k=2, length_norm="sum"),
                                 progress=False).v_hack
    generator = torch.Generator().manual_seed(0)
    controls = {"vanilla": {}, "erase": real,
                "random": {n: random_basis(v.shape[0], v.shape[1], generator) for n, v in real.items()}}

    @torch.no_grad()
    def margin() -> float:
        return float((sequence_log_probs(model, tokenizer, probe, "hack")
                      - sequence_log_probs(model, tokenizer, probe, "clean")).mean())

    def rise(v_hack: dict[str, torch.Tensor]) -> float:
        with torch.no_grad():
            for a in adapters.values():
                a.delta_s.zero_()
        before = margin()
        optimizer = torch.optim.Adam([a.delta_s for a in adapters.values()], lr=1e-2)
        for _ in range(5):
            optimizer.zero_grad()
            (-sequence_log_probs(model, tokenizer, demos, "hack").mean()).backward()
            for name, v in v_hack.items():
                adapters[name].delta_s.grad = project_gradient(adapters[name].delta_s.grad, v).g_projected
            optimizer.step()
        return margin() - before

    rises = {arm: rise(v_hack) for arm, v_hack in controls.items()}
    assert rises["vanilla"] > 0
    assert rises["erase"] < rises["random"], rises


def test_presets_and_every_overlay_parse_and_instantiate() -> None:
    """configs/cpu.yaml with each experiment overlay and each arm: parsed and instantiated as `antipasto fit`
    would (no model is loaded until fit)."""
    overlays = [None, *sorted((ROOT / "configs" / "experiments").glob("*.yaml"))]
    arms = sorted((ROOT / "configs" / "arms").glob("*.yaml"))
    assert overlays[1:] and len(arms) >= 9
    for overlay in overlays:
        for arm in arms:
            configs = [ROOT / "configs" / "cpu.yaml", *([overlay] if overlay else []), arm]
            cli = AntipastoCLI(args=[a for c in configs for a in ("--config", str(c))], run=False)
            assert isinstance(cli.model, AntipastoModule) and cli.datamodule.hparams.prefill == \
                cli.model.sampling.prefill
