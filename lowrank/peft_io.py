"""export_peft / import_peft: LoRA adapters in Hugging Face peft's file format, written and read without peft.

An adapter directory as peft (0.21) writes it:
    adapter_config.json         LoraConfig fields: peft_type "LORA", r, lora_alpha, lora_dropout, use_rslora,
                                bias, target_modules, base_model_name_or_path, ...
    adapter_model.safetensors   base_model.model.<HF module path>.lora_A.weight   A [r, K]
                                base_model.model.<HF module path>.lora_B.weight   B [N, r]

peft computes Y = X Wᵀ + b + s · (Xd Aᵀ) Bᵀ with s = lora_alpha / r (use_rslora: lora_alpha / √r), which is
our algebra: the tensors cross unchanged; only module names and fused projections need work.

Names. peft keys are module paths of the ``transformers`` model. lowrank does not know the encoders (models/
imports lowrank, never the reverse), so it asks the model, duck-typed: ``model.hf_module_paths()`` →
{naming: {our module path: HF module path(s)}}, preferred naming first (``models.TransformerEncoder`` has it).
A model without that method is taken to be a ``transformers`` model itself, its own names used as they are.

Row blocks. One of our modules maps to n HF modules when it stacks their weights by rows: attn.qkv [3D, K] =
[W_q; W_k; W_v]. A LoRAQKVLinear on it holds lora_a [m·r, K] = [A_p₁; …; A_pₘ] and lora_b [m·D, r] =
[B_p₁; …; B_pₘ] for its m adapted projections p; (A_p, B_p) is the adapter of HF module p. A LoRALinear on
such a module (a regex target) has one A and B [n·D, r]; row block j is the adapter (A, B_j), the same update
because the rows of Y = X Wᵀ + s (X Aᵀ) Bᵀ read only their own rows of W and B.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from kernels.lora_qkv import PROJECTIONS
from lowrank.adapter_io import CONFIG_FILE, WEIGHTS_FILE, load_adapter
from lowrank.config import LoRAConfig
from lowrank.inject import TARGET_PATTERNS, provisional_lora
from lowrank.layer import LoRALayer
from lowrank.qkv import LoRAQKVLinear
from lowrank.state import lora_layers
from lowrank_util.errors import MismatchError
from lowrank_util.files import MAX_KEYS_SHOWN, read_json, read_safetensors, staged, state_dict_problems

ModulePaths = dict[str, tuple[str, ...]]  # our module path → HF module path per row block

PEFT_PREFIX = "base_model.model."  # PeftModel.base_model (LoraModel).model (the transformers model)
PEFT_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<matrix>[AB])\.weight")
OWN_NAMING = "own"  # the naming of a model without hf_module_paths: its own module paths
# peft options that change what an adapter computes and that lowrank's layers cannot express (rejected if set).
UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA, weight-decomposed LoRA",
    "lora_bias": "a bias on lora_B",
    "fan_in_fan_out": "transposed (Conv1D) base weights",
    "modules_to_save": "fully trained module copies",
    "target_parameters": "LoRA on bare parameters",
    "trainable_token_indices": "trainable token embeddings",
    "layer_replication": "replicated layers",
    "use_qalora": "QALoRA input pooling",
    "alora_invocation_tokens": "activated LoRA",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
}
# init_lora_weights whose adapters hold only relative to base weights that peft changed at init (prefixes).
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def hf_module_paths(model: nn.Module) -> dict[str, ModulePaths]:
    """{naming: {our module path: HF module path(s)}}, from ``model.hf_module_paths()`` or else the identity."""
    paths = getattr(model, "hf_module_paths", None)
    if paths is None:
        return {OWN_NAMING: {name: (name,) for name, _ in model.named_modules() if name}}
    return paths()


def _row_blocks(name: str, layer: LoRALayer, blocks: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(row block j, A [r, K], B [N / blocks, r]) for each adapted row block of ``layer``; views, not copies."""
    lora_a, lora_b = layer.lora_a.detach(), layer.lora_b.detach()
    if not isinstance(layer, LoRAQKVLinear):
        for block, block_b in enumerate(lora_b.chunk(blocks)):
            yield block, lora_a, block_b
        return
    if blocks != len(PROJECTIONS):
        raise ValueError(f"{name} adapts fused q/k/v projections but has {blocks} Hugging Face module(s), not 3")
    adapted = len(layer.projections)
    for projection, block_a, block_b in zip(
        layer.projections, lora_a.chunk(adapted), lora_b.chunk(adapted), strict=True
    ):
        yield PROJECTIONS.index(projection), block_a, block_b


def peft_tensors(model: nn.Module, naming: str | None = None) -> dict[str, torch.Tensor]:
    """peft key → view of the A [r, K] or B [D, r] it names, for every LoRA layer of ``model``.

    ``naming`` picks one of ``model.hf_module_paths()`` (default: the first). Export copies these views;
    import writes into them.
    """
    namings = hf_module_paths(model)
    naming = naming or next(iter(namings))
    if naming not in namings:
        raise ValueError(f"unknown module naming {naming!r}; {type(model).__name__} knows {sorted(namings)}")
    paths = namings[naming]
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, LoRALayer):
            continue
        if name not in paths:
            raise ValueError(f"LoRA layer {name} has no counterpart in the transformers model ({naming} names)")
        for block, lora_a, lora_b in _row_blocks(name, layer, len(paths[name])):
            module = f"{PEFT_PREFIX}{paths[name][block]}"
            tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"] = lora_a, lora_b
    return tensors


def peft_config_document(
    config: LoRAConfig, target_modules: list[str], base_model_name_or_path: str | None
) -> dict[str, Any]:
    """adapter_config.json for ``config``: what peft's LoraConfig.from_pretrained reads, peft's defaults elsewhere."""
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.rslora,
        "bias": config.bias,
        "target_modules": target_modules,  # full module paths: a suffix such as "output.dense" could match two
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "lora_bias": False,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def export_peft(
    model: nn.Module,
    path: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    naming: str | None = None,
) -> None:
    """Write the adapter of a model that ``add_lora`` adapted as a peft LoRA adapter into directory ``path``.

    ``peft.PeftModel.from_pretrained(<transformers model with the same base weights>, path)`` then computes
    what ``model`` computes. ``naming``: one of ``model.hf_module_paths()``, e.g. "legacy" for transformers 4
    ViT/AST module paths (default: the first, transformers 5's). Each file is written atomically.
    """
    config = getattr(model, "lora_config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no lora_config: export_peft needs the model add_lora adapted")
    if config.bias != "none":
        raise ValueError(
            f"bias={config.bias!r} trains base biases, which a peft LoRA adapter does not carry; train with "
            "bias='none', or write a merged checkpoint (python -m models.convert merge)"
        )
    tensors = {key: tensor.clone() for key, tensor in peft_tensors(model, naming).items()}  # unshared for safetensors
    target_modules = sorted({PEFT_KEY.fullmatch(key)["module"] for key in tensors})
    document = peft_config_document(config, target_modules, base_model_name_or_path)
    directory = Path(path)
    with staged(directory / WEIGHTS_FILE) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    with staged(directory / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def is_peft_adapter(path: Path) -> bool:
    """True if ``path``'s adapter config is peft's (it has a peft_type); lowrank's has a format field."""
    try:
        return "peft_type" in read_json(path / CONFIG_FILE)
    except (OSError, ValueError, TypeError):
        return False  # missing or corrupt: load_adapter names the problem


def load_any_adapter(model: nn.Module, path: Path) -> nn.Module:
    """Load the adapter at ``path`` into ``model``: import_peft for a peft adapter, else load_adapter."""
    return (import_peft if is_peft_adapter(path) else load_adapter)(model, path)


def read_peft_config(path: str | os.PathLike) -> dict[str, Any]:
    """LoRAConfig fields but targets (rank, alpha, dropout, rslora) of a peft adapter directory.

    Raises a ValueError naming the option for anything lowrank cannot represent: another peft_type than LORA,
    DoRA and the other UNSUPPORTED_OPTIONS, trained biases, base-changing inits, per-module ranks or alphas.
    """
    file = Path(path) / CONFIG_FILE
    document = read_json(file, f"; is {path} a peft adapter directory?")
    if not isinstance(document, dict) or "peft_type" not in document:
        raise MismatchError(
            f"{file} is not a peft adapter config (no peft_type); lowrank's own adapters use load_adapter"
        )
    if document["peft_type"] != "LORA":
        raise MismatchError(f"{file}: peft_type {document['peft_type']!r} is not supported; only LORA adapters import")
    used = [f"{option} ({meaning})" for option, meaning in UNSUPPORTED_OPTIONS.items() if document.get(option)]
    if used:
        raise MismatchError(f"{file} uses peft options that lowrank cannot represent: {', '.join(used)}")
    init = document.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise MismatchError(
            f"{file}: init_lora_weights={init!r} changed the base weights; convert the adapter with peft "
            "(save_pretrained(path_initial_model_for_weight_conversion=...)) first"
        )
    if document.get("bias", "none") != "none":
        raise MismatchError(f"{file}: bias={document['bias']!r} (trained base biases) is not supported; only 'none'")
    rank, alpha = document.get("r", 8), document.get("lora_alpha", 8)  # peft's defaults
    for option, value in (("rank_pattern", rank), ("alpha_pattern", alpha)):
        differing = {module: v for module, v in (document.get(option) or {}).items() if v != value}
        if differing:
            raise MismatchError(
                f"{file}: {option} {differing} differs from the global value {value}; lowrank gives every adapter "
                "one rank and one alpha"
            )
    return {
        "rank": rank,
        "alpha": alpha,
        "dropout": document.get("lora_dropout", 0.0),
        "rslora": bool(document.get("use_rslora", False)),
    }


def _resolve_modules(model: nn.Module, hf_modules: set[str]) -> tuple[str, dict[str, tuple[str, int]]]:
    """(naming, {HF module: (our module, row block)}) of the first naming that knows every module in
    ``hf_modules``; a ValueError lists the unknown ones (under the closest naming) and non-Linear ones."""
    unknown_by_naming: dict[str, list[str]] = {}
    for naming, paths in hf_module_paths(model).items():
        ours = {theirs: (mine, block) for mine, blocks in paths.items() for block, theirs in enumerate(blocks)}
        unknown_by_naming[naming] = sorted(hf_modules - ours.keys())
        if not unknown_by_naming[naming]:
            break
    else:
        naming, unknown = min(unknown_by_naming.items(), key=lambda item: len(item[1]))
        raise MismatchError(
            f"the adapter has LoRA weights for {len(unknown)} module(s) that {type(model).__name__} has no "
            f"equivalent for: {', '.join(unknown[:MAX_KEYS_SHOWN])} (compared with its {naming!r} HF module paths)"
        )
    resolved = {theirs: ours[theirs] for theirs in hf_modules}
    not_linear = sorted(
        f"{theirs} ({type(model.get_submodule(mine)).__name__})"
        for theirs, (mine, _) in resolved.items()
        if not isinstance(model.get_submodule(mine), nn.Linear | LoRALayer)
    )
    if not_linear:
        raise ValueError(f"lowrank adapts nn.Linear layers only; the adapter targets {', '.join(not_linear)}")
    return naming, resolved


def _differing_aliases(own: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> list[str]:
    """peft keys whose model tensors are one and the same view but whose tensors in the file differ."""
    aliases: dict[tuple, list[str]] = {}
    for key, target in own.items():
        aliases.setdefault((target.data_ptr(), tuple(target.shape), target.stride()), []).append(key)
    return [key for keys in aliases.values() for key in keys[1:] if not torch.equal(tensors[key], tensors[keys[0]])]


def _targets(adapted: dict[str, set[int]], paths: ModulePaths) -> tuple[str, ...]:
    """add_lora targets that adapt exactly ``adapted`` (our module → its adapted row blocks): q, k, v, o, mlp
    where they cover every module they match, the escaped names of the other modules."""
    fused = {name for name, blocks in paths.items() if len(blocks) == len(PROJECTIONS)}
    targets = []
    for index, projection in enumerate(PROJECTIONS):
        holders = {name for name in fused if index in adapted.get(name, ())}
        if holders and holders != fused:
            raise MismatchError(
                f"the adapter adapts {projection} in {len(holders)} of {len(fused)} layers; lowrank's fused q/k/v "
                "adapters take a projection in every layer or in none"
            )
        if holders:
            targets.append(projection)
    single = {name for name in adapted if name not in fused}
    for short in ("o", "mlp"):
        covered = {name for name in paths.keys() - fused if re.fullmatch(TARGET_PATTERNS[short], name)}
        if covered and covered <= single:
            targets.append(short)
            single -= covered
    return (*targets, *(re.escape(name) for name in sorted(single)))


@torch.no_grad()
def import_peft(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a peft LoRA adapter trained on the matching ``transformers`` model into ``model``; returns it.

    A model without LoRA gets it first, with the adapter's rank, alpha, dropout and rsLoRA and the add_lora
    targets that adapt exactly its modules (fused q/k/v as one LoRAQKVLinear); a model with LoRA must have the
    same rank, scale and adapted modules. Module paths of any naming the model knows are accepted, e.g.
    transformers 4 (legacy) ViT adapters. Errors name the peft key with the expected and found shapes, or the
    option or module that lowrank cannot represent; on any error the model is left as it was.
    """
    settings = read_peft_config(path)
    file = Path(path) / WEIGHTS_FILE
    tensors = read_safetensors(file, "adapter weights")
    not_lora = {key: tensor for key, tensor in tensors.items() if not PEFT_KEY.fullmatch(key)}
    if not_lora or not tensors:
        found = "; ".join(state_dict_problems({}, not_lora)) or "no tensors"
        raise MismatchError(f"{file} is not a plain LoRA adapter (base_model.model.<module>.lora_A/B.weight): {found}")
    naming, resolved = _resolve_modules(model, {PEFT_KEY.fullmatch(key)["module"] for key in tensors})
    adapted: dict[str, set[int]] = {}
    for mine, block in resolved.values():
        adapted.setdefault(mine, set()).add(block)
    config = LoRAConfig(targets=_targets(adapted, hf_module_paths(model)[naming]), **settings)
    if lora_layers(model):
        existing = model.lora_config
        if (existing.rank, existing.scale) != (config.rank, config.scale):
            raise MismatchError(
                f"the model's adapters have rank {existing.rank}, scale {existing.scale:g}; {path} has rank "
                f"{config.rank}, scale {config.scale:g}"
            )
        if any(layer.merged for layer in lora_layers(model)):
            raise RuntimeError("cannot load an adapter into merged layers; call unmerge_lora(model) first")
    with provisional_lora(model, config):
        own = peft_tensors(model, naming)
        problems = state_dict_problems(own, tensors)
        if problems:
            raise MismatchError(f"{file} does not fit {type(model).__name__}: " + "; ".join(problems))
        unequal = _differing_aliases(own, tensors)
        if unequal:  # a LoRALinear spanning several HF modules shares one A between them
            raise MismatchError(
                f"{file}: these modules share one lora_A in the model but differ in the file: {unequal}"
            )
        for key, target in own.items():
            target.copy_(tensors[key])
    return model
