"""train.py with a waveform encoder: Whisper's front end turns AV-MNIST's 8 kHz clips into its log-mel
inputs (not standardised), on a tiny AV-MNIST built from synthetic sources; the MultiBench layout, which
has spectrograms only, is refused in one line."""

from __future__ import annotations

import pytest
import torch
from test_avmnist import make_sources, synthetic

import train
from kernels.backend import use_backend
from lowrank_methods import METHODS
from lowrank_train.cli import parse_args
from lowrank_train.data import load_splits
from lowrank_util.errors import ConfigError
from mmdata import avmnist
from models.whisper_features import log_mel_spectrogram


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    return avmnist.build(synthetic(make_sources(root)), avmnist.BuildOptions(seed=0), root, root / "cache")


def argv(built, root, *extra: str) -> list[str]:
    return [
        "--dataset", "avmnist-mini", "--data-dir", str(built), "--audio-model", "whisper_smoke",
        "--unimodal-epochs", "1", "--epochs", "1", "--batch-size", "16", "--missing-test", "0,1",
        "--out-dir", str(root / "runs"), "--cache-dir", str(root / "cache"), *extra,
    ]  # fmt: skip


def test_audio_inputs_are_the_encoders_log_mel_of_the_waveforms(built, tmp_path):
    splits, modalities, _ = load_splits(parse_args(argv(built, tmp_path), METHODS)[0])
    assert modalities == ("image", "audio")
    item = splits["val"][0]
    waveform = torch.from_numpy(avmnist.load_multibench(built, "val", audio="waveform").waveform[0].astype("float32"))
    torch.testing.assert_close(item["audio"], log_mel_spectrogram(waveform, 8000))  # (80, 100): 1 s at 16 kHz
    assert item["audio"].shape == (80, 100)
    assert abs(item["image"].mean().item()) < 3  # the image is standardised as before


def test_u2a_trains_and_tests_on_whisper_inputs(built, tmp_path):
    with use_backend("torch"):
        results = train.main(argv(built, tmp_path))
    assert set(results["missing"]) == {"image", "audio"} and results["merge_check"]["agree"] == 6


def test_spectrogram_only_data_is_refused(built, tmp_path):
    multibench = tmp_path / "multibench"
    for relpath in ("image", "audio"):
        (multibench / relpath).mkdir(parents=True)
    for name in ("image/train_data.npy", "audio/train_data.npy", "train_labels.npy", "image/test_data.npy",
                 "audio/test_data.npy", "test_labels.npy", "image/val_data.npy", "audio/val_data.npy",
                 "val_labels.npy"):  # fmt: skip
        (multibench / name).write_bytes((built / name).read_bytes())
    with pytest.raises(ConfigError, match="holds spectrograms only"):
        load_splits(parse_args(argv(multibench, tmp_path), METHODS)[0])
