"""Shared fixtures: an isolated cache for SVD factors and converted models."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """SVD factors and converted models of tiny models go to a per-session temp dir."""
    monkeypatch.setenv("ANTIPASTO_CACHE", str(tmp_path_factory.getbasetemp() / "antipasto_cache"))
