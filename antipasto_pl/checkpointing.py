"""Checkpoint file io that survives a kill: atomic writes, corrupt files named, RNG states carried.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file lives in
the system temp dir, so the final move is a copy (not atomic) when that is another filesystem, and a
truncated file only surfaces as a pickle / zip traceback on load. ``AtomicCheckpointIO`` writes next
to the target, fsyncs and ``os.replace``s, and checks a file's zip structure (CRCs included) before
unpickling it.
"""

from __future__ import annotations

import os
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


class CorruptCheckpointError(ValueError):
    """A checkpoint file that cannot be what ``antipasto fit`` wrote (truncated, overwritten, not a checkpoint)."""


def check_checkpoint_file(path: str | Path) -> None:
    """Fail fast, naming the file, if ``path`` is missing or not an intact ``torch.save`` archive."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # reads every member and checks its CRC
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise CorruptCheckpointError(f"checkpoint {path} is corrupt or truncated ({err}); resume from an earlier one") from err
    if bad is not None:
        raise CorruptCheckpointError(f"checkpoint {path} is corrupt or truncated (member {bad!r} fails its CRC check)")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file beside the target, fsync, then ``os.replace``: a kill at any moment
    leaves either the previous checkpoint or the new one, never a partial file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # make the rename itself durable
        finally:
            os.close(directory)

    def load_checkpoint(self, path: str | Path, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        check_checkpoint_file(path)
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


def collect_rng_states() -> dict[str, Any]:
    """torch (CPU and CUDA), python and numpy global RNG states, as tensors and plain tuples so that a
    ``weights_only`` load (LightningCLI reads hyperparameters that way) accepts them."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Inverse of ``collect_rng_states``."""
    torch.set_rng_state(states["torch"])
    random.setstate(_tuples(states["python"]))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _tuples(value: Any) -> Any:
    """``random.setstate`` wants nested tuples; a serialisation round trip may hand back lists."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
