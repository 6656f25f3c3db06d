"""Per-modality input standardisation: x → (x − mean) / std with statistics of the training split.

Encoders trained from scratch need it: AV-MNIST spectrograms scaled by 1/255 have mean ≈ 0.80 and
std ≈ 0.075, and an AST on them stays at chance, where it learns once they are standardised.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from lowrank_util.errors import ConfigError

Statistics = dict[str, tuple[float, float]]  # modality → (mean, std)


def input_statistics(data: Dataset, modalities: tuple[str, ...], samples: int = 1024) -> Statistics:
    """Scalar mean and std of each modality's inputs over the first ``samples`` items of ``data``."""
    items = [data[i] for i in range(min(samples, len(data)))]
    statistics = {}
    for modality in modalities:
        values = torch.stack([item[modality] for item in items]).double()
        statistics[modality] = (values.mean().item(), values.std().item())
    return statistics


class Standardized(Dataset):
    """``data`` with each modality in ``statistics`` standardised; other keys (the label) pass through."""

    def __init__(self, data: Dataset, statistics: Statistics) -> None:
        for modality, (_, std) in statistics.items():
            if not std > 0:
                raise ConfigError(f"modality {modality!r} has a constant input (std {std}): nothing to learn from")
        self.data, self.statistics = data, statistics

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = dict(self.data[i])
        for modality, (mean, std) in self.statistics.items():
            item[modality] = (item[modality] - mean) / std
        return item
