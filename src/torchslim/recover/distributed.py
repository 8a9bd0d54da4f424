"""Running the same recipe under ``torchrun``: process-group set-up, ranks, and reductions.

``torchrun --nnodes=N --nproc_per_node=M -m torchslim compress RECIPE`` sets ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK``; `init_from_env` then joins the process group (nccl when training on CUDA, gloo on CPU). Training
steps wrap the model in DistributedDataParallel and shard each global batch over the ranks; only rank 0 writes
checkpoints and outputs. Without those variables everything runs as a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``world_size`` processes, this one is ``rank`` (``local_rank`` on its node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def current() -> DistInfo:
    """This process's place in the process group (a single process when none is initialised)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()


def init_from_env() -> DistInfo:
    """Join the process group torchrun describes in the environment (no-op for a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return DistInfo()
    if not dist.is_initialized():
        cuda = torch.cuda.is_available() and os.environ.get("TORCHSLIM_DEVICE", "auto") != "cpu"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return current()


def local_world_size() -> int:
    """Processes sharing this machine (torchrun's LOCAL_WORLD_SIZE; 1 for a single process)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if current().active else 1


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if current().active:
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Element-wise sum of ``values`` over every rank (unchanged for a single process)."""
    if not current().active:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()
