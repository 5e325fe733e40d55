"""GRPO loss pieces against hand-computed values (numbers worked out in the comments)."""

import math

import pytest
import torch

from antipasto_pl.grpo import (
    grpo_loss,
    group_advantages,
    k3_kl,
    per_sequence_loss,
    ppo_clip_token_loss,
    sampler_logp_gap,
    sampling_log_probs,
    token_log_probs,
    truncated_importance_weights,
    warp_logits,
)


def test_group_advantages_2x3_by_hand():
    rewards = torch.tensor([[1.25, 0.25, 0.25], [0.0, 0.25, 1.25]])
    # row 0: mean 1.75 / 3, so 1.25 - 7/12 = 2/3 and 0.25 - 7/12 = -1/3
    # row 1: mean 1.5 / 3 = 0.5
    expected = torch.tensor([[2 / 3, -1 / 3, -1 / 3], [-0.5, -0.25, 0.75]])
    torch.testing.assert_close(group_advantages(rewards), expected)


def test_zero_variance_group_is_exactly_zero():
    rewards = torch.tensor([[0.1, 0.1, 0.1], [0.0, 1.25, 1.25]])
    advantages = group_advantages(rewards)
    assert torch.equal(advantages[0], torch.zeros(3))  # exact, not a rounding residue of R - mean
    # row 1: mean 2.5 / 3 = 5/6
    torch.testing.assert_close(advantages[1], torch.tensor([-5 / 6, 5 / 12, 5 / 12]))
    assert torch.equal(group_advantages(rewards, scale_by_std=True)[0], torch.zeros(3))


def test_std_scaling_uses_sample_std():
    rewards = torch.tensor([[0.0, 1.25]])
    # mean 0.625, A = -+0.625; sample std = sqrt(2 * 0.625^2 / 1) = 0.625 * sqrt(2), so A / std = -+1/sqrt(2)
    scaled = group_advantages(rewards, scale_by_std=True, eps=0.0)
    torch.testing.assert_close(scaled, torch.tensor([[-1.0, 1.0]]) / math.sqrt(2))


def test_token_log_probs_by_hand_and_bf16_upcast():
    # vocab of 2 with logits (0, ln 3): p = (1/4, 3/4) at every position
    logits = torch.tensor([0.0, math.log(3.0)]).expand(1, 3, 2)
    input_ids = torch.tensor([[0, 1, 0]])
    expected = torch.tensor([[math.log(3 / 4), math.log(1 / 4)]])  # scores tokens 1 and 2
    torch.testing.assert_close(token_log_probs(logits, input_ids), expected)

    big = torch.tensor([[[1000.0, 0.0], [0.0, 1000.0]]], dtype=torch.bfloat16)
    out = token_log_probs(big, torch.tensor([[0, 1]]))  # token 1 at logits (1000, 0): log p = -1000
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.tensor([[-1000.0]]))


@pytest.mark.parametrize(
    ("ratio", "advantage", "expected", "clipped"),
    [
        (1.5, 1.0, -1.2, True),  # -min(1.5, 1.2): capped at 1+eps
        (0.5, 1.0, -0.5, False),  # -min(0.5, 0.8)
        (1.5, -1.0, 1.5, False),  # -min(-1.5, -1.2)
        (0.5, -1.0, 0.8, True),  # -min(-0.5, -0.8): capped at 1-eps
    ],
)
def test_ppo_clip(ratio, advantage, expected, clipped):
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss = ppo_clip_token_loss(logp, torch.zeros(1, 1), torch.tensor([advantage]), clip_eps=0.2)
    torch.testing.assert_close(loss, torch.tensor([[expected]]))
    loss.sum().backward()
    # clipped tokens carry no gradient; otherwise d/dlogp (-rho A) = -rho A
    expected_grad = 0.0 if clipped else -ratio * advantage
    torch.testing.assert_close(logp.grad, torch.tensor([[expected_grad]]))


def test_k3_kl():
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    assert torch.equal(k3_kl(logp, logp), torch.zeros(1, 3))
    assert (k3_kl(logp, logp + torch.tensor([[0.3, -0.7, 2.0]])) > 0).all()
    # ref - logp = ln 2: 2 - ln 2 - 1; ref - logp = -ln 2: 1/2 + ln 2 - 1
    ln2 = math.log(2.0)
    value = k3_kl(torch.zeros(1, 2), torch.tensor([[ln2, -ln2]]))
    torch.testing.assert_close(value, torch.tensor([[1 - ln2, ln2 - 0.5]]))


def test_reductions_on_masked_example():
    token_loss = torch.tensor([[1.0, 2.0, 3.0, float("inf")], [10.0, float("nan"), 30.0, 40.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    # dr_grpo: (1 + 2 + 3 + 10) / 8 = 2
    assert per_sequence_loss(token_loss, mask, "dr_grpo", denom=8).sum().item() == pytest.approx(2.0)
    # sequence: (6 / 3 + 10 / 1) / 2 = 6
    assert per_sequence_loss(token_loss, mask, "sequence").sum().item() == pytest.approx(6.0)
    torch.testing.assert_close(per_sequence_loss(token_loss, mask, "sequence"), torch.tensor([1.0, 5.0]))
    with pytest.raises(ValueError):
        per_sequence_loss(token_loss, mask, "dr_grpo")


def _batch():
    torch.manual_seed(0)
    logp = (-torch.rand(4, 5)).requires_grad_()
    advantages = torch.tensor([1.5, -0.5, 0.25, -1.25])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
    return logp, advantages, mask


@pytest.mark.parametrize("mode", ["dr_grpo", "sequence"])
def test_student_teacher_split_sums_to_whole(mode):
    logp, advantages, mask = _batch()
    out = grpo_loss(
        logp, advantages, mask, logp_old=logp.detach() + 0.1, ref_logp=logp.detach() - 0.2,
        beta=0.05, mode=mode, denom=20 if mode == "dr_grpo" else None,
    )
    student, teacher = torch.tensor([0, 1]), torch.tensor([2, 3])
    loss_s, loss_t = out.per_sequence[student].sum(), out.per_sequence[teacher].sum()
    torch.testing.assert_close(loss_s + loss_t, out.loss)
    grad_s, = torch.autograd.grad(loss_s, logp, retain_graph=True)
    grad_t, = torch.autograd.grad(loss_t, logp, retain_graph=True)
    grad, = torch.autograd.grad(out.loss, logp)
    torch.testing.assert_close(grad_s + grad_t, grad)


def test_gradient_at_rho_one_is_minus_advantage_over_denom():
    logp, advantages, mask = _batch()
    # K3's gradient vanishes at logp == ref_logp, so beta does not change it
    out = grpo_loss(logp, advantages, mask, ref_logp=logp.detach(), beta=0.1, denom=10)
    out.loss.backward()
    expected = -advantages[:, None] * mask / 10
    torch.testing.assert_close(logp.grad, expected)
    assert out.stats["rho_mean"].item() == 1.0 and out.stats["clip_frac"].item() == 0.0
    assert out.stats["kl_mean"].item() == 0.0


def test_stats_by_hand():
    # token ratios 1.5, 0.5 (A=+1) and 1.5 (A=-1, row 2), last token masked
    logp = torch.log(torch.tensor([[1.5, 0.5], [1.5, 9.0]]))
    mask = torch.tensor([[1, 1], [1, 0]])
    out = grpo_loss(logp, torch.tensor([1.0, -1.0]), mask, logp_old=torch.zeros(2, 2), clip_eps=0.2, denom=4)
    # clipped: only (1.5, A=+1); rho mean (1.5 + 0.5 + 1.5) / 3
    assert out.stats["clip_frac"].item() == pytest.approx(1 / 3)
    assert out.stats["rho_mean"].item() == pytest.approx(3.5 / 3)
    assert "kl_mean" not in out.stats
    # loss: (-1.2 - 0.5 + 1.5) / 4
    assert out.loss.item() == pytest.approx(-0.05)
    with pytest.raises(ValueError):
        grpo_loss(logp, torch.tensor([1.0, -1.0]), mask, beta=0.1, denom=4)


def test_truncated_importance_weights_by_hand():
    # pi / q = 2, 0.5, 5 -> capped at 3
    policy = torch.log(torch.tensor([[0.4, 0.1, 0.5]]))
    sampler = torch.log(torch.tensor([[0.2, 0.2, 0.1]]))
    weights = truncated_importance_weights(policy.requires_grad_(), sampler, cap=3.0)
    torch.testing.assert_close(weights, torch.tensor([[2.0, 0.5, 3.0]]))
    assert not weights.requires_grad


def test_sampler_logp_gap_by_hand():
    # masked tokens' gaps |-1 - -1.5| = 0.5 and |-2 - -1| = 1; the third is padding
    gap = sampler_logp_gap(torch.tensor([[-1.0, -2.0, -9.0]]), torch.tensor([[-1.5, -1.0, 0.0]]),
                           torch.tensor([[1, 1, 0]]))
    assert gap.item() == pytest.approx(0.75)


def test_importance_weights_scale_each_tokens_gradient_and_are_logged():
    logp, advantages, mask = _batch()
    weights = torch.rand(logp.shape, generator=torch.Generator().manual_seed(3)) * 2
    out = grpo_loss(logp, advantages, mask, denom=10, is_weight=weights)
    out.loss.backward()
    torch.testing.assert_close(logp.grad, -advantages[:, None] * mask * weights / 10)
    assert out.stats["is_weight_mean"].item() == pytest.approx((weights * mask).sum().item() / mask.sum().item())
    assert "is_weight_mean" not in grpo_loss(logp.detach(), advantages, mask, denom=10).stats


def test_sampling_log_probs_are_those_of_the_warped_distribution():
    logits = torch.randn(2, 5, 40, generator=torch.Generator().manual_seed(0)) * 3
    targets = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(1))
    for temperature, top_p in ((1.0, 1.0), (0.8, 1.0), (0.7, 0.9)):
        expected = torch.log_softmax(warp_logits(logits.reshape(10, 40), temperature, top_p), -1)
        expected = expected.gather(-1, targets.reshape(10, 1)).reshape(2, 5)
        torch.testing.assert_close(sampling_log_probs(logits, targets, temperature, top_p), expected)
