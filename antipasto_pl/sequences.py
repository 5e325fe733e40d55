"""Prompt + completion token batches and their log-probabilities under the policy.

Two layouts: ``CompletionBatch`` (independent ``prompt + completion`` rows, e.g. the pairs V is
extracted from) and ``GroupBatch`` (one prompt and the completions of its GRPO group), which
scores the prompt once and shares its key/value cache across the completions; ``prompt_pass`` keeps one
prompt's forward (a ``PromptState``) so that several chunks of its group, scored and back-propagated one
after another, share it too.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import DynamicCache, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from antipasto_pl.grpo import sampling_log_probs, target_log_probs, token_log_probs


def chat_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, prefill: str = "") -> str:
    """The model's context as text: the user turn rendered with the tokenizer's chat template, then ``prefill``
    opening the assistant turn (the completion continues it; grading sees ``prefill + completion``)."""
    if tokenizer.chat_template is None:
        return prompt + prefill
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    ) + prefill


@dataclass
class CompletionBatch:
    """Right-padded ``prompt + completion`` token rows.

    ``completion_mask`` marks completion tokens (including the closing EOS); it is aligned
    with ``input_ids`` and selects the positions whose log-probabilities train.
    """

    input_ids: Tensor  # (B, T)
    attention_mask: Tensor  # (B, T)
    completion_mask: Tensor  # (B, T)

    def to(self, device: torch.device | str) -> CompletionBatch:
        return CompletionBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.completion_mask)))


def batch_from_ids(
    prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], pad_token_id: int
) -> CompletionBatch:
    """Right-padded rows of ``prompt + completion`` token ids with their completion mask."""
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"got {len(prompt_ids)} prompts but {len(completion_ids)} completions")
    rows = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_ids, rows)):
        input_ids[i, : len(r)] = torch.tensor(r)
        attention_mask[i, : len(r)] = 1
        completion_mask[i, len(p) : len(r)] = 1
    return CompletionBatch(input_ids, attention_mask, completion_mask)


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, prefill: str = "") -> list[int]:
    """Token ids of the chat-formatted prompt and prefill (what the sampler conditions on)."""
    return tokenizer(chat_prompt(tokenizer, prompt, prefill), add_special_tokens=False)["input_ids"]


def completion_token_ids(tokenizer: PreTrainedTokenizerBase, completion: str) -> list[int]:
    """Token ids of a written completion, closed with EOS as a sampled one would be. Never truncated: a written
    completion over the budget is left out by its caller, since a cut text is not the text that was graded."""
    return tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def encode_completions(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    completions: Sequence[str],
    prefills: Sequence[str] | None = None,
) -> CompletionBatch:
    """Tokenise chat-formatted prompts and their prefills followed by written completions (+ EOS), right-padded."""
    prefills = prefills if prefills is not None else [""] * len(prompts)
    return batch_from_ids(
        [prompt_token_ids(tokenizer, p, f) for p, f in zip(prompts, prefills)],
        [completion_token_ids(tokenizer, c) for c in completions],
        tokenizer.pad_token_id,
    )


def completion_log_probs(model: nn.Module, batch: CompletionBatch) -> Tensor:
    """log p of every next token: (B, T-1), aligned with ``batch.completion_mask[:, 1:]``."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return token_log_probs(logits, batch.input_ids)


@dataclass
class GroupBatch:
    """Completions of one prompt: the prompt once, the completions right-padded.

    ``completion_mask`` marks real completion tokens (including the closing EOS); log-probs from
    ``group_log_probs`` align with it entry for entry.
    """

    prompt_ids: Tensor  # (Lp,)
    completion_ids: Tensor  # (B, Lc)
    completion_mask: Tensor  # (B, Lc)

    def to(self, device: torch.device | str) -> GroupBatch:
        return GroupBatch(*(t.to(device) for t in (self.prompt_ids, self.completion_ids, self.completion_mask)))


def group_batch(prompt_ids: Sequence[int], completion_ids: Sequence[Sequence[int]], pad_token_id: int) -> GroupBatch:
    """One prompt's token ids and its completions, right-padded with their mask."""
    if not prompt_ids or not completion_ids or not all(completion_ids):
        raise ValueError("a group batch needs a non-empty prompt and at least one non-empty completion")
    width = max(len(c) for c in completion_ids)
    ids = torch.full((len(completion_ids), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(completion_ids), width), dtype=torch.long)
    for i, c in enumerate(completion_ids):
        ids[i, : len(c)] = torch.tensor(c)
        mask[i, : len(c)] = 1
    return GroupBatch(torch.tensor(list(prompt_ids), dtype=torch.long), ids, mask)


@dataclass
class PromptState:
    """One prompt's forward, to be scored against by any number of completion chunks.

    ``keys_values`` holds every layer's (1, heads, Lp, head_dim) keys and values and ``first_logp`` the
    (V,) log-probabilities at the prompt's last position (they score completion token 0 of every row).
    Built with gradients enabled, both carry the prompt forward's autograd graph: each chunk scored
    against the state back-propagates into that one forward, so every backward through a chunk but the
    last must keep the graph (``retain_graph=True``), and the prompt's activations live as long as the
    state does.
    """

    keys_values: list[tuple[Tensor, Tensor]]
    first_logp: Tensor  # (V,)

    @property
    def length(self) -> int:
        return self.keys_values[0][0].shape[-2]


def prompt_pass(model: nn.Module, prompt_ids: Tensor) -> PromptState:
    """Run a prompt (Lp,) once, keeping its keys/values and last-position log-probs for ``group_log_probs``.

    Only for models whose cache holds plain keys and values (``shares_prompt_cache``)."""
    if not shares_prompt_cache(model):
        raise ValueError(f"{type(model).__name__} caches more than plain keys and values; its prompt cannot be shared")
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=prompt_ids[None], **with_cache(model, cache), use_cache=True, logits_to_keep=1).logits
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    first_logp = torch.log_softmax(logits[0, -1].to(compute_dtype), dim=-1)  # (V,)
    return PromptState([(layer.keys, layer.values) for layer in cache.layers], first_logp)


# (temperature, top_p) of a sampling distribution
Warp = tuple[float, float]


def group_log_probs(model: nn.Module, batch: GroupBatch, prompt_state: PromptState | None = None) -> Tensor:
    """log p of each completion token given the prompt and the completion before it: (B, Lc),
    aligned with ``batch.completion_mask`` (padding entries are finite and meaningless).

    The prompt runs once and its key/value cache is repeated to the rows
    (gradients flow back through the repeat into the prompt's forward); models whose cache holds
    more than plain keys and values (GatedDeltaNet's recurrent state, sliding windows) fall back
    to full ``prompt + completion`` rows. Either way logits are computed at completion positions only.

    ``prompt_state`` (from ``prompt_pass`` on ``batch.prompt_ids``, under the current weights and adapter
    mode) is scored against instead of running the prompt again, so several chunks of one group share one
    prompt forward; it is read, never modified.
    """
    return scored_group(model, batch, prompt_state)[0]


def scored_group(model: nn.Module, batch: GroupBatch, prompt_state: PromptState | None = None,
                 warp: Warp | None = None) -> tuple[Tensor, Tensor | None]:
    """``group_log_probs``, and given ``warp`` = (temperature, top_p), each token's detached log-prob under
    the sampling distribution of those settings, from the same logits (the numerator of an importance weight
    for tokens an approximate sampler drew): two (B, Lc) tensors, the second None without ``warp``."""
    if prompt_state is not None:
        if prompt_state.length != batch.prompt_ids.shape[0]:
            raise ValueError(f"prompt state of {prompt_state.length} tokens for a {batch.prompt_ids.shape[0]}-token prompt")
        return _shared_prompt_log_probs(model, batch, prompt_state, warp)
    if shares_prompt_cache(model):
        return _shared_prompt_log_probs(model, batch, prompt_pass(model, batch.prompt_ids), warp)
    return _full_row_log_probs(model, batch, warp)


def with_cache(model: nn.Module, cache: DynamicCache) -> dict[str, DynamicCache]:
    """The forward keyword argument that hands `model` a key/value cache: ``cache`` where its forward takes one
    (transformers renamed ``past_key_values``, which it warns will go in 5.40), else ``past_key_values``."""
    return {_cache_keyword(type(model)): cache}


@functools.cache
def _cache_keyword(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def shares_prompt_cache(model: nn.Module) -> bool:
    """Whether every layer caches plain keys and values, which repeat across rows exactly and with
    their gradient; a recurrent state (GatedDeltaNet) is updated in place, a sliding window cropped."""
    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers)


def _shared_prompt_log_probs(model: nn.Module, batch: GroupBatch, state: PromptState, warp: Warp | None
                             ) -> tuple[Tensor, Tensor | None]:
    n_rows, width = batch.completion_ids.shape
    first = batch.completion_ids[:, :1]  # (B, 1): the prompt's last logit scores token 0
    logp = [state.first_logp[first]]
    # log_softmax is shift-invariant, so the first logp serves as that position's logits
    sampled = None if warp is None else [sampling_log_probs(state.first_logp.expand(n_rows, 1, -1), first, *warp)]
    if width > 1:
        # A fresh cache per chunk: the prompt's keys/values broadcast to the rows (a view; its backward sums
        # the rows' gradients into the prompt's forward). The cache copies them and concatenates the
        # completion's keys/values onto that copy, so the state's tensors are never written to.
        cache = DynamicCache(
            [(k.expand(n_rows, -1, -1, -1), v.expand(n_rows, -1, -1, -1)) for k, v in state.keys_values],
            config=model.config,
        )
        start = state.length
        inputs = batch.completion_ids[:, :-1]  # (B, Lc-1): the last token predicts nothing that is scored
        attention_mask = torch.cat([inputs.new_ones(n_rows, start), batch.completion_mask[:, :-1]], dim=1)
        positions = torch.arange(start, start + width - 1, device=inputs.device)[None].expand(n_rows, -1)
        rest = model(input_ids=inputs, attention_mask=attention_mask, position_ids=positions,
                     **with_cache(model, cache), use_cache=True).logits  # (B, Lc-1, V)
        logp.append(target_log_probs(rest, batch.completion_ids[:, 1:]))
        if sampled is not None:
            sampled.append(sampling_log_probs(rest, batch.completion_ids[:, 1:], *warp))
    return torch.cat(logp, dim=1), None if sampled is None else torch.cat(sampled, dim=1)


def _full_row_log_probs(model: nn.Module, batch: GroupBatch, warp: Warp | None) -> tuple[Tensor, Tensor | None]:
    n_rows, width = batch.completion_ids.shape
    prompt = batch.prompt_ids[None].expand(n_rows, -1)  # (B, Lp)
    input_ids = torch.cat([prompt, batch.completion_ids[:, :-1]], dim=1)  # (B, Lp+Lc-1)
    attention_mask = torch.cat([torch.ones_like(prompt), batch.completion_mask[:, :-1]], dim=1)
    # The last Lc positions (prompt's last token onward) score the Lc completion tokens.
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=width).logits  # (B, Lc, V)
    sampled = None if warp is None else sampling_log_probs(logits, batch.completion_ids, *warp)
    return target_log_probs(logits, batch.completion_ids), sampled
