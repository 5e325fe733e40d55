"""Prompt + completion token batches and their log-probabilities under the policy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from antipasto_pl.grpo import token_log_probs


def chat_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The user turn rendered with the tokenizer's chat template, ready for the assistant."""
    if tokenizer.chat_template is None:
        return prompt
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )


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


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of the chat-formatted prompt (what the sampler conditions on)."""
    return tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]


def completion_token_ids(
    tokenizer: PreTrainedTokenizerBase, completion: str, max_completion_tokens: int | None = None
) -> list[int]:
    """Token ids of a written completion, truncated, closed with EOS as a sampled one would be."""
    ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if max_completion_tokens is not None and len(ids) >= max_completion_tokens:
        return ids[:max_completion_tokens]
    return ids + [tokenizer.eos_token_id]


def encode_completions(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    completions: Sequence[str],
    max_completion_tokens: int | None = None,
) -> CompletionBatch:
    """Tokenise chat-formatted prompts followed by written completions (+ EOS), right-padded."""
    return batch_from_ids(
        [prompt_token_ids(tokenizer, p) for p in prompts],
        [completion_token_ids(tokenizer, c, max_completion_tokens) for c in completions],
        tokenizer.pad_token_id,
    )


def completion_log_probs(model: nn.Module, batch: CompletionBatch) -> Tensor:
    """log p of every next token: (B, T-1), aligned with ``batch.completion_mask[:, 1:]``."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return token_log_probs(logits, batch.input_ids)


def completion_nll(model: nn.Module, batch: CompletionBatch) -> Tensor:
    """Mean teacher-forced NLL per completion token for each row: (B,)."""
    mask = batch.completion_mask[:, 1:].to(torch.float32)
    logp = completion_log_probs(model, batch)
    return -(logp * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)
