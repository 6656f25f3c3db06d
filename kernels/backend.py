"""Which implementation runs an op: the Triton kernels or the PyTorch path.

Rule (docs/design.md §4): CUDA tensors → Triton; CPU tensors → Triton when
``TRITON_INTERPRET=1`` is set (the interpreter), else torch. ``use_backend``
overrides the rule for a block of code, so that one process (one pytest run)
can exercise both implementations on the same inputs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Literal

import torch

Backend = Literal["triton", "torch"]
BACKENDS: tuple[Backend, ...] = ("triton", "torch")

_forced: ContextVar[Backend | None] = ContextVar("lowrank_backend", default=None)


def interpreting() -> bool:
    """True when Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@contextlib.contextmanager
def use_backend(backend: Backend | None) -> Iterator[None]:
    """Force ``backend`` for every op called inside the block (``None``: the default rule)."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    token = _forced.set(backend)
    try:
        yield
    finally:
        _forced.reset(token)


def select_backend(device: torch.device) -> Backend:
    """The backend for tensors on ``device``; raises if Triton is forced where it cannot run."""
    forced = _forced.get()
    triton_runs_here = device.type == "cuda" or (device.type == "cpu" and interpreting())
    if forced == "triton" and not triton_runs_here:
        raise RuntimeError(
            f"backend 'triton' was forced but cannot run on {device.type} tensors; "
            "use CUDA tensors or set TRITON_INTERPRET=1 before triton is imported"
        )
    if forced is not None:
        return forced
    return "triton" if triton_runs_here else "torch"
