"""Data parallelism under torchrun: the device and process group as a context manager, reductions over
the processes, and the gather of sharded evaluation. Outside torchrun every helper is the identity."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from lowrank_util.errors import ConfigError


def world() -> tuple[int, int]:
    """(rank, number of processes): (0, 1) outside torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_main() -> bool:
    """The process that writes files and prints (rank 0)."""
    return world()[0] == 0


def resolve_device(name: str) -> torch.device:
    """--device: "auto" picks CUDA when available; ConfigError for a device this machine does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"--device {name!r} is not a device name (cpu, cuda, cuda:N or auto): {error}") from None
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise ConfigError(
            f"--device {name}: no such CUDA device here ({torch.cuda.device_count()} visible); use --device cpu"
        )
    return device


@contextmanager
def process_group(device: torch.device, batch_size: int) -> Iterator[torch.device]:
    """Yield this process's device. Under torchrun (WORLD_SIZE > 1) also join the process group (NCCL with
    one GPU per process, cuda:LOCAL_RANK; gloo on the CPU), silence stdout on ranks other than 0, and on
    the way out meet at a barrier before the group is destroyed (no process tears it down while another
    still uses it)."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes == 1:
        yield device
        return
    if batch_size % processes:
        raise ConfigError(f"--batch-size {batch_size} (global) must be a multiple of the {processes} processes")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")  # waits for every process
    if not is_main():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    try:
        yield device
        dist.barrier()
    finally:
        dist.destroy_process_group()


def sum_over_processes(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over the processes, in place (themselves in a single process)."""
    if dist.is_initialized():
        dist.all_reduce(values)
    return values


def mean_over_processes(values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` over the processes (a new tensor; ``values`` in a single process)."""
    return sum_over_processes(values.clone()) / world()[1]


def average_gradients(params: list[nn.Parameter]) -> None:
    """Each gradient ← its mean over the processes (one all-reduce of one flat buffer). A gradient that
    is None (parameter unused in this process's batch) counts as zero."""
    processes = world()[1]
    if processes == 1:
        return
    flat = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in params])
    sum_over_processes(flat.div_(processes))
    for p, piece in zip(params, flat.split([p.numel() for p in params]), strict=True):
        p.grad = piece.view_as(p)


def gather_shards(local: torch.Tensor, total: int) -> torch.Tensor:
    """(total, ...) on every process from each process r's rows r, r + P, … (``local``, on its device)."""
    processes = world()[1]
    if processes == 1:
        return local
    padded = local.new_zeros(math.ceil(total / processes), *local.shape[1:])
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(processes)]
    dist.all_gather(parts, padded)
    gathered = local.new_empty(total, *local.shape[1:])
    for r, part in enumerate(parts):
        gathered[r::processes] = part[: len(range(r, total, processes))]
    return gathered
