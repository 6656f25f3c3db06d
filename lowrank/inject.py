"""add_lora: wrap a model's Linear layers in LoRA adapters, chosen by name.

Targets are short names resolved through TARGET_PATTERNS (fit for the encoders in
``models/``: fused ``attn.qkv``, ``attn.proj``, ``mlp.fc1/fc2``), ``"all"``, or any
regular expression, matched in full against ``model.named_modules()`` names:

    LoRAConfig(targets=("q", "v"))                       # q and v thirds of every fused qkv
    LoRAConfig(targets=("all",))                         # q, k, v, o and the MLP
    LoRAConfig(targets=(r".*attention\\.self\\.(query|value)",))   # e.g. Hugging Face BERT

q, k and v on a fused qkv Linear make one LoRAQKVLinear adapting just those thirds;
any other match becomes a LoRALinear. The model's code is never changed: modules are
swapped in place, keeping their weight objects.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
from torch import nn

from lowrank.config import LoRAConfig
from lowrank.layer import LoRALayer
from lowrank.linear import LoRALinear
from lowrank.qkv import LoRAQKVLinear
from lowrank.state import lora_layers, mark_only_lora_as_trainable, merge_lora

QKV_TARGETS = ("q", "k", "v")
# target name → regex over module names (full match). Edit a copy, or pass regexes as targets.
TARGET_PATTERNS: dict[str, str] = {
    "q": r"(.*\.)?qkv",
    "k": r"(.*\.)?qkv",
    "v": r"(.*\.)?qkv",
    "o": r"(.*\.)?attn\.proj",
    "mlp": r"(.*\.)?mlp\.fc[12]",
}
ALL_TARGETS = ("q", "k", "v", "o", "mlp")


def _expand(targets: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(t for target in targets for t in (ALL_TARGETS if target == "all" else (target,))))


def _match_targets(model: nn.Module, targets: tuple[str, ...]) -> dict[str, set[str]]:
    """Linear-module name → the targets that matched it; raises if a target matches nothing."""
    linear_names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    matches: dict[str, set[str]] = {}
    for target in targets:
        pattern = re.compile(TARGET_PATTERNS.get(target, target))
        hits = [name for name in linear_names if pattern.fullmatch(name)]
        if not hits:
            shown = ", ".join(linear_names[:8]) + (", …" if len(linear_names) > 8 else "")
            raise ValueError(
                f"LoRA target {target!r} (pattern {pattern.pattern!r}) matches no nn.Linear in "
                f"{type(model).__name__}; its Linear layers are: {shown or 'none'}"
            )
        for name in hits:
            matches.setdefault(name, set()).add(target)
    return matches


def _adapter_for(name: str, linear: nn.Linear, targets: set[str], config: LoRAConfig) -> LoRALayer:
    projections = targets & set(QKV_TARGETS)
    if projections and targets - projections:
        raise ValueError(f"{name} matched both q/k/v targets and {sorted(targets - projections)}; make them disjoint")
    if projections:
        return LoRAQKVLinear(linear, config.rank, config.scale, sorted(projections), config.dropout)
    return LoRALinear(linear, config.rank, config.scale, config.dropout)


def add_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Wrap every targeted Linear of ``model`` in place, freeze all but the adapters (and the
    biases ``config.bias`` names), record ``model.lora_config``; returns ``model``."""
    if any(isinstance(module, LoRALayer) for module in model.modules()):
        raise ValueError(f"{type(model).__name__} already has LoRA adapters; adding a second set is not supported")
    for name, targets in _match_targets(model, _expand(config.targets)).items():
        if not name:
            raise ValueError("add_lora adapts Linear layers inside a model; wrap a bare nn.Linear in LoRALinear")
        model.set_submodule(name, _adapter_for(name, model.get_submodule(name), targets, config))
    model.lora_config = config
    mark_only_lora_as_trainable(model, config.bias)
    return model


def remove_lora(model: nn.Module) -> nn.Module:
    """Undo add_lora: each LoRA layer (unmerged first) becomes an nn.Linear holding its original weight and
    bias objects, and ``model.lora_config`` goes; trainability flags are left as they are. Returns ``model``."""
    for name, layer in [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALayer)]:
        layer.unmerge()
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        linear.weight, linear.bias = layer.weight, layer.bias
        model.set_submodule(name, linear)
    vars(model).pop("lora_config", None)
    return model


def fold_lora(model: nn.Module) -> nn.Module:
    """Make the adapters part of the weights for good (peft's merge_and_unload): every adapted W becomes
    W + s·B A (computed in fp32 by merge, cast once), and the LoRA layers plain nn.Linear again, so the model
    has no adapter left and its state dict is the base layout. Returns ``model``."""
    merge_lora(model)
    merged = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, LoRALayer)}
    remove_lora(model)  # unmerges: the original weight objects are back in plain nn.Linear layers
    with torch.no_grad():
        for name, weight in merged.items():
            model.get_submodule(name).weight.copy_(weight)
    return model


@contextlib.contextmanager
def provisional_lora(model: nn.Module, config: LoRAConfig) -> Iterator[None]:
    """add_lora(model, config) unless the model has adapters already; if the block then raises, the
    adapters are removed again and every parameter's requires_grad restored: the model is as it was."""
    if lora_layers(model):
        yield
        return
    trainable = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    add_lora(model, config)
    try:
        yield
    except BaseException:
        remove_lora(model)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(trainable[name])
        raise
