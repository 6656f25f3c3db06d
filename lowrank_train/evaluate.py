"""Evaluation: predictions over a data set (sharded over the processes) and the missing-modality
protocols of docs/design.md §6: every fill the method has, and the fallback to the unimodal models.

Shapes: N samples, M modalities, C classes."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kernels.backend import use_backend
from lowrank import merge_lora, unmerge_lora
from lowrank_train.config import TrainConfig
from lowrank_train.data import Batch, batches, missing_in, to_device
from lowrank_train.distributed import gather_shards, world
from lowrank_train.metrics import PRIMARY, is_multilabel, probabilities, score, scores
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
    """A multimodal model's logits with missing modalities filled in by ``fill``; missing: the rows given,
    else those the data lacks (data.missing_in)."""

    def logits(batch: Batch, missing: torch.Tensor | None) -> torch.Tensor:
        inputs = {m: batch[m] for m in model.modalities}
        return model(inputs, missing_in(batch) if missing is None else missing, fill).logits

    return logits


def every_fill(model: torch.nn.Module, fills: tuple[str, ...]) -> Logits:
    """The logits of each of ``fills`` side by side (B, F·C), from one forward: the model's ``fill_logits``
    combines that forward's features with each fill's stand-in."""

    def logits(batch: Batch, missing: torch.Tensor | None) -> torch.Tensor:
        output = model({m: batch[m] for m in model.modalities}, missing, fills[0])
        return torch.cat([model.fill_logits(output.features, output.generated, output.present, f) for f in fills], 1)

    return logits


def labels_of(data: Dataset, config: TrainConfig) -> torch.Tensor:
    """(N,) class indices or (N, C) multi-hot labels of ``data``: its ``labels`` where it keeps them (a
    manifest split, ClassFeatures), else read through its batches."""
    labels = getattr(data, "labels", None)
    if isinstance(labels, torch.Tensor) and len(labels) == len(data):
        return labels
    return torch.cat([batch["label"] for batch in batches(data, config)])


def given_missing(data: Dataset, modalities: int) -> torch.Tensor:
    """(N, M) bool: the modalities the data itself lacks in each sample (none unless it has a ``present``
    mask, as a manifest split does)."""
    present = getattr(data, "present", None)
    return torch.zeros(len(data), modalities, dtype=torch.bool) if present is None else ~present


def missing_patterns(modalities: tuple[str, ...]) -> list[tuple[int, ...]]:
    """The sets of modalities the protocols take away, by index: each one alone, then (three or more
    modalities) each set that leaves at least one, in order of size: (0,), (1,), (2,), (0, 1), …"""
    indices = range(len(modalities))
    return [c for size in range(1, len(modalities)) for c in itertools.combinations(indices, size)]


def pattern_name(modalities: tuple[str, ...], pattern: tuple[int, ...]) -> str:
    return "+".join(modalities[i] for i in pattern)


def missing_mask(size: int, modalities: int, pattern: tuple[int, ...], rate: float, seed: int) -> torch.Tensor:
    """(N, M) bool: the modalities of ``pattern`` missing together in round(rate · N) samples, drawn with
    ``seed``."""
    chosen = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[: round(rate * size)]
    mask = torch.zeros(size, modalities, dtype=torch.bool)
    mask[chosen[:, None], torch.tensor(pattern)] = True
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
    """Test scores (the task's primary metric, lowrank_train.metrics): the test set as given; and per set of
    missing modalities (missing_patterns) × missing rate × fill (``fills`` + FALLBACK), on merged weights
    (where there is LoRA). A simulated missing modality adds to those the data lacks; the same samples
    miss it for every fill, and one forward per pattern and rate serves them all. Where the data lacks
    modalities, "given_missing" reports how many samples lack each and every fill's score on them."""
    model.eval()
    labels, modalities = labels_of(data, config), model.modalities
    multilabel, given = is_multilabel(labels), given_missing(data, len(modalities))
    # The unmerged side of the merge check runs the unfused algebra X Wᵀ + b + s · (X Aᵀ) Bᵀ: the torch
    # path would fold W + s · B A on the CPU exactly as merging does, and the check could not fail.
    with use_backend("reference"):
        unmerged = predict(fused(model, fills[0]), data, config, device, given)
    for encoder in model.encoders.values():
        merge_lora(encoder)
    try:
        as_given = predict(every_fill(model, fills), data, config, device, given).chunk(len(fills), dim=1)
        complete = as_given[0]  # the first fill's: what validation scores
        merge_check = dict(
            agree=int((complete.argmax(1) == unmerged.argmax(1)).sum()),
            total=len(labels),
            max_abs_logit_diff=(complete - unmerged).abs().max().item(),
        )
        unimodal_probs = {
            m: probabilities(predict(lambda batch, _, u=u, m=m: u(batch[m]), data, config, device), multilabel)
            for m, u in unimodal.items()
        }
        fallback_of = partial(fallback_probabilities, probabilities(complete, multilabel), unimodal_probs)
        unimodal_scores = {}
        for m, p in unimodal_probs.items():  # each unimodal model on the samples that have its modality
            has = ~given[:, modalities.index(m)]
            unimodal_scores[m] = score(p[has], labels[has], already_probabilities=True)
        missing_results: dict[str, dict[str, list[float]]] = {}
        for pattern in missing_patterns(modalities):
            by_fill: dict[str, list[float]] = {fill: [] for fill in (*fills, FALLBACK)}
            for rate in config.missing_test:
                missing = missing_mask(len(labels), len(modalities), pattern, rate, seed=config.seed + 1) | given
                every = predict(every_fill(model, fills), data, config, device, missing)
                for fill, logits in zip(fills, every.chunk(len(fills), dim=1), strict=True):
                    by_fill[fill].append(score(logits, labels))
                by_fill[FALLBACK].append(score(fallback_of(missing, modalities), labels, already_probabilities=True))
            missing_results[pattern_name(modalities, pattern)] = by_fill
        results = dict(
            metric=PRIMARY[multilabel],
            unimodal=unimodal_scores,
            complete=score(complete, labels),
            scores=scores(complete, labels),
            merge_check=merge_check,
            missing_rates=list(config.missing_test),
            missing=missing_results,
        )
        incomplete = given.any(1)
        if incomplete.any():  # the samples the data leaves incomplete: how many lack each modality, every score
            pairs = zip(fills, as_given, strict=True)
            on_incomplete = {fill: score(logits[incomplete], labels[incomplete]) for fill, logits in pairs}
            fallback = fallback_of(given, modalities)[incomplete]
            on_incomplete[FALLBACK] = score(fallback, labels[incomplete], already_probabilities=True)
            lacking = {m: int(given[:, i].sum()) for i, m in enumerate(modalities)}
            results["given_missing"] = dict(samples=int(incomplete.sum()), lacking=lacking, **on_incomplete)
    finally:
        for encoder in model.encoders.values():
            unmerge_lora(encoder)
    return results


def validation(
    model: torch.nn.Module, fill: str, data: Dataset, config: TrainConfig, device: torch.device
) -> Callable[[], float]:
    """A closure for fit: the primary score of ``model`` on ``data`` as given (modalities the data lacks
    filled with ``fill``)."""
    labels = labels_of(data, config)
    return lambda: score(predict(fused(model, fill), data, config, device), labels)
