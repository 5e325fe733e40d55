"""Hack subspace V from pair gradients (docs/design.md section 3): SVD, orientation, floors, controls, overlap.

Pure tensor functions; computing the pair gradients and caching V live elsewhere. One module at a
time: g_hack, g_clean are the (n_pairs, r) gradients on that module's delta_s.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


def orient_rows_hackward(v_hack: Tensor, diffs: Tensor) -> Tensor:
    """Flip each row of V to point hack-ward by per-pair majority vote over D_j . v_i.

    A row is flipped when more pairs have D_j . v_i < 0 than > 0; pairs with D_j . v_i == 0 abstain.
    Ties are broken by the sign of sum_j D_j . v_i, so the result never depends on the arbitrary
    sign LAPACK gives a singular vector (docs/design.md's "flip if fewer than half are positive" is the same
    rule when nobody abstains, except that it leaves exact ties to that arbitrary sign).
    """
    # v_hack: (k, r), diffs: (n, r) -> (k, r)
    projections = diffs @ v_hack.T  # (n, k)
    positive = (projections > 0).sum(dim=0)
    negative = (projections < 0).sum(dim=0)
    flip = (negative > positive) | ((negative == positive) & (projections.sum(dim=0) < 0))
    return torch.where(flip[:, None], -v_hack, v_hack)


def hack_basis_from_pair_grads(
    g_hack: Tensor, g_clean: Tensor, k: int, tau_axis: float | None = None
) -> tuple[Tensor, Tensor]:
    """Top-k right singular vectors of D = g_hack - g_clean, oriented hack-ward, with their singular values.

    D_j is the GRPO gradient of pair j with advantages +1 (hack) / -1 (clean). k is capped at
    min(n, r). Weak rows are dropped, not zeroed, so V stays orthonormal and the noise floor pools
    only real axes: rows beyond D's numerical rank (S <= S_0 * max(n, r) * eps: arbitrary completions
    from the SVD, not data), and with `tau_axis` rows with S < tau_axis * S_0. A zero D gives (0, r).

    The same function gives the `nonhack` control when called on two clean completions per pair,
    and the `shuffled` control on the output of `shuffle_pair_labels`.
    """
    # g_hack, g_clean: (n, r) -> v_hack: (k', r) orthonormal rows, singular_values: (k',)
    if g_hack.dim() != 2 or g_hack.shape != g_clean.shape:
        raise ValueError(f"g_hack and g_clean must both be (n, r), got {tuple(g_hack.shape)}, {tuple(g_clean.shape)}")
    diffs = (g_hack - g_clean).to(torch.promote_types(g_hack.dtype, torch.float32))
    n, r = diffs.shape
    k_max = min(k, n, r)
    if k_max <= 0:
        return diffs.new_zeros(0, r), diffs.new_zeros(0)
    _, singular_values, vh = torch.linalg.svd(diffs, full_matrices=False)
    singular_values, v_hack = singular_values[:k_max], vh[:k_max]
    top = singular_values[0]
    keep = singular_values > top * max(n, r) * torch.finfo(diffs.dtype).eps
    if tau_axis is not None:
        keep &= singular_values >= tau_axis * top
    v_hack, singular_values = v_hack[keep], singular_values[keep]
    return orient_rows_hackward(v_hack, diffs), singular_values


def apply_noise_floor(singular_values_by_module: Mapping[str, Tensor], drop_bottom_frac: float) -> dict[str, Tensor]:
    """Keep masks after a global noise floor: rows whose singular value is below the `drop_bottom_frac`
    quantile of all modules' kept singular values (pooled, linear interpolation) are dropped.

    A module whose mask is all False is left unprojected. The floor is global on purpose: a module
    whose hack signal is weak everywhere loses all its rows instead of keeping its noisiest ones.
    """
    # each value: (k_m,) -> bool keep mask (k_m,) on the same device
    if not 0.0 <= drop_bottom_frac < 1.0:
        raise ValueError(f"drop_bottom_frac must be in [0, 1), got {drop_bottom_frac}")
    pooled = [s.detach().double().cpu().flatten() for s in singular_values_by_module.values()]
    if drop_bottom_frac == 0.0 or sum(p.numel() for p in pooled) == 0:
        return {name: torch.ones_like(s, dtype=torch.bool) for name, s in singular_values_by_module.items()}
    threshold = torch.quantile(torch.cat(pooled), drop_bottom_frac).item()
    return {name: s.double() >= threshold for name, s in singular_values_by_module.items()}


def random_basis(
    k: int,
    r: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """The `random` control: k Haar-random orthonormal rows (QR of a Gaussian, signs fixed by diag(R)).

    Drawn on the CPU in float64 so a seeded generator gives the same basis on every device and rank.
    """
    # -> (k, r)
    if not 0 <= k <= r:
        raise ValueError(f"need 0 <= k <= r, got k={k}, r={r}")
    gaussian = torch.randn(r, k, generator=generator, dtype=torch.float64)
    q, upper = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(upper))
    return q.T.to(dtype=dtype, device=device).contiguous()


def shuffle_pair_labels(
    g_hack: Tensor, g_clean: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """The `shuffled` control: swap hack / clean within each pair with probability 1/2, reusing the
    already computed gradients.

    Note: a swap only flips the sign of D_j, and D^T D is invariant to that, so the shuffled control
    has exactly the real V's subspace and singular values; only the majority-vote orientation is
    randomised. It controls for orientation (meaningful under the one_sided gate), not for the
    subspace: under no_gate it removes exactly what the real V removes.
    """
    # g_hack, g_clean: (n, r) -> (n, r), (n, r)
    swap = (torch.rand(g_hack.shape[0], generator=generator) < 0.5).to(g_hack.device)[:, None]
    return torch.where(swap, g_clean, g_hack), torch.where(swap, g_hack, g_clean)


def basis_overlap(v_new: Tensor, v_old: Tensor) -> float:
    """Mean over new rows of the norm of their projection onto span(v_old): mean_i ||V_old v_new_i||.

    In [0, 1]; equals |<v_new, v_old>| for k = 1, and is invariant to sign flips and rotations
    within span(v_old), so a refresh that returns the same subspace with reshuffled near-degenerate
    axes still reads 1 (a max-|cos| matching would not). Two random bases read about sqrt(k_old / r).
    NaN when v_new has no rows (nothing to compare); 0 when v_old has none.
    """
    # v_new: (k_new, r), v_old: (k_old, r) orthonormal rows -> float
    if v_new.shape[0] == 0:
        return float("nan")
    v_old = v_old.to(dtype=v_new.dtype, device=v_new.device)
    return (v_new @ v_old.T).norm(dim=1).mean().item()
