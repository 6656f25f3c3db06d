"""U2A (unified unimodal adaptation; docs/design.md §5): LoRA on every frozen stage-1 encoder; the
adapters, the fusion head and one Mask Token per modality train jointly on

    L = CE(logits, y) + λ · alignment_loss        (λ = --align-weight)

with --missing-train-rate of the samples losing one modality (modality dropout), so that the Mask
Tokens learn to stand in for it. Tested with every fill (models.multimodal.MISSING_FILLS)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from lowrank_methods.base import Method
from lowrank_train.config import TrainConfig
from lowrank_train.data import Batch, missing_in
from lowrank_train.distributed import mean_over_processes
from lowrank_train.metrics import classification_loss
from models.multimodal import MISSING_FILLS, FusionOutput, MultimodalClassifier


def drop_modalities(draws: torch.Tensor, modalities: int, rate: float) -> torch.Tensor:
    """(B, M) bool: each sample loses one modality, chosen uniformly, with probability ``rate``; from the
    (B, 2) uniforms u: sample b loses modality ⌊u₁ · M⌋ when u₀ < rate."""
    hit = draws[:, 0] < rate
    which = (draws[:, 1] * modalities).long().clamp(max=modalities - 1)
    return F.one_hot(which, modalities).bool() & hit[:, None]


def alignment_loss(
    output: FusionOutput, row_counts: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> torch.Tensor:
    """Mean over modalities of MSE(ĥ_m, stopgrad(h_m)) on the samples where m and another modality are
    present: it teaches the Mask Tokens to stand in for the real features.

    Each modality's squared error is summed over its rows R_m and divided by n_m · D_m, where
    n_m = ``row_counts``(|R_m| per modality, (M,)) (default: |R_m|). Under data parallelism pass the
    counts summed over the P processes and divided by P: averaging the processes' gradients then
    gives the gradient of the loss of the whole global batch, whatever share of R_m each one holds.
    """
    with_company = output.present.sum(1) > 1  # ĥ_m needs another present modality to come from
    rows = output.present & with_company[:, None]  # (B, M)
    counts = rows.sum(0).to(output.logits.dtype)
    counts = row_counts(counts) if row_counts is not None else counts
    losses = []
    for i, m in enumerate(output.features):
        if counts[i] > 0:
            generated, real = output.generated[m][rows[:, i]], output.features[m][rows[:, i]].detach()
            losses.append(F.mse_loss(generated, real, reduction="sum") / (counts[i] * real.shape[1]))
    return torch.stack(losses).mean() if losses else output.logits.new_zeros(())


def training_missing(draws: torch.Tensor, modalities: int, rate: float, given: torch.Tensor | None) -> torch.Tensor:
    """(B, M) bool: the modalities the data lacks (``given``; None: none) and the one modality dropout
    takes (drop_modalities), which it takes only from a sample that has at least two."""
    dropped = drop_modalities(draws, modalities, rate)
    if given is None:
        return dropped
    return given | (dropped & ((~given).sum(1, keepdim=True) > 1))


def u2a_loss(model: MultimodalClassifier, batch: Batch, config: TrainConfig) -> torch.Tensor:
    """The task's loss with modality dropout (from the batch's draws) on top of the modalities the data
    lacks, + λ · alignment loss of the Mask Tokens."""
    missing = training_missing(batch["draws"], len(model.modalities), config.missing_train_rate, missing_in(batch))
    output = model({m: batch[m] for m in model.modalities}, missing)
    alignment = alignment_loss(output, row_counts=mean_over_processes)
    return classification_loss(output.logits, batch["label"]) + config.align_weight * alignment


class U2A(Method):
    title = "U2A"
    tuning = "lora"
    fills = MISSING_FILLS

    def loss(self, batch: Batch) -> torch.Tensor:
        return u2a_loss(self.model, batch, self.config)
