"""AV-MNIST on synthetic files written here: readers, checksums, downloads (faked), builder, loader.

Nothing here touches the network: downloads go through a monkeypatched ``urllib.request.urlopen``.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import tarfile
import urllib.request
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from lowrank_util.errors import ConfigError
from mmdata import avmnist, get_dataset, sources
from mmdata.avmnist import BuildOptions, RawSources
from mmdata.sources import ChecksumError, DownloadError, RemoteFile

N_IMAGES = 60  # → 48 / 6 / 6 train / val / test
SPEAKERS = ("alice", "bob")
TAKES = 12  # takes 0–4 test, 5–9 val, 10–11 train


# ----------------------------------------------------------------------------- synthetic sources


def idx_bytes(array: np.ndarray) -> bytes:
    """uint8 array → IDX bytes (magic 0x0000 08 ndim, big-endian sizes, data)."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(idx_bytes(array)))
    return path


def wav_bytes(samples: np.ndarray, rate: int = 8000) -> bytes:
    """int16 samples [T] → mono 16-bit WAV bytes."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(samples.astype("<i2").tobytes())
    return buffer.getvalue()


def tone(digit: int, take: int) -> np.ndarray:
    """A digit-dependent tone [T] (300 + 200·digit Hz), 0.5–1.6 s long so that some are cropped."""
    t = np.arange(4000 + 800 * (take % 8)) / 8000
    return (8000 * np.sin(2 * np.pi * (300 + 200 * digit) * t)).astype(np.int16)


def make_sources(root: Path) -> RawSources:
    """Write a tiny MNIST (digit-coded images) and FSDD under ``root``; return RawSources pinned to them."""
    labels = np.arange(N_IMAGES) % 10
    images = np.zeros((N_IMAGES, 28, 28), dtype=np.uint8)
    for i, digit in enumerate(labels):
        images[i, 2 * digit : 2 * digit + 6, 4 + i % 5 : 20] = 255
    remotes = []
    for name, array in (("t10k-images-idx3-ubyte.gz", images), ("t10k-labels-idx1-ubyte.gz", labels)):
        path = write_idx(root / "mnist" / name, array)
        md5 = hashlib.md5(gzip.decompress(path.read_bytes())).hexdigest()
        remotes.append(RemoteFile(f"mnist/{name}", ("https://example.invalid/" + name,), md5))
    folder = root / sources.FSDD_RECORDINGS
    folder.mkdir(parents=True)
    for digit in range(10):
        for speaker in SPEAKERS:
            for take in range(TAKES):
                (folder / f"{digit}_{speaker}_{take}.wav").write_bytes(wav_bytes(tone(digit, take)))
    return RawSources((remotes[0],), (remotes[1],), sources.recordings_digest(folder))


def synthetic(raw: RawSources) -> avmnist.Variant:
    """avmnist-mini's recipe applied to the synthetic sources."""
    return dataclasses.replace(avmnist.VARIANTS["avmnist-mini"], raw=raw)


@pytest.fixture(scope="module")
def raw_root(tmp_path_factory) -> tuple[Path, RawSources]:
    root = tmp_path_factory.mktemp("raw")
    return root, make_sources(root)


@pytest.fixture(scope="module")
def built(raw_root, tmp_path_factory) -> Path:
    root, raw = raw_root
    return avmnist.build(synthetic(raw), BuildOptions(seed=0), root, tmp_path_factory.mktemp("cache"))


def load_split(folder: Path, split: str) -> dict[str, np.ndarray]:
    """Every array the builder wrote for one split."""
    return {
        "image": np.load(folder / "image" / f"{split}_data.npy"),
        "audio": np.load(folder / "audio" / f"{split}_data.npy"),
        "labels": np.load(folder / f"{split}_labels.npy"),
        **avmnist.load_provenance(folder, split),
    }


def takes_of(folder: Path, split: str) -> set[int]:
    """FSDD take indices of the recordings a built split uses."""
    return {avmnist.parse_recording(n)[2] for n in avmnist.load_provenance(folder, split)["recordings"]}


# ----------------------------------------------------------------------------- readers


def test_read_idx_roundtrip_plain_and_gzip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    plain = tmp_path / "a-idx3-ubyte"
    plain.write_bytes(idx_bytes(array))
    np.testing.assert_array_equal(sources.read_idx(plain), array)
    np.testing.assert_array_equal(sources.read_idx(write_idx(tmp_path / "a.gz", array)), array)


def test_truncated_idx_names_the_file(tmp_path):
    path = tmp_path / "cut-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((5, 28, 28), np.uint8))[:-100])
    with pytest.raises(ValueError, match=r"cut-idx3-ubyte: truncated IDX"):
        sources.read_idx(path)


def test_truncated_gzip_names_the_file(tmp_path):
    path = write_idx(tmp_path / "cut.gz", np.zeros((50, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match=r"cut\.gz: cannot read"):
        sources.read_idx(path)


def test_not_idx_names_the_file(tmp_path):
    path = tmp_path / "junk"
    path.write_bytes(b"hello world")
    with pytest.raises(ValueError, match="junk: not an IDX"):
        sources.read_idx(path)


def test_read_wav_scales_to_unit_range(tmp_path):
    path = tmp_path / "0_x_0.wav"
    path.write_bytes(wav_bytes(np.array([0, 16384, -32768], dtype=np.int16)))
    np.testing.assert_array_equal(sources.read_wav(path), np.array([0, 0.5, -1], dtype=np.float32))


@pytest.mark.parametrize("cut", [10, 44])  # mid-data, then mid-header
def test_truncated_wav_names_the_file(tmp_path, cut):
    path = tmp_path / "3_bob_7.wav"
    data = wav_bytes(tone(3, 7))
    path.write_bytes(data[: len(data) - 1000] if cut == 10 else data[:cut])
    with pytest.raises(ValueError, match=r"3_bob_7\.wav: (truncated WAV|not a readable WAV)"):
        sources.read_wav(path)


def test_wrong_sample_rate_names_the_file(tmp_path):
    path = tmp_path / "fast.wav"
    path.write_bytes(wav_bytes(tone(1, 1), rate=16000))
    with pytest.raises(ValueError, match=r"fast\.wav: expected mono 16-bit 8000 Hz"):
        sources.read_wav(path)


# ----------------------------------------------------------------------------- checksums and downloads


def test_md5_mismatch_is_detected(raw_root):
    root, raw = raw_root
    bad = RemoteFile(raw.images[0].relpath, raw.images[0].urls, "0" * 32)
    with pytest.raises(ChecksumError, match=r"t10k-images-idx3-ubyte\.gz: md5"):
        sources.fetch(bad, [root])


def test_altered_recording_is_detected(tmp_path, raw_root):
    _, raw = raw_root
    root = tmp_path / "copy"
    make_sources(root)
    (root / sources.FSDD_RECORDINGS / "4_bob_3.wav").write_bytes(wav_bytes(tone(5, 3)))
    with pytest.raises(ChecksumError, match="recordings digest"):
        sources.fetch_fsdd([root], raw.fsdd_digest)


def test_build_refuses_sources_with_bad_checksum(raw_root, tmp_path):
    root, raw = raw_root
    bad = RawSources(raw.images, (RemoteFile(raw.labels[0].relpath, (), "f" * 32),), raw.fsdd_digest)
    with pytest.raises(ChecksumError, match=r"t10k-labels-idx1-ubyte\.gz"):
        avmnist.build(synthetic(bad), BuildOptions(), root, tmp_path)


class FakeResponse(io.BytesIO):
    """What urlopen returns, minus the network."""

    def __init__(self, payload: bytes):
        super().__init__(payload)
        self.headers = {"Content-Length": str(len(payload))}


def serve(monkeypatch, payloads: dict[str, bytes]) -> None:
    """Make urlopen answer the given URLs and fail (OSError) for every other one."""

    def urlopen(url: str, timeout: float) -> FakeResponse:
        if url not in payloads:
            raise OSError("network disabled in tests")
        return FakeResponse(payloads[url])

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)


def test_failed_download_says_which_file_to_put_where(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWRANK_DATA", str(tmp_path))
    serve(monkeypatch, {})
    with pytest.raises(DownloadError, match=rf"put it at {tmp_path}/mnist/t10k-labels-idx1-ubyte\.gz"):
        sources.fetch(sources.MNIST_TEST_LABELS, roots=[])
    with pytest.raises(DownloadError, match=rf"recordings/ folder in {tmp_path}/fsdd/recordings"):
        sources.fetch_fsdd(roots=[])
    assert not [p for p in tmp_path.rglob("*") if p.is_file()], "a failed download must leave no file behind"


class BrokenResponse(FakeResponse):
    """A connection that drops after the first block."""

    def read(self, size: int = -1) -> bytes:
        if self.tell():
            raise OSError("connection reset")
        return super().read(4)


def test_download_dropped_midway_leaves_nothing_behind(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWRANK_DATA", str(tmp_path))
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: BrokenResponse(b"0123456789"))
    with pytest.raises(DownloadError, match="connection reset"):
        sources.fetch(sources.MNIST_TEST_LABELS, roots=[])
    assert list((tmp_path / "mnist").iterdir()) == []


def test_download_lands_in_cache_and_is_verified(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWRANK_DATA", str(tmp_path))
    payload = gzip.compress(idx_bytes(np.arange(7, dtype=np.uint8)))
    remote = RemoteFile("mnist/x.gz", ("https://a.invalid/x.gz", "https://b.invalid/x.gz"), "0" * 32)
    serve(monkeypatch, {remote.urls[1]: payload})  # first mirror down, second up
    with pytest.raises(ChecksumError):
        sources.fetch(remote, roots=[])
    good = RemoteFile(remote.relpath, remote.urls, hashlib.md5(gzip.decompress(payload)).hexdigest())
    assert sources.fetch(good, roots=[]) == tmp_path / "mnist" / "x.gz"
    np.testing.assert_array_equal(sources.read_idx(tmp_path / "mnist" / "x.gz"), np.arange(7))


def test_fsdd_download_extracts_recordings(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWRANK_DATA", str(tmp_path / "cache"))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in ("0_a_0.wav", "1_a_0.wav"):
            data = wav_bytes(tone(int(name[0]), 0))
            info = tarfile.TarInfo(f"free-spoken-digit-dataset-1.0.10/recordings/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    serve(monkeypatch, {sources.FSDD_ARCHIVE_URL: buffer.getvalue()})
    expected = tmp_path / "expected"
    expected.mkdir()
    for name in ("0_a_0.wav", "1_a_0.wav"):
        (expected / name).write_bytes(wav_bytes(tone(int(name[0]), 0)))
    folder = sources.fetch_fsdd(roots=[], expected=sources.recordings_digest(expected))
    assert sorted(p.name for p in folder.iterdir()) == ["0_a_0.wav", "1_a_0.wav"]
    assert not (tmp_path / "cache" / "fsdd" / "free-spoken-digit-dataset-1.0.10.tar.gz").exists()


# ----------------------------------------------------------------------------- transforms


def test_spectrogram_shape_and_range():
    clips = torch.randn(3, avmnist.CLIP_SAMPLES)
    spec = avmnist.spectrogram(clips)
    assert spec.shape == (3, 112, 112) and spec.dtype == torch.uint8
    assert int(spec.amax()) == 255


def test_noise_has_the_requested_snr():
    clips = torch.zeros(4, 8000)
    power = torch.tensor([1e-2, 1e-3, 1.0, 0.25])
    noisy = avmnist.add_noise(clips, power, -10.0, torch.Generator().manual_seed(0))
    measured_snr = 10 * torch.log10(power / noisy.square().mean(1))
    torch.testing.assert_close(measured_snr, torch.full((4,), -10.0), atol=0.1, rtol=0)
    assert avmnist.add_noise(clips, power, None, torch.Generator()) is clips


def test_pca_keeps_fewest_components_reaching_the_energy():
    scales = torch.tensor([4.0, 2.0, 1.0, 1.0])  # variances 16, 4, 1, 1 → 73 %, 91 %, 95 %, 100 %
    x = torch.randn(20000, 4, generator=torch.Generator().manual_seed(0)) * scales + 3.0
    for energy, k in ((0.25, 1), (0.8, 2), (0.92, 3)):
        assert avmnist.fit_pca(x, energy)[1].shape == (4, k)
    reconstruction = avmnist.project_pca(x, *avmnist.fit_pca(x, 1.0))
    torch.testing.assert_close(reconstruction, x, atol=1e-4, rtol=0)


def test_fit_clip_crops_centre_and_pads_end():
    np.testing.assert_array_equal(avmnist.fit_clip(np.arange(10.0), 4), [3, 4, 5, 6])
    np.testing.assert_array_equal(avmnist.fit_clip(np.arange(2.0), 4), [0, 1, 0, 0])


def test_pairing_matches_digits_and_uses_recordings_evenly():
    labels = np.repeat(np.arange(10), 7)
    pool = [f"{d}_s_{t}.wav" for d in range(10) for t in range(3)]
    paired = avmnist.pair_recordings(labels, pool, np.random.default_rng(0))
    assert [avmnist.parse_recording(n)[0] for n in paired] == labels.tolist()
    _, counts = np.unique(paired, return_counts=True)
    assert len(counts) == 30 and counts.max() - counts.min() <= 1


def test_parse_snr():
    assert avmnist.parse_snr("clean") is None and avmnist.parse_snr(None) is None
    assert avmnist.parse_snr("-10") == -10.0 and avmnist.parse_snr(5) == 5.0
    with pytest.raises(ValueError, match="audio_snr"):
        avmnist.parse_snr("loud")


# ----------------------------------------------------------------------------- builder


def test_built_split_sizes_shapes_and_dtypes(built):
    sizes = json.loads((built / "meta" / "build.json").read_text())["sizes"]
    assert sizes == {"train": 48, "val": 6, "test": 6}
    for split, n in sizes.items():
        arrays = load_split(built, split)
        assert arrays["image"].shape == (n, 784) and arrays["image"].dtype == np.float32
        assert arrays["audio"].shape == (n, 112, 112) and arrays["audio"].dtype == np.uint8
        assert arrays["labels"].shape == (n,) and arrays["labels"].dtype == np.int64


def test_built_waveforms_are_the_clips_of_the_spectrograms(built):
    waveforms = np.load(built / "waveform" / "val_data.npy")
    assert waveforms.shape == (6, avmnist.CLIP_SAMPLES) and waveforms.dtype == np.float16
    remade = avmnist.spectrogram(torch.from_numpy(waveforms.astype(np.float32))).numpy().astype(int)
    stored = np.load(built / "audio" / "val_data.npy").astype(int)
    assert np.abs(remade - stored).mean() < 0.5 and np.percentile(np.abs(remade - stored), 99) <= 12  # fp16 rounding
    item = get_dataset("avmnist-mini", "val", data_dir=built, audio="waveform")[0]
    assert item["audio"].shape == (avmnist.CLIP_SAMPLES,) and item["audio"].dtype == torch.float32
    torch.testing.assert_close(item["audio"], torch.from_numpy(waveforms[0].astype(np.float32)))


def test_waveforms_of_a_multibench_folder_are_refused_in_one_line(tmp_path):
    multibench = tmp_path / "mb"
    for split in ("train", "test"):
        (multibench / "image").mkdir(parents=True, exist_ok=True)
        (multibench / "audio").mkdir(exist_ok=True)
        np.save(multibench / "image" / f"{split}_data.npy", np.zeros((24, 784), np.float32))
        np.save(multibench / "audio" / f"{split}_data.npy", np.zeros((24, 112, 112), np.uint8))
        np.save(multibench / f"{split}_labels.npy", np.arange(24) % 10)
    with pytest.raises(ConfigError, match=r"holds spectrograms only .* but the audio encoder reads waveforms"):
        avmnist.load_multibench(multibench, "train", audio="waveform")


def test_built_pairs_share_their_digit_and_no_recording_crosses_splits(built, raw_root):
    root, _ = raw_root
    mnist_labels = sources.read_idx(root / "mnist" / "t10k-labels-idx1-ubyte.gz")
    seen: dict[str, set[str]] = {}
    for split in avmnist.SPLITS:
        arrays = load_split(built, split)
        digits = [avmnist.parse_recording(n)[0] for n in arrays["recordings"]]
        np.testing.assert_array_equal(arrays["labels"], digits)
        np.testing.assert_array_equal(arrays["labels"], mnist_labels[arrays["image_index"]])
        assert takes_of(built, split) <= set(avmnist.MINI_TAKES[split])
        seen[split] = set(arrays["recordings"])
    assert not (seen["train"] & seen["val"] or seen["train"] & seen["test"] or seen["val"] & seen["test"])
    all_images = np.concatenate([load_split(built, s)["image_index"] for s in avmnist.SPLITS])
    assert sorted(all_images) == list(range(N_IMAGES))


def test_build_is_deterministic_by_seed(built, raw_root, tmp_path):
    root, raw = raw_root
    again = avmnist.build(synthetic(raw), BuildOptions(seed=0), root, tmp_path / "a")
    other = avmnist.build(synthetic(raw), BuildOptions(seed=1), root, tmp_path / "b")
    for split in avmnist.SPLITS:
        first, second, third = (load_split(d, split) for d in (built, again, other))
        for key in first:
            np.testing.assert_array_equal(first[key], second[key])
        assert not np.array_equal(first["audio"], third["audio"])


def test_build_is_cached_by_options(built, raw_root):
    root, raw = raw_root
    cache = built.parent.parent
    stamp = (built / "image" / "train_data.npy").stat().st_mtime_ns
    assert avmnist.build(synthetic(raw), BuildOptions(seed=0), root, cache) == built
    assert (built / "image" / "train_data.npy").stat().st_mtime_ns == stamp
    clean = avmnist.build(synthetic(raw), BuildOptions(audio_snr=None), root, cache)
    assert clean != built and "snrclean" in clean.name
    assert not [p for p in cache.rglob("*") if p.name.startswith(".")], "no temporary folder left behind"


def test_full_recipe_writes_train_and_test_and_carves_val(raw_root, tmp_path):
    root, raw = raw_root
    twice = RawSources(raw.images * 2, raw.labels * 2, raw.fsdd_digest)  # stands in for MNIST train + test
    variant = dataclasses.replace(avmnist.VARIANTS["avmnist"], raw=twice)
    folder = avmnist.build(variant, BuildOptions(), root, tmp_path)
    assert not (folder / "val_labels.npy").exists()
    test_rows = avmnist.load_provenance(folder, "test")["image_index"]
    assert test_rows.tolist() == list(range(N_IMAGES, 2 * N_IMAGES))
    assert takes_of(folder, "test") <= set(range(5)) and takes_of(folder, "train") <= set(range(5, 50))
    sizes = [len(avmnist.load_multibench(folder, split)) for split in avmnist.SPLITS]
    assert sizes == [55, 5, 60]


def test_get_dataset_items(built):
    dataset = get_dataset("avmnist-mini", "val", data_dir=built)
    assert len(dataset) == 6
    item = dataset[0]
    assert item["image"].shape == (1, 28, 28) and item["image"].dtype == torch.float32
    assert item["audio"].shape == (1, 112, 112) and 0 <= float(item["audio"].min()) <= 1
    assert item["label"].dtype == torch.int64 and item["label"].ndim == 0
    with pytest.raises(KeyError, match="unknown data set 'mnist'"):
        get_dataset("mnist", "train")


def test_show_writes_a_png(built, tmp_path, capsys):
    out = tmp_path / "grid.png"
    avmnist.main(["--data-dir", str(built), "--show", "--out", str(out), "--split", "test"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "train 48, val 6, test 6" in capsys.readouterr().out


# ----------------------------------------------------------------------------- MultiBench loader


def write_multibench(root: Path, sizes: dict[str, int], audio_dtype=np.float32) -> Path:
    """Random MultiBench-layout files: image [N, 784] 0–255, audio [N, 112, 112] 0–255, labels [N]."""
    rng = np.random.default_rng(0)
    for split, n in sizes.items():
        (root / "image").mkdir(parents=True, exist_ok=True)
        (root / "audio").mkdir(exist_ok=True)
        np.save(root / "image" / f"{split}_data.npy", rng.uniform(0, 255, (n, 784)).astype(np.float32))
        np.save(root / "audio" / f"{split}_data.npy", rng.uniform(0, 255, (n, 112, 112)).astype(audio_dtype))
        np.save(root / f"{split}_labels.npy", np.arange(n) % 10)
    return root


def test_multibench_val_is_carved_from_train_by_seed(tmp_path):
    root = write_multibench(tmp_path, {"train": 24, "test": 5})
    train, val, test = (avmnist.load_multibench(root, s) for s in avmnist.SPLITS)
    assert (len(train), len(val), len(test)) == (22, 2, 5)  # val = 1/12 of train, as 5k of 60k
    assert sorted([*train.index, *val.index]) == list(range(24))
    np.testing.assert_array_equal(avmnist.load_multibench(root, "val").index, val.index)
    assert not np.array_equal(avmnist.load_multibench(root, "val", seed=3).index, val.index)


def test_multibench_items_are_scaled_by_1_over_255(tmp_path):
    root = write_multibench(tmp_path, {"train": 12, "test": 3}, audio_dtype=np.uint8)
    item = get_dataset("avmnist", "test", data_dir=root)[2]
    image = np.load(root / "image" / "test_data.npy")[2] / 255.0
    np.testing.assert_allclose(item["image"].flatten().numpy(), image, rtol=1e-6)
    assert item["audio"].max() <= 1.0 and int(item["label"]) == 2


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda r: (r / "audio" / "test_data.npy").unlink(), r"audio/test_data\.npy: missing"),
        (lambda r: np.save(r / "image" / "test_data.npy", np.zeros((5, 28, 28))), r"image/test_data\.npy: shape"),
        (lambda r: np.save(r / "test_labels.npy", np.zeros(4, np.int64)), "test sizes differ"),
        (lambda r: np.save(r / "test_labels.npy", np.full(5, 10)), r"test_labels\.npy: labels must be"),
        (lambda r: (r / "test_labels.npy").write_bytes(b"junk"), r"test_labels\.npy: not a readable"),
    ],
)
def test_multibench_errors_name_the_bad_file(tmp_path, damage, message):
    root = write_multibench(tmp_path, {"train": 12, "test": 5})
    damage(root)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        avmnist.load_multibench(root, "test")


def test_unknown_split_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="split must be one of"):
        avmnist.load_multibench(write_multibench(tmp_path, {"test": 2}), "dev")
