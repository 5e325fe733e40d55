"""Shared-prompt scoring of GRPO groups against full prompt + completion rows, on real tiny models."""

from __future__ import annotations

import gc

import lightning as L
import pytest
import torch
from helpers import tiny_policy

from antipasto_pl import experience
from antipasto_pl.adapter import adapter_modules
from antipasto_pl.data import AntipastoDataModule
from antipasto_pl.grpo import grpo_loss
from antipasto_pl.models import PolicyConfig
from antipasto_pl.module import AntipastoModule
from antipasto_pl.projection import ProjectionConfig
from antipasto_pl.rollout import SamplingConfig
from antipasto_pl.sequences import (
    PromptState,
    batch_from_ids,
    completion_log_probs,
    group_batch,
    group_log_probs,
    prompt_pass,
    shares_prompt_cache,
)

# float32 agrees to rounding; float64 isolates the algebra (delta_s stays float32, so its gradient is
# rounded to float32 once per forward call: 1e-6 relative, not 1e-12).
TOLERANCE = {"float32": dict(logp=1e-5, grad=1e-5), "float64": dict(logp=1e-12, grad=1e-6)}


def moved_policy(name: str, dtype: str):
    """A tiny policy whose adapter is away from zero, so the adapter path shapes the log-probs."""
    model, tokenizer = tiny_policy(name, dtype=dtype)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for a in adapter_modules(model).values():
            a.delta_s.copy_(0.3 * torch.randn(a.rank, generator=gen))
    return model, tokenizer


def one_group(lengths: tuple[int, ...], prompt_length: int = 13, seed: int = 0) -> tuple[list[int], list[list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 256, (prompt_length,), generator=gen).tolist()
    return prompt, [torch.randint(0, 256, (n,), generator=gen).tolist() for n in lengths]


def full_row_reference(model, tokenizer, prompt: list[int], completions: list[list[int]]) -> list[torch.Tensor]:
    """Per completion, the log-probs of its tokens from the independent batch API (all positions scored)."""
    batch = batch_from_ids([prompt] * len(completions), completions, tokenizer.pad_token_id)
    logp = completion_log_probs(model, batch)  # (B, T-1)
    mask = batch.completion_mask[:, 1:].bool()
    return [row[m] for row, m in zip(logp, mask)]


def test_only_plain_key_value_caches_are_shared() -> None:
    assert shares_prompt_cache(tiny_policy("tiny-llama")[0]) and shares_prompt_cache(tiny_policy("tiny-qwen3")[0])
    assert not shares_prompt_cache(tiny_policy("tiny-qwen3_5")[0])  # GatedDeltaNet keeps a recurrent state


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3", "tiny-qwen3_5"])
@pytest.mark.parametrize("lengths", [(7, 3, 1, 5), (1, 1)])
def test_group_log_probs_equal_full_rows(name: str, dtype: str, lengths: tuple[int, ...]) -> None:
    """Shared prompt (or, for GatedDeltaNet, its fallback) == full rows, token for token, under a ragged mask."""
    model, tokenizer = moved_policy(name, dtype)
    prompt, completions = one_group(lengths)
    batch = group_batch(prompt, completions, tokenizer.pad_token_id)
    reference = full_row_reference(model, tokenizer, prompt, completions)
    tol = TOLERANCE[dtype]["logp"]
    with torch.no_grad():
        results = [group_log_probs(model, batch)]  # shared prompt, or (GatedDeltaNet) full rows
        if shares_prompt_cache(model):  # one prompt pass, scored against twice
            state = prompt_pass(model, batch.prompt_ids)
            results += [group_log_probs(model, batch, prompt_state=state) for _ in range(2)]
        else:
            with pytest.raises(ValueError, match="cannot be shared"):
                prompt_pass(model, batch.prompt_ids)
        for logp in results:
            assert logp.shape == batch.completion_mask.shape and torch.isfinite(logp).all()
            for row, mask, expected in zip(logp, batch.completion_mask.bool(), reference):
                torch.testing.assert_close(row[mask], expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3"])
@pytest.mark.parametrize("mode", ["dr_grpo", "sequence"])
def test_grpo_gradient_through_the_shared_prompt_equals_full_rows(name: str, dtype: str, mode: str) -> None:
    """The gradient on every delta_s reaches the prompt's forward through the repeated cache: it equals the
    gradient of the same loss over full rows (the old layout, prompt logits included and masked)."""
    model, tokenizer = moved_policy(name, dtype)
    prompt, completions = one_group((9, 4, 6, 2, 9))
    advantages = torch.tensor([1.0, -0.5, 0.25, -1.25, 0.5])
    params = [a.delta_s for a in adapter_modules(model).values()]
    denom = 5 * 9.0 if mode == "dr_grpo" else 5.0

    batch = group_batch(prompt, completions, tokenizer.pad_token_id)
    shared = grpo_loss(group_log_probs(model, batch), advantages, batch.completion_mask, mode=mode, denom=denom)
    rows = batch_from_ids([prompt] * len(completions), completions, tokenizer.pad_token_id)
    full = grpo_loss(completion_log_probs(model, rows), advantages, rows.completion_mask[:, 1:], mode=mode, denom=denom)

    tol = TOLERANCE[dtype]
    torch.testing.assert_close(shared.per_sequence, full.per_sequence, atol=tol["logp"], rtol=tol["logp"])
    grads = zip(torch.autograd.grad(shared.loss, params), torch.autograd.grad(full.loss, params))
    for got, expected in grads:
        assert expected.abs().sum() > 0
        assert (got - expected).norm() <= tol["grad"] * expected.norm(), ((got - expected).norm(), expected.norm())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3"])
def test_chunks_backpropagated_through_one_prompt_pass_equal_full_rows(name: str, dtype: str) -> None:
    """Chunks of a group scored against one PromptState and back-propagated one after another (keeping the
    prompt graph for all but the last) accumulate the full-row gradient of all their rows; the state's
    tensors are read, never written."""
    model, tokenizer = moved_policy(name, dtype)
    prompt, completions = one_group((9, 4, 6, 2, 9))
    advantages = torch.tensor([1.0, -0.5, 0.25, -1.25, 0.5])
    params = [a.delta_s for a in adapter_modules(model).values()]
    denom = 5 * 9.0

    rows = batch_from_ids([prompt] * len(completions), completions, tokenizer.pad_token_id)
    full = grpo_loss(completion_log_probs(model, rows), advantages, rows.completion_mask[:, 1:], denom=denom)
    expected = torch.autograd.grad(full.loss, params)

    state = prompt_pass(model, torch.tensor(prompt))
    before = [t.detach().clone() for kv in state.keys_values for t in kv]
    versions = [t._version for kv in state.keys_values for t in kv]
    chunks = [(0, 2), (2, 3), (3, 5)]
    for i, (start, stop) in enumerate(chunks):
        batch = group_batch(prompt, completions[start:stop], tokenizer.pad_token_id)
        out = grpo_loss(group_log_probs(model, batch, prompt_state=state), advantages[start:stop],
                        batch.completion_mask, denom=denom)
        out.loss.backward(retain_graph=i < len(chunks) - 1)
    assert [t._version for kv in state.keys_values for t in kv] == versions
    for t, b in zip((t for kv in state.keys_values for t in kv), before):
        assert torch.equal(t.detach(), b)
    tol = TOLERANCE[dtype]["grad"]
    for p, e in zip(params, expected):
        assert e.abs().sum() > 0
        assert (p.grad - e).norm() <= tol * e.norm(), ((p.grad - e).norm(), e.norm())
    with pytest.raises(ValueError, match="prompt state of"):
        group_log_probs(model, group_batch(prompt[:-1], completions, tokenizer.pad_token_id), prompt_state=state)


class CountPromptPasses(AntipastoModule):
    """The module with its forwards observed: per training pass (``backward_groups`` call) and per frozen
    scoring (``experience.frozen_log_probs``), the shapes of the token batches the embedding sees; after each
    pass, the live PromptStates."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.passes: list[dict] = []

    def observed(self, kind: str, chunks: list, method, *args):
        shapes: list[tuple[int, ...]] = []
        hook = self.model.get_input_embeddings().register_forward_pre_hook(
            lambda module, inputs: shapes.append(tuple(inputs[0].shape)))
        try:
            result = method(*args)
        finally:
            hook.remove()
        gc.collect()
        prompts = {c.group: len(c.batch.prompt_ids) for c in chunks}  # the active groups' prompts
        scored = sum(c.batch.completion_ids.shape[1] > 1 for c in chunks)  # a 1-token completion needs no forward
        self.passes.append({"kind": kind, "shapes": shapes, "prompt_lengths": sorted(prompts.values()),
                            "scored_chunks": scored,
                            "live_states": sum(type(o) is PromptState for o in gc.get_objects())})
        return result

    def backward_groups(self, chunks_by_source, frozen, n_prompts, is_weights=None):
        chunks = [c for source_chunks in chunks_by_source.values() for c in source_chunks]
        return self.observed("train", chunks, super().backward_groups, chunks_by_source, frozen, n_prompts,
                             is_weights)


def test_each_group_runs_its_prompt_once_per_pass(tmp_path, monkeypatch) -> None:
    """One row per chunk (two student and two teacher chunks per group), two PPO epochs and a KL term: every
    training pass runs each active group's prompt forward once (and each frozen policy once), the completion
    forwards once per chunk, and no prompt state (nor its graph) outlives its pass."""
    L.seed_everything(0)
    scorer = experience.frozen_log_probs
    monkeypatch.setattr(experience, "frozen_log_probs", lambda model, chunks, *args: module.observed(
        "frozen", chunks, scorer, model, chunks, *args))
    module = CountPromptPasses(policy=PolicyConfig(name="tiny-llama"), sampling=SamplingConfig(max_new_tokens=8),
                               max_completion_tokens=640,
                               group_size=4, mix_ratio=0.5, micro_batch_size=1, log_completions_every=0,
                               projection=ProjectionConfig(k=1), learning_rate=1e-2, ppo_epochs=2, beta=0.1)
    data = AntipastoDataModule(prompts_per_step=2, pool_per_prompt=2, pair_problems=1, variants_per_mode=1,
                               modes=["sentinel", "file_marker"])
    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, data)
    assert [p["kind"] for p in module.passes] == ["frozen", "train", "train"] * 2
    for p in module.passes:
        # Teacher records are whole (up to 640 byte-level tokens), so a forward is told by its length: a prompt's
        # is one of the pass's prompt lengths (no completion in this seeded run has one of those lengths).
        assert p["prompt_lengths"]
        is_prompt = [s[1] in p["prompt_lengths"] for s in p["shapes"]]
        prompts = sorted(s[1] for s, prompt in zip(p["shapes"], is_prompt) if prompt)
        completions = [s for s, prompt in zip(p["shapes"], is_prompt) if not prompt]
        assert all(s[0] == 1 for s, prompt in zip(p["shapes"], is_prompt) if prompt)
        per_policy = 2 if p["kind"] == "frozen" else 1  # rollout policy (PPO ratio) and reference (KL)
        assert prompts == sorted(p["prompt_lengths"] * per_policy), p
        assert len(completions) == per_policy * p["scored_chunks"] and p["scored_chunks"] > len(p["prompt_lengths"]), p
        assert p["live_states"] == 0


class CaptureGradients(L.Callback):
    """The module's gradient (and its student / teacher parts) before projection, at the first step."""

    def __init__(self) -> None:
        self.grad: dict[str, torch.Tensor] = {}
        self.parts = None

    def on_before_optimizer_step(self, trainer: L.Trainer, module: AntipastoModule, optimizer) -> None:
        if not self.grad:
            self.grad = {n: a.delta_s.grad.clone() for n, a in adapter_modules(module.model).items()}
            self.parts = module.grad_parts


def first_step_gradient(tmp_path, micro_batch_size: int) -> tuple[CaptureGradients, dict[str, float]]:
    L.seed_everything(0)
    module = AntipastoModule(policy=PolicyConfig(name="tiny-llama"), sampling=SamplingConfig(max_new_tokens=8),
                             max_completion_tokens=640, group_size=4, mix_ratio=0.5, micro_batch_size=micro_batch_size, log_completions_every=0,
                             projection=ProjectionConfig(k=1), learning_rate=0.0)
    data = AntipastoDataModule(prompts_per_step=2, pool_per_prompt=2, pair_problems=1, variants_per_mode=1,
                               modes=["sentinel", "file_marker"])
    capture = CaptureGradients()
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, callbacks=[capture], default_root_dir=tmp_path / str(micro_batch_size))
    trainer.fit(module, data)
    return capture, {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_step_gradient_does_not_depend_on_micro_batch_size(tmp_path) -> None:
    """One row per chunk vs whole (group, source) chunks: the same gradient and parts up to rounding; the step
    also logs where its time went."""
    one, metrics = first_step_gradient(tmp_path, micro_batch_size=1)
    whole, _ = first_step_gradient(tmp_path, micro_batch_size=8)
    assert any(g.abs().sum() > 0 for g in one.grad.values())
    for name, expected in whole.grad.items():
        torch.testing.assert_close(one.grad[name], expected, atol=1e-7, rtol=1e-5)
        torch.testing.assert_close(one.parts.student[name], whole.parts.student[name], atol=1e-7, rtol=1e-5)
        torch.testing.assert_close(one.parts.teacher[name], whole.parts.teacher[name], atol=1e-7, rtol=1e-5)
    assert {"time/generate", "time/grade_wait", "time/loss_backward", "time/optimizer"} <= metrics.keys()
    assert all(metrics[k] >= 0 for k in metrics if k.startswith("time/"))
