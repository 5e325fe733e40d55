"""The ``HackProjection`` Callback: project every adapter gradient against the hack subspace V.

Acts in ``on_before_optimizer_step``, i.e. after backward (and after the step's gradient reduction over
DDP ranks, ``AntipastoModule._average_over_ranks``, so every rank projects the same global gradient) and
before clipping and the optimizer step. The
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

from antipasto_pl import distributed
from antipasto_pl.adapter import adapter_modules
from antipasto_pl.projection_math import (
    Gate,
    energy_matched,
    fired,
    hack_cosine,
    null_cosine_level,
    project_gradient,
    remove_hackward_moment,
    update_leak,
)
from antipasto_pl.seeds import run_seed
from antipasto_pl.vhack import (
    MATCHING_LENGTH_NORM,
    ExtractionSettings,
    HackSubspace,
    LengthNorm,
    SubspaceKind,
    cache_path,
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
            ``random`` (random orthonormal rows), ``shuffled`` (labels swapped at random per pair and module),
            ``nonhack`` (pairs of two clean completions), ``stub`` (a stub without exploit vs the real
            solution). Controls are drawn from the run seed. Every arm also loads the real V, against which
            the diagnostics (cin, cout, leak, removed energy) are measured, so they compare across arms.
        match_energy: rescale a control's removal, per module and step, to the norm the real V would remove
            from the same gradient (the energy-matched control: ``subspace: random, match_energy: true``).
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
    """

    intervention: Intervention = "none"
    subspace: SubspaceKind = "real"
    match_energy: bool = False
    k: int = 4
    gate: Gate = "one_sided"
    overshoot: float = 1.0
    preserve_magnitude: bool = False
    project_moments: bool = False
    tau_axis: float | None = None
    drop_bottom_frac: float = 0.0
    length_norm: LengthNorm | None = None
    subspace_path: str | None = None

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"projection.k must be >= 1, got {self.k}")
        if not 0.0 <= self.drop_bottom_frac < 1.0:
            raise ValueError(f"projection.drop_bottom_frac must be in [0, 1), got {self.drop_bottom_frac}")
        if self.match_energy and self.subspace == "real":
            raise ValueError("projection.match_energy rescales a control's removal to the real V's: it needs a "
                             "control subspace (random, shuffled, nonhack, stub), got subspace: real")


class HackProjection(Callback):
    """Owns V (saved in checkpoints), projects gradients, logs cin / cout / fired / leak / removed-energy
    diagnostics, measured against the real V (``reference``) whatever the arm's V is."""

    def __init__(self, config: ProjectionConfig) -> None:
        self.config = config
        self.subspace: HackSubspace | None = None
        self.reference: HackSubspace | None = None
        self._before_step: dict[str, Tensor] = {}
        self._post_hook = None

    @property
    def state_key(self) -> str:
        return "HackProjection"

    # --- V ------------------------------------------------------------------------------------------

    def _extraction(
        self, pl_module: L.LightningModule, datamodule: Any, kind: SubspaceKind | None = None
    ) -> tuple[list, ExtractionSettings]:
        """The detector pairs (those within the completion budget) and extraction settings for this arm's V, or
        for V of another `kind`. Real V is the same for every seed; controls are drawn from the run seed."""
        cfg = self.config
        kind = kind or cfg.subspace
        settings = ExtractionSettings(
            k=cfg.k, kind=kind, tau_axis=cfg.tau_axis, seed=run_seed(),
            length_norm=cfg.length_norm or MATCHING_LENGTH_NORM[pl_module.hparams.loss_reduction],
        )
        pairs = datamodule.detector_pairs(kind)
        kept = [p for p in pairs if pl_module.fits_budget(p.hack) and pl_module.fits_budget(p.clean)]
        if len(kept) < len(pairs):
            log.warning("%s pairs: %d of %d over the %d-token completion budget are left out", kind,
                        len(pairs) - len(kept), len(pairs), pl_module.max_completion_tokens)
        pl_module.over_budget[f"pairs_{kind}"] = len(pairs) - len(kept)
        if not kept and kind != "random":
            raise ValueError(f"every {kind} detector pair is over the {pl_module.max_completion_tokens}-token "
                             "completion budget: raise model.max_completion_tokens or use shorter problems")
        return kept, settings

    def cache_file(self, pl_module: L.LightningModule, datamodule: Any) -> Path:
        """Where ``extract`` caches V for the current policy."""
        pairs, settings = self._extraction(pl_module, datamodule)
        return cache_path(pl_module.model, pl_module.tokenizer, pairs, settings)

    def extract(self, pl_module: L.LightningModule, datamodule: Any, kind: SubspaceKind | None = None) -> HackSubspace:
        """V (of this arm's kind, or `kind`) on the current policy from the data module's detector pairs (cached on
        disk), noise floor applied."""
        pairs, settings = self._extraction(pl_module, datamodule, kind)
        # DDP: extracted (or loaded) on rank 0 only and handed to the others, so every rank projects with one V.
        subspace = distributed.computed_once(pl_module._trainer, lambda: load_or_extract(
            pl_module.model, pl_module.tokenizer, pairs, settings).to("cpu"))
        drop = self.config.drop_bottom_frac
        return subspace.after_noise_floor(drop) if drop > 0 else subspace

    def set_subspace(self, subspace: HackSubspace, pl_module: L.LightningModule) -> None:
        """Use `subspace` as the arm's V (and, for a real arm, as the diagnostics' reference)."""
        subspace.check_model(pl_module.model)
        self.subspace = subspace.to(pl_module.device)
        if self.config.subspace == "real":
            self.reference = self.subspace

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        subspace = self.subspace  # restored from a checkpoint, else loaded or extracted
        if subspace is None and self.config.subspace_path is not None:
            subspace = HackSubspace.load(self.config.subspace_path)
        if subspace is None:
            subspace = self.extract(pl_module, trainer.datamodule)
        if self.config.subspace != "real":  # the diagnostics' real V (restored with the control, else extracted)
            reference = self.reference or self.extract(pl_module, trainer.datamodule, "real")
            reference.check_model(pl_module.model)
            self.reference = reference.to(pl_module.device)
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
        reference = self.reference.v_hack
        grads = {name: a.delta_s.grad if a.delta_s.grad is not None else torch.zeros_like(a.delta_s)
                 for name, a in adapters.items()}
        projected = dict(grads)
        removed_sq = torch.zeros(())
        for name, v_hack in self.subspace.v_hack.items():
            g = grads[name]
            result = project_gradient(g, v_hack, cfg.gate, cfg.overshoot, cfg.preserve_magnitude)
            if cfg.match_energy:
                target = (project_gradient(g, reference[name], cfg.gate, cfg.overshoot).removed.norm()
                          if name in reference else torch.zeros((), device=g.device))
                result = energy_matched(g, result.removed, target)
            projected[name] = result.g_projected
            removed_sq = removed_sq + result.removed.detach().float().cpu().square().sum()
            if cfg.intervention != "none":
                adapters[name].delta_s.grad = result.g_projected
            if cfg.intervention == "route":
                adapters[name].delta_s_hack.grad = result.removed
            if cfg.project_moments and cfg.intervention != "none":
                self._project_moment(optimizer, adapters[name].delta_s, v_hack)
        stats: dict[str, list[Tensor]] = {"cin": [], "cout": [], "fired": [], "cin_s": [], "cin_t": [], "null": []}
        for name, v_ref in reference.items():
            g = grads[name]
            stats["cin"].append(hack_cosine(g, v_ref))
            stats["cout"].append(hack_cosine(projected[name], v_ref))
            stats["fired"].append(fired(v_ref @ g.to(v_ref.dtype)).float())
            stats["null"].append(torch.tensor(null_cosine_level(v_ref.shape[0], v_ref.shape[1])))
            if parts is not None:
                stats["cin_s"].append(hack_cosine(parts.student[name], v_ref))
                stats["cin_t"].append(hack_cosine(parts.teacher[name], v_ref))
        # In model order: the leak and quarantine norms reduce over these, so the order must not depend on the
        # process (a set's order follows the string hash seed, and float sums follow the order).
        self._before_step = {
            name: torch.stack([adapter.delta_s.detach().clone(), adapter.delta_s_hack.detach().clone()])
            for name, adapter in adapters.items() if name in reference or name in self.subspace.v_hack
        }
        for key, values in stats.items():
            if values:
                pl_module.log(f"proj/{key}", torch.stack(values).float().mean(), prog_bar=key == "cin_s",
                              on_step=True, on_epoch=False, batch_size=1)
        # Share of the gradient's squared norm the arm's V takes (or, under intervention none, would take).
        total_sq = sum(g.detach().float().cpu().square().sum() for g in grads.values())
        pl_module.log("proj/removed_energy", removed_sq / total_sq if total_sq > 0 else torch.zeros(()),
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
            adapter = adapters[name]
            if name in self.reference.v_hack:
                leaks.append(update_leak(before[0], adapter.delta_s.detach(), self.reference.v_hack[name]))
            if self.config.intervention == "route" and name in self.subspace.v_hack:
                v_hack = self.subspace.v_hack[name]
                move = adapter.delta_s_hack - before[1]
                adapter.delta_s_hack.copy_(before[1] + (move @ v_hack.T.to(move.dtype)) @ v_hack.to(move.dtype))
            quarantine.append(adapter.delta_s_hack.detach().norm())
        self._before_step = {}
        if leaks:
            pl_module.log("proj/leak", torch.stack(leaks).mean(), on_step=True, on_epoch=False, batch_size=1)
        pl_module.log("proj/delta_s_hack_norm", torch.stack(quarantine).norm(), on_step=True, on_epoch=False,
                      batch_size=1)

    # --- checkpoint ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self.subspace is None:
            return {}
        state = {"subspace": _subspace_state(self.subspace)}
        if self.reference is not None and self.reference is not self.subspace:
            state["reference"] = _subspace_state(self.reference)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self.subspace = HackSubspace(**state_dict["subspace"])
            self.reference = HackSubspace(**state_dict["reference"]) if "reference" in state_dict else None


def _subspace_state(s: HackSubspace) -> dict[str, Any]:
    return {"v_hack": {k: v.cpu() for k, v in s.v_hack.items()},
            "singular_values": {k: v.cpu() for k, v in s.singular_values.items()},
            "weight_hashes": dict(s.weight_hashes), "metadata": dict(s.metadata)}
