"""Fixtures of the environment tests."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest


@pytest.fixture
def canary():
    """A world-writable dir with a world-writable file outside any sandbox: only isolation protects it."""
    root = tempfile.mkdtemp(prefix="antipasto-canary-")
    os.chmod(root, 0o777)
    path = os.path.join(root, "canary.txt")
    with open(path, "w") as fh:
        fh.write("original")
    os.chmod(path, 0o666)
    yield root, path
    shutil.rmtree(root, ignore_errors=True)
