"""A callback for the DDP tests (run inside `antipasto fit` processes): what each rank holds and sampled at every step.

Not a test module: the test puts this directory on the fit's PYTHONPATH and adds
``--trainer.callbacks+=ddp_probe.RecordRanks``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch

from antipasto_pl.adapter import adapter_modules
from antipasto_pl.projection import HackProjection


class RecordRanks(L.Callback):
    """After every step, this rank's adapter vectors, V, and its samples' grades; written per rank to
    ``<default_root_dir>/ranks/rank<r>-<first step>.pt`` at the end of the fit (and after each step, so a killed
    run leaves what it recorded)."""

    def __init__(self) -> None:
        self.steps: dict[int, dict[str, Any]] = {}
        self.first: int | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        projection = next(c for c in trainer.callbacks if isinstance(c, HackProjection))
        adapters = adapter_modules(pl_module.model)
        self.first = trainer.global_step if self.first is None else self.first
        self.steps[trainer.global_step] = {
            "vectors": {n: torch.stack([a.delta_s.detach().cpu(), a.delta_s_hack.detach().cpu()])
                        for n, a in adapters.items()},
            "v": {n: v.detach().cpu() for n, v in projection.subspace.v_hack.items()},
            "active": sum(g.active for g in pl_module.last_groups),
            "problems": [g.problem.id for g in pl_module.last_groups],
            "samples": [(g.problem.mode, s.source, s.grade.reward, s.grade.exploited, s.grade.gt_correct,
                         s.grade.passed) for g in pl_module.last_groups for s in g.samples],
        }
        out = Path(trainer.default_root_dir) / "ranks" / f"rank{trainer.global_rank}-{self.first}.pt"
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.steps, out)
