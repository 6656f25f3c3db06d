"""Which parameters are the adapter's: trainability, parameter lists, state dicts, merging.

One predicate decides (``adapter_parameter_names``): every ``lora_*`` parameter, plus
the biases that the bias policy makes trainable ("none", "lora_only": biases of adapted
layers, "all": every bias). Training, ``lora_parameters`` and the adapter-only save all
use it, so what is trained is exactly what is saved.
"""

from __future__ import annotations

import torch
from torch import nn

from lowrank.config import BIAS_POLICIES
from lowrank.layer import LoRALayer


def is_lora_name(name: str) -> bool:
    """True for parameter names whose last component starts with ``lora_``."""
    return name.rsplit(".", 1)[-1].startswith("lora_")


def _bias_policy(model: nn.Module, bias: str | None) -> str:
    config = getattr(model, "lora_config", None)
    policy = bias if bias is not None else (config.bias if config is not None else "none")
    if policy not in BIAS_POLICIES:
        raise ValueError(f"unknown bias policy {policy!r}; expected one of {BIAS_POLICIES}")
    return policy


def adapter_parameter_names(model: nn.Module, bias: str | None = None) -> set[str]:
    """Names of the adapter's parameters: lora_* and the biases of the policy (default: the model's)."""
    policy = _bias_policy(model, bias)
    names = {name for name, _ in model.named_parameters() if is_lora_name(name)}
    if policy == "all":
        names |= {name for name, _ in model.named_parameters() if name.rsplit(".", 1)[-1] == "bias"}
    elif policy == "lora_only":
        prefixes = (
            f"{name}." if name else "" for name, module in model.named_modules() if isinstance(module, LoRALayer)
        )
        names |= {f"{prefix}bias" for prefix in prefixes} & {name for name, _ in model.named_parameters()}
    return names


def mark_only_lora_as_trainable(model: nn.Module, bias: str | None = None) -> None:
    """requires_grad = True exactly for the adapter's parameters, False for everything else."""
    trainable = adapter_parameter_names(model, bias)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in trainable)


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter's parameters, in ``named_parameters`` order (what the optimizer gets)."""
    names = adapter_parameter_names(model)
    return [parameter for name, parameter in model.named_parameters() if name in names]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors by parameter name (detached, not copied)."""
    names = adapter_parameter_names(model)
    return {name: parameter.detach() for name, parameter in model.named_parameters() if name in names}


def lora_layers(model: nn.Module) -> list[LoRALayer]:
    return [module for module in model.modules() if isinstance(module, LoRALayer)]


def merge_lora(model: nn.Module) -> int:
    """Merge every adapter into its base weight (idempotent); returns the number of layers."""
    layers = lora_layers(model)
    for layer in layers:
        layer.merge()
    return len(layers)


def unmerge_lora(model: nn.Module) -> int:
    """Restore every base weight bit for bit (idempotent); returns the number of layers."""
    layers = lora_layers(model)
    for layer in layers:
        layer.unmerge()
    return len(layers)
