"""The thin distributed layer: one process or many under `torchrun`, one training loop.

`init_distributed()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); without it
the run is a single process with rank 0 of 1, and the same loop runs either way. CPU runs use
the gloo backend, CUDA runs nccl.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def pick_device(requested: str, local_rank: int) -> str:
    """'auto' means this process's GPU when there is one, else the CPU."""
    if requested == "auto":
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        return f"cuda:{local_rank}"
    return requested


def init_distributed(device: str = "auto") -> DistEnv:
    """Set up the process group when launched by torchrun; a single-process env otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.startswith("cuda") else "gloo"
        if dev.startswith("cuda"):
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def all_reduce_mean(value: float, env: DistEnv) -> float:
    """The mean of a number over all processes (the number itself when single)."""
    if not env.distributed:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64)
    if env.device.startswith("cuda"):
        t = t.to(env.device)
    dist.all_reduce(t)
    return float(t.item()) / env.world_size


def all_reduce_sum_counts(counts: dict[str, int], env: DistEnv) -> dict[str, int]:
    """Counters summed over all processes (keys united)."""
    if not env.distributed:
        return dict(counts)
    gathered: list[dict] = [None] * env.world_size  # type: ignore[list-item]
    dist.all_gather_object(gathered, dict(counts))
    total: dict[str, int] = {}
    for c in gathered:
        for k, v in c.items():
            total[k] = total.get(k, 0) + int(v)
    return total


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def shutdown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()
