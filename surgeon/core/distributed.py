"""Sharded statistics with torch.distributed (torchrun): each rank accumulates its share of the images,
one all-reduce merges them (statistics are sums). gloo on CPU, NCCL on GPU; no home-made transport."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from surgeon.core.stats import HeadStats


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """The process group torchrun set up (initialised on first use), or a single-process world."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        backend = "gloo"
        if torch.cuda.is_available():  # NCCL for CUDA tensors, gloo for CPU ones (e.g. --device cpu on a GPU box)
            backend = "cpu:gloo,cuda:nccl"
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return World(dist.get_rank(), dist.get_world_size())


def device_for(w: World, requested: str | None) -> str | None:
    """Each rank on its own GPU under torchrun (LOCAL_RANK), unless a device was asked for."""
    if requested is None and w.active and torch.cuda.is_available():
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return requested


def shard(count: int, w: World, batch_size: int = 1) -> tuple[int, int]:
    """Contiguous [start, stop) of `count` items for this rank, cut at batch boundaries: every image is
    embedded in the same batch as in a single-process run, so results agree to float64 summation order."""
    n_batches = -(-count // batch_size)
    base, extra = divmod(n_batches, w.size)
    first = w.rank * base + min(w.rank, extra)
    last = first + base + (1 if w.rank < extra else 0)
    return min(first * batch_size, count), min(last * batch_size, count)


def all_reduce(stats: HeadStats, w: World) -> HeadStats:
    """Sum the statistics of every rank; every rank gets the total."""
    if not w.active:
        return stats
    count = torch.tensor([stats.count], dtype=torch.float64, device=stats.total.device)
    for tensor in (count, stats.total, stats.outer):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return HeadStats(stats.layers, int(count.item()), stats.total, stats.outer)


def agree(flag: bool, w: World) -> bool:
    """True only when every rank says True (e.g. 'my cache entry exists')."""
    if not w.active:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        value = value.cuda()
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())
