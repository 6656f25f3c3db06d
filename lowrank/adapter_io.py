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
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lowrank.config import LoRAConfig
from lowrank.inject import provisional_lora
from lowrank.state import lora_layers, lora_state_dict
from lowrank_util.errors import MismatchError
from lowrank_util.files import load_checked, read_json, read_safetensors, staged

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT = "lowrank-adapter"


def save_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the adapter of a model that ``add_lora`` adapted into the directory ``path``."""
    config = getattr(model, "lora_config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no lora_config: save_adapter needs the model add_lora adapted")
    directory = Path(path)
    tensors = {name: tensor.contiguous() for name, tensor in lora_state_dict(model).items()}
    document = json.dumps({"format": FORMAT, "version": 1, "config": config.to_dict()}, indent=2)
    with staged(directory / WEIGHTS_FILE) as tmp:
        save_file(tensors, tmp)
    with staged(directory / CONFIG_FILE) as tmp:
        tmp.write_text(document, encoding="utf-8")


def read_adapter_config(path: str | os.PathLike) -> LoRAConfig:
    """The LoRAConfig stored in an adapter directory; clear errors for a missing or corrupt file."""
    file = Path(path) / CONFIG_FILE
    document = read_json(file, f"; is {path} an adapter saved by save_adapter?")
    if not isinstance(document, dict) or document.get("format") != FORMAT or "config" not in document:
        raise MismatchError(f"{file} is not a lowrank adapter config (expected format {FORMAT!r})")
    return LoRAConfig.from_dict(document["config"])


@torch.no_grad()
def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an adapter into ``model``; adds LoRA with the saved config first if the model has none.

    On any error (corrupt file, missing/unexpected keys, wrong shapes) the model is left as it was."""
    config = read_adapter_config(path)
    if lora_layers(model) and getattr(model, "lora_config", None) != config:
        raise MismatchError(
            f"the model's adapters were built with {getattr(model, 'lora_config', None)} but {path} holds {config}"
        )
    if any(layer.merged for layer in lora_layers(model)):
        raise RuntimeError("cannot load an adapter into merged layers; call unmerge_lora(model) first")
    file = Path(path) / WEIGHTS_FILE
    tensors = read_safetensors(file, "adapter weights")
    with provisional_lora(model, config):
        load_checked(model, tensors, file, expected=lora_state_dict(model))
    return model
