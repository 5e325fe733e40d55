"""Hack subspace extraction: planted direction, orientation, floors, controls, overlap."""

import math

import pytest
import torch

from antipasto_pl.vhack_math import (
    apply_noise_floor,
    basis_overlap,
    hack_basis_from_pair_grads,
    orient_rows_hackward,
    random_basis,
    shuffle_pair_labels,
)


def _planted_pairs(n: int = 16, r: int = 32, seed: int = 0):
    """g_hack = base + s_j u + noise, g_clean = base + noise, with a known unit u and s_j > 0."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.randn(r, generator=generator)
    u = u / u.norm()
    base = torch.randn(n, r, generator=generator)
    strength = 2.0 + torch.rand(n, 1, generator=generator)
    g_hack = base + strength * u + 0.05 * torch.randn(n, r, generator=generator)
    g_clean = base + 0.05 * torch.randn(n, r, generator=generator)
    return g_hack, g_clean, u


def _assert_orthonormal_rows(v: torch.Tensor):
    torch.testing.assert_close(v @ v.T, torch.eye(v.shape[0], dtype=v.dtype), atol=1e-5, rtol=0)


def test_recovers_planted_direction_oriented_hackward():
    g_hack, g_clean, u = _planted_pairs()
    v, s = hack_basis_from_pair_grads(g_hack, g_clean, k=3)
    assert v.shape == (3, 32) and s.shape == (3,)
    _assert_orthonormal_rows(v)
    assert (v[0] @ u).item() > 0.9  # |cos| > 0.9 and the sign points hack-ward
    assert (s[:-1] >= s[1:]).all()
    # swapping hack and clean flips the orientation, not the axis
    v_swapped, _ = hack_basis_from_pair_grads(g_clean, g_hack, k=3)
    assert (v_swapped[0] @ u).item() < -0.9


def test_orientation_is_majority_vote_not_sum():
    # two pairs point along -e0, one strongly along +e0: the sum is positive, the majority negative
    diffs = torch.tensor([[-1.0, 0.0], [-1.0, 0.0], [5.0, 0.0]])
    assert torch.equal(orient_rows_hackward(torch.tensor([[1.0, 0.0]]), diffs), torch.tensor([[-1.0, 0.0]]))
    # the full extraction (rank-1 D) ends on the majority side too
    v, _ = hack_basis_from_pair_grads(diffs, torch.zeros_like(diffs), k=2)
    assert torch.equal(v, torch.tensor([[-1.0, 0.0]]))  # rank 1: the null-space row is dropped


def test_orientation_tie_broken_by_summed_projection():
    diffs = torch.tensor([[-1.0, 0.0], [3.0, 0.0]])  # one vote each way, sum +2
    for start in ([1.0, 0.0], [-1.0, 0.0]):
        assert torch.equal(orient_rows_hackward(torch.tensor([start]), diffs), torch.tensor([[1.0, 0.0]]))
    # pairs with D . v == 0 abstain: one positive vote against none wins
    abstaining = torch.tensor([[0.0, 1.0], [0.0, 2.0], [1.0, 0.0]])
    assert torch.equal(orient_rows_hackward(torch.tensor([[-1.0, 0.0]]), abstaining), torch.tensor([[1.0, 0.0]]))


def test_tau_axis_and_k_cap():
    diffs = torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.2, 0.0]])  # S = 3, 1, 0.2
    zeros = torch.zeros_like(diffs)
    _, s = hack_basis_from_pair_grads(diffs, zeros, k=10)  # capped at min(n, r) = 3
    torch.testing.assert_close(s, torch.tensor([3.0, 1.0, 0.2]))
    v, s = hack_basis_from_pair_grads(diffs, zeros, k=3, tau_axis=0.25)  # keep S >= 0.75
    torch.testing.assert_close(s, torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(v, torch.eye(4)[:2])
    assert hack_basis_from_pair_grads(diffs, zeros, k=1)[0].shape == (1, 4)
    v, s = hack_basis_from_pair_grads(zeros, zeros, k=3)  # no signal at all: no rows
    assert v.shape == (0, 4) and s.shape == (0,)


def test_noise_floor_pools_across_modules():
    singular_values = {
        "a": torch.tensor([4.0, 1.0]),
        "b": torch.tensor([3.0, 2.0, 0.5]),
        "c": torch.tensor([0.1]),
    }
    # pooled sorted: 0.1 0.5 1 2 3 4; the 0.5 quantile sits at position 2.5 -> 1 + 0.5 * (2 - 1) = 1.5
    masks = apply_noise_floor(singular_values, drop_bottom_frac=0.5)
    assert masks["a"].tolist() == [True, False]
    assert masks["b"].tolist() == [True, True, False]
    assert masks["c"].tolist() == [False]  # module left without rows: not projected
    assert all(m.all() for m in apply_noise_floor(singular_values, 0.0).values())
    with pytest.raises(ValueError):
        apply_noise_floor(singular_values, 1.0)


def test_random_basis_orthonormal_and_reproducible():
    v = random_basis(5, 40, torch.Generator().manual_seed(7))
    assert v.shape == (5, 40) and v.dtype == torch.float32
    _assert_orthonormal_rows(v)
    assert torch.equal(v, random_basis(5, 40, torch.Generator().manual_seed(7)))
    assert not torch.allclose(v, random_basis(5, 40, torch.Generator().manual_seed(8)))
    assert random_basis(0, 40).shape == (0, 40)


def test_shuffle_pair_labels_reproducible_and_swaps_some():
    g_hack, g_clean, _ = _planted_pairs(n=32)
    a1, b1 = shuffle_pair_labels(g_hack, g_clean, torch.Generator().manual_seed(3))
    a2, b2 = shuffle_pair_labels(g_hack, g_clean, torch.Generator().manual_seed(3))
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    swapped = (a1 == g_clean).all(dim=1)
    kept = (a1 == g_hack).all(dim=1)
    assert (swapped | kept).all() and swapped.any() and kept.any()
    torch.testing.assert_close(a1 + b1, g_hack + g_clean)


def test_shuffled_control_keeps_the_subspace():
    # swaps flip the sign of D rows, and D^T D ignores signs: same span, same singular values
    g_hack, g_clean, _ = _planted_pairs()
    v, s = hack_basis_from_pair_grads(g_hack, g_clean, k=4)
    v_shuffled, s_shuffled = hack_basis_from_pair_grads(
        *shuffle_pair_labels(g_hack, g_clean, torch.Generator().manual_seed(0)), k=4
    )
    torch.testing.assert_close(s_shuffled, s)
    assert basis_overlap(v_shuffled, v) == pytest.approx(1.0, abs=1e-4)


def test_basis_overlap():
    v = random_basis(4, 64, torch.Generator().manual_seed(1))
    assert basis_overlap(v, v) == pytest.approx(1.0, abs=1e-6)
    rotation = random_basis(4, 4, torch.Generator().manual_seed(2))  # 4x4 orthogonal
    signs = torch.tensor([1.0, -1.0, -1.0, 1.0])[:, None]
    assert basis_overlap(signs * (rotation @ v), v) == pytest.approx(1.0, abs=1e-5)
    # k = 1 reduces to |cos|
    a, b = torch.tensor([[0.6, 0.8, 0.0]]), torch.tensor([[-1.0, 0.0, 0.0]])
    assert basis_overlap(a, b) == pytest.approx(0.6)
    assert basis_overlap(torch.eye(3)[:1], torch.eye(3)[1:]) == 0.0
    # random bases: about sqrt(k / r) = 0.25
    other = random_basis(4, 64, torch.Generator().manual_seed(3))
    assert basis_overlap(other, v) < 2 * math.sqrt(4 / 64)
    assert math.isnan(basis_overlap(torch.zeros(0, 64), v))
    assert basis_overlap(v, torch.zeros(0, 64)) == 0.0
