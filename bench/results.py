"""Where results go and what they record: ``bench/results/<device>-<date>-<suite>.csv``.

Every row carries its provenance (device name, torch and triton versions, git commit,
UTC time of the run), so rows from several runs and machines can share a folder.
"""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

from lowrank_util.errors import ConfigError

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: torch.device) -> str:
    """E.g. 'NVIDIA H200' or 'CPU x86_64 x2 threads'."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def git_commit() -> str:
    """Short hash of HEAD, with '+dirty' when tracked files differ from it; 'unknown' outside git.

    ``BENCH_COMMIT`` overrides it, for copies of the tree that travel without ``.git``.
    """
    if "BENCH_COMMIT" in os.environ:
        return os.environ["BENCH_COMMIT"]
    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True)
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=repo, capture_output=True)
    except OSError:
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.returncode == 1 else "")


def provenance(device: torch.device) -> dict[str, str]:
    """The columns every row starts with."""
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = "none"
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": git_commit(),
        "time_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def results_path(folder: Path, device: torch.device, suite: str) -> Path:
    """``folder/<device slug>-<UTC date>-<suite>.csv``, e.g. results/nvidia-h200-2026-11-26-kernels.csv."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    return folder / f"{slug}-{date}-{suite}.csv"


def append_rows(path: Path, rows: list[dict]) -> Path:
    """Append rows to a CSV, writing the header when the file is new; a file with other columns is an error."""
    if not rows:
        raise ConfigError(f"no rows to write to {path}")
    fields = list(rows[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size:
        with path.open(newline="") as handle:
            existing = next(csv.reader(handle), [])
        if existing != fields:
            raise ConfigError(f"{path} has columns {existing}, these rows have {fields}: write to another --out")
        mode = "a"
    else:
        mode = "w"
    with path.open(mode, newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        if mode == "w":
            writer.writeheader()
        writer.writerows(rows)
    return path
