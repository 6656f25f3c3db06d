"""Peak memory of one call of a step: what it allocates on top of what already exists, in MiB.

CUDA: ``torch.cuda.max_memory_allocated`` after a reset, minus the memory allocated
before the call (the caching allocator's own accounting; exact).

CPU (Linux): the growth of the process's peak resident set. Writing ``5`` to
``/proc/self/clear_refs`` resets the peak (VmHWM) to the current resident set (VmRSS);
after the call, VmHWM − VmRSS-before is the most memory the call held at once. For this
to see every allocation, freed blocks must go back to the kernel instead of staying
resident in malloc's free lists: ``use_fixed_mmap_threshold`` makes glibc serve every
block of 64 KiB or more with its own mmap, so reuse of earlier, freed memory cannot
hide an allocation. Pages are counted once touched, so an allocated but never written
buffer does not count (torch writes what it allocates). Elsewhere: NaN.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
from collections.abc import Callable
from pathlib import Path

import torch

# glibc's mallopt parameter M_MMAP_THRESHOLD, and the threshold set: blocks ≥ 64 KiB are mmapped.
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 64 * 1024
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def use_fixed_mmap_threshold() -> bool:
    """Make glibc mmap (and unmap on free) every block ≥ 64 KiB; False where that is not possible."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        return bool(ctypes.CDLL(name).mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise OSError(f"{field} not in {_STATUS}")
    return int(match.group(1))


def peak_memory_mb(step: Callable[[], object], device: torch.device) -> float:
    """MiB allocated at the peak of one ``step()`` beyond what was allocated before it; NaN if unmeasurable."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    try:
        _CLEAR_REFS.write_text("5")
        before = _status_kib("VmRSS")
        step()
        return (_status_kib("VmHWM") - before) / 1024
    except OSError:
        return float("nan")
