"""Test helpers: tiny real transformers models (no download)."""

from __future__ import annotations

import torch

from antipasto_pl.adapter import AdapterConfig, wrap_model
from antipasto_pl.models import TINY_CONFIGS, PolicyConfig, load_policy

TINY_NAMES = sorted(TINY_CONFIGS)


def tiny_policy(name: str = "tiny-llama", dtype: str = "float32", seed: int = 0, wrap: bool = True, **adapter):
    """A tiny random causal LM (optionally SVD-wrapped) and its byte-level tokenizer."""
    model, tokenizer = load_policy(PolicyConfig(name=name, dtype=dtype, seed=seed))
    if wrap:
        wrap_model(model, AdapterConfig(**adapter))
    return model, tokenizer


def token_batch(batch: int = 2, length: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))
