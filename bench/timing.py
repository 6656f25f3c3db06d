"""Timing, memory and provenance helpers shared by every benchmark."""

from __future__ import annotations

import csv
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

QUANTILES = (0.2, 0.5, 0.8)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, warmup: int = 5, reps: int = 30
) -> dict[str, tuple[float, float, float]]:
    """name → the 20/50/80 % quantiles of its wall time in ms (device-synchronised).

    Providers run round-robin within each repetition, so drift in clock speed or
    background load hits all of them alike instead of whichever happened to run then.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(warmup + reps):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if rep >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    quantiles = torch.tensor(QUANTILES)
    return {name: tuple(float(t) for t in torch.tensor(values).quantile(quantiles)) for name, values in times.items()}


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak device memory allocated while running ``fn`` once (MiB); NaN on CPU, where torch does not track it."""
    if device.type != "cuda":
        return float("nan")
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - baseline) / 2**20


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append rows to a CSV (header written when the file is new)."""
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)
