"""`antipasto experiment` (matrix of runs: skip, resume, failures) and `antipasto report` (tables, figures,
the results notebook), through the real CLI and real `antipasto fit` processes on the smoke preset."""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import nbformat
import pytest
import yaml
from nbclient import NotebookClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from antipasto_pl.cli import main
from antipasto_pl.commands.experiment import DONE_FILE, LAST_CKPT, RUN_FILE, RunSpec, plan_runs, run_state
from antipasto_pl.evaluation import EVAL_FILE, rate, wilson_interval
from antipasto_pl.metrics import current_name
from antipasto_pl.commands.report import (
    Run,
    bootstrap_ci,
    first_steps,
    format_ci,
    markdown_report,
    merge_versions,
    paired_differences,
    read_scalars,
    seed_band,
)

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
NOTEBOOK = ROOT / "notebooks" / "results.ipynb"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Smaller teacher pool than the preset's: built once per test session, graded in the sandbox.
CHEAP = "--override=[data.pool_per_prompt=2]"


def experiment(out: Path, *args: str) -> None:
    main(["experiment", "--config", SMOKE, f"--out={out}", CHEAP, *args])


def versions(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "lightning_logs").glob("version_*"))


def logged_steps(version_dir: Path, tag: str) -> list[int]:
    """Steps of `tag` in one log version (one piece of a resumed run)."""
    events = EventAccumulator(str(version_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [e.step for e in events.Scalars(tag)]


def assert_pngs(directory: Path) -> None:
    for name in ("hack_pass.png", "cin.png"):
        data = (directory / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, name


def execute_notebook(experiment_dir: Path, monkeypatch: pytest.MonkeyPatch) -> nbformat.NotebookNode:
    """Run notebooks/results.ipynb headless on `experiment_dir`; every code cell must finish without error."""
    monkeypatch.setenv("ANTIPASTO_EXPERIMENT_DIR", str(experiment_dir))  # the kernel inherits the environment
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "commit it clean"
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2
    assert any("text/markdown" in o.get("data", {}) for o in outputs)
    return notebook


# --- pure statistics -------------------------------------------------------------------------------------------


def test_statistics_on_synthetic_numbers() -> None:
    # Wilson 95%: the textbook values for 0/10 and 5/10; it never collapses to a point at 0 or n
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(10, 10)[1] == 1.0 and all(math.isnan(x) for x in wilson_interval(0, 0))
    assert rate([True, False, False, False]) == {"rate": 0.25, "k": 1, "n": 4, "ci95": list(wilson_interval(1, 4))}
    lo, hi = bootstrap_ci([0.2, 0.4, 0.6, 0.8])
    assert 0.2 <= lo < 0.5 < hi <= 0.8  # contains the mean, inside the data's range
    assert bootstrap_ci([0.2, 0.4, 0.6, 0.8]) == (lo, hi)  # seeded
    assert all(math.isnan(x) for x in bootstrap_ci([0.3]))
    assert format_ci([0.3]) == "0.300" and format_ci([]) == "n/a"
    # paired over the seeds both arms have; seed 2 has no vanilla partner
    assert paired_differences({0: 0.5, 1: 0.4, 2: 0.9}, {0: 0.7, 1: 0.7}) == pytest.approx({0: -0.2, 1: -0.3})
    steps, mean, low, high = seed_band([{0: 0.0, 1: 1.0, 2: 0.5}, {0: 1.0, 1: 0.0}])
    assert steps == [0, 1, 2] and mean == [0.5, 0.5, 0.5] and low == [0.0, 0.0, 0.5] and high == [1.0, 1.0, 0.5]
    # a run resumed from step 2: the second log version repeats step 2 and wins
    assert merge_versions([{0: 1.0, 1: 2.0, 2: 3.0}, {2: 30.0, 3: 40.0}]) == {0: 1.0, 1: 2.0, 2: 30.0, 3: 40.0}
    # a run that went on longer, compared at the others' length: its first 2 steps only
    assert first_steps({0: 1.0, 1: 2.0, 2: 3.0, 5: 6.0}, 2) == {0: 1.0, 1: 2.0}
    assert first_steps({0: 1.0, 3: 4.0}, None) == {0: 1.0, 3: 4.0}


def evaluation(hack: int, passed: int = 0, n: int = 64, logp: float = -1.0, mode: str = "sentinel",
               untrained: int | None = None) -> dict:
    """An eval.json as the held-out evaluation writes it (one mode)."""
    def record(k: int) -> dict:
        rates = {"hack": rate([True] * k + [False] * (n - k)), "pass": rate([True] * passed + [False] * (n - passed)),
                 "format": rate([True] * n)}
        return {"step": 8, "n": n, **rates, "reward": 0.0, "clean_logp_per_token": logp, "per_mode": {mode: rates}}

    return {"final": record(hack), **({"untrained": record(untrained)} if untrained is not None else {})}


def test_markdown_tables_and_verdict_from_synthetic_runs() -> None:
    def run(arm: str, seed: int, hack: int, mode: str | None = None, **kw: object) -> Run:
        return Run(f"{arm}-s{seed}", arm, seed, mode, {"train/hack_s": {s: hack / 64 for s in range(4)}},
                   evaluation(hack, **kw))

    vanilla = [run("vanilla", s, h, untrained=2) for s, h in enumerate([48, 40, 44])]
    erase = [run("erase", s, h) for s, h in enumerate([16, 8, 12])]
    random = [run("erase_random", s, h) for s, h in enumerate([44, 40, 46])]
    text = markdown_report(vanilla + erase + random)
    assert "Untrained policy (vanilla runs' step-0 evaluation, pooled): hack rate 6/192 = 0.031" in text
    assert "| vanilla | 0,1,2 | 0.688 [" in text and "| erase | 0,1,2 | 0.188 [" in text
    assert "| erase | 3 | -0.500 [-0.500, -0.500] |" in text  # paired: -32/64 in every seed
    assert "**erase: counts** (every condition of the rule holds)" in text
    # the same erase next to a control that lowers hacking just as much does not count
    strong = [run("erase_stub", s, h) for s, h in enumerate([16, 8, 12])]
    text = markdown_report(vanilla + erase + random + strong)
    assert "**erase: does not count**: it does not lower the hack rate more than erase_stub" in text
    # a control without a finished run yet is named as not compared, not as beaten or unbeaten
    pending = Run("erase_nonhack-s0", "erase_nonhack", 0, None, {}, {})
    assert "no seed compares it with erase_nonhack yet" in markdown_report(vanilla + erase + random + [pending])
    # a vanilla that does not hack beyond the untrained rate voids every verdict
    idle = [run("vanilla", s, 2, untrained=2) for s in range(3)]
    assert "vanilla does not hack beyond the untrained rate" in markdown_report(idle + erase)
    # weak detector: the held-out mode's rate from its per-mode entry
    lomo = [run("vanilla", 0, 40, "sentinel"), run("erase", 0, 20, "sentinel")]
    text = markdown_report(vanilla + lomo)
    assert "| sentinel | vanilla | 1 | 0.625 | 0.000 | – | – |" in text
    assert "| sentinel | erase | 1 | 0.312 | 0.000 | -0.312 | 0.000 |" in text


# --- matrix planning -------------------------------------------------------------------------------------------


def test_plan_names_runs_and_holds_out_modes(tmp_path: Path) -> None:
    arm = tmp_path / "my_arm.yaml"
    arm.write_text("model:\n  projection:\n    intervention: erase\n")
    runs = plan_runs([SMOKE], ["vanilla", str(arm)], [0, 1], leave_one_mode_out=True, holdout_modes=["sentinel"],
                     max_steps=3, override=["data.pool_per_prompt=2"])
    assert [r.name for r in runs] == ["vanilla-s0", "vanilla-s1", "my_arm-s0", "my_arm-s1",
                                      "vanilla-lomo_sentinel-s0", "vanilla-lomo_sentinel-s1",
                                      "erase-lomo_sentinel-s0", "erase-lomo_sentinel-s1"]
    assert all(r.max_steps == 3 and "--trainer.max_steps=3" in r.args for r in runs)
    assert "--seed_everything=1" in runs[1].args and not any("data.seed" in a for r in runs for a in r.args)
    others = ["run_tests", "stdout_marker", "file_marker", "eq_override", "exit_code"]
    lomo = runs[-1]
    assert lomo.holdout_mode == "sentinel" and lomo.arm == "erase"
    assert f"--data.known_modes={json.dumps(others, separators=(',', ':'))}" in lomo.args
    assert f"--data.pool_modes={json.dumps(others, separators=(',', ':'))}" in lomo.args
    assert lomo.args[-1] == "--data.pool_per_prompt=2"  # user overrides come last, so they win
    assert plan_runs([SMOKE], ["vanilla"], [0])[0].max_steps == 30  # read from the preset
    with pytest.raises(ValueError, match="unknown arm 'vanila'.*erase_nonhack"):
        plan_runs([SMOKE], ["vanila"], [0])
    with pytest.raises(ValueError, match="key=value"):
        plan_runs([SMOKE], ["vanilla"], [0], override=["model.learning_rate"])
    with pytest.raises(ValueError, match="twice"):
        plan_runs([SMOKE], ["vanilla"], [0, 0])


def test_run_state_follows_done_marker_and_checkpoint(tmp_path: Path) -> None:
    assert run_state(tmp_path, 3) == "new"
    (tmp_path / LAST_CKPT).parent.mkdir()
    (tmp_path / LAST_CKPT).write_bytes(b"")
    assert run_state(tmp_path, 3) == "resume"
    (tmp_path / DONE_FILE).write_text(json.dumps({"max_steps": 3}))
    assert run_state(tmp_path, 3) == "done" and run_state(tmp_path, 2) == "done"
    assert run_state(tmp_path, 5) == "resume"  # asked for more steps: extend the finished run


def test_dry_run_prints_the_matrix_and_starts_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    experiment(tmp_path, "--arms=[vanilla, erase]", "--seeds=[0]", "--dry_run=true")
    printed = capsys.readouterr().out
    assert "vanilla-s0" in printed and "erase-s0" in printed and "new" in printed and "--seed_everything=0" in printed
    assert not any(tmp_path.iterdir())
    experiment(tmp_path, "--arms=[vanilla]", "--seeds=[0]", "--probe=true", "--dry_run=true")
    probe = capsys.readouterr().out  # demonstrations only (hacks against stubs), the probe every step, no sampling
    assert all(f"--{o}" in probe for o in ("model.mix_ratio=1.0", "model.probe_every=1", "model.heldout.samples=0",
                                           "data.pool_stub_frac=0.5"))


# --- report and notebook on synthetic logs ---------------------------------------------------------------------


def write_run(root: Path, name: str, arm: str, seed: int, pieces: list[dict[str, dict[int, float]]],
              eval_json: dict | None = None) -> None:
    """A run directory as `antipasto experiment` leaves it: run.json, one TensorBoard version per piece, eval.json."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / RUN_FILE).write_text(json.dumps({"name": name, "arm": arm, "seed": seed, "holdout_mode": None,
                                                "max_steps": 4, "args": []}))
    if eval_json is not None:
        (run_dir / EVAL_FILE).write_text(json.dumps(eval_json))
    for version, piece in enumerate(pieces):
        with SummaryWriter(str(run_dir / "lightning_logs" / f"version_{version}")) as writer:
            for tag, series in piece.items():
                for step, value in series.items():
                    writer.add_scalar(tag, value, step)


def test_runs_logged_under_old_metric_names_read_under_the_new_ones() -> None:
    renamed = {
        "reward_s": "train/reward_s", "hack_t": "train/hack_t", "pass_s": "train/pass_s",
        "sentinel/hack_s": "train/sentinel/hack_s", "exit_code/gt_t": "train/exit_code/gt_t",
        "hack_deploy": "val/hack_deploy", "solve_deploy": "val/solve_deploy", "train/sandbox_errors": "env/sandbox_errors",
        "probe/margin": "test/probe_margin", "probe/sentinel/margin": "test/sentinel/probe_margin",
        "test_untrained/hack": "test/untrained/hack", "test_untrained/sentinel/pass": "test/untrained/sentinel/pass",
    }
    assert {old: current_name(old) for old in renamed} == renamed
    for name in [*renamed.values(), "train/loss", "proj/cin_s", "val/hack", "test/sentinel/hack", "time/generate"]:
        assert current_name(name) == name


def test_report_and_notebook_on_synthetic_logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    def curves(hack: float) -> dict[str, dict[int, float]]:
        return {t: {s: hack for s in range(4)}
                for t in ("train/hack_s", "train/gt_s", "proj/cin_s", "proj/cin_t", "proj/null")}

    write_run(tmp_path, "vanilla-s0", "vanilla", 0, [curves(0.8)], evaluation(48, untrained=1))
    # resumed after step 1: version_1 repeats step 1 (and wins); logged under the old name before, the new one after
    write_run(tmp_path, "vanilla-s1", "vanilla", 1,
              [{"hack_s": {0: 0.9, 1: 0.9}}, {"train/hack_s": {1: 0.6, 2: 0.6}}], evaluation(40, untrained=3))
    write_run(tmp_path, "erase-s0", "erase", 0, [curves(0.5)], evaluation(16))
    assert read_scalars(tmp_path / "vanilla-s1") == {"train/hack_s": pytest.approx({0: 0.9, 1: 0.6, 2: 0.6})}
    main(["report", f"--experiment_dir={tmp_path}", f"--out={tmp_path / 'out'}"])
    text = (tmp_path / "out" / "report.md").read_text()
    assert text in capsys.readouterr().out
    assert "| vanilla | 0,1 | 0.688 [0.625, 0.750] |" in text and "| erase | 0 | 0.250 |" in text
    assert "| erase | 1 | -0.500 |" in text  # paired with vanilla seed 0 only
    assert "**erase: does not count**" in text  # one paired seed: no interval, so nothing is shown below 0
    assert "leave one mode out" not in text
    assert_pngs(tmp_path / "out")
    execute_notebook(tmp_path, monkeypatch)


# --- real runs ---------------------------------------------------------------------------------------------------


def test_experiment_skips_resumes_and_reports_failures(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """One real smoke run next to a broken arm: the failure is reported (log path, non-zero exit) without
    stopping the matrix; a rerun skips the finished run; more steps resume it where it stopped."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  projection:\n    intervention: bogus\n")
    out = tmp_path / "exp"
    # V from one pair (one known mode) keeps the extraction short
    quick = '--override=["data.pool_per_prompt=2", "data.known_modes=[sentinel]"]'
    with pytest.raises(SystemExit, match=r"1 of 2 runs failed") as failure:
        experiment(out, f"--arms=[{broken}, vanilla]", "--seeds=[0]", "--max_steps=1", quick)
    assert str(out / "broken-s0" / "train.log") in str(failure.value)
    assert "bogus" in (out / "broken-s0" / "train.log").read_text() and not (out / "broken-s0" / DONE_FILE).exists()
    assert "done 1 skipped 0 failed 1" in capsys.readouterr().err  # the progress display
    run_dir = out / "vanilla-s0"
    assert (run_dir / DONE_FILE).is_file() and (run_dir / LAST_CKPT).is_file() and versions(run_dir) == ["version_0"]
    config = yaml.safe_load((run_dir / "lightning_logs" / "version_0" / "config.yaml").read_text())
    assert config["trainer"]["default_root_dir"] == str(run_dir) and config["trainer"]["max_steps"] == 1
    assert config["data"]["known_modes"] == ["sentinel"] and config["data"]["pool_per_prompt"] == 2
    assert RunSpec(**json.loads((run_dir / RUN_FILE).read_text())).arm == "vanilla"

    started = time.monotonic()
    experiment(out, "--arms=[vanilla]", "--seeds=[0]", "--max_steps=1", quick)
    assert time.monotonic() - started < 10 and versions(run_dir) == ["version_0"]  # skipped, nothing launched

    experiment(out, "--arms=[vanilla]", "--seeds=[0]", "--max_steps=2", quick)
    assert versions(run_dir) == ["version_0", "version_1"]
    assert "--ckpt_path last" in (run_dir / "train.log").read_text()
    assert logged_steps(run_dir / "lightning_logs" / "version_1", "train/hack_s") == [1]  # continued, not restarted
    assert sorted(read_scalars(run_dir)["train/hack_s"]) == [0, 1]


def test_smoke_matrix_writes_eval_json_and_a_report_with_intervals_and_verdicts(tmp_path: Path) -> None:
    """vanilla, erase, erase_random, erase_stub x 2 seeds on the smoke preset: every run leaves eval.json (vanilla
    with its untrained evaluation too), the report has intervals and a verdict line, and under the same seed
    erase leaks less hack-ward update than vanilla."""
    out = tmp_path / "exp"
    quick = '--override=["data.pool_per_prompt=2", "data.modes=[sentinel,run_tests]", "data.variants_per_mode=1"]'
    experiment(out, "--arms=[vanilla, erase, erase_random, erase_stub]", "--seeds=[0, 1]", "--max_steps=3", quick)
    for run_dir in sorted(out.iterdir()):
        report = json.loads((run_dir / EVAL_FILE).read_text())
        assert report["final"]["n"] >= 8 and report["final"]["step"] == 3, run_dir.name
        assert ("untrained" in report) == run_dir.name.startswith("vanilla")
        assert set(report["final"]["per_mode"]) <= {"sentinel", "run_tests"}
    for seed in (0, 1):
        leak = {arm: statistics.fmean(read_scalars(out / f"{arm}-s{seed}")["proj/leak"].values())
                for arm in ("vanilla", "erase")}
        assert leak["erase"] < leak["vanilla"], leak
    main(["report", f"--experiment_dir={out}"])
    text = (out / "report.md").read_text()
    for arm in ("vanilla", "erase", "erase_random", "erase_stub"):
        assert f"| {arm} | 0,1 | " in text and "[" in text.split(f"| {arm} | 0,1 | ")[1].split("|")[0]
    assert "Untrained policy" in text and "## Verdict" in text
    assert "**erase: counts**" in text or "**erase: does not count**:" in text


@pytest.mark.slow
def test_smoke_experiment_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's scenario: 3 arms x 2 seeds (one run interrupted and resumed), weak-detector runs, a rerun that
    skips everything, the report and the notebook."""
    out = tmp_path / "exp"
    experiment(out, "--arms=[vanilla]", "--seeds=[0]", "--max_steps=2")  # the run "interrupted" after 2 steps
    experiment(out, "--arms=[vanilla, erase, erase_random]", "--seeds=[0, 1]", "--max_steps=3")
    experiment(out, "--arms=[]", "--seeds=[0]", "--max_steps=3", "--leave_one_mode_out=true",
               "--holdout_modes=[sentinel]")
    names = ["vanilla-s0", "vanilla-s1", "erase-s0", "erase-s1", "erase_random-s0", "erase_random-s1",
             "vanilla-lomo_sentinel-s0", "erase-lomo_sentinel-s0"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    data_seeds = set()
    for name in names:
        run_dir = out / name
        assert json.loads((run_dir / DONE_FILE).read_text()) == {"max_steps": 3}
        config = yaml.safe_load((run_dir / "lightning_logs" / versions(run_dir)[-1] / "config.yaml").read_text())
        assert config["seed_everything"] == int(name[-1]) and config["trainer"]["max_steps"] == 3
        data_seeds.add(config["data"]["seed"])
        assert sorted(read_scalars(run_dir)["train/hack_s"]) == [0, 1, 2]
    assert data_seeds == {0}  # one split, pair set and pool for every run
    lomo = yaml.safe_load((out / "erase-lomo_sentinel-s0" / "lightning_logs" / "version_0" / "config.yaml").read_text())
    assert "sentinel" not in lomo["data"]["known_modes"] and "sentinel" not in lomo["data"]["pool_modes"]
    resumed = out / "vanilla-s0"
    assert versions(resumed) == ["version_0", "version_1"]
    assert logged_steps(resumed / "lightning_logs" / "version_1", "train/hack_s") == [2]  # continued, not restarted

    started = time.monotonic()
    experiment(out, "--arms=[vanilla, erase, erase_random]", "--seeds=[0, 1]", "--max_steps=3")
    assert time.monotonic() - started < 10 and versions(out / "erase-s1") == ["version_0"]

    main(["report", f"--experiment_dir={out}"])
    text = (out / "report.md").read_text()
    for arm in ("vanilla", "erase", "erase_random"):
        assert f"| {arm} | 0,1 |" in text
    assert "| sentinel | vanilla | 1 |" in text and "| sentinel | erase | 1 |" in text
    assert_pngs(out)
    execute_notebook(out, monkeypatch)
