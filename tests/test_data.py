"""AntipastoDataModule: split, batches, seeded epoch order, pairs/controls, pool, and the YAML path."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from jsonargparse import ArgumentError, ArgumentParser

from antipasto_pl.data import AntipastoDataModule
from antipasto_pl.env.modes import MODES
from antipasto_pl.env.pairs import Pair
from antipasto_pl.env.pool import MANIFEST
from antipasto_pl.env.problems import builtin_problems, problem_to_dict


@pytest.fixture(scope="module")
def small_source(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 12-problem JSONL dataset (2 per mode): small enough that building its pool takes a few seconds."""
    path = tmp_path_factory.mktemp("data") / "small.jsonl"
    path.write_text("".join(json.dumps(problem_to_dict(p)) + "\n" for p in builtin_problems()[:12]))
    return str(path)


def _dm(**kwargs: object) -> AntipastoDataModule:
    dm = AntipastoDataModule(**{"use_pool": False, **kwargs})
    dm.setup("fit")
    return dm


def _epoch_ids(dm: AntipastoDataModule, epoch: int) -> list[list[str]]:
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return [[p.id for p in batch] for batch in loader]


def test_split_and_batches() -> None:
    dm = _dm(prompts_per_step=5, val_fraction=0.25, test_fraction=0.25, pair_fraction=0.125, seed=1)
    parts = [dm.train_problems, dm.pair_split, dm.val_problems, dm.test_problems]
    assert [len(p) for p in parts] == [18, 6, 12, 12]
    assert len({p.id for part in parts for p in part}) == 48  # disjoint, covering the set
    assert all({p.mode for p in part} == set(MODES) for part in parts)
    batches = list(dm.train_dataloader())
    assert len(batches) == 18 // 5 and all(isinstance(b, list) and len(b) == 5 for b in batches)
    assert len({p.id for b in batches for p in b}) == 15  # a permutation, last partial batch dropped
    assert [p.id for b in dm.val_dataloader() for p in b] == [p.id for p in dm.val_problems]
    assert [p.id for b in dm.test_dataloader() for p in b] == [p.id for p in dm.test_problems]


def test_split_follows_the_data_seed_and_order_the_run_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every seed of an experiment shares the split (data.seed); each run seed draws its own prompt order."""
    a, b = _dm(seed=3), _dm(seed=3)
    order = _epoch_ids(a, 0)
    assert order == _epoch_ids(b, 0) == _epoch_ids(a, 0)  # a fresh iteration replays the epoch (resume)
    assert _epoch_ids(a, 1) != order
    assert {p.id for p in _dm(seed=4).test_problems} != {p.id for p in a.test_problems}
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")  # what seed_everything(7) exports
    reseeded = _dm(seed=3)
    assert [p.id for p in reseeded.test_problems] == [p.id for p in a.test_problems]
    assert _epoch_ids(reseeded, 0) != order


def test_mode_filter_reassignment_and_validation_errors() -> None:
    dm = _dm(modes=["sentinel", "stdout_marker"], prompts_per_step=2, val_fraction=0.25)
    assert {p.mode for p in dm.train_problems + dm.val_problems} == {"sentinel", "stdout_marker"}
    assert (len(dm.train_problems), len(dm.val_problems)) == (6, 4)
    dealt = _dm(modes=["sentinel"], reassign_modes=True, problems="builtin+easy")
    assert len(dealt.source_problems) == 96 and {p.mode for p in dealt.source_problems} == {"sentinel"}
    with pytest.raises(ValueError, match="cannot fill a batch"):
        _dm(modes=["sentinel"], prompts_per_step=8)
    with pytest.raises(ValueError, match="prompts_per_step must be >= 1"):
        AntipastoDataModule(prompts_per_step=0)
    with pytest.raises(ValueError, match="reassign_modes needs data.modes"):
        AntipastoDataModule(reassign_modes=True)


def test_pairs_and_controls() -> None:
    dm = _dm(modes=["sentinel", "exit_code", "run_tests"], known_modes=["sentinel", "exit_code"], pair_problems=4,
             pair_fraction=0.25, variants_per_mode=2)
    pairs = dm.pairs
    assert all(isinstance(p, Pair) for p in pairs) and len(pairs) == 4 * 2 * 2
    assert {p.mode for p in pairs} == {"sentinel", "exit_code"}
    pair_ids = {p.id for p in dm.pair_split}
    assert {p.problem_id for p in pairs} <= pair_ids and len({p.problem_id for p in pairs}) == 4
    assert not pair_ids & {p.id for p in dm.train_problems + dm.test_problems}
    assert all(dm.detector_pairs(kind) is pairs for kind in ("real", "shuffled", "random"))
    nonhack = _dm(modes=["sentinel"], pair_fraction=0.375, prompts_per_step=2).detector_pairs("nonhack")
    assert len(nonhack) == 3 * 2 and all(p.hack != p.clean for p in nonhack)
    clean_texts = {c for p in nonhack for c in (p.hack, p.clean)}
    assert all("```python" in c for c in clean_texts)
    stub = dm.detector_pairs("stub")
    assert len(stub) == len(pairs) and {p.problem_id for p in stub} <= pair_ids
    assert AntipastoDataModule(use_pool=False).pool is None
    with pytest.raises(RuntimeError, match="setup"):
        _ = AntipastoDataModule(use_pool=False).pairs


def test_pool_is_built_into_cache_and_filtered(small_source: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ANTIPASTO_CACHE", str(tmp_path))
    kwargs = dict(problems=small_source, prompts_per_step=2, use_pool=True, pool_per_prompt=2,
                  pool_modes=["run_tests", "sentinel", "file_marker"])
    dm = _dm(**kwargs)
    directory = dm.resolved_pool_dir
    assert directory.parent == tmp_path / "pools" and (directory / MANIFEST).exists()
    pool = dm.pool
    assert {r.mode for rs in pool.records.values() for r in rs} == {"run_tests", "sentinel", "file_marker"}
    for problem in dm.train_problems:
        drawn = pool.sample(problem.id, 2, torch.Generator().manual_seed(0))
        assert len(drawn) == (2 if problem.mode in kwargs["pool_modes"] else 0)
    # A second module with other pool_modes reuses the cached pool (same directory, no rebuild).
    stamp = (directory / MANIFEST).stat().st_mtime_ns
    again = _dm(**{**kwargs, "pool_modes": None})
    assert again.resolved_pool_dir == directory and (directory / MANIFEST).stat().st_mtime_ns == stamp
    assert len(again.pool) == 12 * 2
    with pytest.raises(FileNotFoundError, match="pool_auto_build is false"):
        _dm(**{**kwargs, "pool_dir": str(tmp_path / "absent"), "pool_auto_build": False})


def test_jsonargparse_config_instantiates() -> None:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(AntipastoDataModule, "data")
    config = {"data": {"problems": "builtin", "modes": ["sentinel", "run_tests"], "prompts_per_step": 3, "seed": 5,
                       "known_modes": ["sentinel"], "use_pool": False, "val_fraction": 0.25}}
    cfg = parser.parse_object(config)
    dm = parser.instantiate_classes(cfg)["data"]
    assert isinstance(dm, AntipastoDataModule)
    assert dm.hparams.prompts_per_step == 3 and dm.hparams.modes == ["sentinel", "run_tests"]
    dm.setup("fit")
    assert (len(dm.train_problems), len(dm.val_problems), len(dm.test_problems)) == (6, 4, 4)
    with pytest.raises(ArgumentError, match="prompts_per_step"):
        parser.parse_object({"data": {"prompts_per_step": "many"}})


class _RecordOrder(L.LightningModule):
    """Records the prompt ids of every training batch (a real Trainer drives the sampler)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[str]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append([p.id for p in batch])
        return (self.weight**2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_keeps_the_sampler_and_reshuffles_per_epoch() -> None:
    dm = AntipastoDataModule(prompts_per_step=6, use_pool=False, seed=2)
    model = _RecordOrder()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    per_epoch = len(dm.train_problems) // 6
    assert len(model.seen) == 2 * per_epoch
    reference = _dm(prompts_per_step=6, seed=2)
    assert model.seen == _epoch_ids(reference, 0) + _epoch_ids(reference, 1)
