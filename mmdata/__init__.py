"""Data sets for lowrank, by name: ``get_dataset(name, split, data_dir=None, **options)``.

Every data set is a ``torch.utils.data.Dataset`` of dicts keyed by modality (``"image"``, ``"audio"``,
…) plus ``"label"``. To add one, write its factory ``(split, data_dir=None, **options) -> Dataset``
and list it in ``DATASETS`` as ``"module:function"`` (imported on first use, so that
``python -m mmdata.<module>`` runs cleanly).
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

from torch.utils.data import Dataset

from lowrank_util.errors import UnknownNameError

DATASETS: dict[str, str] = {
    "avmnist": "mmdata.avmnist:avmnist",
    "avmnist-mini": "mmdata.avmnist:avmnist_mini",
    "cremad": "mmdata.importers:cremad",
    "fashion-mnist": "mmdata.fashion:fashion_mnist",
    "food101": "mmdata.importers:food101",
    "manifest": "mmdata.manifest:manifest_dataset",
    "mmimdb": "mmdata.importers:mmimdb",
    "synthetic": "mmdata.synthetic:synthetic",
}


def dataset_takes(name: str, option: str) -> bool:
    """True if data set ``name``'s factory takes the keyword ``option`` (e.g. AV-MNIST's audio="waveform")."""
    module, function = DATASETS[name].split(":")
    return option in inspect.signature(getattr(importlib.import_module(module), function)).parameters


def get_dataset(name: str, split: str, data_dir: str | Path | None = None, **options) -> Dataset:
    """The ``split`` ("train" | "val" | "test") of data set ``name``.

    data_dir: a prepared folder (for AV-MNIST: the MultiBench layout); None → build or fetch it.
    options:  passed to the factory (AV-MNIST: audio_snr, seed, source_dir, cache_dir).
    """
    if name not in DATASETS:
        raise UnknownNameError(f"unknown data set {name!r}; known: {', '.join(sorted(DATASETS))}")
    module, function = DATASETS[name].split(":")
    return getattr(importlib.import_module(module), function)(split, data_dir, **options)
