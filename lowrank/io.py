"""File helpers shared by adapters, encoder checkpoints and training: atomic writes and key checks."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

MAX_KEYS_SHOWN = 8  # per category in an error message: enough to recognise the architecture


def atomic_write(target: Path, write: Callable[[Path], object]) -> None:
    """Run ``write(tmp)`` on a temporary file beside ``target``, then rename it over ``target``.

    A crash mid-write leaves the previous file (or none), never a truncated one.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def state_dict_problems(
    expected: Mapping[str, torch.Tensor],
    found: Mapping[str, torch.Tensor],
    may_be_missing: Callable[[str], bool] = lambda key: False,
) -> list[str]:
    """Missing, unexpected and mis-shaped keys of ``found`` against ``expected``, one line per kind."""
    missing = sorted(key for key in expected.keys() - found.keys() if not may_be_missing(key))
    unexpected = sorted(found.keys() - expected.keys())
    mismatched = [
        f"{key} (checkpoint {tuple(found[key].shape)}, model {tuple(expected[key].shape)})"
        for key in sorted(expected.keys() & found.keys())
        if found[key].shape != expected[key].shape
    ]
    return [
        _describe_keys(label, keys)
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
        if keys
    ]


def _describe_keys(label: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_KEYS_SHOWN])
    more = f", … (+{len(keys) - MAX_KEYS_SHOWN} more)" if len(keys) > MAX_KEYS_SHOWN else ""
    return f"{len(keys)} {label}: {shown}{more}"
