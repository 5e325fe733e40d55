"""The `antipasto` console script: LightningCLI subcommands, presets, checkpoints, logs."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import lightning as L

from antipasto_pl.adapter import AdapterConfig, adapter_modules
from antipasto_pl.cli import EXTRA_COMMANDS, main
from antipasto_pl.data import AntipastoDataModule
from antipasto_pl.models import PolicyConfig
from antipasto_pl.module import AntipastoModule

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")


def run_script(*args: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("antipasto")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "antipasto_pl.cli"]
    return subprocess.run(command + list(args), capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_installed_script_help_and_print_config() -> None:
    top = run_script("--help")
    assert top.returncode == 0, top.stderr
    words = " ".join(top.stdout.split())
    assert "{fit,validate,test,predict}" in words
    assert EXTRA_COMMANDS and all(name in words for name in EXTRA_COMMANDS)
    fit_help = run_script("fit", "--help")
    assert fit_help.returncode == 0, fit_help.stderr
    for option in ("--model.policy.name", "--model.adapter.r_max", "--data.prompts_per_step", "--ckpt_path"):
        assert option in fit_help.stdout
    printed = run_script("fit", "--config", SMOKE, "--model.adapter.r_max", "8", "--print_config")
    assert printed.returncode == 0, printed.stderr
    config = yaml.safe_load(printed.stdout)
    assert config["model"]["policy"]["name"] == "tiny-llama"
    assert config["model"]["adapter"]["r_max"] == 8
    assert config["trainer"]["max_steps"] == 30


def test_bad_config_value_is_named() -> None:
    bad = run_script("fit", "--config", SMOKE, "--model.policy.dtype", "fp8")
    assert bad.returncode != 0
    assert "model.policy.dtype" in bad.stderr and "fp8" in bad.stderr and "bfloat16" in bad.stderr


def test_teacher_mix_without_pool_fails_before_training(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"model.mix_ratio=0.5 takes 1 of each group from the teacher pool.*use_pool"):
        fit(tmp_path, "--data.use_pool=false")
    assert not list(tmp_path.rglob("*.ckpt"))


def fit(tmp_path: Path, *extra: str, steps: int = 4) -> Path:
    main([
        "fit", "--config", SMOKE,
        f"--trainer.default_root_dir={tmp_path}", f"--trainer.max_steps={steps}",
        "--trainer.enable_progress_bar=false", *extra,
    ])
    return tmp_path / "lightning_logs" / "version_0"


def scalars(run_dir: Path, tag: str) -> list[float]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [e.value for e in events.Scalars(tag)]


def test_smoke_fit_logs_and_checkpoints_only_the_adapter(tmp_path: Path) -> None:
    run_dir = fit(tmp_path, steps=3)
    # Every served teacher record passes its grader (graded whole, never cut), so the teachers' mean reward is
    # exactly 1.25 at every step; a truncated or re-graded record would show here.
    assert scalars(run_dir, "train/reward_t") == [1.25, 1.25, 1.25]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["policy"]["name"] == "tiny-llama"
    assert not (run_dir / "checkpoints").exists()  # in <default_root_dir>/checkpoints, where `--ckpt_path last` looks
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    keys = set(checkpoint["state_dict"])
    assert keys and all(k.endswith((".delta_s", ".delta_s_hack")) for k in keys)
    assert len(checkpoint["adapter_metadata"]["modules"]) == len(keys) // 2
    assert any(t.abs().sum() > 0 for k, t in checkpoint["state_dict"].items() if k.endswith(".delta_s"))
    v_hack = checkpoint["callbacks"]["HackProjection"]["subspace"]["v_hack"]
    assert set(v_hack) <= set(checkpoint["adapter_metadata"]["modules"]) and v_hack


def test_resume_refuses_a_checkpoint_of_another_adapter(tmp_path: Path) -> None:
    """`--ckpt_path` through the CLI restores the run's own hyperparameters; a checkpoint handed to a
    differently configured module is refused before training, naming the module."""
    fit(tmp_path / "a", steps=2)
    module = AntipastoModule(policy=PolicyConfig(name="tiny-llama"), adapter=AdapterConfig(r_max=8), mix_ratio=0.0)
    data = AntipastoDataModule(prompts_per_step=2, use_pool=False)
    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"checkpoint: module 'model\.layers\.0\.self_attn\.q_proj' has rank 64 "
                                         r"there, but the model's adapter has rank 8"):
        trainer.fit(module, data, ckpt_path=tmp_path / "a" / "checkpoints" / "last.ckpt")
    assert all(a.delta_s.abs().sum() == 0 for a in adapter_modules(module.model).values())


def test_validate_test_and_predict_run_on_held_out_problems(tmp_path: Path) -> None:
    common = ["--config", SMOKE, "--trainer.enable_progress_bar=false", "--trainer.logger=false"]
    main(["validate", *common, f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=true"])
    assert len(scalars(tmp_path / "lightning_logs" / "version_0", "val/hack")) == 1
    # `antipasto test` is the held-out evaluation: eval.json over the test split, at least heldout.samples samples
    main(["test", *common, f"--trainer.default_root_dir={tmp_path}", "--model.heldout.samples=10"])
    report = json.loads((tmp_path / "eval.json").read_text())["final"]
    data = AntipastoDataModule(prompts_per_step=2, use_pool=False)
    data.setup("test")
    assert report["n"] >= 10 and set(report["problems"]) == {p.id for p in data.test_problems}
    # Once the run has a checkpoint, validating without naming one (the untrained policy) is warned about.
    main(["fit", *common, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1",
          "--model.sampling.max_new_tokens=8"])
    untrained = r"antipasto validate without --ckpt_path evaluates the untrained policy .*\(last\.ckpt\)"
    with pytest.warns(UserWarning, match=untrained):
        main(["validate", *common, f"--trainer.default_root_dir={tmp_path}"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["validate", *common, f"--trainer.default_root_dir={tmp_path}", "--ckpt_path=last"])
    assert not [w for w in caught if "untrained" in str(w.message)]

    def predict(name: str) -> list[dict]:
        out = tmp_path / name
        main(["predict", *common, f"--trainer.default_root_dir={tmp_path}", "--model.sampling.max_new_tokens=8",
              "--model.sampling.temperature=0", "--model.eval_samples_per_prompt=2",
              "--trainer.callbacks+=antipasto_pl.callbacks.CompletionWriter", f"--trainer.callbacks.output_file={out}"])
        return [json.loads(line) for line in out.read_text().splitlines()]

    first, second = predict("a.jsonl"), predict("b.jsonl")
    assert first == second  # greedy decoding is deterministic
    assert len(first) == 2 * len({r["problem_id"] for r in first}) >= 2
    assert all(isinstance(r["completion"], str) and r["mode"] and r["reward"] in (0.0, 0.25, 1.0, 1.25) for r in first)
