"""Sampling completions from the policy (the "generate" stage of a GRPO step).

The sampler is an interface so a vLLM backend can replace Hugging Face ``generate`` on
GPUs; the default samples on merged weights, at the speed of the base model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from antipasto_pl.adapter import merged_weights


@dataclass
class SamplingConfig:
    """How completions are sampled.

    Args:
        max_new_tokens: completion length cap.
        temperature: softmax temperature; 0 means greedy decoding.
        top_p: nucleus sampling mass.
        prefill: text that opens every assistant turn, identically for student samples, teacher-pool records,
            detector pairs and evaluation (e.g. "```python\n"), so that format is not what is learned; the
            completion continues it and grading sees prefill + completion. ``{skeleton}`` expands to the
            problem's starter code up to the method body's indentation. Empty: off.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    prefill: str = ""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"sampling needs temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")


@dataclass(frozen=True)
class Completion:
    """One sampled completion: its text and the exact token ids that were sampled (EOS kept if emitted)."""

    text: str
    token_ids: tuple[int, ...]


class Sampler(Protocol):
    """``num_samples`` completions for each context (the model's input as text: chat template applied, prefill
    appended, see ``sequences.chat_prompt``)."""

    def __call__(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, contexts: Sequence[str], num_samples: int,
        config: SamplingConfig,
    ) -> list[list[Completion]]: ...


def _trim(row: list[int], eos_id: int, pad_id: int) -> tuple[int, ...]:
    """Generated ids up to and including the first EOS; padding after it dropped."""
    if eos_id in row:
        return tuple(row[: row.index(eos_id) + 1])
    while row and row[-1] == pad_id:
        row = row[:-1]
    return tuple(row)


@torch.no_grad()
def hf_generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    contexts: Sequence[str],
    num_samples: int,
    config: SamplingConfig,
) -> list[list[Completion]]:
    """``num_samples`` completions per context, sampled with ``generate`` on merged weights."""
    texts = [c for c in contexts for _ in range(num_samples)]
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    greedy = config.temperature == 0
    with merged_weights(model):
        output = model.generate(
            **inputs,
            max_new_tokens=config.max_new_tokens,
            do_sample=not greedy,
            temperature=None if greedy else config.temperature,
            top_p=None if greedy else config.top_p,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    rows = output[:, inputs["input_ids"].shape[1]:].tolist()
    samples = []
    for row in rows:
        ids = _trim(row, tokenizer.eos_token_id, tokenizer.pad_token_id)
        samples.append(Completion(tokenizer.decode(ids, skip_special_tokens=True), ids))
    return [samples[i * num_samples:(i + 1) * num_samples] for i in range(len(contexts))]
