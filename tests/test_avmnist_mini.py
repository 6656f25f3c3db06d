"""avmnist-mini built from the real data in ../shared/data (skipped where that folder is absent).

The set is built once per module into a temporary cache (≈ 7 s), never into the user's cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmdata import avmnist, get_dataset, sources

pytestmark = pytest.mark.skipif(
    not (sources.SHARED_DATA_DIR / "mnist").is_dir(), reason=f"no offline data at {sources.SHARED_DATA_DIR}"
)

N_FIT = 500  # training rows for the trivial classifier: "a few hundred samples"
CHANCE = 0.1


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> Path:
    return avmnist.build("avmnist-mini", cache_dir=tmp_path_factory.mktemp("lowrank-cache"))


def test_pinned_checksums_match_the_offline_copy():
    for remote in (sources.MNIST_TEST_IMAGES, sources.MNIST_TEST_LABELS):
        assert sources.fetch(remote, [sources.SHARED_DATA_DIR]).is_relative_to(sources.SHARED_DATA_DIR)
    sources.fetch_fsdd([sources.SHARED_DATA_DIR])


def test_split_sizes(mini):
    build = json.loads((mini / "meta" / "build.json").read_text())
    assert build["sizes"] == {"train": 8000, "val": 1000, "test": 1000}
    assert 1 <= build["pca_components"] <= 10
    for split, n in build["sizes"].items():
        assert len(get_dataset("avmnist-mini", split, data_dir=mini)) == n


def test_every_pair_shares_its_digit(mini):
    mnist_labels = sources.read_idx(sources.SHARED_DATA_DIR / sources.MNIST_TEST_LABELS.relpath)
    for split in avmnist.SPLITS:
        labels = np.load(mini / f"{split}_labels.npy")
        pairs = avmnist.load_provenance(mini, split)
        np.testing.assert_array_equal(labels, mnist_labels[pairs["image_index"]])
        np.testing.assert_array_equal(labels, [avmnist.parse_recording(n)[0] for n in pairs["recordings"]])


def test_no_recording_or_image_in_two_splits(mini):
    pairs = {split: avmnist.load_provenance(mini, split) for split in avmnist.SPLITS}
    for split, takes in avmnist.MINI_TAKES.items():
        assert {avmnist.parse_recording(n)[2] for n in pairs[split]["recordings"]} <= set(takes)
    recordings = [set(p["recordings"]) for p in pairs.values()]
    assert sum(map(len, recordings)) == len(set.union(*recordings))
    images = np.concatenate([p["image_index"] for p in pairs.values()])
    assert sorted(images) == list(range(10_000))


def stack(dataset: torch.utils.data.Dataset, n: int) -> dict[str, torch.Tensor]:
    """The first n items of ``dataset`` batched: {"image": [n, 1, 28, 28], "audio": …, "label": [n]}."""
    items = [dataset[i] for i in range(n)]
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def logistic_regression_accuracy(x_fit, y_fit, x_test, y_test) -> float:
    """Test accuracy of a standardised, lightly L2-regularised softmax regression fit by L-BFGS."""
    mean, std = x_fit.mean(0), x_fit.std(0) + 1e-6
    x_fit, x_test = (x_fit - mean) / std, (x_test - mean) / std
    torch.manual_seed(0)
    linear = torch.nn.Linear(x_fit.shape[1], 10)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=100)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(x_fit), y_fit) + 1e-3 * linear.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return (linear(x_test).argmax(1) == y_test).float().mean().item()


@pytest.fixture(scope="module")
def fit_and_test(mini) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    train, test = (get_dataset("avmnist-mini", split, data_dir=mini) for split in ("train", "test"))
    return stack(train, N_FIT), stack(test, len(test))


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_trivial_classifier_beats_chance(fit_and_test, modality, capsys):
    fit, test = fit_and_test
    accuracy = logistic_regression_accuracy(
        fit[modality].flatten(1), fit["label"], test[modality].flatten(1), test["label"]
    )
    with capsys.disabled():
        print(f"\navmnist-mini {modality}-only logistic regression ({N_FIT} train rows): {accuracy:.1%}")
    assert accuracy > 2 * CHANCE
