"""Data for training: the splits (standardised with the training split's statistics), batches, the seeded
epoch order dealt over the processes, and the per-sample uniforms that randomise a step."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lowrank_train.config import TrainConfig
from lowrank_train.distributed import world
from mmdata import get_dataset
from mmdata.standardize import Standardized, input_statistics

Batch = dict[str, torch.Tensor]  # modality → (B, ...) inputs, "label" (B,), and in training "draws" (B, 2)


def load_splits(config: TrainConfig) -> tuple[dict[str, Dataset], tuple[str, ...], int]:
    """({split: data set, inputs standardised with the training split's statistics}, modalities, classes)."""
    splits = {split: get_dataset(config.dataset, split, config.data_dir) for split in ("train", "val", "test")}
    first = splits["train"][0]
    modalities = tuple(k for k in first if k != "label")
    labels = torch.as_tensor([int(splits["train"][i]["label"]) for i in range(len(splits["train"]))])
    statistics = input_statistics(splits["train"], modalities)
    print("input mean, std: " + ", ".join(f"{m} {mean:.4f}, {std:.4f}" for m, (mean, std) in statistics.items()))
    return {k: Standardized(v, statistics) for k, v in splits.items()}, modalities, int(labels.max()) + 1


def batches(data: Dataset, config: TrainConfig, order: list[int] | None = None) -> DataLoader:
    """This process's training batches over the sample indices ``order`` (see epoch_order), or ordered
    evaluation batches. The loader's own generator keeps torch's global one untouched (exact resume)."""
    size = config.batch_size // world()[1] if order is not None else config.batch_size
    return DataLoader(data, size, sampler=order, generator=torch.Generator())


def epoch_order(data: Dataset, config: TrainConfig, epoch: int, skip_steps: int = 0) -> list[int]:
    """This process's sample indices in ``epoch`` after its first ``skip_steps`` batches: a permutation
    drawn from (seed, epoch), dealt round the processes as DistributedSampler does, so that global
    batch i holds the same samples for any number of processes (when they divide the data set)."""
    rank, processes = world()
    sampler = DistributedSampler(data, num_replicas=processes, rank=rank, shuffle=True, seed=config.seed)
    sampler.set_epoch(epoch)
    return list(sampler)[skip_steps * (config.batch_size // processes) :]


def steps_per_epoch(data: Dataset, config: TrainConfig) -> int:
    processes = world()[1]
    return math.ceil(math.ceil(len(data) / processes) / (config.batch_size // processes))


def step_draws(config: TrainConfig, epoch: int, step: int, size: int) -> torch.Tensor:
    """(size, 2) uniforms for this process's samples at (epoch, step), which a method may use to randomise
    the step per sample (U2A: modality dropout): drawn for the global batch from (seed, epoch, step) and
    dealt like the samples (process r: rows r, r + P, …), so that they do not depend on the process count
    and a resumed run draws the same."""
    rank, processes = world()
    seed = int(np.random.SeedSequence([config.seed, epoch, step]).generate_state(1)[0])
    draws = torch.rand(size * processes, 2, generator=torch.Generator().manual_seed(seed))
    return draws[rank::processes]


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
