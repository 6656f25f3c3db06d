"""Fashion-MNIST from the Debian package dataset-fashion-mnist (skipped without it; CI installs it)."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest
import torch

from lowrank_util.errors import MissingFileError
from mmdata import fashion, get_dataset
from mmdata.sources import ChecksumError

FOLDER = fashion.DEBIAN_ROOT / "fashion-mnist"
pytestmark = pytest.mark.skipif(
    not FOLDER.is_dir(), reason="needs the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist)"
)


def test_splits_are_disjoint_and_cover_the_corpus():
    splits = {split: get_dataset("fashion-mnist", split) for split in ("train", "val", "test")}
    assert {k: len(v) for k, v in splits.items()} == {"train": 55_000, "val": 5_000, "test": 10_000}
    assert not set(splits["train"].index) & set(splits["val"].index)
    item = splits["val"][0]
    assert item["image"].shape == (1, 28, 28) and item["image"].dtype == torch.float32
    assert float(item["image"].min()) >= 0 and float(item["image"].max()) <= 1
    counts = np.bincount(splits["test"].labels, minlength=10)
    assert counts.tolist() == [1000] * 10 and len(fashion.CLASSES) == 10  # the test set is balanced


def test_a_damaged_copy_or_a_missing_file_is_named(tmp_path):
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(FOLDER / name, tmp_path / name)
    assert len(get_dataset("fashion-mnist", "test", data_dir=tmp_path)) == 10_000
    with pytest.raises(MissingFileError, match=r"train-images-idx3-ubyte\.gz not found: the data folder"):
        get_dataset("fashion-mnist", "val", data_dir=tmp_path)
    labels = gzip.decompress((FOLDER / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels[:-1] + bytes([labels[-1] ^ 1])))
    with pytest.raises(ChecksumError, match=r"t10k-labels-idx1-ubyte\.gz: md5"):
        get_dataset("fashion-mnist", "test", data_dir=tmp_path)
