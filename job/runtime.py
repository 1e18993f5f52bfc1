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
    image_variant: str | None = None  # "cuda" or "cpu" inside job's image (JOB_IMAGE_VARIANT), None outside it


@dataclass
class Process:
    """This process's place in a torchrun launch (rank 0 of 1 when alone)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def why_no_gpu(torch) -> str:
    """What stands between this process and a CUDA device, for a message a person can act on: no driver in the
    container, a driver older than torch's CUDA, or no device visible. Asks the driver itself (libcuda), since torch
    only says that CUDA is unavailable."""
    import ctypes

    wanted = torch.version.cuda
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return ("no NVIDIA driver in the container (libcuda.so.1 is missing): the pod has no nvidia.com/gpu limit, or "
                "its node has no NVIDIA container runtime")
    version = ctypes.c_int(0)
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) == 0 and wanted:
        have = (version.value // 1000, version.value % 1000 // 10)
        need = tuple(int(part) for part in wanted.split(".")[:2])
        if have < need:
            return (f"the NVIDIA driver supports CUDA {have[0]}.{have[1]} and this image's torch needs CUDA {wanted}: "
                    "the node's driver is too old (docs/image.md names the minimum)")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and not visible.strip():
        return "no GPU visible: CUDA_VISIBLE_DEVICES is empty"
    return f"torch finds no usable CUDA device (driver CUDA {version.value // 1000}.{version.value % 1000 // 10})"


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
