"""Many finished U2A runs over one set of stage-1 encoders, served at once: a bank of whole U2A models.

A U2A run (train.py) trains LoRA adapters in every encoder, the fusion head, the Mask Tokens and the maps
between encoder widths; its run folder's adapter.safetensors holds them, with the config and the stage-1
encoders' sha256 as metadata. Runs made on the same encoders (seeds, ranks, learning rates of one stage
1) become one MultimodalClassifier whose adapted layers are LoRABanks, whose head and token maps are
LinearBanks and whose Mask Tokens are a TokenBank; ``lowrank.selected_adapters(ids)`` picks each
sample's run (ids 0 … n − 1, in the order given).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from lowrank import LoRAConfig, add_lora, lora_state_dict
from lowrank.bank import LinearBank, TokenBank, bank_adapters
from lowrank_train.config import TrainConfig
from lowrank_util.errors import CorruptFileError, MismatchError
from lowrank_util.files import load_checked, read_safetensors
from models.multimodal import MultimodalClassifier

TRAINED_FILE = "adapter.safetensors"


def read_trained(run: Path) -> tuple[dict[str, torch.Tensor], TrainConfig, dict[str, str]]:
    """(trained tensors, config, the stage-1 encoders' sha256 by modality) of a finished train.py run folder."""
    file = run / TRAINED_FILE
    tensors = read_safetensors(file, "trained tensors")
    with safe_open(file, "pt") as handle:
        metadata = handle.metadata() or {}
    if not {"config", "encoder_sha256"} <= metadata.keys():
        raise CorruptFileError(f"{file} has no config / encoder_sha256 metadata; is it a train.py run's?")
    return tensors, TrainConfig.from_json(metadata["config"], str(file)), json.loads(metadata["encoder_sha256"])


def bank_of_runs(
    model: MultimodalClassifier, runs: Sequence[Path], encoder_sha256: Mapping[str, str]
) -> MultimodalClassifier:
    """``model`` (copies of the stage-1 encoders whose checkpoints have ``encoder_sha256``, no adapters) made to
    serve the U2A ``runs`` at once, in place; run i is adapter i. Refused, naming the run: another method,
    runs trained on other encoders, other LoRA targets."""
    trained = [read_trained(run) for run in runs]
    for run, (_, config, sha256) in zip(runs, trained, strict=True):
        if config.method != "u2a":
            raise MismatchError(f"{run} is a {config.method} run; a bank of runs serves U2A runs (LoRA, head, tokens)")
        if sha256 != dict(encoder_sha256):
            raise MismatchError(f"{run} was trained on other encoders (sha256 {sha256}) than these ({encoder_sha256})")
    for modality, encoder in model.encoders.items():
        loaders = [
            partial(_load_lora, prefix=f"encoders.{modality}.", tensors=tensors, config=config, source=run)
            for run, (tensors, config, _) in zip(runs, trained, strict=True)
        ]
        bank_adapters(encoder, loaders, [str(run) for run in runs])
    model.head = _linear_bank([tensors for tensors, _, _ in trained], "head")
    model.mask_tokens = TokenBank(
        {m: [tensors[f"mask_tokens.{m}"] for tensors, _, _ in trained] for m in model.modalities}
    )
    for maps, prefix in ((model.token_in, "token_in"), (model.token_out, "token_out")):
        for key, layer in maps.items():
            if isinstance(layer, nn.Linear):
                maps[key] = _linear_bank([tensors for tensors, _, _ in trained], f"{prefix}.{key}")
    return model.requires_grad_(False)


def _load_lora(encoder: nn.Module, prefix: str, tensors: Mapping[str, torch.Tensor], config: TrainConfig, source: Path):
    """Add the run's LoRA to the bare ``encoder`` and load its tensors (those under ``prefix``)."""
    add_lora(encoder, LoRAConfig(rank=config.rank, alpha=config.alpha, targets=config.targets))
    own = {key.removeprefix(prefix): tensor for key, tensor in tensors.items() if key.startswith(prefix)}
    load_checked(encoder, own, source / TRAINED_FILE, expected=lora_state_dict(encoder))


def _linear_bank(runs: Sequence[Mapping[str, torch.Tensor]], prefix: str) -> LinearBank:
    """The LinearBank of each run's Linear layer ``prefix`` (its ``prefix.weight`` and, if saved, ``prefix.bias``)."""
    biases = [tensors[f"{prefix}.bias"] for tensors in runs] if f"{prefix}.bias" in runs[0] else None
    return LinearBank([tensors[f"{prefix}.weight"] for tensors in runs], biases)
