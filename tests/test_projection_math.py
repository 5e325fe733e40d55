"""Projection of a gradient onto / off the hack subspace, its diagnostics and the update-space leak."""

import math

import pytest
import torch

from antipasto_pl.projection_math import (
    energy_matched,
    fired,
    hack_cosine,
    null_cosine_level,
    project_gradient,
    remove_hackward_moment,
    update_leak,
)

GATES = ["one_sided", "no_gate", "reverse"]


def _basis(k: int, r: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(r, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.T  # (k, r) orthonormal rows


def _span_residual(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return x - (v @ x) @ v  # the part of x orthogonal to span(V)


def test_hand_example():
    v = torch.eye(5)[:2]  # rows e0, e1
    g = torch.tensor([2.0, -3.0, 1.0, 0.0, 0.0])
    out = project_gradient(g, v)
    # c = (2, -3); one_sided keeps only c0 = 2: removed = 2 e0
    torch.testing.assert_close(out.coeffs, torch.tensor([2.0, -3.0]))
    torch.testing.assert_close(out.removed, torch.tensor([2.0, 0, 0, 0, 0]))
    torch.testing.assert_close(out.g_projected, torch.tensor([0.0, -3.0, 1.0, 0, 0]))
    assert hack_cosine(g, v).item() == pytest.approx(2 / math.sqrt(14))
    torch.testing.assert_close(project_gradient(g, v, overshoot=1.5).removed, torch.tensor([3.0, 0, 0, 0, 0]))
    torch.testing.assert_close(project_gradient(g, v, "no_gate").g_projected, torch.tensor([0.0, 0, 1, 0, 0]))
    torch.testing.assert_close(project_gradient(g, v, "reverse").g_projected, torch.tensor([-2.0, 3, 1, 0, 0]))


@pytest.mark.parametrize("gate", GATES)
def test_removed_in_span_and_orthogonal_part_untouched(gate):
    v, g = _basis(3, 12), torch.randn(12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = project_gradient(g, v, gate, overshoot=1.3)
    torch.testing.assert_close(_span_residual(out.removed, v), torch.zeros(12, dtype=torch.float64))
    torch.testing.assert_close(_span_residual(out.g_projected, v), _span_residual(g, v))
    torch.testing.assert_close(out.g_projected + out.removed, g)


def test_gate_effects_in_span():
    v = _basis(4, 16)
    g = torch.randn(16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    coeffs = v @ g
    assert (coeffs > 0).any() and (coeffs < 0).any()

    one_sided = project_gradient(g, v, "one_sided").g_projected
    assert hack_cosine(one_sided, v).item() == pytest.approx(0.0, abs=1e-12)  # cout = 0
    torch.testing.assert_close(v @ one_sided, coeffs.clamp_max(0))  # anti-hack coefficients kept

    no_gate = project_gradient(g, v, "no_gate").g_projected
    torch.testing.assert_close(v @ no_gate, torch.zeros(4, dtype=torch.float64))

    reverse = project_gradient(g, v, "reverse").g_projected
    torch.testing.assert_close(v @ reverse, -coeffs)


def test_preserve_magnitude():
    v = _basis(3, 10)
    g = torch.randn(10, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    plain = project_gradient(g, v, "no_gate").g_projected
    kept = project_gradient(g, v, "no_gate", preserve_magnitude=True)
    assert kept.g_projected.norm().item() == pytest.approx(g.norm().item())
    torch.testing.assert_close(kept.g_projected / kept.g_projected.norm(), plain / plain.norm())
    torch.testing.assert_close(kept.removed, project_gradient(g, v, "no_gate").removed)  # removed not rescaled


@pytest.mark.parametrize("gate", GATES)
def test_zero_gradient_and_empty_basis(gate):
    v, zero = _basis(3, 8), torch.zeros(8, dtype=torch.float64)
    out = project_gradient(zero, v, gate, preserve_magnitude=True)
    assert torch.equal(out.g_projected, zero) and torch.equal(out.removed, zero)
    assert hack_cosine(zero, v).item() == 0.0
    assert update_leak(zero, zero, v).item() == 0.0

    g = torch.randn(8, dtype=torch.float64)
    empty = torch.zeros(0, 8, dtype=torch.float64)
    out = project_gradient(g, empty, gate, preserve_magnitude=True)
    torch.testing.assert_close(out.g_projected, g)
    assert out.coeffs.shape == (0,) and not fired(out.coeffs)
    assert hack_cosine(g, empty).item() == 0.0


def test_fired():
    assert fired(torch.tensor([-1.0, 0.5])) and not fired(torch.tensor([-1.0, 0.0]))


def test_remove_hackward_moment():
    v = torch.eye(4)[:2]
    exp_avg = torch.tensor([2.0, -3.0, 1.0, 4.0])
    # hack-ward part is 2 e0 only; the anti-hack e1 component and the orthogonal part stay
    torch.testing.assert_close(remove_hackward_moment(exp_avg, v), torch.tensor([0.0, -3.0, 1.0, 4.0]))


def test_update_leak_sign():
    v = torch.eye(4)[:1]  # hack-ward gradient direction e0
    before = torch.tensor([0.5, 0.5, 0.5, 0.5])
    lr = 0.1
    # descent on the hack-ward gradient g = e0 moves delta by -lr * e0: fully hack-ward
    assert update_leak(before, before - lr * v[0], v).item() == pytest.approx(1.0)
    assert update_leak(before, before + lr * v[0], v).item() == 0.0  # anti-hack update
    orthogonal = torch.tensor([0.0, 1.0, -2.0, 0.5])
    assert update_leak(before, before + orthogonal, v).item() == 0.0
    # update -(3 e0) + 4 e1: leak 3 / 5
    assert update_leak(before, before + torch.tensor([-3.0, 4.0, 0, 0]), v).item() == pytest.approx(0.6)


@pytest.mark.parametrize(("k", "r"), [(1, 20), (3, 50), (16, 64)])
def test_null_level_matches_monte_carlo(k, r):
    generator = torch.Generator().manual_seed(k)
    g = torch.randn(40_000, r, generator=generator, dtype=torch.float64)
    g = g / g.norm(dim=1, keepdim=True)
    estimate = hack_cosine(g, _basis(k, r)).mean().item()
    assert estimate == pytest.approx(null_cosine_level(k, r), rel=0.02)


def test_null_level_limits():
    assert null_cosine_level(0, 10) == 0.0
    assert null_cosine_level(1, 1) == pytest.approx(0.5)  # g = +-1: relu keeps it half the time
    # for many rows the mean approaches the RMS sqrt(k / (2r)), below docs/design.md's no-relu sqrt(k / r)
    assert null_cosine_level(400, 10_000) == pytest.approx(math.sqrt(400 / 20_000), rel=0.01)


def test_energy_matched_removal_has_the_target_norm_inside_the_control_span() -> None:
    """The energy-matched control removes exactly the real V's norm, along its own removal's direction."""
    generator = torch.Generator().manual_seed(0)
    g = torch.randn(16, generator=generator)
    v_random = torch.linalg.qr(torch.randn(16, 2, generator=generator))[0].T  # (2, 16)
    own = project_gradient(g, v_random)
    target = torch.tensor(2.5)
    matched = energy_matched(g, own.removed, target)
    assert torch.allclose(matched.removed.norm(), target)
    assert torch.allclose(matched.removed / matched.removed.norm(), own.removed / own.removed.norm())
    assert torch.allclose(matched.g_projected + matched.removed, g)
    nothing = energy_matched(g, torch.zeros(16), target)  # no component to scale: nothing removed
    assert torch.equal(nothing.g_projected, g)
