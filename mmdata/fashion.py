"""Fashion-MNIST (Xiao et al. 2017): 70k 28×28 grey images of clothing in 10 classes, a corpus disjoint
from AV-MNIST's digits, on which an image encoder is pretrained before it is adapted (docs/design.md §7).

Sources, searched in order: the Debian package ``dataset-fashion-mnist`` (/usr/share/datasets), then
``../shared/data`` and the cache (``$LOWRANK_DATA`` or ~/.cache/lowrank), downloading what is missing
there from the official mirror; every file is checked against the md5 of its decompressed content.
Splits: train 55,000 and val 5,000 carved from the 60k training images by the seed; test the 10k.
Items: {"image": [1, 28, 28] float32 in [0, 1], "label": int64 []}.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from lowrank_util.errors import ConfigError, MissingFileError
from mmdata import sources
from mmdata.sources import RemoteFile

DEBIAN_ROOT = Path("/usr/share/datasets")  # dataset-fashion-mnist installs fashion-mnist/*.gz here
MIRRORS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
)
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
VAL_SIZE = 5000  # carved from the 60k training images, as MultiBench carves AV-MNIST's


def _file(name: str, md5: str) -> RemoteFile:
    return RemoteFile(f"fashion-mnist/{name}", tuple(mirror + name for mirror in MIRRORS), md5)


FILES = {  # split file → (images, labels); md5 of the decompressed IDX content
    "train": (
        _file("train-images-idx3-ubyte.gz", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
        _file("train-labels-idx1-ubyte.gz", "9018921c3c673c538a1fc5bad174d6f9"),
    ),
    "test": (
        _file("t10k-images-idx3-ubyte.gz", "8181f5470baa50b63fa0f6fddb340f0a"),
        _file("t10k-labels-idx1-ubyte.gz", "15d484375f8d13e6eb1aabb0c3f46965"),
    ),
}


def _local(remote: RemoteFile, data_dir: str | Path | None) -> Path:
    """A verified copy of ``remote``: in ``data_dir`` (by file name) if given, else found or downloaded."""
    if data_dir is None:
        return sources.fetch(remote, [DEBIAN_ROOT, *sources.source_roots()])
    path = Path(data_dir) / Path(remote.relpath).name
    if not path.is_file():
        raise MissingFileError(f"{path} not found: the data folder must hold the four Fashion-MNIST *-ubyte.gz files")
    sources.verify_md5(path, remote.md5)
    return path


class FashionMNIST(Dataset):
    """Rows ``index`` of images [N, 28, 28] uint8 and labels [N]."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, index: np.ndarray) -> None:
        self.images, self.labels, self.index = images, labels, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.index[i]
        image = torch.from_numpy(self.images[row].astype(np.float32) / 255.0)
        return {"image": image[None], "label": torch.tensor(int(self.labels[row]), dtype=torch.long)}


def fashion_mnist(split: str, data_dir: str | Path | None = None, seed: int = 0) -> FashionMNIST:
    """``split`` ("train" | "val" | "test") of Fashion-MNIST; ``data_dir``: a folder holding the four
    ``*-ubyte.gz`` files (default: the Debian package, ../shared/data, the cache, then a download)."""
    if split not in ("train", "val", "test"):
        raise ConfigError(f"split must be one of train, val, test, got {split!r}")
    images, labels = (sources.read_idx(_local(f, data_dir)) for f in FILES["test" if split == "test" else "train"])
    if split == "test":
        return FashionMNIST(images, labels, np.arange(len(labels)))
    order = np.random.default_rng(seed).permutation(len(labels))
    index = order[:VAL_SIZE] if split == "val" else order[VAL_SIZE:]
    return FashionMNIST(images, labels, np.sort(index))
