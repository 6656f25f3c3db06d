"""Evaluation: predictions over a data set (sharded over the processes) and the missing-modality
protocols of docs/design.md §6: every fill the method has, and the fallback to the unimodal models.

Shapes: N samples, M modalities, C classes."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kernels.backend import use_backend
from lowrank import merge_lora, unmerge_lora
from lowrank_train.config import TrainConfig
from lowrank_train.data import Batch, batches, to_device
from lowrank_train.distributed import gather_shards, world
from lowrank_util.errors import ConfigError
from models.multimodal import UnimodalClassifier

Logits = Callable[[Batch, torch.Tensor | None], torch.Tensor]  # (batch, missing rows (B, M) or None) → (B, C)
FALLBACK = "unimodal"  # missing modality handled by the unimodal model(s) of the modalities that remain


@torch.no_grad()
def predict(
    model: Logits, data: Dataset, config: TrainConfig, device: torch.device, missing: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits (N, C) of ``model`` over ``data`` in order, under --precision's autocast; ``missing`` (N, M)
    goes with its samples. Under torchrun, process r predicts samples r, r + P, … and every process
    receives all N rows."""
    rank, processes = world()
    if len(data) < processes:
        raise ConfigError(f"cannot share {len(data)} evaluation samples among {processes} processes")
    shard = list(range(rank, len(data), processes))
    logits, start = [], 0
    for batch in DataLoader(data, config.batch_size, sampler=shard, generator=torch.Generator()):
        size = len(batch["label"])
        rows = None if missing is None else missing[shard[start : start + size]].to(device)
        with config.autocast(device):
            logits.append(model(to_device(batch, device), rows).float())
        start += size
    return gather_shards(torch.cat(logits), len(data)).cpu()


def class_features(
    encoder: nn.Module, modality: str, data: Dataset, config: TrainConfig, device: torch.device
) -> torch.Tensor:
    """(N, D) class features of ``encoder`` (put in eval mode) on ``modality``'s inputs of ``data``, in order."""
    encoder.eval()
    with torch.no_grad():
        return predict(lambda batch, _: encoder(batch[modality])[1], data, config, device)


class ClassFeatures(Dataset):
    """``data``'s labels with each modality m of ``encoders`` replaced by the class feature h_m (D_m,) that the
    frozen encoder E_m gives its input, computed once for the whole split (eval mode, no gradients,
    --precision's autocast; kept in fp32). A head trained on them is a head trained on top of frozen
    encoders, without running the encoders every epoch."""

    def __init__(
        self, encoders: Mapping[str, nn.Module], data: Dataset, config: TrainConfig, device: torch.device
    ) -> None:
        self.features = {m: class_features(encoder, m, data, config, device) for m, encoder in encoders.items()}
        self.labels = labels_of(data, config)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {modality: features[i] for modality, features in self.features.items()} | {"label": self.labels[i]}


def fused(model: torch.nn.Module, fill: str) -> Logits:
    """A multimodal model's logits with missing modalities filled in by ``fill``."""
    return lambda batch, missing: model({m: batch[m] for m in model.modalities}, missing, fill).logits


def every_fill(model: torch.nn.Module, fills: tuple[str, ...]) -> Logits:
    """The logits of each of ``fills`` side by side (B, F·C), from one forward: the model's ``fill_logits``
    combines that forward's features with each fill's stand-in."""

    def logits(batch: Batch, missing: torch.Tensor | None) -> torch.Tensor:
        output = model({m: batch[m] for m in model.modalities}, missing, fills[0])
        return torch.cat([model.fill_logits(output.features, output.generated, output.present, f) for f in fills], 1)

    return logits


def labels_of(data: Dataset, config: TrainConfig) -> torch.Tensor:
    return torch.cat([batch["label"] for batch in batches(data, config)])


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).float().mean().item()


def missing_mask(size: int, modalities: int, modality: int, rate: float, seed: int) -> torch.Tensor:
    """(N, M) bool: ``modality`` missing in round(rate · N) samples, drawn with ``seed``."""
    chosen = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[: round(rate * size)]
    mask = torch.zeros(size, modalities, dtype=torch.bool)
    mask[chosen, modality] = True
    return mask


def fallback_probabilities(
    complete: torch.Tensor, unimodal: dict[str, torch.Tensor], missing: torch.Tensor, modalities: tuple[str, ...]
) -> torch.Tensor:
    """(N, C): the multimodal model's probabilities where nothing is missing; elsewhere the mean of
    the unimodal models' probabilities over the modalities present."""
    present = (~missing).float()  # (N, M)
    stacked = torch.stack([unimodal[m] for m in modalities], 1)  # (N, M, C)
    remaining = (present[:, :, None] * stacked).sum(1) / present.sum(1, keepdim=True).clamp(min=1)
    return torch.where(missing.any(1, keepdim=True), remaining, complete)


@torch.no_grad()
def test_multimodal(
    model: torch.nn.Module,
    unimodal: dict[str, UnimodalClassifier],
    data: Dataset,
    config: TrainConfig,
    device: torch.device,
    fills: tuple[str, ...],
) -> dict[str, Any]:
    """Test accuracies: complete; and per modality × missing rate × fill (``fills`` + FALLBACK), on merged
    weights (where there is LoRA). The same missing samples are used for every fill, and one forward per
    modality and rate serves them all."""
    model.eval()
    labels = labels_of(data, config)
    # The unmerged side of the merge check runs the unfused algebra X Wᵀ + b + s · (X Aᵀ) Bᵀ: the torch
    # path would fold W + s · B A on the CPU exactly as merging does, and the check could not fail.
    with use_backend("reference"):
        unmerged = predict(fused(model, fills[0]), data, config, device)
    for encoder in model.encoders.values():
        merge_lora(encoder)
    try:
        complete = predict(fused(model, fills[0]), data, config, device)
        merge_check = dict(
            agree=int((complete.argmax(1) == unmerged.argmax(1)).sum()),
            total=len(labels),
            max_abs_logit_diff=(complete - unmerged).abs().max().item(),
        )
        unimodal_probs = {
            m: predict(lambda batch, _, u=u, m=m: u(batch[m]), data, config, device).softmax(1)
            for m, u in unimodal.items()
        }
        missing_results: dict[str, dict[str, list[float]]] = {}
        for i, modality in enumerate(model.modalities):
            missing_results[modality] = {fill: [] for fill in (*fills, FALLBACK)}
            for rate in config.missing_test:
                missing = missing_mask(len(labels), len(model.modalities), i, rate, seed=config.seed + 1)
                every = predict(every_fill(model, fills), data, config, device, missing)
                for fill, logits in zip(fills, every.chunk(len(fills), dim=1), strict=True):
                    missing_results[modality][fill].append(accuracy(logits, labels))
                fallback = fallback_probabilities(complete.softmax(1), unimodal_probs, missing, model.modalities)
                missing_results[modality][FALLBACK].append(accuracy(fallback, labels))
    finally:
        for encoder in model.encoders.values():
            unmerge_lora(encoder)
    return dict(
        unimodal={m: accuracy(p, labels) for m, p in unimodal_probs.items()},
        complete=accuracy(complete, labels),
        merge_check=merge_check,
        missing_rates=list(config.missing_test),
        missing=missing_results,
    )


def validation(
    model: torch.nn.Module, fill: str, data: Dataset, config: TrainConfig, device: torch.device
) -> Callable[[], float]:
    """A closure for fit: the accuracy of ``model`` on ``data`` (complete), filled with ``fill``."""
    labels = labels_of(data, config)
    return lambda: accuracy(predict(fused(model, fill), data, config, device), labels)
