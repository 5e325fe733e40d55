"""Where files go and how they are written: the one cache root, and atomic writes.

Everything this package writes that another process may read while it is being written (checkpoints, caches
shared by concurrent runs or ranks, eval.json) goes through ``atomic_write``: a reader, or the next run after a
kill at any moment, sees the old version or the new one, never a part.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

CACHE_ENV = "ANTIPASTO_CACHE"


def cache_root() -> Path:
    """Root of the on-disk cache (converted models, SVD factors, hack subspaces, teacher pools):
    ``$ANTIPASTO_CACHE`` (the CLI's ``cache_dir`` sets it), else ``~/.cache/antipasto_pl``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "antipasto_pl").expanduser()


@contextlib.contextmanager
def atomic_write(path: str | Path, directory: bool = False) -> Iterator[Path]:
    """A temporary sibling of `path` to write (a file name, or a created directory when `directory`); when the
    block ends without an error it is made durable (a file is fsynced) and moved onto `path` with ``os.replace``
    (a directory replaces an existing one), else removed. Names are unique per call, so concurrent writers of one
    path (ranks filling one cache entry) each leave a whole file and the last one wins."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}."
    if directory:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix, suffix=".tmp"))
    else:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if directory:
            tmp.chmod(0o755)  # mkdtemp / mkstemp make private entries; caches are shared like any model directory
            if path.exists():
                shutil.rmtree(path)
        else:
            tmp.chmod(0o644)
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        if directory:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)  # make the rename itself durable


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
