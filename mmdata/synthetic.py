"""A tiny synthetic AV-MNIST look-alike, generated in memory from a seed: for smoke runs and tests.

Item i → {"image": [1, 28, 28], "audio": [1, 112, 112], "label": int64 []}, like AV-MNIST. Class c draws
a bright square at one of 10 places in the image and a bright band at one of 10 frequencies in the
spectrogram, both under Gaussian noise (``noise``), so each modality alone carries the label.
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from lowrank_util.errors import ConfigError
from mmdata.avmnist import IMAGE_SIDE, SPEC_SIZE

SPLIT_SIZES = {"train": 128, "val": 32, "test": 32}
SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}  # offset from ``seed``: the splits never share a draw
NUM_CLASSES = 10


class SyntheticAV(TensorDataset):
    """TensorDataset of (image, audio, label) that yields AV-MNIST's dict items."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        image, audio, label = super().__getitem__(i)
        return {"image": image, "audio": audio, "label": label}


def synthetic(split: str, data_dir: None = None, seed: int = 0, size: int | None = None, noise: float = 0.5):
    """``size`` samples (default SPLIT_SIZES[split]) of the synthetic set; ``data_dir`` is not used."""
    if split not in SPLIT_SIZES:
        raise ConfigError(f"split must be one of {tuple(SPLIT_SIZES)}, got {split!r}")
    if data_dir is not None:
        raise ConfigError("the synthetic data set is generated in memory; it takes no data_dir")
    n = SPLIT_SIZES[split] if size is None else size
    generator = torch.Generator().manual_seed(1000 * seed + SPLIT_SEEDS[split])
    labels = torch.randint(NUM_CLASSES, (n,), generator=generator)
    image = noise * torch.randn(n, 1, IMAGE_SIDE, IMAGE_SIDE, generator=generator)
    audio = noise * torch.randn(n, 1, SPEC_SIZE, SPEC_SIZE, generator=generator)
    for i, c in enumerate(labels.tolist()):
        row, col = divmod(c, 5)
        image[i, 0, 4 + 10 * row : 12 + 10 * row, 1 + 5 * col : 6 + 5 * col] += 1.0
        audio[i, 0, :, 8 + 10 * c : 14 + 10 * c] += 1.0
    return SyntheticAV(image, audio, labels)
