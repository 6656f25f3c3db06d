"""What a run writes to continue or to be used later: the trainable tensors, the resume point (state.pt:
tensors, optimiser, scheduler, scaler, RNG states, progress, config) and the trained-tensor file
(adapter.safetensors). Every file is written atomically by the main process only."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from lowrank_train.config import TrainConfig
from lowrank_train.distributed import is_main
from lowrank_util.errors import CorruptFileError
from lowrank_util.files import load_checked, read_torch_file, staged

CHECKPOINT_KEYS = ("progress", "trainable", "optimizer", "scheduler", "scaler", "rng", "config")


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that training changes: adapters, head, tokens (frozen encoders left out)."""
    return {name: p.detach().clone().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(path: Path, model: nn.Module, progress: Any, config: TrainConfig, **stateful: Any) -> None:
    """state.pt: trainable tensors, the ``stateful`` objects' state dicts (optimizer, scheduler, scaler),
    RNG states, the ``progress`` dataclass and the config: all a resume needs."""
    if not is_main():
        return
    state = dict(
        progress=dataclasses.asdict(progress),
        trainable=trainable_state(model),
        rng=get_rng_state(),
        config=dataclasses.asdict(config),
        **{name: obj.state_dict() for name, obj in stateful.items()},
    )
    with staged(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, model: nn.Module, **stateful: Any) -> dict[str, Any]:
    """Restore what save_checkpoint wrote and return its progress fields; errors name the file and what
    does not fit."""
    state = read_torch_file(path, "train.py checkpoint")
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CorruptFileError(f"{path} is not a checkpoint of this train.py: it lacks {', '.join(missing)}")
    load_checked(model, state["trainable"], path, expected=trainable_state(model))
    for name, obj in stateful.items():
        obj.load_state_dict(state[name])
    set_rng_state(state["rng"])
    return state["progress"]


def save_trained(model: nn.Module, path: Path, config: TrainConfig, encoder_sha256: dict[str, str]) -> None:
    """The trained tensors (adapters or encoders, head, Mask Tokens; safetensors), with the config and the
    stage-1 encoders' sha256 as metadata."""
    if not is_main():
        return
    metadata = {"config": config.to_json(), "encoder_sha256": json.dumps(encoder_sha256)}
    with staged(path) as tmp:
        save_file(trainable_state(model), tmp, metadata=metadata)


def get_rng_state() -> dict[str, Any]:
    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
