"""Hack-subspace projection of a gradient (docs/design.md section 4): the math under the projection Callback.

V (`v_hack`) has orthonormal rows oriented hack-ward: a loss gradient g with v.g > 0 is one whose
descent step -lr*g moves toward hacking. Every function broadcasts over leading dims.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Gate = Literal["one_sided", "no_gate", "reverse"]


@dataclass(frozen=True)
class ProjectionResult:
    """g' = g - removed (before any magnitude rescale); `coeffs` c = V g, before gating."""

    g_projected: Tensor  # (..., r)
    removed: Tensor  # (..., r): what `route` writes to delta_s_hack.grad
    coeffs: Tensor  # (..., k)


def _gated(coeffs: Tensor, gate: Gate) -> Tensor:
    # coeffs: (..., k) -> (..., k)
    if gate == "one_sided":
        return coeffs.clamp_min(0)
    if gate == "no_gate":
        return coeffs
    if gate == "reverse":
        return 2 * coeffs
    raise ValueError(f"unknown gate {gate!r}; expected 'one_sided', 'no_gate' or 'reverse'")


def _safe_ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator, and 0 where the denominator is 0 (no NaN for a zero gradient)."""
    safe = denominator.clamp_min(torch.finfo(denominator.dtype).tiny)
    return torch.where(denominator > 0, numerator / safe, torch.zeros_like(numerator))


def project_gradient(
    g: Tensor,
    v_hack: Tensor,
    gate: Gate = "one_sided",
    overshoot: float = 1.0,
    preserve_magnitude: bool = False,
) -> ProjectionResult:
    """Remove the gated hack-ward component: c = V g, removed = overshoot * gate(c) @ V, g' = g - removed.

    one_sided removes only hack-ward coefficients (c > 0), no_gate all of span(V), reverse pushes the
    in-span component to its mirror image (-c). `preserve_magnitude` rescales g' to ||g|| (a zero g'
    stays zero); `removed` is never rescaled. k = 0 rows or g = 0 return g unchanged.
    """
    # g: (..., r), v_hack: (..., k, r) orthonormal rows -> g_projected, removed: (..., r), coeffs: (..., k)
    v_hack = v_hack.to(dtype=g.dtype, device=g.device)
    coeffs = torch.einsum("...kr,...r->...k", v_hack, g)
    removed = overshoot * torch.einsum("...k,...kr->...r", _gated(coeffs, gate), v_hack)
    g_projected = g - removed
    if preserve_magnitude:
        out_norm = g_projected.norm(dim=-1, keepdim=True)
        g_projected = g_projected * _safe_ratio(g.norm(dim=-1, keepdim=True), out_norm)
    return ProjectionResult(g_projected=g_projected, removed=removed, coeffs=coeffs)


def energy_matched(g: Tensor, removed: Tensor, target_norm: Tensor) -> ProjectionResult:
    """The energy-matched control: `removed` (a control subspace's removal) rescaled to `target_norm` (the real
    V's removal norm for the same gradient), so the control takes exactly as much gradient norm as the real V,
    along directions that are not hack-ward. Where the control's own span holds less than that, the rescaled
    removal overshoots inside that span (it also reverses part of it); nothing is removed where it has none."""
    # g, removed: (r,), target_norm: () -> g_projected, removed: (r,)
    scale = _safe_ratio(target_norm, removed.norm())
    matched = removed * scale
    return ProjectionResult(g - matched, matched, scale.reshape(1))


def hack_cosine(g: Tensor, v_hack: Tensor) -> Tensor:
    """||relu(V g)|| / ||g||: the hack-ward fraction of g (cin on g, cout on g'; 0 for g = 0).

    relu before the norm, so anti-hack components never count as signal.
    """
    # g: (..., r), v_hack: (..., k, r) -> (...)
    coeffs = torch.einsum("...kr,...r->...k", v_hack.to(dtype=g.dtype, device=g.device), g)
    return _safe_ratio(coeffs.clamp_min(0).norm(dim=-1), g.norm(dim=-1))


def fired(coeffs: Tensor) -> Tensor:
    """Whether a one-sided projection removed anything: any coefficient c = V g is positive."""
    # coeffs: (..., k) -> (...) bool
    return (coeffs > 0).any(dim=-1)


def null_cosine_level(k: int, r: int) -> float:
    """E[hack_cosine(g, V)] for g uniform on the unit sphere of R^r and any k orthonormal rows.

    The null line for cin / cout. docs/design.md's sqrt(k/r) is the RMS of ||V g|| without relu
    (E||V g||^2 = k/r); with the relu each coordinate survives half the time, so the RMS of cin is
    sqrt(k/(2r)), and its mean is lower still for small k (a single row is 0 half the time). This
    returns the exact mean, the right comparison for a logged average of cin:
    with m ~ Binomial(k, 1/2) positive coordinates and ||x_{1..m}||^2 ~ Beta(m/2, (r-m)/2),
        E = sum_m C(k, m) 2^-k  Gamma((m+1)/2) Gamma(r/2) / (Gamma(m/2) Gamma((r+1)/2)).
    """
    if not 0 <= k <= r or r < 1:
        raise ValueError(f"need 0 <= k <= r and r >= 1, got k={k}, r={r}")
    log_tail = math.lgamma(r / 2) - math.lgamma((r + 1) / 2)
    return math.fsum(
        math.exp(
            math.lgamma(k + 1) - math.lgamma(m + 1) - math.lgamma(k - m + 1) - k * math.log(2)
            + math.lgamma((m + 1) / 2) - math.lgamma(m / 2) + log_tail
        )
        for m in range(1, k + 1)
    )


def remove_hackward_moment(exp_avg: Tensor, v_hack: Tensor) -> Tensor:
    """Adam's first moment without its hack-ward part in span(V) (the `project_moments` option).

    The moment is a running mean of gradients, so "hack-ward" means what it means for g: positive
    coefficients, removed exactly as the one_sided gate does. Otherwise momentum keeps stepping
    toward hacking after the gradient itself has been projected.
    """
    # exp_avg: (..., r), v_hack: (..., k, r) -> (..., r)
    return project_gradient(exp_avg, v_hack, gate="one_sided").g_projected


def update_leak(delta_before: Tensor, delta_after: Tensor, v_hack: Tensor) -> Tensor:
    """Hack-ward fraction of the parameter update actually taken: ||relu(V(-u))|| / ||u||, u = after - before.

    Sign: V is oriented on loss gradients, and a descent step is u ~ -lr * g. So -u is the gradient
    that would produce this update, and the update is hack-ward where V(-u) > 0. 0 when u = 0.
    """
    # delta_before, delta_after: (..., r), v_hack: (..., k, r) -> (...)
    return hack_cosine(delta_before - delta_after, v_hack)
