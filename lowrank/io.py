"""File helpers shared by adapters, encoder checkpoints, data sets and training: atomic writes and key checks."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

MAX_KEYS_SHOWN = 8  # per category in an error message: enough to recognise the architecture


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _temp_beside(dest: Path, folder: bool) -> Path:
    """A new empty temporary file or folder in dest's folder (same file system, so os.replace is atomic)."""
    if folder:
        return Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    os.close(fd)
    return Path(name)


@contextmanager
def staged(dest: Path, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary file (or folder) beside ``dest``; when the block succeeds, move it onto ``dest``
    in one step (os.replace), when it fails, delete it. Readers never see a half-written ``dest``; if
    another process published the same folder first, theirs is kept."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(dest, folder)
    tmp.chmod(0o755 if folder else 0o644)  # mkdtemp / mkstemp make them private; the cache is shared
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    try:
        os.replace(tmp, dest)
    except OSError:
        _remove(tmp)
        if not (folder and dest.is_dir()):
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
