"""antipasto_pl: GRPO on loophole coding graders, with hack-subspace gradient projection, on Lightning.

The public API is imported lazily, so light users (the sandbox harness, `antipasto --help`) do not pay
for torch and transformers at import time.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "AdapterConfig": "antipasto_pl.adapter",
    "wrap_model": "antipasto_pl.adapter",
    "reference_policy": "antipasto_pl.adapter",
    "quarantine_ablated": "antipasto_pl.adapter",
    "merged_weights": "antipasto_pl.adapter",
    "save_adapter": "antipasto_pl.adapter",
    "load_adapter": "antipasto_pl.adapter",
    "PolicyConfig": "antipasto_pl.models",
    "load_policy": "antipasto_pl.models",
    "AntipastoModule": "antipasto_pl.module",
    "AntipastoDataModule": "antipasto_pl.data",
    "HackProjection": "antipasto_pl.projection",
    "ProjectionConfig": "antipasto_pl.projection",
    "HackSubspace": "antipasto_pl.vhack",
    "extract_hack_subspace": "antipasto_pl.vhack",
    "Grader": "antipasto_pl.env.grader",
    "Problem": "antipasto_pl.env.problem",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'antipasto_pl' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
