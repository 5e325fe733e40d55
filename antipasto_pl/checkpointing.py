"""Checkpoints that resume exactly: atomic writes, corrupt files named, RNG states carried, and every
checkpoint (periodic or written when a fit ends) holding the loop state the next step starts from.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file lives in
the system temp dir, so the final move is a copy (not atomic) when that is another filesystem, and a
truncated file only surfaces as a pickle / zip traceback on load. ``AtomicCheckpointIO`` writes next
to the target, fsyncs and ``os.replace``s, and checks a file's zip structure (CRCs included) before
unpickling it.
"""

from __future__ import annotations

import copy
import logging
import random
import signal
import threading
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from antipasto_pl.storage import atomic_write

log = logging.getLogger(__name__)


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
        with atomic_write(path) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)

    def load_checkpoint(self, path: str | Path, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        check_checkpoint_file(path)
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


class ExactResume(Callback):
    """Makes every checkpoint of a fit resume where the uninterrupted run would go on, and stops a fit
    gracefully on SIGINT / SIGTERM.

    Lightning closes the epoch when a fit stops inside it (``max_steps``, ``trainer.should_stop``), so
    a checkpoint written after that (``save_last`` at train end, or at validation end) would resume in
    the next epoch, on other prompts, while one written at train-batch end resumes mid-epoch. The fit
    loop's state is therefore recorded at each train-batch end (before ``ModelCheckpoint``, which
    Lightning runs last) and written into every checkpoint of that step. At train end, ``last.ckpt`` is
    rewritten if it lags behind (``ModelCheckpoint`` skips that save when it wrote any ``last`` in this
    fit). The first SIGINT or SIGTERM lets the step under way finish, then ends the fit as ``max_steps``
    would, so without the validation that ``trainer.should_stop`` adds (a second SIGINT interrupts at once,
    without a checkpoint).
    """

    def __init__(self) -> None:
        self._loop_state: tuple[int, dict[str, Any]] | None = None
        self._stop_signal: int | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._max_steps: int | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._loop_state, self._stop_signal = None, None
        if threading.current_thread() is threading.main_thread():  # signals that are ignored stay ignored (nohup, &)
            self._previous_handlers = {s: signal.signal(s, self._request_stop) for s in (signal.SIGINT, signal.SIGTERM)
                                       if signal.getsignal(s) is not signal.SIG_IGN}

    @property
    def stop_signal(self) -> int | None:
        """The signal that ended the last fit early (None if it ran its course)."""
        return self._stop_signal

    def _request_stop(self, signum: int, frame: Any) -> None:
        if self._stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._stop_signal = signum
        log.warning("%s received: stopping after the step under way (Ctrl-C again to stop now, without a checkpoint)",
                    signal.Signals(signum).name)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        """Forget the last step's values. Lightning sends every step value logged since the epoch began with
        each step, so one measured at step k only (a mode absent later, no active group) would be logged
        again at k+1, k+2, ... by the uninterrupted run, but not by a run resumed after k."""
        for result in trainer._results.values():
            if not result.meta.on_epoch:
                result.reset()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self._loop_state = (trainer.global_step, copy.deepcopy(trainer.fit_loop.state_dict()))
        # DDP: a signal can reach the ranks in different steps; all stop after the first step any rank saw it in.
        stop = trainer.strategy.reduce_boolean_decision(self._stop_signal is not None, all=False)
        if stop and self._stop_signal is None:  # another rank's signal: this rank's fit is interrupted as well
            self._stop_signal = signal.SIGTERM
        if stop and self._max_steps is None:
            self._max_steps, trainer.fit_loop.epoch_loop.max_steps = trainer.max_steps, trainer.global_step

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._loop_state is not None and self._loop_state[0] == trainer.global_step:
            checkpoint["loops"]["fit_loop"] = copy.deepcopy(self._loop_state[1])

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_handlers()
        if self._max_steps is not None:
            trainer.fit_loop.epoch_loop.max_steps, self._max_steps = self._max_steps, None
        if trainer.fast_dev_run or self._loop_state is None:
            return
        for callback in trainer.checkpoint_callbacks:
            if (isinstance(callback, ModelCheckpoint) and callback.save_last and callback._last_checkpoint_saved
                    and callback._last_global_step_saved != trainer.global_step):
                callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}


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


def stop_signal(trainer: Trainer) -> int | None:
    """The signal that stopped this trainer's last fit early, if an ``ExactResume`` recorded one."""
    return next((c.stop_signal for c in trainer.callbacks if isinstance(c, ExactResume) and c.stop_signal), None)
