"""torchrun support: one process per device, DDP over the trainable weights, each rank reading its own shards.

Launch the same command under `torchrun --nproc_per_node N avlink train ...`; torchrun sets RANK, WORLD_SIZE and
LOCAL_RANK, and everything else follows from them. Nothing here is needed for one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Dist:
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


def setup(device: str = "auto") -> Dist:
    """Join the process group when launched by torchrun (gloo on CPU, NCCL on CUDA); else a single process."""
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=torch.device("cuda" if want_cuda else "cpu"))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo")
    return Dist(rank, world, local, torch.device(f"cuda:{local}" if want_cuda else "cpu"))


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class LossModule(nn.Module):
    """Wraps an objective so that DDP sees one module whose forward is the loss: DDP then averages the gradients
    of the trainable weights across ranks during backward."""

    def __init__(self, objective) -> None:
        super().__init__()
        self.objective = objective
        self.trainable = objective.trainable

    def forward(self, batch):
        out = self.objective.loss(batch)
        self.last = out
        return out.loss


def wrap(objective, ctx: Dist) -> nn.Module | None:
    """A DDP-wrapped LossModule when running distributed, else None (the plain objective is used)."""
    if not ctx.enabled:
        return None
    module = LossModule(objective)
    ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)
