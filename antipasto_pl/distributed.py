"""Data-parallel training under Lightning DDP: the few rank-aware pieces, as helpers that do nothing on one process.

Gradients. The trainable state is a few vectors per adapted layer, and a step's number of backwards depends on the
rank's own data (active groups, micro-batches, PPO iterations). With manual optimization DDP would all-reduce in every
``manual_backward``, so a rank with fewer backwards (one with no active group has none) leaves the others waiting in a
collective it never enters: a hang. So every backward runs under DDP's ``no_sync`` (``local_backward``) and the
adapter gradients are averaged in exactly one explicit all-reduce per optimizer step (``mean_over_ranks``), which
every rank enters whatever it did. Frozen base weights never get a gradient, so DDP's reducer has nothing else to do.

Everything that decides whether a collective happens (what is logged, when to stop) is computed from values every
rank holds (reduced ones), so the ranks always issue the same collectives in the same order.

Sharing. Work that must not be repeated per rank, or must agree across ranks, is done once: the model conversion and
SVD factors by the node's first rank while the others wait and then read its cache (``local_zero_first``); V by global
rank 0, handed to the others (``computed_once``).
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")

# Strategies that shard the model. Under them the base would be sharded to save memory that a few vectors per layer
# do not need, and this trainer's hooks (projection, merged-weight cache, V extraction) read whole weights.
SHARDED = ("fsdp", "deepspeed", "model_parallel", "modelparallel", "xla_fsdp")
SHARDED_ERROR = (
    "trainer.strategy {name!r} shards the model, which antipasto does not support: the trainable state is a few "
    "vectors per adapted layer and the frozen base is replicated on every device; use --trainer.strategy ddp "
    "(with --trainer.devices N, --trainer.num_nodes M)"
)


def check_strategy(strategy: Any) -> None:
    """Refuse a sharding strategy (FSDP, DeepSpeed, model parallel), given as a name, a ``class_path`` or an
    instance, with what to use instead."""
    if not isinstance(strategy, str) and hasattr(strategy, "get"):  # {class_path: ..., init_args: ...}
        strategy = strategy.get("class_path", "")
    name = strategy if isinstance(strategy, str) else type(strategy).__name__
    compact = name.rsplit(".", 1)[-1].lower().replace("strategy", "").replace("_", "")
    if any(compact.startswith(kind.replace("_", "")) for kind in SHARDED):
        raise ValueError(SHARDED_ERROR.format(name=name))


def world_size(trainer: L.Trainer | None) -> int:
    """Processes taking part in collectives (1 without a trainer or a process group)."""
    if trainer is None or not (dist.is_available() and dist.is_initialized()):
        return 1
    return trainer.world_size


def local_processes(trainer: L.Trainer | None) -> int:
    """Processes of this run on this machine."""
    return getattr(trainer.strategy, "num_processes", 1) if trainer is not None else 1


def split_workers(requested: int | None, local: int) -> int:
    """Grader sandboxes per rank: as requested, else this machine's cores shared by its ranks."""
    if requested is not None:
        return requested
    return max(1, (os.cpu_count() or 1) // max(local, 1))


@contextlib.contextmanager
def local_backward(trainer: L.Trainer | None) -> Iterator[None]:
    """Backwards that only accumulate into ``.grad`` on this rank (DDP's ``no_sync``); ``mean_over_ranks`` then
    reduces once."""
    block = getattr(trainer.strategy, "block_backward_sync", None) if trainer is not None else None
    with block() if block is not None else contextlib.nullcontext():
        yield


def mean_over_ranks(trainer: L.Trainer | None, tensors: list[Tensor]) -> list[Tensor]:
    """The element-wise mean over ranks of each tensor, in one all-reduce (the tensors are flattened into one
    buffer, which must have the same layout on every rank)."""
    if world_size(trainer) == 1 or not tensors:
        return tensors
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    flat /= world_size(trainer)
    out, start = [], 0
    for t in tensors:
        out.append(flat[start:start + t.numel()].reshape(t.shape).to(t.dtype))
        start += t.numel()
    return out


def reduce_values(trainer: L.Trainer | None, values: dict[str, float], op: str = "sum") -> dict[str, float]:
    """Sum (or max) of each value over ranks, in one all-reduce; every rank must pass the same keys."""
    if world_size(trainer) == 1 or not values:
        return {k: float(v) for k, v in values.items()}
    keys = sorted(values)
    device = trainer.strategy.root_device
    buffer = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(buffer, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return dict(zip(keys, buffer.tolist()))


def gather_objects(trainer: L.Trainer | None, obj: T) -> list[T]:
    """``obj`` of every rank, in rank order, on every rank (``[obj]`` on one process). Tensors must be on the CPU."""
    if world_size(trainer) == 1:
        return [obj]
    out: list[Any] = [None] * world_size(trainer)
    dist.all_gather_object(out, obj)
    return out


def computed_once(trainer: L.Trainer | None, compute: Callable[[], T]) -> T:
    """``compute()`` on global rank 0 only, its result handed to every rank (which waits for it meanwhile). The
    result must pickle; tensors in it should be on the CPU (they unpickle on the device they were on)."""
    if world_size(trainer) == 1:
        return compute()
    box = [compute() if trainer.global_rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def local_zero_first(trainer: L.Trainer | None) -> Iterator[None]:
    """Run the block on the node's first rank, then on the others: for work that fills an on-disk cache (model
    conversion, SVD factors), which the later ranks then read instead of recomputing."""
    if world_size(trainer) == 1:
        yield
        return
    first = trainer.local_rank == 0
    if not first:
        trainer.strategy.barrier("antipasto: local rank 0 fills the cache")
    yield
    if first:
        trainer.strategy.barrier("antipasto: local rank 0 fills the cache")


def seed_rank(seed: int, rank: int) -> None:
    """Distinct sampling streams per rank (torch, python, numpy), derived from the run seed; rank 0 keeps the
    stream ``seed_everything`` gave it, so a run's rank 0 samples as a one-process run would."""
    if rank == 0:
        return
    derived = (seed * 1_000_003 + rank) % 2**32
    torch.manual_seed(derived)
    random.seed(derived)
    np.random.seed(derived)
