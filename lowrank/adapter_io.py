"""save_adapter / load_adapter: the adapter alone, as safetensors + a JSON LoRAConfig.

Layout of an adapter directory:
    adapter_config.json         {"format": "lowrank-adapter", "version": 1, "config": LoRAConfig fields}
    adapter_model.safetensors   lora_state_dict(model), keyed by parameter name

Both files are written atomically (temporary file, then rename), so an interrupted
save never leaves a half-written adapter behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lowrank.config import LoRAConfig
from lowrank.inject import add_lora
from lowrank.state import lora_layers, lora_state_dict

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT = "lowrank-adapter"


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the adapter of a model that ``add_lora`` adapted into the directory ``path``."""
    config = getattr(model, "lora_config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no lora_config: save_adapter needs the model add_lora adapted")
    directory = Path(path)
    tensors = {name: tensor.contiguous() for name, tensor in lora_state_dict(model).items()}
    document = json.dumps({"format": FORMAT, "version": 1, "config": config.to_dict()}, indent=2)
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp))
    atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(document, encoding="utf-8"))


def read_adapter_config(path: str | os.PathLike) -> LoRAConfig:
    """The LoRAConfig stored in an adapter directory; clear errors for a missing or corrupt file."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no adapter config at {file}; is {path} an adapter saved by save_adapter?")
    try:
        document = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"corrupt adapter config {file}: {error}") from error
    if not isinstance(document, dict) or document.get("format") != FORMAT or "config" not in document:
        raise ValueError(f"{file} is not a lowrank adapter config (expected format {FORMAT!r})")
    return LoRAConfig.from_dict(document["config"])


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise FileNotFoundError(f"no adapter weights at {file}")
    try:
        return load_file(file)
    except Exception as error:  # safetensors raises several types for corrupt/truncated files
        raise ValueError(f"corrupt or truncated adapter weights {file}: {error}") from error


def check_state_dict(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source: str) -> None:
    """Raise a ValueError listing missing keys, unexpected keys and shape mismatches by name."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = [
        f"{name}: expected {tuple(expected[name].shape)}, found {tuple(found[name].shape)}"
        for name in sorted(set(expected) & set(found))
        if expected[name].shape != found[name].shape
    ]
    problems = [
        f"{label}: {', '.join(items)}" for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                                 ("shape mismatches", mismatched)) if items
    ]  # fmt: skip
    if problems:
        raise ValueError(f"{source} does not fit the model; " + "; ".join(problems))


@torch.no_grad()
def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an adapter into ``model``; adds LoRA with the saved config first if the model has none."""
    config = read_adapter_config(path)
    if not lora_layers(model):
        add_lora(model, config)
    elif getattr(model, "lora_config", None) != config:
        raise ValueError(
            f"the model's adapters were built with {getattr(model, 'lora_config', None)} but {path} holds {config}"
        )
    if any(layer.merged for layer in lora_layers(model)):
        raise RuntimeError("cannot load an adapter into merged layers; call unmerge_lora(model) first")
    file = Path(path) / WEIGHTS_FILE
    tensors = _read_tensors(file)
    own = lora_state_dict(model)
    check_state_dict(own, tensors, str(file))
    for name, tensor in tensors.items():
        own[name].copy_(tensor)
    return model
