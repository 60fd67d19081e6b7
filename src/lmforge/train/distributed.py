"""Multi-process training through torchrun: process-group setup, and the few collectives the
trainer needs. With a single process every helper is a cheap no-op."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(spec)


def setup(device: str = "auto") -> DistInfo:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and join the process group:
    NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=pick_device(device))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        # LMFORGE_DIST_TIMEOUT (seconds) bounds how long a rank waits for the others (default: torch's 30 min)
        timeout = os.environ.get("LMFORGE_DIST_TIMEOUT")
        kwargs = {"timeout": timedelta(seconds=float(timeout))} if timeout else {}
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", **kwargs)
    return DistInfo(rank, world, local, dev)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def mean_across(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= info.world_size
    return value


def sum_across(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The sum of ``value`` over all ranks (itself when not distributed)."""
    if info.enabled:
        value = value.to(info.device).clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def max_across(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The elementwise maximum of ``value`` over all ranks (on the CPU; itself when not distributed)."""
    if info.enabled:
        value = value.to(info.device).clone()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.cpu()


def any_across(flag: bool, info: DistInfo) -> bool:
    """True on every rank if it is True on any rank (stop signals must be agreed)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
