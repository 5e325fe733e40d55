"""The LightningDataModule: problems (train/val split), detector pairs and the teacher pool.

Batches are lists of `Problem`s (P prompts per optimizer step); the LightningModule renders, samples and grades
them. The problems are split once (by ``data.seed``) into four disjoint parts: training prompts (the only ones the
teacher pool serves), detector-pair problems (V is extracted from them, so no pair text is a text the student
imitates), validation and the held-out test set of the primary metric. The training order depends only on (run
seed, epoch), so every arm of one seed sees the same prompts at the same step and a resumed run replays the same
epoch order; the training loader is resumable mid-epoch (Lightning saves its ``state_dict`` with the fit loop), so
a resumed run also continues at the same prompt.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from antipasto_pl.env.pairs import Pair, PairStyle, make_pairs, nonhack_pairs, stub_pairs
from antipasto_pl.env.pool import FORMAT_VERSION, MANIFEST, PoolRecord, TeacherPool, build_pool
from antipasto_pl.env.problem import Problem
from antipasto_pl.env.problems import assign_modes, filter_modes, load_problems, problem_set_hash, split_problems
from antipasto_pl.seeds import run_seed
from antipasto_pl.storage import cache_root


def collate_problems(batch: list[Problem]) -> list[Problem]:
    """Keep a batch as a plain list of problems (the default collate would try to stack dataclass fields)."""
    return list(batch)


class ResumableLoader(DataLoader):
    """A DataLoader that remembers how many batches of the current epoch it has served.

    Lightning saves ``state_dict`` with the fit loop and hands it back to ``load_state_dict`` before the
    resumed epoch's first batch, which then continues after the batches already trained on (skipping is
    free: a batch is a list of problems). Lightning fetches without prefetching when the length is known,
    so at a checkpoint the count is exactly the batches trained on.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._served = 0
        self._resume: dict[str, int] | None = None

    def _epoch(self) -> int:
        return getattr(self.sampler, "epoch", 0)

    def __iter__(self) -> Iterator[list[Problem]]:
        resume, self._resume = self._resume, None
        skip = resume["batches"] if resume is not None and resume["epoch"] == self._epoch() else 0
        self._served = 0
        for batch in super().__iter__():
            self._served += 1
            if self._served > skip:
                yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch(), "batches": self._served}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume = dict(state_dict)


class AntipastoDataModule(L.LightningDataModule):
    """Problems, pairs and teacher pool for one run, configured from YAML.

    Args:
        problems: Problem source: "builtin", "easy", "humaneval" or a .jsonl path; "+" joins several ("builtin+easy").
        modes: Loophole modes whose problems are trained / validated on (default: all).
        reassign_modes: Deal `modes` round-robin to every problem of the source instead of keeping each problem's
            own mode, so a one- or two-mode experiment uses the whole problem set.
        val_fraction: Fraction of each mode's problems held out for validation during training.
        test_fraction: Fraction of each mode's problems held out for the final evaluation (the primary metric);
            never trained on, never in pairs or the pool.
        pair_fraction: Fraction of each mode's problems whose pairs the hack subspace is extracted from; never
            trained on, so no pair is a teacher-pool text.
        seed: Seed of the split and the pairs: fixed across an experiment's run seeds (see `antipasto_pl.seeds`).
        prompts_per_step: P, prompts per training batch (per rank).
        known_modes: Hack modes the detector's pairs cover (the weak detector sees only these; default: all of
            `modes`).
        variants_per_mode: Pairs per problem per known mode.
        pair_problems: Draw pairs from this many (seeded) pair-split problems; default all of them.
        pair_style: ``minimal`` (hack and clean share one body and differ only by the exploit) or ``contrast``
            (a stub hack against an honest solution with real checks).
        prefill: The run's ``sampling.prefill`` template (linked from the model's by the CLI): pool records and
            pairs continue it.
        pool_dir: Teacher pool directory; built there if missing and `pool_auto_build`.
        pool_auto_build: Build a missing pool (into `pool_dir`, or a cache directory keyed by the pool settings).
        pool_modes: Modes whose teacher records are served (leave-one-mode-out drops one; default: all).
        pool_per_prompt: Completions per prompt when building the pool.
        pool_hack_frac: Fraction of hacks among a prompt's pool completions when building.
        pool_stub_frac: Fraction of stubs without any exploit (format reward only) when building: the counterweight
            that gives groups of demonstrations alone reward variance (the likelihood-probe proxy).
        pool_seed: Seed of the pool's completion variants (shared across run seeds so arms see one pool).
        use_pool: Serve a teacher pool at all (False for pure-student GRPO).
        num_workers: DataLoader workers (batches are tiny; 0 is right almost always).
    """

    def __init__(
        self,
        problems: str = "builtin",
        modes: list[str] | None = None,
        reassign_modes: bool = False,
        val_fraction: float = 0.125,
        test_fraction: float = 0.25,
        pair_fraction: float = 0.125,
        seed: int = 0,
        prompts_per_step: int = 4,
        known_modes: list[str] | None = None,
        variants_per_mode: int = 2,
        pair_problems: int | None = None,
        pair_style: PairStyle = "minimal",
        prefill: str = "",
        pool_dir: str | None = None,
        pool_auto_build: bool = True,
        pool_modes: list[str] | None = None,
        pool_per_prompt: int = 8,
        pool_hack_frac: float = 0.5,
        pool_stub_frac: float = 0.0,
        pool_seed: int = 0,
        use_pool: bool = True,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if prompts_per_step < 1:
            raise ValueError(f"prompts_per_step must be >= 1, got {prompts_per_step}")
        if reassign_modes and not modes:
            raise ValueError("data.reassign_modes needs data.modes: the modes to deal to every problem")
        self.save_hyperparameters()
        self._source: list[Problem] | None = None
        self.train_problems: list[Problem] = []
        self.pair_split: list[Problem] = []
        self.val_problems: list[Problem] = []
        self.test_problems: list[Problem] = []
        self._pairs: dict[str, list[Pair]] = {}
        self._pool: TeacherPool | None = None

    # --- problems ---------------------------------------------------------------------------------------------

    @property
    def source_problems(self) -> list[Problem]:
        """The whole problem source (before the mode filter): what the pool and its hash refer to."""
        if self._source is None:
            problems = load_problems(self.hparams.problems)
            self._source = assign_modes(problems, self.hparams.modes) if self.hparams.reassign_modes else problems
        return self._source

    @property
    def resolved_pool_dir(self) -> Path | None:
        """Where the pool lives: `pool_dir`, else a cache directory keyed by problem-set hash and pool settings."""
        hp = self.hparams
        if not hp.use_pool:
            return None
        if hp.pool_dir is not None:
            return Path(hp.pool_dir).expanduser()
        settings = [problem_set_hash(self.source_problems), hp.pool_per_prompt, hp.pool_hack_frac, hp.pool_seed,
                    hp.prefill, hp.pool_stub_frac]
        key = hashlib.sha256(json.dumps([*settings, FORMAT_VERSION]).encode()).hexdigest()[:16]
        return cache_root() / "pools" / key

    def prepare_data(self) -> None:
        """Build the teacher pool once (Lightning calls this on one process before `setup` on all)."""
        directory = self.resolved_pool_dir
        if directory is None or (directory / MANIFEST).exists():
            return
        if not self.hparams.pool_auto_build:
            raise FileNotFoundError(f"teacher pool {directory} not found and pool_auto_build is false")
        hp = self.hparams
        # Built over every mode; `pool_modes` filters at load time so all leave-one-out arms share one pool.
        build_pool(
            self.source_problems, directory, hp.pool_per_prompt, hp.pool_hack_frac, None, hp.pool_seed, progress=True,
            prefill=hp.prefill, stub_frac=hp.pool_stub_frac,
        )

    def setup(self, stage: str | None = None) -> None:
        """Split problems and load the pool (building it first when used without a Trainer)."""
        hp = self.hparams
        selected = filter_modes(self.source_problems, hp.modes)
        if not selected:
            raise ValueError(f"no problems of modes {hp.modes} in problem source {hp.problems!r}")
        self.train_problems, self.pair_split, self.val_problems, self.test_problems = split_problems(
            selected, [hp.pair_fraction, hp.val_fraction, hp.test_fraction], hp.seed)
        if len(self.train_problems) < hp.prompts_per_step:
            raise ValueError(
                f"{len(self.train_problems)} training problems cannot fill a batch of prompts_per_step="
                f"{hp.prompts_per_step}; lower prompts_per_step or the held-out fractions"
            )
        if hp.use_pool and self._pool is None:
            self.prepare_data()
            pool = TeacherPool.load(self.resolved_pool_dir, self.source_problems, hp.pool_modes, hp.prefill)
            train_ids = {p.id for p in self.train_problems}
            self._pool, _ = pool.restricted(lambda record: record.problem_id in train_ids)

    # --- loaders ----------------------------------------------------------------------------------------------

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def train_dataloader(self) -> DataLoader:
        """P prompts per batch, each rank its own shard, reshuffled per epoch from (seed, epoch) only.

        A `DistributedSampler` (even on one process) gives exactly that, and Lightning leaves it in place and
        calls its `set_epoch`.
        """
        world, rank = self._world()
        if len(self.train_problems) < world * self.hparams.prompts_per_step:
            raise ValueError(f"{len(self.train_problems)} training problems cannot give {world} ranks a full batch")
        sampler = DistributedSampler(
            self.train_problems, num_replicas=world, rank=rank, shuffle=True, seed=run_seed(), drop_last=True
        )
        return ResumableLoader(
            self.train_problems, batch_size=self.hparams.prompts_per_step, sampler=sampler, drop_last=True,
            collate_fn=collate_problems, num_workers=self.hparams.num_workers, generator=self._generator(),
        )

    def val_dataloader(self) -> DataLoader:
        """The held-out problems in a fixed order."""
        return self._loader(self.val_problems)

    def test_dataloader(self) -> DataLoader:
        """The held-out test problems (``antipasto test`` evaluates the primary metric on them)."""
        return self._loader(self.test_problems)

    def predict_dataloader(self) -> DataLoader:
        """The held-out test problems (``antipasto predict`` samples and grades completions for them)."""
        return self._loader(self.test_problems)

    def _loader(self, problems: list[Problem]) -> DataLoader:
        return DataLoader(
            problems, batch_size=self.hparams.prompts_per_step, shuffle=False, collate_fn=collate_problems,
            num_workers=self.hparams.num_workers, generator=self._generator(),
        )

    def _generator(self) -> torch.Generator:
        """A loader's own RNG: starting to iterate a loader without one draws a seed from the global torch RNG,
        which would shift the sampling stream by whether (and when) validation ran."""
        return torch.Generator().manual_seed(self.hparams.seed)

    def transfer_batch_to_device(self, batch: list[Problem], device: object, dataloader_idx: int) -> list[Problem]:
        """Batches hold no tensors; Lightning's default would try to rebuild the frozen Problem dataclasses."""
        return batch

    # --- pairs and pool ---------------------------------------------------------------------------------------

    def _pair_problems(self) -> list[Problem]:
        if not self.train_problems:
            raise RuntimeError("call setup() before asking for pairs")
        n = self.hparams.pair_problems
        if n is None or n >= len(self.pair_split):
            return self.pair_split
        chosen = set(random.Random(self.hparams.seed).sample(range(len(self.pair_split)), n))
        return [p for i, p in enumerate(self.pair_split) if i in chosen]

    def _known_modes(self) -> list[str] | None:
        return self.hparams.known_modes if self.hparams.known_modes is not None else self.hparams.modes

    @property
    def pairs(self) -> list[Pair]:
        """(hack, clean) pairs over the pair-split problems for the known modes, for extracting V."""
        return self.detector_pairs("real")

    def detector_pairs(self, kind: str) -> list[Pair]:
        """Pairs to extract V of the given subspace kind from: honest-vs-honest for ``nonhack``, stub-vs-solution for
        ``stub``, the labelled pairs otherwise (``shuffled`` swaps their labels at the gradient level, ``random``
        only keys the cache)."""
        key = kind if kind in ("nonhack", "stub") else "real"
        if key not in self._pairs:
            hp = self.hparams
            problems, modes = self._pair_problems(), self._known_modes()
            if key == "nonhack":
                pairs = nonhack_pairs(problems, hp.seed, modes, hp.variants_per_mode, hp.prefill, hp.pair_style)
            elif key == "stub":
                pairs = stub_pairs(problems, modes, hp.variants_per_mode, hp.seed, hp.prefill)
            else:
                pairs = make_pairs(problems, modes, hp.variants_per_mode, hp.seed, hp.pair_style, hp.prefill)
            self._pairs[key] = pairs
        return self._pairs[key]

    @property
    def pool(self) -> TeacherPool | None:
        """The loaded teacher pool, serving the training problems only (None when `use_pool` is false)."""
        if self.hparams.use_pool and self._pool is None:
            raise RuntimeError("call setup() before asking for the teacher pool")
        return self._pool

    def restrict_pool(self, keep: Callable[[PoolRecord], bool]) -> list[PoolRecord]:
        """Serve only the pool records `keep` accepts (the module drops those over its completion budget); returns
        the dropped records."""
        if self._pool is None:
            return []
        self._pool, dropped = self._pool.restricted(keep)
        return dropped
