"""The ``HackProjection`` Callback: project every adapter gradient against the hack subspace V.

Acts in ``on_before_optimizer_step``, i.e. after backward (and after DDP's all-reduce, so every
rank projects the same synchronised gradient) and before clipping and the optimizer step. The
math lives in ``projection_math``; this file only reads gradients, writes them back and logs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from antipasto_pl.adapter import adapter_modules
from antipasto_pl.projection_math import (
    Gate,
    fired,
    hack_cosine,
    null_cosine_level,
    project_gradient,
    remove_hackward_moment,
    update_leak,
)
from antipasto_pl.vhack import (
    MATCHING_LENGTH_NORM,
    ExtractionSettings,
    HackSubspace,
    LengthNorm,
    SubspaceKind,
    cache_path,
    default_cache_dir,
    load_or_extract,
)

log = logging.getLogger(__name__)

Intervention = Literal["none", "erase", "route"]


@dataclass
class ProjectionConfig:
    """The gradient policy of an arm.

    Args:
        intervention: ``none`` (measure only: the vanilla arm), ``erase`` (remove the hack-ward
            part of each gradient) or ``route`` (move it into ``delta_s_hack``).
        subspace: where V comes from: ``real`` (labelled hack/clean pairs) or a control:
            ``random`` (random orthonormal rows), ``shuffled`` (labels swapped at random per pair),
            ``nonhack`` (pairs of two clean completions).
        k: rows of V per module.
        gate: ``one_sided`` removes only hack-ward coefficients, ``no_gate`` all of span(V),
            ``reverse`` mirrors the in-span component.
        overshoot: scale of the removed component (1: exact removal).
        preserve_magnitude: rescale the projected gradient to the original norm.
        project_moments: also remove the hack-ward part of Adam's first moment in span(V).
        tau_axis: drop V rows whose singular value is below ``tau_axis * S_0`` of their module.
        drop_bottom_frac: global noise floor: drop rows below this quantile of all singular values.
        length_norm: per-completion NLL normalisation for extraction (``mean`` or ``sum``); default:
            the one matching the loss reduction (``sum`` for dr_grpo), since a mismatch biases V
            toward short completions.
        subspace_path: load V from this file instead of extracting (must match the model).
        cache_dir: cache root for extracted subspaces.
    """

    intervention: Intervention = "none"
    subspace: SubspaceKind = "real"
    k: int = 4
    gate: Gate = "one_sided"
    overshoot: float = 1.0
    preserve_magnitude: bool = False
    project_moments: bool = False
    tau_axis: float | None = None
    drop_bottom_frac: float = 0.0
    length_norm: LengthNorm | None = None
    subspace_path: str | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"projection.k must be >= 1, got {self.k}")
        if not 0.0 <= self.drop_bottom_frac < 1.0:
            raise ValueError(f"projection.drop_bottom_frac must be in [0, 1), got {self.drop_bottom_frac}")


class HackProjection(Callback):
    """Owns V (saved in checkpoints), projects gradients, logs cin / cout / fired / leak diagnostics."""

    def __init__(self, config: ProjectionConfig) -> None:
        self.config = config
        self.subspace: HackSubspace | None = None
        self._before_step: dict[str, Tensor] = {}
        self._post_hook = None

    @property
    def state_key(self) -> str:
        return "HackProjection"

    # --- V ------------------------------------------------------------------------------------------

    def _extraction(self, pl_module: L.LightningModule, datamodule: Any) -> tuple[list, ExtractionSettings]:
        """The detector pairs and extraction settings for this arm (same for every seed of a real arm)."""
        cfg = self.config
        settings = ExtractionSettings(
            k=cfg.k, kind=cfg.subspace, tau_axis=cfg.tau_axis, seed=datamodule.hparams.seed,
            length_norm=cfg.length_norm or MATCHING_LENGTH_NORM[pl_module.hparams.loss_reduction],
            max_completion_tokens=pl_module.max_completion_tokens,
        )
        return datamodule.detector_pairs(cfg.subspace), settings

    def cache_file(self, pl_module: L.LightningModule, datamodule: Any) -> Path:
        """Where ``extract`` caches V for the current policy."""
        pairs, settings = self._extraction(pl_module, datamodule)
        return cache_path(pl_module.model, pl_module.tokenizer, pairs, settings, self._cache_dir)

    @property
    def _cache_dir(self) -> Path:
        return default_cache_dir(self.config.cache_dir)

    def extract(self, pl_module: L.LightningModule, datamodule: Any) -> HackSubspace:
        """V on the current policy from the data module's detector pairs (cached on disk), noise floor applied."""
        pairs, settings = self._extraction(pl_module, datamodule)
        subspace = load_or_extract(pl_module.model, pl_module.tokenizer, pairs, settings, self._cache_dir)
        drop = self.config.drop_bottom_frac
        return subspace.after_noise_floor(drop) if drop > 0 else subspace

    def set_subspace(self, subspace: HackSubspace, pl_module: L.LightningModule) -> None:
        subspace.check_model(pl_module.model)
        self.subspace = subspace.to(pl_module.device)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        subspace = self.subspace  # restored from a checkpoint, else loaded or extracted
        if subspace is None and self.config.subspace_path is not None:
            subspace = HackSubspace.load(self.config.subspace_path)
        if subspace is None:
            subspace = self.extract(pl_module, trainer.datamodule)
        self.set_subspace(subspace, pl_module)
        log.info("hack projection: %s with %s V on %d modules", self.config.intervention, self.config.subspace,
                 len(self.subspace.modules))
        optimizer = trainer.optimizers[0]
        self._post_hook = optimizer.register_step_post_hook(lambda opt, args, kwargs: self._after_step(pl_module))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._post_hook is not None:
            self._post_hook.remove()
            self._post_hook = None

    # --- projection ---------------------------------------------------------------------------------

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        cfg = self.config
        adapters = adapter_modules(pl_module.model)
        parts = pl_module.grad_parts
        stats: dict[str, list[Tensor]] = {"cin": [], "cout": [], "fired": [], "cin_s": [], "cin_t": [], "null": []}
        self._before_step = {}
        for name, v_hack in self.subspace.v_hack.items():
            adapter = adapters[name]
            g = adapter.delta_s.grad if adapter.delta_s.grad is not None else torch.zeros_like(adapter.delta_s)
            result = project_gradient(g, v_hack, cfg.gate, cfg.overshoot, cfg.preserve_magnitude)
            stats["cin"].append(hack_cosine(g, v_hack))
            stats["cout"].append(hack_cosine(result.g_projected, v_hack))
            stats["fired"].append(fired(result.coeffs).float())
            stats["null"].append(torch.tensor(null_cosine_level(v_hack.shape[0], v_hack.shape[1])))
            if parts is not None:
                stats["cin_s"].append(hack_cosine(parts.student[name], v_hack))
                stats["cin_t"].append(hack_cosine(parts.teacher[name], v_hack))
            if cfg.intervention != "none":
                adapter.delta_s.grad = result.g_projected
            if cfg.intervention == "route":
                adapter.delta_s_hack.grad = result.removed
            if cfg.project_moments and cfg.intervention != "none":
                self._project_moment(optimizer, adapter.delta_s, v_hack)
            self._before_step[name] = torch.stack([adapter.delta_s.detach().clone(), adapter.delta_s_hack.detach().clone()])
        for key, values in stats.items():
            if values:
                pl_module.log(f"proj/{key}", torch.stack(values).float().mean(), prog_bar=key == "cin_s",
                              on_step=True, on_epoch=False, batch_size=1)

    @staticmethod
    def _project_moment(optimizer: Any, param: torch.nn.Parameter, v_hack: Tensor) -> None:
        state = optimizer.state.get(param, {})
        if "exp_avg" in state:
            state["exp_avg"].copy_(remove_hackward_moment(state["exp_avg"], v_hack))

    @torch.no_grad()
    def _after_step(self, pl_module: L.LightningModule) -> None:
        """Leak on the update actually taken; in the route arm, keep the quarantine's move inside span(V)
        (Adam's per-coordinate scaling would otherwise rotate it out)."""
        if not self._before_step:
            return
        adapters = adapter_modules(pl_module.model)
        leaks, quarantine = [], []
        for name, before in self._before_step.items():
            v_hack = self.subspace.v_hack[name]
            adapter = adapters[name]
            leaks.append(update_leak(before[0], adapter.delta_s.detach(), v_hack))
            if self.config.intervention == "route":
                move = adapter.delta_s_hack - before[1]
                adapter.delta_s_hack.copy_(before[1] + (move @ v_hack.T.to(move.dtype)) @ v_hack.to(move.dtype))
            quarantine.append(adapter.delta_s_hack.detach().norm())
        self._before_step = {}
        pl_module.log("proj/leak", torch.stack(leaks).mean(), on_step=True, on_epoch=False, batch_size=1)
        pl_module.log("proj/delta_s_hack_norm", torch.stack(quarantine).norm(), on_step=True, on_epoch=False,
                      batch_size=1)

    # --- checkpoint ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self.subspace is None:
            return {}
        s = self.subspace
        return {"v_hack": {k: v.cpu() for k, v in s.v_hack.items()},
                "singular_values": {k: v.cpu() for k, v in s.singular_values.items()},
                "weight_hashes": dict(s.weight_hashes), "metadata": dict(s.metadata)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self.subspace = HackSubspace(state_dict["v_hack"], state_dict["singular_values"],
                                         state_dict["weight_hashes"], state_dict["metadata"])
