"""File helpers shared by adapters, encoder checkpoints, data sets and training: atomic, durable writes,
checked reads (errors name the file: MissingFileError, CorruptFileError), key checks and checked loads."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from lowrank_util.errors import CorruptFileError, MismatchError, MissingFileError

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


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a folder's entries) from the OS cache to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """fsync every file and folder under ``path`` (or the file itself), children before parents."""
    if path.is_dir():
        for root, _, files in os.walk(path, topdown=False):
            for name in files:
                _fsync(Path(root) / name)
            _fsync(Path(root))
    else:
        _fsync(path)


@contextmanager
def staged(dest: Path, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary file (or folder) beside ``dest``; when the block succeeds, fsync it, move it onto
    ``dest`` in one step (os.replace) and fsync the parent folder; when it fails, delete it. Readers
    never see a half-written ``dest``, a crash (even a power cut) leaves either the old or the new
    ``dest``, and if another process published the same folder first, theirs is kept."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(dest, folder)
    tmp.chmod(0o755 if folder else 0o644)  # mkdtemp / mkstemp make them private; the cache is shared
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException:
        _remove(tmp)
        raise
    try:
        os.replace(tmp, dest)
    except OSError:
        _remove(tmp)
        if not (folder and dest.is_dir()):
            raise
    _fsync(dest.parent)


def write_text(path: Path, text: str) -> None:
    """Write ``path`` (UTF-8) atomically: readers see the old text or the new, never a part."""
    with staged(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_text(path: Path) -> str:
    """The UTF-8 text of ``path``; MissingFileError naming it when absent."""
    if not path.is_file():
        raise MissingFileError(f"{path} not found")
    return path.read_text(encoding="utf-8")


def sha256(path: Path) -> str:
    """Hex SHA-256 of the file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _corrupt(path: Path, what: str, error: Exception) -> CorruptFileError:
    size = path.stat().st_size
    return CorruptFileError(
        f"{path} is not a readable {what} ({size:,} bytes; truncated or corrupt?): {type(error).__name__}: {error}"
    )


def read_torch_file(path: Path, what: str = "torch checkpoint") -> Any:
    """torch.load(``path``) onto the CPU; a missing file raises MissingFileError, a truncated or
    corrupt one CorruptFileError naming the file and its size. Unpickles: only for trusted files."""
    if not path.is_file():
        raise MissingFileError(f"{path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # zip, pickle and EOF errors alike: the file is not a whole checkpoint
        raise _corrupt(path, what, error) from error


def read_safetensors(path: Path, what: str = "safetensors file") -> dict[str, torch.Tensor]:
    """safetensors' load_file(``path``) with the same errors as read_torch_file."""
    if not path.is_file():
        raise MissingFileError(f"{path} not found")
    try:
        return load_file(path)
    except Exception as error:  # SafetensorError, or OSError on a header that points past the end
        raise _corrupt(path, what, error) from error


def read_json(path: Path, missing_hint: str = "") -> Any:
    """The parsed JSON document in ``path``; MissingFileError (plus ``missing_hint``) when absent,
    CorruptFileError naming the file when it is not valid UTF-8 JSON."""
    if not path.is_file():
        raise MissingFileError(f"{path} not found{missing_hint}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise _corrupt(path, "JSON file", error) from error


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


def load_checked(
    module: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    source: str | Path,
    *,
    expected: Mapping[str, torch.Tensor] | None = None,
    into: str = "the model",
    error: type[Exception] = MismatchError,
    may_be_missing: Callable[[str], bool] = lambda key: False,
    assign: bool = False,
) -> nn.modules.module._IncompatibleKeys:
    """``module.load_state_dict(tensors, strict=False, assign=assign)`` once ``tensors`` fit ``expected``.

    ``expected`` (default: ``module.state_dict()``) and ``tensors`` map keys to tensors of any shapes. If
    ``tensors`` lacks a key of ``expected`` (one ``may_be_missing`` does not excuse), has a key ``expected``
    lacks or a tensor of another shape, raises ``error(f"{source} does not fit {into}: …")`` naming the
    keys (see ``state_dict_problems``) before anything is loaded. Returns load_state_dict's result.
    """
    problems = state_dict_problems(module.state_dict() if expected is None else expected, tensors, may_be_missing)
    if problems:
        raise error(f"{source} does not fit {into}: " + "; ".join(problems))
    return module.load_state_dict(tensors, strict=False, assign=assign)


def _describe_keys(label: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_KEYS_SHOWN])
    more = f", … (+{len(keys) - MAX_KEYS_SHOWN} more)" if len(keys) > MAX_KEYS_SHOWN else ""
    return f"{len(keys)} {label}: {shown}{more}"
