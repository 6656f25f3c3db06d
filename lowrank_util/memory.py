"""Peak memory of a block of code beyond what was held at its start, in MiB.

CUDA: ``torch.cuda.max_memory_allocated`` after a reset, minus what was allocated
before (the caching allocator's own accounting; exact).

CPU (Linux): the growth of the process's peak resident set. Writing ``5`` to
``/proc/self/clear_refs`` resets the peak (VmHWM) to the current resident set (VmRSS);
at the end, VmHWM − VmRSS-at-start is the most memory the block held at once. Memory
that malloc keeps after a free would hide a later allocation that reuses it, so first
``malloc_trim`` hands every free page back to the kernel (reusing one faults it in,
and counts). With ``unpooled``, glibc also serves each block of 64 KiB or more with its
own mmap inside the block, so that a free inside the block shrinks the resident set at
once: exact for one short call (bench/), but each large allocation then pays for fresh
pages, so timed code runs outside it. Elsewhere (no glibc, no /proc): NaN.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import ctypes.util
import functools
import math
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
# glibc mallopt parameters, and the values set: blocks ≥ 64 KiB mmapped inside ``unpooled``;
# after it, glibc's own ceilings for its adaptive thresholds (large blocks pooled again).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_UNPOOLED_MMAP_BYTES = 64 * 1024
_POOLED_MMAP_BYTES, _POOLED_TRIM_BYTES = 32 * 2**20, 64 * 2**20


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """libc, once per process (find_library runs ldconfig); None without glibc's mallopt / malloc_trim."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextlib.contextmanager
def unpooled_malloc() -> Iterator[None]:
    """Inside the block, glibc mmaps every block ≥ 64 KiB and unmaps it on free; a no-op without glibc."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, _UNPOOLED_MMAP_BYTES)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, _POOLED_MMAP_BYTES)
            libc.mallopt(_M_TRIM_THRESHOLD, _POOLED_TRIM_BYTES)


def status_mib(field: str) -> float:
    """A memory field of /proc/self/status (kB there), in MiB."""
    match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise OSError(f"{field} not in {_STATUS}")
    return int(match.group(1)) / 1024


class PeakMemory:
    """``with PeakMemory(device) as memory: ...`` sets ``memory.mib``, the block's peak beyond its start (NaN if
    unmeasurable here). ``unpooled``: see the module docstring (CPU only)."""

    def __init__(self, device: torch.device, unpooled: bool = False) -> None:
        self.device, self.unpooled = device, unpooled
        self.before = self.mib = math.nan
        self._malloc = contextlib.ExitStack()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device) / 2**20
            return self
        libc = _glibc()
        if libc is not None:
            libc.malloc_trim(0)
        if self.unpooled:
            self._malloc.enter_context(unpooled_malloc())
        with contextlib.suppress(OSError):
            _CLEAR_REFS.write_text("5")  # VmHWM ← VmRSS
            self.before = status_mib("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20 - self.before
            return
        self._malloc.close()
        if not math.isnan(self.before):
            self.mib = status_mib("VmHWM") - self.before


def peak_memory_mb(step: Callable[[], object], device: torch.device) -> float:
    """MiB held at the peak of one ``step()`` beyond what was held before it; NaN if unmeasurable.

    On the CPU the step runs unpooled on a thread of its own: glibc gives that thread its own
    malloc arena, which therefore never holds blocks that the caller freed into its pool,
    and which every large block of the step leaves again when freed.
    """
    if device.type == "cuda":
        with PeakMemory(device) as memory:
            step()
        return memory.mib
    context = contextvars.copy_context()  # the caller's settings (e.g. kernels.backend.use_backend)

    def measured() -> float:
        with PeakMemory(device, unpooled=True) as memory:
            context.run(step)
        return memory.mib

    return _measuring_thread().submit(measured).result()


@functools.cache
def _measuring_thread() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="peak-memory")
