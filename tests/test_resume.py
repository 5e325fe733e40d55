"""Checkpoints, exact resume, faults, the non-finite guard, export and determinism, through the real CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from antipasto_pl.adapter import adapter_modules, quarantine_ablated
from antipasto_pl.checkpointing import AtomicCheckpointIO, CorruptCheckpointError
from antipasto_pl.cli import AntipastoCLI, main
from antipasto_pl.commands.export import ADAPTER_FILE, MERGED_DIR, load_trained_module
from antipasto_pl.evaluation import EVAL_FILE

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
ARMS = ROOT / "configs" / "arms"
# Deterministic, checkpoint every 2 steps, validation after step 2 (between a checkpoint and the next step).
COMMON = [
    "--trainer.enable_progress_bar=false", "--trainer.deterministic=true", "--trainer.val_check_interval=2",
    "--trainer.callbacks.every_n_train_steps=2", "--data.pool_per_prompt=2",
]

_SCRIPT = Path(sys.executable).with_name("antipasto")
ANTIPASTO = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "antipasto_pl.cli"]


def fit_args(root: Path, steps: int, *extra: str) -> list[str]:
    return ["fit", "--config", SMOKE, *extra, *COMMON, f"--trainer.default_root_dir={root}", f"--trainer.max_steps={steps}"]


def logged(root: Path) -> dict[str, dict[int, float]]:
    """Every scalar of every run version under ``root``: tag -> {step: value} (later versions continue earlier).
    Wall-clock timings (``time/*``) are left out: they are the one thing a rerun does not reproduce."""
    out: dict[str, dict[int, float]] = {}
    for version in sorted((root / "lightning_logs").iterdir()):
        events = EventAccumulator(str(version), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            if not tag.startswith("time/"):
                out.setdefault(tag, {}).update({e.step: e.value for e in events.Scalars(tag)})
    return out


def adapter_vectors(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, weights_only=True)["state_dict"]


# The resume audit: the uninterrupted run against a first run stopped one way (at `split`) plus `--ckpt_path last`.
AUDIT_COMMON = [
    "--trainer.enable_progress_bar=false", "--trainer.deterministic=true", "--model.sampling.max_new_tokens=8",
]


def arm(name: str) -> tuple[str, ...]:
    return ("--config", str(ARMS / f"{name}.yaml"))


@dataclass(frozen=True)
class Case:
    """``overlay``: arm and settings of every run; ``stop``: how the first run ends (``max_steps`` at
    ``split``; ``early_stop``: EarlyStopping at the validation after ``split``; a signal sent during the step
    that ends at ``split``; ``SIGKILL`` at whatever periodic checkpoint it reached); ``steps``: optimizer steps
    of the uninterrupted run."""

    overlay: tuple[str, ...]
    stop: str = "max_steps"
    steps: int = 4
    split: int = 2


PERIODIC = ("--trainer.callbacks.every_n_train_steps=2",)
AUDIT = [
    pytest.param(Case(arm("vanilla")), id="max_steps-vanilla"),
    pytest.param(Case((*arm("erase_refresh"), "--model.refresh_every=3", "--trainer.val_check_interval=2")),
                 id="max_steps-erase_refresh3-validation_at_end"),
    pytest.param(Case((*arm("erase"), *PERIODIC, "--trainer.val_check_interval=2", "--model.deploy_eval_every=2")),
                 id="periodic-erase-validation_after"),
    pytest.param(Case((*arm("route"), *PERIODIC, "--trainer.val_check_interval=2", "--model.deploy_eval_every=2")),
                 id="periodic-route", marks=pytest.mark.slow),
    pytest.param(Case((*arm("route"), "--trainer.val_check_interval=1", "--model.deploy_eval_every=2"), split=3),
                 id="max_steps-route-validation_inside", marks=pytest.mark.slow),
    pytest.param(Case((*arm("erase"), "--trainer.val_check_interval=2"), stop="early_stop"),
                 id="early_stop-erase", marks=pytest.mark.slow),
    pytest.param(Case((*arm("erase_refresh"), *PERIODIC), stop="SIGTERM", split=3),  # last.ckpt moves on from step 2
                 id="SIGTERM-erase_refresh-after_periodic", marks=pytest.mark.slow),
    pytest.param(Case(arm("route"), stop="SIGINT"), id="SIGINT-route", marks=pytest.mark.slow),
    pytest.param(Case((*arm("erase"), *PERIODIC), stop="SIGKILL", steps=6), id="SIGKILL-erase", marks=pytest.mark.slow),
    pytest.param(Case((*arm("erase"), "--model.ppo_epochs=2")), id="max_steps-erase-ppo_epochs2",
                 marks=pytest.mark.slow),
    pytest.param(Case((*arm("vanilla"), "--data.pool_per_prompt=2", "--model.group_size=4")),
                 id="max_steps-vanilla-pool2-two_teachers", marks=pytest.mark.slow),
]


class SignalDuringStep(L.Callback):
    """Sends a real signal to this process while the step that ends at global step ``step`` is under way."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum, self.step = signum, step

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if trainer.global_step == self.step - 1:
            os.kill(os.getpid(), self.signum)


def audit_args(root: Path, steps: int, case: Case) -> list[str]:
    return ["fit", "--config", SMOKE, *case.overlay, *AUDIT_COMMON, f"--trainer.default_root_dir={root}",
            f"--trainer.max_steps={steps}"]


def first_run(root: Path, case: Case) -> None:
    """The first run of the split pair, ended as ``case.stop`` says."""
    if case.stop == "max_steps":
        main(audit_args(root, case.split, case))
        return
    if case.stop == "SIGKILL":
        kill_after_a_checkpoint(audit_args(root, case.steps, case), root)
        return
    cli = AntipastoCLI(args=audit_args(root, case.steps, case)[1:], run=False)
    if case.stop == "early_stop":  # val/hack is 0 < 1 at the first validation
        cli.trainer.callbacks.append(EarlyStopping(monitor="val/hack", mode="min", stopping_threshold=1.0))
    else:
        cli.trainer.callbacks.append(SignalDuringStep(getattr(signal, case.stop), case.split))
    # As in a terminal (a background job, pytest's included, starts with SIGINT ignored).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        cli.trainer.fit(cli.model, cli.datamodule)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the fit's handler is gone
    finally:
        signal.signal(signal.SIGINT, previous)
    assert cli.trainer.global_step == case.split


@pytest.mark.parametrize("case", AUDIT)
def test_resume_audit(tmp_path: Path, case: Case) -> None:
    """The uninterrupted run == a first run stopped at ``split`` + `--ckpt_path last`: final vectors and every
    logged scalar but wall times, bit for bit; and the first run's `last.ckpt` is where it stopped."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    main(audit_args(straight, case.steps, case))
    first_run(split, case)
    last = split / "checkpoints" / "last.ckpt"
    stopped_at = torch.load(last, weights_only=True)["global_step"]
    assert stopped_at in (2, 4) if case.stop == "SIGKILL" else stopped_at == case.split
    main(audit_args(split, case.steps, case) + ["--ckpt_path=last"])

    a, b = adapter_vectors(straight / "checkpoints" / "last.ckpt"), adapter_vectors(last)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if k.endswith(".delta_s"))
    metrics_a, metrics_b = logged(straight), logged(split)
    batches = case.steps // (2 if "--model.ppo_epochs=2" in case.overlay else 1)
    assert sorted(metrics_a["train/loss"]) == list(range(batches)) and "proj/leak" in metrics_a
    # The first run's end also evaluated its final policy (deployed view; the held-out evaluation unless a signal
    # stopped it; the untrained policy's evaluation is at step 0 only).
    final = [t for t in metrics_b if t in ("val/hack_deploy", "val/solve_deploy")
             or (t.startswith("test/") and not t.startswith("test/untrained/"))]
    for tag in final:
        if stopped_at not in metrics_a.get(tag, {}):
            metrics_b[tag].pop(stopped_at, None)
    assert metrics_a == metrics_b
    versions = sorted((split / "lightning_logs").iterdir())
    resumed = EventAccumulator(str(versions[-1]))
    resumed.Reload()
    assert len(versions) == 2 and resumed.Scalars("train/loss")[0].step == stopped_at * batches // case.steps


def test_seeded_runs_are_identical(tmp_path: Path) -> None:
    main(fit_args(tmp_path / "a", 2))
    main(fit_args(tmp_path / "b", 2))
    first, second = logged(tmp_path / "a"), logged(tmp_path / "b")
    assert len(first["train/loss"]) == 2 and first == second


def kill_after_a_checkpoint(args: list[str], root: Path, signum: int = signal.SIGKILL) -> int:
    """Start a real `antipasto fit` and signal it just after its first checkpoint appears (SIGKILL: the whole
    process group; another signal: the fit's process alone, as `kill PID` would). Returns its exit status."""
    root.mkdir(parents=True, exist_ok=True)
    log = (root / "first.log").open("w")
    proc = subprocess.Popen(ANTIPASTO + args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    last = root / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # into the next step (keeping only the newest, ModelCheckpoint may replace step 2's file)
    alive = proc.poll() is None
    if signum == signal.SIGKILL:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    code = proc.wait(timeout=240)
    assert alive and last.exists(), (root / "first.log").read_text()[-3000:]
    return code


def test_a_fit_stopped_by_sigterm_is_not_a_finished_run(tmp_path: Path) -> None:
    """SIGTERM ends a real `antipasto fit` after the step under way with a checkpoint, exit status 128 + 15 (so
    `antipasto experiment` does not mark the run done) and no final held-out evaluation (a stopped fit is not the
    end of training); resuming it finishes the run and writes that evaluation."""
    args = fit_args(tmp_path, 8)
    assert kill_after_a_checkpoint(args, tmp_path, signal.SIGTERM) == 128 + signal.SIGTERM
    stopped_at = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 2 <= stopped_at < 8
    evaluation = tmp_path / EVAL_FILE
    assert not evaluation.exists() or "final" not in json.loads(evaluation.read_text())
    done = subprocess.run(ANTIPASTO + args + ["--ckpt_path=last"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(evaluation.read_text())["final"]["step"] == 8


def test_a_run_killed_during_its_final_evaluation_evaluates_when_resumed(tmp_path: Path) -> None:
    """Killed after its last checkpoint, during the final held-out evaluation: the resumed fit has no step left
    to train (Lightning runs no training loop then) and still writes the final evaluation."""
    args = fit_args(tmp_path, 4)
    first = subprocess.run(ANTIPASTO + args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    evaluation = tmp_path / EVAL_FILE
    report = json.loads(evaluation.read_text())
    assert report["final"]["step"] == 4
    evaluation.write_text(json.dumps({k: v for k, v in report.items() if k != "final"}))  # as if killed mid-evaluation
    resumed = subprocess.run(ANTIPASTO + args + ["--ckpt_path=last"], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = json.loads(evaluation.read_text())["final"]
    assert final["step"] == 4 and final.keys() == report["final"].keys()


def test_sigkill_mid_step_resumes_from_the_last_checkpoint(tmp_path: Path) -> None:
    """A real `antipasto fit` killed with SIGKILL after its step-2 checkpoint resumes there and completes."""
    args = fit_args(tmp_path, 8)
    kill_after_a_checkpoint(args, tmp_path)
    last = tmp_path / "checkpoints" / "last.ckpt"
    resumed_from = torch.load(last, weights_only=True)["global_step"]
    assert resumed_from in (2, 4, 6)  # what was saved is intact; at most the steps since then are lost
    for saved in (tmp_path / "checkpoints").glob("*.ckpt"):  # a kill mid-save leaves at most a stray temp file
        assert torch.load(saved, weights_only=True)["global_step"] in (2, 4, 6)
    done = subprocess.run(ANTIPASTO + args + ["--ckpt_path=last"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch.load(last, weights_only=True)["global_step"] == 8
    steps = sorted(logged(tmp_path)["train/loss"])
    resumed_version = sorted((tmp_path / "lightning_logs").iterdir())[-1]
    events = EventAccumulator(str(resumed_version))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")][0] == resumed_from and steps[-1] == 7


def test_checkpoint_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def killed(obj: Any, f: Any) -> None:
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_truncated_or_foreign_checkpoint_fails_fast_with_its_name(tmp_path: Path) -> None:
    main(fit_args(tmp_path / "run", 2))
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 2 and {"torch", "python", "numpy"} <= saved["rng_states"].keys()
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 0, "batches": 2}]
    assert saved["callbacks"]["HackProjection"]["subspace"]["v_hack"]
    assert all(k.endswith((".delta_s", ".delta_s_hack")) for k in saved["state_dict"])  # never W, U or Vh
    data = (tmp_path / "run" / "checkpoints" / "last.ckpt").read_bytes()
    truncated, garbage = tmp_path / "truncated.ckpt", tmp_path / "garbage.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    garbage.write_bytes(b"not a checkpoint")
    for bad in (truncated, garbage):
        with pytest.raises(CorruptCheckpointError, match=rf"checkpoint {bad} is corrupt or truncated"):
            main(fit_args(tmp_path / "resume", 4, f"--ckpt_path={bad}"))
    with pytest.raises(ValueError, match=r"module 'model\.layers\.0\.self_attn\.q_proj' has rank 64 there, but the "
                                         r"model's adapter has rank 8"):
        cli = AntipastoCLI(args=["--config", SMOKE, "--model.adapter.r_max=8", "--trainer.logger=false"], run=False)
        cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=tmp_path / "run" / "checkpoints" / "last.ckpt")


class PoisonGradient(L.Callback):
    """Writes NaN into one module's delta_s gradient at one step (before the module's own check runs) and
    records the parameters and Adam state around that step."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.before: dict[str, Any] = {}
        self.after: dict[str, Any] = {}

    @staticmethod
    def snapshot(pl_module: L.LightningModule, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        params = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
        state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
        return {"params": params, "state": state}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if trainer.global_step == self.step:
            adapter = next(iter(adapter_modules(pl_module.model).values()))
            adapter.delta_s.grad[0] = float("nan")
            self.before = self.snapshot(pl_module, optimizer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.step + 1:
            self.after = self.snapshot(pl_module, trainer.optimizers[0])


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_nonfinite_gradient_is_reported_and_skipped_or_stops(tmp_path: Path, policy: str) -> None:
    cli = AntipastoCLI(args=fit_args(tmp_path, 3, f"--model.on_nonfinite={policy}")[1:], run=False)
    poison = PoisonGradient(step=1)
    cli.trainer.callbacks.insert(0, poison)
    if policy == "stop":
        with pytest.raises(FloatingPointError, match=r"non-finite gradient on model\.layers\.0\.self_attn\.q_proj\.svd_adapter"
                                                      r"\.delta_s at step 1 .*on_nonfinite: stop"):
            cli.trainer.fit(cli.model, cli.datamodule)
        return
    cli.trainer.fit(cli.model, cli.datamodule)
    before, after = poison.before, poison.after
    assert before["state"] and before["state"].keys() == after["state"].keys()
    for key, state in before["state"].items():
        assert all(torch.equal(v, after["state"][key][k]) for k, v in state.items())
    assert all(torch.equal(v, after["params"][n]) for n, v in before["params"].items())
    assert min(logged(tmp_path)["train/skipped_steps"].items()) == (1, 1.0)
    final = cli.model
    assert all(torch.isfinite(p).all() for p in final.parameters() if p.requires_grad)


def test_export_merged_model_equals_the_ablated_trained_model(tmp_path: Path) -> None:
    main(fit_args(tmp_path / "run", 2, "--config", str(ARMS / "route.yaml")))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    main(["export", "--ckpt_path", str(ckpt), "--out_dir", str(tmp_path / "export")])  # no config: the checkpoint's
    out = tmp_path / "export"
    assert (out / ADAPTER_FILE).is_file()
    trained = load_trained_module(ckpt).model
    assert any(a.delta_s_hack.abs().sum() > 0 for a in adapter_modules(trained).values())
    merged = AutoModelForCausalLM.from_pretrained(out / MERGED_DIR)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = trained(ids).logits
        with quarantine_ablated(trained):
            ablated = trained(ids).logits
        deployed = merged(ids).logits
    torch.testing.assert_close(deployed, ablated, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(deployed, full, rtol=1e-4, atol=1e-4)
