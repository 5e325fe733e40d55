"""Every arm of the experiment fits on a tiny model through the real CLI and logs its diagnostics;
the GPU presets parse and instantiate (with the model swapped for a tiny one)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from antipasto_pl.cli import AntipastoCLI, main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

DIAGNOSTICS = {
    "train/reward_s", "train/hack_s", "train/gt_s", "train/reward_t", "train/hack_t", "train/gt_t", "train/loss",
    "train/grad_norm", "env/sandbox_errors",
    "proj/cin", "proj/cout", "proj/cin_s", "proj/cin_t", "proj/fired", "proj/null", "proj/leak",
    "proj/delta_s_hack_norm", "proj/removed_energy",
}
# A short fit: 3 steps, 2 prompts x G=2 (1 student + 1 teacher), V from 6 pairs.
FAST = [
    "--trainer.max_steps=3", "--trainer.enable_progress_bar=false", "--trainer.val_check_interval=3",
    "--model.log_completions_every=2", "--data.pool_per_prompt=2",
]


def fit(tmp_path: Path, *args: str) -> dict[str, list[float]]:
    main(["fit", "--config", str(CONFIGS / "smoke.yaml"), *args, *FAST, f"--trainer.default_root_dir={tmp_path}"])
    events = EventAccumulator(str(tmp_path / "lightning_logs" / "version_0"), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()
    scalars = {tag: [e.value for e in events.Scalars(tag)] for tag in tags["scalars"]}
    scalars["__text__"] = tags["tensors"]
    scalars["__histograms__"] = tags["histograms"]
    return scalars


@pytest.mark.parametrize(
    "arm", ["vanilla", "erase", "route", "erase_random", "erase_shuffled", "erase_nonhack", "erase_refresh",
            "erase_stub", "erase_random_matched"]
)
def test_arm_fits_and_logs_every_diagnostic(tmp_path: Path, arm: str) -> None:
    logged = fit(tmp_path, "--config", str(CONFIGS / "arms" / f"{arm}.yaml"), "--model.deploy_eval_every=2")
    missing = DIAGNOSTICS - logged.keys()
    assert not missing, f"{arm} did not log {sorted(missing)}"
    assert all(len(logged[key]) == 3 for key in ("proj/cin", "proj/leak", "train/reward_s"))
    assert any(key.startswith("train/") and key.endswith("/hack_s") and key != "train/hack_s" for key in logged)
    assert any(key.startswith("train/") and key.endswith("/gt_t") and key != "train/gt_t" for key in logged)
    assert {"val/hack_deploy", "val/solve_deploy", "val/hack", "val/solve"} <= logged.keys()
    namespaces = {"train", "val", "test", "proj", "time", "env"}
    assert {key.partition("/")[0] for key in logged if "/" in key} <= namespaces | {"__text__", "__histograms__"}
    assert "samples/text_summary" in logged["__text__"] and "delta_s" in logged["__histograms__"]
    if arm in ("erase", "erase_refresh"):
        assert max(logged["proj/cout"]) < 1e-5  # one-sided erase leaves no hack-ward component
    if arm.startswith("erase_") and arm != "erase_refresh":  # diagnostics are read against the real V
        assert max(logged["proj/cout"]) > 1e-3 and min(logged["proj/removed_energy"]) > 0
    if arm == "route":
        assert logged["proj/delta_s_hack_norm"][-1] > 0
    else:
        assert max(logged["proj/delta_s_hack_norm"]) == 0.0  # only routed gradient moves the quarantine
    if arm == "erase_refresh":
        assert len(logged["proj/basis_overlap"]) == 1 and 0.0 <= logged["proj/basis_overlap"][0] <= 1.0 + 1e-6


def test_pure_student_grpo_needs_no_pool(tmp_path: Path) -> None:
    logged = fit(tmp_path, "--model.mix_ratio=0", "--model.group_size=2", "--data.use_pool=false")
    assert len(logged["train/reward_s"]) == 3 and "train/reward_t" not in logged and "proj/cin_t" in logged


def test_kl_and_ppo_inner_iterations(tmp_path: Path) -> None:
    logged = fit(tmp_path, "--model.ppo_epochs=2", "--model.beta=0.05", "--config", str(CONFIGS / "arms" / "erase.yaml"))
    # max_steps counts optimizer steps: two rollout batches of two (projected) steps each
    assert len(logged["train/reward_s"]) == 2 and len(logged["proj/cin"]) == 2
    assert any(abs(rho - 1) > 1e-6 for rho in logged["train/rho_mean"])  # the 2nd iteration sees a moved policy
    assert all(kl >= 0 for kl in logged["train/kl_mean"]) and max(logged["train/kl_mean"]) > 0


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        ("full.yaml", dict(group_size=6, prompts=43, max_new_tokens=1024, lr=1e-3, beta=1e-3, steps=200)),
        ("fast.yaml", dict(group_size=8, prompts=4, max_new_tokens=512, lr=3e-3, beta=0.0, steps=60)),
    ],
)
def test_gpu_presets_parse_and_instantiate(preset: str, expected: dict) -> None:
    cli = AntipastoCLI(
        args=["--config", str(CONFIGS / preset), "--config", str(CONFIGS / "arms" / "erase.yaml"),
              "--model.policy.name=tiny-qwen3", "--model.policy.dtype=float32", "--trainer.accelerator=cpu"],
        run=False,
    )
    hp, data = cli.model.hparams, cli.datamodule.hparams
    assert (hp.group_size, data.prompts_per_step, cli.model.sampling.max_new_tokens) == (
        expected["group_size"], expected["prompts"], expected["max_new_tokens"])
    assert (hp.learning_rate, hp.beta, cli.trainer.max_steps) == (expected["lr"], expected["beta"], expected["steps"])
    assert cli.model.projection_config.intervention == "erase"
    cli.model.configure_model()
    cli.datamodule.setup("fit")
    assert len(cli.datamodule.train_problems) >= data.prompts_per_step


def test_an_approximate_sampler_is_corrected_by_importance_weights(tmp_path: Path) -> None:
    """The bfloat16 sampler on the float32 tiny policy: every step logs the mean importance weight, close to 1
    and not exactly 1, and the mean log-prob gap between sampler and policy, small and not 0 (the distributions
    differ slightly); the exact default logs neither."""
    logged = fit(tmp_path / "bf16", "--model.sampler=antipasto_pl.rollout.KVCacheSampler",
                 "--model.sampler.weights=bfloat16")
    weights, gaps = logged["train/is_weight_mean"], logged["train/sampler_logp_gap"]
    assert len(weights) == 3 and all(0.8 < w < 1.2 for w in weights) and any(w != 1.0 for w in weights)
    assert len(gaps) == 3 and all(0 < g < 0.2 for g in gaps)
    exact = fit(tmp_path / "exact")
    assert "train/is_weight_mean" not in exact and "train/sampler_logp_gap" not in exact
