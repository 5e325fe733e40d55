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


def encode_completions(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    completions: Sequence[str],
    max_completion_tokens: int | None = None,
) -> CompletionBatch:
    """Tokenise chat-formatted prompts followed by completions (+ EOS), right-padded."""
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
    rows, masks = [], []
    for prompt, completion in zip(prompts, completions):
        prompt_ids = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        if max_completion_tokens is not None:
            completion_ids = completion_ids[:max_completion_tokens]
        completion_ids = completion_ids + [tokenizer.eos_token_id]
        rows.append(prompt_ids + completion_ids)
        masks.append([0] * len(prompt_ids) + [1] * len(completion_ids))
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    completion_mask = torch.tensor([m + [0] * (width - len(m)) for m in masks])
    return CompletionBatch(input_ids, attention_mask, completion_mask)


def completion_log_probs(model: nn.Module, batch: CompletionBatch) -> Tensor:
    """log p of every next token: (B, T-1), aligned with ``batch.completion_mask[:, 1:]``."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return token_log_probs(logits, batch.input_ids)


def completion_nll(model: nn.Module, batch: CompletionBatch) -> Tensor:
    """Mean teacher-forced NLL per completion token for each row: (B,)."""
    mask = batch.completion_mask[:, 1:].to(torch.float32)
    logp = completion_log_probs(model, batch)
    return -(logp * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)
