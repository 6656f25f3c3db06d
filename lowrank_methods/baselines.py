"""The baselines every method is compared with, on the same stage-1 encoders, data and schedule:

unimodal      each stage-1 model alone (nothing trains in stage 2)
linear-probe  frozen encoders; a linear fusion head on concat_m(h_m) trains (the encoders run once)
late-fusion   every encoder parameter and the fusion head train (full fine-tuning)
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from lowrank_methods.base import Method
from lowrank_train.data import Batch
from lowrank_train.evaluate import ClassFeatures
from lowrank_train.metrics import classification_loss


class Unimodal(Method):
    title = "unimodal"
    multimodal = False


class LinearProbe(Method):
    """The frozen encoders run once per training sample (ClassFeatures); the fusion head trains on
    concat_m(h_m), which is what the full model computes on complete data (and, for a modality the data
    lacks, on h_m of the zero input, its "zero-input" fill)."""

    title = "linear probe"
    tuning = "frozen"

    def training_data(self, train: Dataset) -> Dataset:
        return ClassFeatures(self.model.encoders, train, self.config, self.model.head.weight.device)

    def loss(self, batch: Batch) -> torch.Tensor:
        features = torch.cat([batch[m] for m in self.model.modalities], dim=1)
        return classification_loss(self.model.head(features), batch["label"])


class LateFusion(Method):
    title = "late fusion"
    tuning = "full"
