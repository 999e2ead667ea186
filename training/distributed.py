"""Data parallel training with torchrun: the process's rank and world, a barrier, gradient averaging."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size())


def barrier(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


def sync_gradients(params: list[torch.nn.Parameter], d: Dist) -> None:
    """Average gradients over processes. A parameter no process touched keeps grad None (AdamW skips it);
    one touched elsewhere gets a zero local gradient first, so every process steps the same parameters."""
    if d.world <= 1:
        return
    import torch.distributed as dist

    touched = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
    dist.all_reduce(touched)
    for p, t in zip(params, touched.tolist(), strict=True):
        if t == 0:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(d.world)


