"""GRPO loss pieces (docs/design.md section 7): group advantages, token log-probs, PPO clip, K3 KL, reduction.

Pure tensor functions, free of Lightning, so the loss can be checked by hand. Shapes: B completions
(P prompts x G completions per group, flattened), T completion-aligned token positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Reduction = Literal["dr_grpo", "sequence"]


def group_advantages(rewards: Tensor, scale_by_std: bool = False, eps: float = 1e-6) -> Tensor:
    """Dr.GRPO advantage A = R - mean_group(R) per row of a (P, G) reward table; `scale_by_std` divides by the
    group's sample std (Bessel-corrected, as TRL: classic GRPO).

    A group whose rewards are all equal (exact comparison, max > min, so equal rewards are never mistaken for
    signal) gets exactly 0, not a rounding residue of R - mean.
    """
    # rewards: (P, G) -> (P, G)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (P, G), got shape {tuple(rewards.shape)}")
    rewards = rewards if rewards.is_floating_point() else rewards.float()
    group_size = rewards.shape[1]
    advantages = rewards - rewards.sum(-1, keepdim=True) / group_size
    if scale_by_std:
        std = torch.sqrt((advantages**2).sum(-1, keepdim=True) / max(group_size - 1, 1))
        advantages = advantages / (std + eps)
    varies = rewards.amax(-1, keepdim=True) > rewards.amin(-1, keepdim=True)
    return torch.where(varies, advantages, torch.zeros_like(advantages))


def target_log_probs(logits: Tensor, targets: Tensor, temperature: float = 1.0, top_p: float = 1.0) -> Tensor:
    """log_softmax(logits)[target] at every position, of the distribution ``warp_logits`` makes of the logits
    (by default the logits' own).

    In at least float32 (bf16 logits are upcast), one sequence at a time so the upcast copy of the
    (L, vocab) logits exists for one row only.
    """
    # logits: (B, L, V), targets: (B, L) -> (B, L)
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    rows = [
        torch.log_softmax(warp_logits(row.to(compute_dtype), temperature, top_p), dim=-1)
        .gather(-1, target[:, None]).squeeze(-1)
        for row, target in zip(logits, targets)
    ]
    return torch.stack(rows)


def warp_logits(logits: Tensor, temperature: float, top_p: float) -> Tensor:
    """The logits of the distribution that is sampled: divided by ``temperature``, tokens outside the top-p
    nucleus set to -inf (as HF's ``TemperatureLogitsWarper`` then ``TopPLogitsWarper``). Unchanged for greedy."""
    # logits: (B, V) float32 -> (B, V)
    if temperature == 0:
        return logits
    scores = logits / temperature if temperature != 1.0 else logits
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        remove = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        remove[..., -1:] = False  # keep at least the most likely token
        scores = scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return scores


def sampling_log_probs(logits: Tensor, targets: Tensor, temperature: float, top_p: float) -> Tensor:
    """log-probs of ``targets`` under the distribution a sampler draws from at ``temperature`` / ``top_p``
    (``warp_logits``), detached: what an exact sampler would have reported for the same tokens."""
    # logits: (B, L, V), targets: (B, L) -> (B, L)
    with torch.no_grad():
        return target_log_probs(logits, targets, temperature, top_p)


def truncated_importance_weights(policy_logp: Tensor, sampler_logp: Tensor, cap: float) -> Tensor:
    """Token-level truncated importance weights min(pi(y_t) / q(y_t), C) for tokens drawn from an approximate
    sampler q (e.g. low-precision weights) instead of the policy pi, as TRL and verl correct vLLM samples (TIS):
    the loss of token t is multiplied by its weight, so the gradient is an estimate under pi again, its variance
    bounded by the cap. Both log-probs are of the sampled distribution (after temperature / top-p); detached."""
    # policy_logp, sampler_logp: (B, T) -> (B, T)
    return torch.exp(policy_logp.detach() - sampler_logp).clamp(max=cap)


def sampler_logp_gap(policy_logp: Tensor, sampler_logp: Tensor, mask: Tensor) -> Tensor:
    """Mean |log pi(y_t) - log q(y_t)| over the masked tokens: how far an approximate sampler's distribution is
    from the policy's on the tokens it drew (0 for an exact one). Detached scalar."""
    # policy_logp, sampler_logp, mask: (B, T) -> ()
    return _masked_mean((policy_logp.detach() - sampler_logp).abs(), mask.bool())


def token_log_probs(logits: Tensor, input_ids: Tensor) -> Tensor:
    """log p(input_ids[:, t+1] | input_ids[:, :t+1]) for every position.

    Entry t scores token t+1, so a completion mask over input_ids is aligned with `mask[:, 1:]`.
    """
    # logits: (B, T, V), input_ids: (B, T) -> (B, T-1)
    return target_log_probs(logits[:, :-1], input_ids[:, 1:])


def _per_token(advantages: Tensor) -> Tensor:
    # advantages: (B,) -> (B, 1); (B, T) unchanged
    return advantages[:, None] if advantages.dim() == 1 else advantages


def ppo_clip_token_loss(logp: Tensor, logp_old: Tensor, advantages: Tensor, clip_eps: float) -> Tensor:
    """PPO clipped surrogate -min(rho A, clip(rho, 1-eps, 1+eps) A), rho = exp(logp - logp_old).

    With logp_old = logp.detach() (one optimizer step per rollout batch) rho = 1 and the gradient is
    -A * grad(logp).
    """
    # logp, logp_old: (B, T), advantages: (B,) or (B, T) -> (B, T)
    advantages = _per_token(advantages)
    ratio = torch.exp(logp - logp_old)
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps)
    return -torch.minimum(ratio * advantages, clipped * advantages)


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """K3 estimator of KL(pi || pi_ref): exp(ref - logp) - (ref - logp) - 1; >= 0, 0 iff equal."""
    # logp, ref_logp: (B, T) -> (B, T)
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


def per_sequence_loss(
    token_loss: Tensor,
    completion_mask: Tensor,
    mode: Reduction = "dr_grpo",
    denom: float | None = None,
) -> Tensor:
    """Each completion's share of the reduced loss; its sum is the loss, so any split of the rows
    (student / teacher) gives parts that add up to the whole.

    - "dr_grpo": sum of the completion's masked token losses / denom, with denom the fixed constant
      G * max_new_tokens * P (required), so no completion is up-weighted for being short.
    - "sequence" (classic GRPO): mean over the completion's own tokens / denom, with denom the
      number of completions (default B, the rows given). Pass the full batch size when scoring a
      subset so the parts still sum to the whole.

    Masked positions are selected out (not multiplied by 0), so inf / nan there cannot leak.
    """
    # token_loss, completion_mask: (B, T) -> (B,)
    mask = completion_mask.bool()
    summed = torch.where(mask, token_loss, 0.0).sum(dim=-1)
    if mode == "dr_grpo":
        if denom is None:
            raise ValueError("dr_grpo reduction needs the fixed denom G * max_new_tokens * P")
        return summed / denom
    if mode == "sequence":
        lengths = mask.sum(dim=-1).clamp_min(1)
        return summed / lengths / (token_loss.shape[0] if denom is None else denom)
    raise ValueError(f"unknown reduction mode {mode!r}; expected 'dr_grpo' or 'sequence'")


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    # values, mask: (B, T) -> ()
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp_min(1)


@dataclass(frozen=True)
class GRPOLoss:
    """The reduced loss, its per-completion parts and detached statistics for logging."""

    loss: Tensor  # (): equals per_sequence.sum()
    per_sequence: Tensor  # (B,): index with the student / teacher rows to get loss_s, loss_t
    stats: dict[str, Tensor]  # detached scalars: rho_mean, clip_frac, kl_mean (with ref_logp), is_weight_mean (with is_weight)


def grpo_loss(
    logp: Tensor,
    advantages: Tensor,
    completion_mask: Tensor,
    *,
    logp_old: Tensor | None = None,
    ref_logp: Tensor | None = None,
    beta: float = 0.0,
    clip_eps: float = 0.2,
    mode: Reduction = "dr_grpo",
    denom: float | None = None,
    is_weight: Tensor | None = None,
) -> GRPOLoss:
    """Per token PPO-clip + beta * K3, masked and reduced (docs/design.md section 7).

    `logp_old` defaults to logp.detach() (rho = 1: one optimizer step per rollout batch; teacher
    samples have no sampling policy of their own either). `ref_logp` comes from the free reference
    (adapter zeroed) and is required when beta > 0; given with beta = 0 it is only logged.
    clip_frac counts tokens whose gradient the clip removed (rho > 1+eps with A > 0, or
    rho < 1-eps with A < 0). `is_weight` (``truncated_importance_weights``) scales each token's loss, KL
    included, for tokens an approximate sampler drew.
    """
    # logp, logp_old, ref_logp, completion_mask, is_weight: (B, T), advantages: (B,) or (B, T)
    if beta != 0.0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp from the reference policy")
    if logp_old is None:
        logp_old = logp.detach()
    mask = completion_mask.bool()
    token_loss = ppo_clip_token_loss(logp, logp_old, advantages, clip_eps)
    kl = None if ref_logp is None else k3_kl(logp, ref_logp)
    if kl is not None and beta != 0.0:
        token_loss = token_loss + beta * kl
    if is_weight is not None:
        token_loss = token_loss * is_weight
    per_sequence = per_sequence_loss(token_loss, mask, mode, denom)

    with torch.no_grad():
        ratio = torch.exp(logp - logp_old)
        per_token_advantages = _per_token(advantages)
        clipped = ((ratio > 1 + clip_eps) & (per_token_advantages > 0)) | (
            (ratio < 1 - clip_eps) & (per_token_advantages < 0)
        )
        stats = {"rho_mean": _masked_mean(ratio, mask), "clip_frac": _masked_mean(clipped.float(), mask)}
        if kl is not None:
            stats["kl_mean"] = _masked_mean(kl, mask)
        if is_weight is not None:
            stats["is_weight_mean"] = _masked_mean(is_weight, mask)
    return GRPOLoss(loss=per_sequence.sum(), per_sequence=per_sequence, stats=stats)
