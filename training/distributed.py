"""torchrun / DDP plumbing: one process per device, gloo on CPU, NCCL on CUDA."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> DistInfo:
    """Join the process group torchrun describes in the environment; a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    if device_kind == "cuda":
        torch.cuda.set_device(info.local_rank)
    return info


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


@torch.no_grad()
def average_buffers(module: torch.nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over processes and take the
    others (batch counters) from process 0. Without SyncBatchNorm (gloo on CPU) each process
    accumulates its own; made one set, what is validated, what is saved and what every process
    continues from agree."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    for buf in module.buffers():
        if buf.dtype.is_floating_point:
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(world)
        else:
            dist.broadcast(buf, src=0)


def process_seed(seed: int, rank: int) -> int:
    """Seed of process ``rank``'s random stream after the networks are built: independent per process
    (its own image scale, feature scale and dropout masks), a pure function of (seed, rank) for resume."""
    return int(np.random.SeedSequence([seed, 0x5EED, rank]).generate_state(1)[0])


def all_gather_objects(obj) -> list:
    if dist.is_available() and dist.is_initialized():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
