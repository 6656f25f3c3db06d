"""What every --method is: an Objective (its loss and gradient hooks) with plain attributes saying how
the stage-1 encoders train and which ways of filling in a missing modality it is tested with, the model
it builds on copies of the stage-1 encoders, and its training as a list of Stage for the loop to run."""

from __future__ import annotations

import copy
from typing import ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset

from lowrank import LoRAConfig, add_lora
from lowrank_train.checkpoint import seed_everything
from lowrank_train.config import TrainConfig
from lowrank_train.data import Batch, missing_in
from lowrank_train.loop import Objective, Stage
from lowrank_train.metrics import classification_loss
from models.multimodal import MultimodalClassifier, UnimodalClassifier

TUNINGS = ("lora", "full", "frozen")  # how the encoders train: LoRA adapters, every parameter, none


def adapt_encoders(encoders: nn.ModuleDict, config: TrainConfig, tuning: str) -> None:
    """Make the encoders train as ``tuning`` says: "lora" (frozen, with LoRA rank r on --targets), "full"
    (every parameter) or "frozen" (none)."""
    if tuning not in TUNINGS:
        raise ValueError(f"tuning must be one of {TUNINGS}, got {tuning!r}")
    lora = LoRAConfig(rank=config.rank, alpha=config.alpha, dropout=config.lora_dropout, targets=config.targets)
    for encoder in encoders.values():
        if tuning == "lora":
            add_lora(encoder, lora)
        else:
            encoder.requires_grad_(tuning == "full")


class Method(Objective):
    """One --method of stage 2. By default: a MultimodalClassifier (copies of the stage-1 encoders, tuned as
    ``tuning`` says; a new linear fusion head) trained for --epochs on cross-entropy over complete data."""

    title: ClassVar[str] = ""  # as the tables name it
    multimodal: ClassVar[bool] = True  # False: the stage-1 models are the result; nothing trains in stage 2
    tuning: ClassVar[str] = "lora"  # one of TUNINGS
    stage1_tuning: ClassVar[str] = "head"  # --unimodal-tuning auto on a given pretrained encoder
    fills: ClassVar[tuple[str, ...]] = ("zero-input", "zero-feature")  # tested with these (+ the unimodal
    # fallback); the first is used for validation; "mask-token" among them: the Mask Tokens train
    multilabel: ClassVar[bool] = True  # False: single-label tasks only (its maths reads the true class)
    model: nn.Module

    def build(self, unimodal: dict[str, UnimodalClassifier], num_classes: int, device: torch.device) -> nn.Module:
        """Copies of the unimodal encoders (tuned as ``tuning`` says) and a new fusion head; Mask Tokens
        train only where ``fills`` has them."""
        seed_everything(self.config.seed)
        encoders = {m: copy.deepcopy(u.encoder) for m, u in unimodal.items()}
        model = MultimodalClassifier(encoders, num_classes, self.config.mask_tokens_visible)
        for tokens in (model.mask_tokens, model.token_in, model.token_out):
            tokens.requires_grad_("mask-token" in self.fills)
        adapt_encoders(model.encoders, self.config, self.tuning)
        self.model = model.to(device)
        return self.model

    def loss(self, batch: Batch) -> torch.Tensor:
        """The task's loss (metrics.classification_loss); modalities the data lacks are filled in."""
        output = self.model({m: batch[m] for m in self.model.modalities}, missing_in(batch), self.fills[0])
        return classification_loss(output.logits, batch["label"])

    def training_data(self, train: Dataset) -> Dataset:
        """What the loop trains on, made from the ``train`` split (by default the split itself); ``loss``
        receives its batches."""
        return train

    def stages(self, train: Dataset) -> list[Stage]:
        """The training, as the loop runs it (on the ``train`` split): one fit over --epochs."""
        return [Stage(self.title, self.config.epochs)]
