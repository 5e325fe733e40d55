"""The one atomic writer and the one cache root."""

from __future__ import annotations

from pathlib import Path

import pytest

from antipasto_pl.cli import AntipastoCLI
from antipasto_pl.storage import atomic_write, cache_root

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"


def test_atomic_write_replaces_a_file_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "eval.json"
    with atomic_write(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("old")
    assert target.read_text() == "old" and target.stat().st_mode & 0o777 == 0o644
    with pytest.raises(RuntimeError), atomic_write(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in target.parent.iterdir()] == ["eval.json"]  # no temporary left behind


def test_atomic_write_of_a_directory_replaces_the_old_one(tmp_path: Path) -> None:
    target = tmp_path / "pool"
    target.mkdir()
    (target / "stale.jsonl").write_text("x")
    with atomic_write(target, directory=True) as tmp:
        (tmp / "manifest.json").write_text("{}")
        assert not (target / "manifest.json").exists()  # nothing visible before the block ends
    assert sorted(p.name for p in target.iterdir()) == ["manifest.json"]
    with pytest.raises(ValueError), atomic_write(target, directory=True) as tmp:
        (tmp / "manifest.json").write_text("broken")
        raise ValueError
    assert (target / "manifest.json").read_text() == "{}" and [p.name for p in tmp_path.iterdir()] == ["pool"]


@pytest.mark.filterwarnings("ignore:LightningCLI.s args parameter")
def test_cache_root_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``cache_dir`` in a config (or on the command line) over ``$ANTIPASTO_CACHE`` over the home default."""
    monkeypatch.setenv("ANTIPASTO_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    AntipastoCLI(args=["--config", str(SMOKE), "--cache_dir", str(tmp_path / "field")], run=False)
    assert cache_root() == tmp_path / "field"
    monkeypatch.delenv("ANTIPASTO_CACHE")
    assert cache_root() == Path.home() / ".cache" / "antipasto_pl"
