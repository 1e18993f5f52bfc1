"""Where this process runs: the machine-local paths, its place under torchrun, the process group, and the
decisions only rank 0 takes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from job.errors import JobError, SpecError


@dataclass
class Paths:
    """Machine-local places, from the environment (job/cli/common.py: paths_from_env), never from the spec."""

    work_dir: Path
    cache_dir: Path
    llama_cpp_dir: Path


@dataclass
class Process:
    """This process's place in a torchrun launch (rank 0 of 1 when alone)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def on_rank_0(process: Process, decide):
    """`decide()` on rank 0 alone, its answer (or its error) given to every rank. The `auto` choices depend on each
    card's free memory: ranks that chose apart would train different configurations, or different numbers of steps
    and then wait on each other forever."""
    if process.world_size == 1:
        return decide()
    import torch.distributed as dist

    box: list = [None]
    failure = None
    if process.is_main:
        try:
            box[0] = {"value": decide()}
        except Exception as exc:  # noqa: BLE001 - re-raised below, once the other ranks know not to wait
            failure, box[0] = exc, {"error": str(exc), "user": isinstance(exc, JobError)}
    dist.broadcast_object_list(box, src=0)
    if failure:
        raise failure
    if "error" in box[0]:
        if box[0]["user"]:
            raise SpecError(box[0]["error"], where="rank 0")
        raise RuntimeError(f"rank 0 failed: {box[0]['error']}")
    return box[0]["value"]


def join_process_group(process: Process, cuda: bool) -> None:
    """Join torchrun's group before loading anything, so each rank loads onto its own card; the Trainer reuses it."""
    import torch
    import torch.distributed as dist

    if process.world_size == 1 or dist.is_initialized():
        return
    if cuda:
        torch.cuda.set_device(process.local_rank)
    else:
        # accelerate names each CPU rank's device "cpu:N", and transformers then loads a resumed optimizer state
        # with map_location="cpu:N", a location torch.load does not know. Plain "cpu" on every rank.
        os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")
    dist.init_process_group(backend="nccl" if cuda else "gloo")
