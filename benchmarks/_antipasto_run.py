"""Running this trainer's real GRPO steps under the Lightning Trainer, with per-step timings (benchmark helper)."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from _common import SMOLLM2, timed

import antipasto_pl.experience as experience_lib
from antipasto_pl.data import AntipastoDataModule
from antipasto_pl.env.problem import Problem
from antipasto_pl.models import PolicyConfig
from antipasto_pl.module import AntipastoModule
from antipasto_pl.projection import ProjectionConfig
from antipasto_pl.rollout import KVCacheSampler, SamplingConfig

JITTER = 1e-3
# The step pieces timed: the experience builder's generate and grade, the module's loss/backward.
PIECES = ("generate", "grade", "backward_groups")


class StepTimer(L.Callback):
    """Wall time of every training batch (one optimizer step here), the problems it held, the module's
    ``time/*`` and ``train/active_groups`` logs, and the time spent in the module's step pieces."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.batches: list[list[str]] = []
        self.logged: list[dict[str, float]] = []
        self.pieces: list[dict[str, float]] = []
        self.calls: dict[str, list[float]] = {name: [] for name in PIECES}
        self._start = 0.0

    def wrap_pieces(self, module: AntipastoModule) -> None:
        """Time the module's backward and, once the fit has built it, its experience builder's generate and grade
        (instance attributes shadow the methods)."""
        self._module = module
        setattr(module, "backward_groups", timed(module.backward_groups, self.calls["backward_groups"]))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if getattr(self, "_module", None) is pl_module:
            for name in ("generate", "grade"):
                setattr(pl_module.experience, name, timed(getattr(pl_module.experience, name), self.calls[name]))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        for values in self.calls.values():
            values.clear()
        self.batches.append([p.id for p in batch])
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.times.append(time.perf_counter() - self._start)
        self.logged.append({k: float(v) for k, v in trainer.callback_metrics.items()
                            if k.startswith("time/") or k == "train/active_groups"})
        self.pieces.append({name: sum(values) for name, values in self.calls.items() if values})


@dataclass
class ForceActive:
    """Replace the zero advantages of a zero-variance group by a tiny zero-mean +-JITTER pattern, so every group
    carries a gradient and every step runs its backward, as every TRL step does. Rewards (and their logs) are
    untouched. Installed by patching ``antipasto_pl.experience.group_advantages``."""

    calls: int = 0
    jittered_groups: int = 0
    groups: int = 0
    _original: Any = field(default=None, repr=False)

    def __enter__(self) -> ForceActive:
        self._original = experience_lib.group_advantages

        def group_advantages(rewards: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            advantages = self._original(rewards, *args, **kwargs).clone()  # (P, G)
            varies = rewards.amax(-1) > rewards.amin(-1)
            self.calls += 1
            self.groups += int(varies.numel())
            for g in (~varies).nonzero().flatten().tolist():
                signs = torch.ones(rewards.shape[1], dtype=advantages.dtype, device=advantages.device)
                signs[1::2] = -1.0
                if rewards.shape[1] % 2:
                    signs[-1] = 0.0
                advantages[g] = signs * JITTER
                self.jittered_groups += 1
            return advantages

        experience_lib.group_advantages = group_advantages
        return self

    def __exit__(self, *exc: object) -> None:
        experience_lib.group_advantages = self._original


def make_module(group_size: int, mix_ratio: float, max_new_tokens: int, micro_batch_size: int = 8,
                intervention: str = "none", ignore_eos: bool = False, sampler_weights: str = "policy",
                cls: type[AntipastoModule] = AntipastoModule) -> AntipastoModule:
    """``AntipastoModule`` on SmolLM2 configured like configs/cpu.yaml (full rank, lr 1e-2), with the given sizes
    and a random k=4 V (no extraction first); ``ignore_eos``: every completion is ``max_new_tokens`` long;
    ``sampler_weights``: the ``KVCacheSampler``'s. The model is built now (``configure_model``) so the caller can
    adjust it before fitting."""
    module = cls(
        sampler=KVCacheSampler(weights=sampler_weights),
        policy=PolicyConfig(name=SMOLLM2, dtype="float32"),
        sampling=SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0, ignore_eos=ignore_eos),
        projection=ProjectionConfig(intervention=intervention, subspace="random", k=4),
        group_size=group_size,
        mix_ratio=mix_ratio,
        learning_rate=1e-2,
        micro_batch_size=micro_batch_size,
        log_completions_every=0,
        eval_samples_per_prompt=1,
    )
    module.configure_model()
    return module


def make_data(prompts_per_step: int, use_pool: bool, seed: int = 0) -> AntipastoDataModule:
    """The builtin problems with configs/cpu.yaml's pair settings (2 pair problems x 2 variants x 6 modes)."""
    return AntipastoDataModule(problems="builtin", prompts_per_step=prompts_per_step, pair_problems=2,
                               variants_per_mode=2, use_pool=use_pool, seed=seed)


def first_batches(prompts_per_step: int, n: int, seed: int = 0) -> list[list[Problem]]:
    """The first ``n`` training batches the Trainer will draw (same sampler, same seed, epoch 0)."""
    data = make_data(prompts_per_step, use_pool=False, seed=seed)
    data.setup("fit")
    batches: list[list[Problem]] = []
    while len(batches) < n:
        for batch in data.train_dataloader():
            batches.append(batch)
            if len(batches) == n:
                break
    return batches


def fit(module: AntipastoModule, data: AntipastoDataModule, steps: int, callbacks: list[L.Callback],
        seed: int = 0) -> L.Trainer:
    """``steps`` optimizer steps under the real Lightning Trainer (no validation, logging or checkpoints)."""
    L.seed_everything(seed, verbose=False)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=callbacks, default_root_dir=tempfile.mkdtemp(prefix="antipasto-bench-"),
    )
    trainer.fit(module, data)
    return trainer
