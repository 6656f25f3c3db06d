"""Which implementation runs an op: the Triton kernels or the PyTorch path.

Rule (docs/design.md §4): CUDA tensors → Triton, unless the dispatch table measured for the
device says the torch path is faster for that problem; CPU tensors → Triton when
``TRITON_INTERPRET=1`` is set (the interpreter), else torch. ``use_backend`` overrides the
rule for a block of code, so that one process (one pytest run) can exercise both
implementations on the same inputs. An op's backward runs the backend its forward ran
(recorded with the op), never a fresh choice.

Dispatch table (written by ``python -m bench tune``): JSON
``{"device": NAME, "entries": [{<the fields of Problem>, "backend": "triton" | "torch", …}, …]}``,
read from ``$LOWRANK_DISPATCH`` or else ``bench/results/dispatch-<device slug>.json`` beside this
package, once per device. A problem it does not list, or a table for another device, gets the
default (Triton). Torch entries with dropout are ignored: the torch path reads the dropout seed
on the host, which a CUDA graph cannot capture.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Literal, NamedTuple

import torch

Backend = Literal["triton", "torch", "reference"]
BACKENDS: tuple[Backend, ...] = ("triton", "torch")  # the two implementations (what tests run both of)
# "reference": kernels/reference.py's unfused algebra X Wᵀ + b + s · (Xd Aᵀ) Bᵀ, only when forced. It is the
# independent side of a merge check: on the CPU the torch path folds W + s · B A exactly as merging does.
FORCEABLE: tuple[Backend, ...] = (*BACKENDS, "reference")
DISPATCH_ENV = "LOWRANK_DISPATCH"

_forced: ContextVar[Backend | None] = ContextVar("lowrank_backend", default=None)


class Problem(NamedTuple):
    """What the dispatch table is keyed on: one LoRA op call."""

    dtype: str  # "bfloat16", "float16", "float32"
    out_features: int  # N
    in_features: int  # K
    rank_columns: int  # n·r: all adapters' ranks together
    m_octave: int  # ⌈log₂ M⌉ for M rows (0 for M ≤ 1)
    dropout: bool


def problem_of(dtype: torch.dtype, rows: int, out_features: int, in_features: int, rank_columns: int, dropout_p: float):
    """The Problem of an op call with ``rows`` = M."""
    octave = max(rows - 1, 0).bit_length()
    return Problem(str(dtype).removeprefix("torch."), out_features, in_features, rank_columns, octave, dropout_p > 0)


def interpreting() -> bool:
    """True when Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@contextlib.contextmanager
def use_backend(backend: Backend | None) -> Iterator[None]:
    """Force ``backend`` for every op called inside the block (``None``: the default rule)."""
    if backend is not None and backend not in FORCEABLE:
        raise ValueError(f"unknown backend {backend!r}; expected one of {FORCEABLE}")
    token = _forced.set(backend)
    try:
        yield
    finally:
        _forced.reset(token)


@torch.compiler.assume_constant_result
def _forced_backend() -> Backend | None:
    """The ``use_backend`` in force; torch.compile reads it once, when compiling (dynamo cannot trace a ContextVar)."""
    return _forced.get()


def device_slug(name: str) -> str:
    """'NVIDIA H200' → 'nvidia-h200' (file names of results and dispatch tables)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def dispatch_path(device_name: str) -> Path:
    """Where the dispatch table for ``device_name`` is read from (see the module docstring)."""
    if os.environ.get(DISPATCH_ENV):
        return Path(os.environ[DISPATCH_ENV])
    return Path(__file__).resolve().parents[1] / "bench" / "results" / f"dispatch-{device_slug(device_name)}.json"


@functools.cache
def dispatch_table(device_name: str, path: Path) -> dict[Problem, Backend]:
    """Problem → measured faster backend, from ``path`` if it exists and is for ``device_name``; else empty."""
    if not path.is_file():
        return {}
    table = json.loads(path.read_text(encoding="utf-8"))
    if table.get("device") != device_name:
        return {}
    return {
        Problem(**{field: e[field] for field in Problem._fields}): e["backend"]
        for e in table["entries"]
        if e["backend"] in BACKENDS and not (e["backend"] == "torch" and e["dropout"])
    }


def measured_backend(device_name: str, problem: Problem) -> Backend:
    """The dispatch table's backend for ``problem`` on the GPU named ``device_name``; Triton if it has none."""
    return dispatch_table(device_name, dispatch_path(device_name)).get(problem, "triton")


@torch.compiler.assume_constant_result
def _cuda_backend(device: torch.device, problem: Problem) -> Backend:
    """measured_backend on ``device``; torch.compile looks it up once, when it compiles."""
    return measured_backend(torch.cuda.get_device_name(device), problem)


def select_backend(device: torch.device, problem: Problem | None = None) -> Backend:
    """The backend for tensors on ``device`` (for ``problem`` on CUDA: the dispatch table's choice, default
    Triton); raises if Triton is forced where it cannot run."""
    forced = _forced_backend()
    triton_runs_here = device.type == "cuda" or (device.type == "cpu" and interpreting())
    if forced == "triton" and not triton_runs_here:
        raise RuntimeError(
            f"backend 'triton' was forced but cannot run on {device.type} tensors; "
            "use CUDA tensors or set TRITON_INTERPRET=1 before triton is imported"
        )
    if forced is not None:
        return forced
    if not triton_runs_here:
        return "torch"
    if device.type == "cuda" and problem is not None:
        return _cuda_backend(device, problem)
    return "triton"
