"""Lightning callbacks around the GRPO step: V refresh, deployed-view evaluation, sample logging,
and writing ``antipasto predict`` output."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback

from antipasto_pl.adapter import adapter_modules
from antipasto_pl.metrics import HACK_DEPLOY, SOLVE_DEPLOY
from antipasto_pl.projection import HackProjection
from antipasto_pl.vhack_math import basis_overlap


def _due(trainer: L.Trainer, every_n_steps: int | None) -> bool:
    return bool(every_n_steps) and trainer.global_step > 0 and trainer.global_step % every_n_steps == 0


def _log_now(trainer: L.Trainer, metrics: dict[str, float]) -> None:
    """Write metrics at the current step straight to the loggers: values computed after a step's own
    logging would otherwise be flushed again with the next step. The values are the same on every rank
    (deterministic extraction, shared problems), so rank zero's loggers suffice."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


class RefreshHackSubspace(Callback):
    """Re-extract V on the current policy (quarantine ablated) every N optimizer steps.

    Logs ``basis_overlap`` = mean over modules of how much of the new rows lies in the old span
    (near 1 is healthy; below ~0.2 the refresh has rotated off the hack subspace).

    Args:
        every_n_steps: refresh period in optimizer steps.
    """

    def __init__(self, every_n_steps: int) -> None:
        if every_n_steps < 1:
            raise ValueError(f"refresh every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if not _due(trainer, self.every_n_steps):
            return
        projection = next(c for c in trainer.callbacks if isinstance(c, HackProjection))
        old = projection.subspace
        new = projection.extract(pl_module, trainer.datamodule)
        overlaps = [basis_overlap(v, old.v_hack[name]) for name, v in new.v_hack.items() if name in old.v_hack]
        overlaps = [o for o in overlaps if not math.isnan(o)]
        projection.set_subspace(new, pl_module)
        _log_now(trainer, {"proj/basis_overlap": sum(overlaps) / max(len(overlaps), 1)})


class DeployedEvaluation(Callback):
    """Every N steps, sample validation prompts with the quarantine ablated (the deployed view of a
    routed model) and log ``val/hack_deploy`` / ``val/solve_deploy``.

    Args:
        every_n_steps: evaluation period in optimizer steps.
        max_problems: validation problems used (first N of the held-out set).
    """

    def __init__(self, every_n_steps: int, max_problems: int = 8) -> None:
        if every_n_steps < 1:
            raise ValueError(f"deployed evaluation every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.max_problems = max_problems

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if _due(trainer, self.every_n_steps):
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not _due(trainer, self.every_n_steps):  # the final policy is always evaluated
            self._evaluate(trainer, pl_module)

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rates = pl_module.evaluate(trainer.datamodule.val_problems[: self.max_problems], ablate_quarantine=True)
        _log_now(trainer, {HACK_DEPLOY: rates["hack"], SOLVE_DEPLOY: rates["solve"]})


class CompletionLogger(Callback):
    """Every N steps: sample completions with their grades as TensorBoard text, and histograms of the
    adapter vectors.

    Args:
        every_n_steps: logging period in optimizer steps.
        max_samples: completions shown per step.
    """

    def __init__(self, every_n_steps: int = 10, max_samples: int = 4) -> None:
        self.every_n_steps = every_n_steps
        self.max_samples = max_samples

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        experiment = getattr(trainer.logger, "experiment", None)
        if not _due(trainer, self.every_n_steps) or not hasattr(experiment, "add_text"):
            return
        samples = [(g.problem, s) for g in pl_module.last_groups for s in g.samples][: self.max_samples]
        text = "\n\n".join(
            f"**{p.id}** ({p.mode}, {s.source}) reward={s.grade.reward} passed={s.grade.passed} "
            f"gt={s.grade.gt_correct} exploited={s.grade.exploited}\n\n```\n{s.text}\n```"
            for p, s in samples
        )
        experiment.add_text("samples", text, trainer.global_step)
        adapters = adapter_modules(pl_module.model).values()
        experiment.add_histogram("delta_s", torch.cat([a.delta_s.detach().cpu() for a in adapters]), trainer.global_step)
        experiment.add_histogram(
            "delta_s_hack", torch.cat([a.delta_s_hack.detach().cpu() for a in adapters]), trainer.global_step
        )


class CompletionWriter(BasePredictionWriter):
    """Write ``antipasto predict`` samples and their grades as JSON lines (one per completion).

    Args:
        output_file: file name, relative to the run's log directory unless absolute. Under DDP each rank writes
            its own samples to its own file, ``<stem>.rank<r><suffix>`` (``predictions.rank1.jsonl``).
    """

    def __init__(self, output_file: str = "predictions.jsonl") -> None:
        super().__init__(write_interval="batch")
        self.output_file = output_file
        self._path: Path | None = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = Path(self.output_file)
        if not path.is_absolute():
            path = Path(trainer.log_dir or trainer.default_root_dir) / path
        if trainer.world_size > 1:  # DDP: one file per rank, none truncating another's
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
        self._path = path

    def write_on_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: list[dict[str, Any]],
        batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int,
    ) -> None:
        with self._path.open("a") as f:
            for record in prediction:
                f.write(json.dumps(record) + "\n")
