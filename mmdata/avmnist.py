"""AV-MNIST: a digit image paired with a spoken digit (Vielzeuf et al. 2018; MultiBench layout).

MultiBench layout (what users already have; what the builder writes):
  image/{split}_data.npy   [N, 784]       MNIST after PCA energy removal, pixel scale 0–255
  audio/{split}_data.npy   [N, 112, 112]  log-magnitude spectrograms, scale 0–255
  {split}_labels.npy       [N]            digit 0–9
The builder also keeps, for encoders that read waveforms through their own front end (Whisper-style),
  waveform/{split}_data.npy [N, 8000]     the noisy 1 s clips the spectrograms were made from, 8 kHz,
                                          rounded to float16 (half the disk; ~1e-3 relative error)
with split ∈ {train, test}; a `val` split is used when its files exist, otherwise it is carved from
train by a seed (5k of 60k, MultiBench's 55k/5k). Items are scaled by 1/255 as in MultiBench.

Builder (raw sources → that layout, written once into the cache, keyed by its options):
  image  x [784] → x̂ = μ + (x − μ)·V_k·V_kᵀ, V_k the top-k principal axes of train holding ≥ 25 %
         of the variance ("75 % of the energy removed"); PCA fit on the train split only.
  audio  w [T] (8 kHz) → centre-cropped / zero-padded to 1 s [8000] → + white noise n ~ N(0, σ²),
         σ² = P_w · 10^(−snr/10), P_w the mean power of the recording → |STFT| (Hann, n_fft 256,
         hop 72, lowest 112 bins: [112 freq (0–3.5 kHz), 112 frames]) → dB, floored 80 dB below its
         peak → scaled to 0–255 uint8.
  pairs  each image gets a recording of its own digit from its split's pool of takes; each digit's
         pool is shuffled by the seed and cycled, so recordings are used evenly.
Variants: `avmnist` = MNIST train+test (60k/10k) with FSDD takes 5–49 / 0–4 (downloaded);
`avmnist-mini` = the 10k MNIST test images split 8,000/1,000/1,000 by the seed, takes 10–49 / 5–9 / 0–4
for train / val / test, so that no recording crosses splits (offline, from ``../shared/data``).

CLI: ``python -m mmdata.avmnist [--dataset avmnist-mini] [--audio-snr -10|clean] [--show]``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from lowrank_util.cli import ArgumentParser, run_command
from lowrank_util.errors import ConfigError, CorruptFileError, DownloadError, MissingFileError
from lowrank_util.files import staged
from mmdata import sources
from mmdata.sources import RemoteFile

IMAGE_SIDE = 28
IMAGE_DIM = IMAGE_SIDE * IMAGE_SIDE  # 784, MultiBench stores images flat
SPEC_SIZE = 112  # MultiBench spectrograms are 112 × 112
CLIP_SAMPLES = sources.FSDD_SAMPLE_RATE  # 1 s at 8 kHz; FSDD takes last 0.2–2.2 s
N_FFT = 256  # 32 ms window; a power of two (2.4× faster than 222); its lowest 112 of 129 bins: 0–3.5 kHz
HOP = CLIP_SAMPLES // (SPEC_SIZE - 1)  # 72 → 1 + 8000 // 72 = 112 frames (center=True)
TOP_DB = 80.0  # dynamic range kept below each spectrogram's peak (librosa's default)
STFT_CHUNK = 1024  # pairs per STFT batch: [1024, 129, 112] complex64 ≈ 120 MB
MULTIBENCH_VAL_FRACTION = 5000 / 60000  # MultiBench carves 5k of its 60k train for validation
MINI_HELD_OUT_FRACTION = 0.1  # avmnist-mini: 1,000 val + 1,000 test of the 10k images
SPLITS = ("train", "val", "test")
BUILD_VERSION = 3  # bump when the builder's output changes, so old caches are not reused (3: waveform/)
AUDIO_INPUTS = ("spectrogram", "waveform")  # what an item's "audio" holds

MINI_TAKES = {"train": range(10, 50), "val": range(5, 10), "test": range(0, 5)}
FULL_TAKES = {"train": range(5, 50), "test": range(0, 5)}


@dataclass(frozen=True)
class BuildOptions:
    """What a built set depends on besides its sources (part of its cache key).

    audio_snr:   dB of white noise mixed into each 1 s waveform; None = clean audio.
    seed:        image split (mini), image–recording pairing and noise.
    energy_kept: fraction of image variance kept by the PCA (MultiBench: 0.25).
    """

    audio_snr: float | None = -10.0
    seed: int = 0
    energy_kept: float = 0.25


@dataclass(frozen=True)
class RawSources:
    """Pinned raw inputs of one variant: image and label IDX files (concatenated in order) and FSDD."""

    images: tuple[RemoteFile, ...]
    labels: tuple[RemoteFile, ...]
    fsdd_digest: str = sources.FSDD_DIGEST


MINI_SOURCES = RawSources((sources.MNIST_TEST_IMAGES,), (sources.MNIST_TEST_LABELS,))
FULL_SOURCES = RawSources(
    (sources.MNIST_TRAIN_IMAGES, sources.MNIST_TEST_IMAGES),
    (sources.MNIST_TRAIN_LABELS, sources.MNIST_TEST_LABELS),
)


def parse_snr(value: float | str | None) -> float | None:
    """``"clean"`` or None → None (no noise); a number or numeric string → float dB."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "clean"):
        return None
    try:
        return float(value)
    except ValueError as err:
        raise ConfigError(f"audio_snr must be a number of dB or 'clean', got {value!r}") from err


# ----------------------------------------------------------------------------- image: PCA


def fit_pca(x: torch.Tensor, energy_kept: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean μ [D] and top-k principal axes V_k [D, k] of x [N, D], k the fewest holding ≥ energy_kept."""
    x = x.double()
    mean = x.mean(0)
    centred = x - mean
    eigvals, eigvecs = torch.linalg.eigh(centred.T @ centred / len(x))  # ascending
    eigvals, eigvecs = eigvals.flip(0).clamp_min(0), eigvecs.flip(1)
    cumulative = eigvals.cumsum(0) / eigvals.sum()
    k = int(torch.searchsorted(cumulative, torch.tensor([energy_kept], dtype=cumulative.dtype))) + 1
    return mean, eigvecs[:, :k]


def project_pca(x: torch.Tensor, mean: torch.Tensor, axes: torch.Tensor) -> torch.Tensor:
    """x [N, D] → μ + (x − μ)·V_k·V_kᵀ [N, D] float32."""
    centred = x.double() - mean
    return (mean + centred @ axes @ axes.T).float()


# ----------------------------------------------------------------------------- audio


def parse_recording(name: str) -> tuple[int, str, int]:
    """``"{digit}_{speaker}_{take}.wav"`` → (digit, speaker, take)."""
    try:
        digit, speaker, take = Path(name).stem.split("_")
        return int(digit), speaker, int(take)
    except ValueError as err:
        raise CorruptFileError(f"{name}: not an FSDD recording name {{digit}}_{{speaker}}_{{take}}.wav") from err


def fit_clip(wave: np.ndarray, length: int = CLIP_SAMPLES) -> np.ndarray:
    """Waveform [T] → [length]: centre-cropped when longer, zero-padded at the end when shorter."""
    start = max(0, (len(wave) - length) // 2)
    clip = wave[start : start + length]
    return np.pad(clip, (0, length - len(clip)))


def load_clips(folder: Path, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Recordings → clips [R, 8000] float32 and each recording's mean power P_w [R] (before padding)."""
    waves = [sources.read_wav(folder / name) for name in names]
    clips = torch.from_numpy(np.stack([fit_clip(w) for w in waves]))
    power = torch.tensor([float(np.mean(w.astype(np.float64) ** 2)) for w in waves])
    return clips, power


def add_noise(
    clips: torch.Tensor, power: torch.Tensor, snr_db: float | None, generator: torch.Generator
) -> torch.Tensor:
    """clips [B, T] + n, n ~ N(0, P_w·10^(−snr/10)) per row (white noise at snr_db); None → unchanged."""
    if snr_db is None:
        return clips
    sigma = (power * 10.0 ** (-snr_db / 10.0)).sqrt().float()
    return clips + sigma[:, None] * torch.randn(clips.shape, generator=generator)


def spectrogram(clips: torch.Tensor) -> torch.Tensor:
    """Waveforms [B, 8000] → log-magnitude spectrograms [B, 112, 112] (freq × time) as uint8 0–255.

    S = 20·log10|STFT| (lowest 112 bins) clipped to [max − 80 dB, max] per item, mapped onto 0–255.
    """
    window = torch.hann_window(N_FFT, dtype=clips.dtype)
    stft = torch.stft(clips, N_FFT, hop_length=HOP, window=window, center=True, return_complex=True)
    db = 20.0 * stft[:, :SPEC_SIZE].abs().clamp_min(1e-10).log10()
    peak = db.amax(dim=(1, 2), keepdim=True)
    scaled = (db.clamp_min(peak - TOP_DB) - (peak - TOP_DB)) * (255.0 / TOP_DB)
    return scaled.round().to(torch.uint8)


# ----------------------------------------------------------------------------- pairing and splits


def pair_recordings(labels: np.ndarray, pool: list[str], rng: np.random.Generator) -> np.ndarray:
    """For labels [N], recording names [N] of the same digit from ``pool``: each digit's recordings
    shuffled by ``rng`` and cycled in image order, so usage differs by at most one per recording."""
    by_digit = {d: [n for n in pool if parse_recording(n)[0] == d] for d in range(10)}
    paired = np.empty(len(labels), dtype=object)
    for digit in np.unique(labels):
        choices = by_digit[int(digit)]
        if not choices:
            raise CorruptFileError(f"no recording of digit {digit} in this split's takes")
        where = np.flatnonzero(labels == digit)
        order = rng.permutation(len(choices))
        paired[where] = [choices[order[i % len(choices)]] for i in range(len(where))]
    return paired.astype(str)


def mini_plan(n_images: int, seed: int) -> dict[str, np.ndarray]:
    """avmnist-mini's image split: a seeded permutation of n images cut 80/10/10 → sorted indices."""
    perm = np.random.default_rng(seed).permutation(n_images)
    n_held = round(n_images * MINI_HELD_OUT_FRACTION)
    cuts = {"val": perm[:n_held], "test": perm[n_held : 2 * n_held], "train": perm[2 * n_held :]}
    return {split: np.sort(cuts[split]) for split in SPLITS}


def carve_val(n: int, seed: int) -> dict[str, np.ndarray]:
    """MultiBench train file of n rows → sorted train / val row indices (val = 1/12 of n, by seed)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = round(n * MULTIBENCH_VAL_FRACTION)
    return {"train": np.sort(perm[n_val:]), "val": np.sort(perm[:n_val])}


# ----------------------------------------------------------------------------- build


def _cache_key(variant: Variant, opts: BuildOptions) -> str:
    """Folder name of a built set: readable options plus a hash of everything it depends on."""
    spec = {"variant": variant.name, "version": BUILD_VERSION, "raw": asdict(variant.raw), "opts": asdict(opts)}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    snr = "clean" if opts.audio_snr is None else f"{opts.audio_snr:g}"
    return f"{variant.name}_snr{snr}_seed{opts.seed}_{digest}"


def _read_raw(raw: RawSources, roots: Iterable[Path] | None) -> tuple[np.ndarray, np.ndarray, list[int], Path]:
    """Verified raw sources → images [M, 28, 28] uint8, labels [M], rows per IDX file, FSDD folder."""
    roots = None if roots is None else list(roots)
    images = [sources.read_idx(sources.fetch(f, roots)) for f in raw.images]
    labels = [sources.read_idx(sources.fetch(f, roots)) for f in raw.labels]
    for image_file, img, lab in zip(raw.images, images, labels, strict=True):
        if img.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE) or len(img) != len(lab):
            raise CorruptFileError(f"{image_file.relpath}: images {img.shape} do not match {len(lab)} labels")
    return (
        np.concatenate(images),
        np.concatenate(labels),
        [len(i) for i in images],
        sources.fetch_fsdd(roots, raw.fsdd_digest),
    )


@dataclass(frozen=True)
class RecordingBank:
    """Every recording of an FSDD folder, loaded once: names [R], clips [R, 8000], mean powers [R]."""

    names: list[str]
    clips: torch.Tensor
    power: torch.Tensor

    @classmethod
    def load(cls, folder: Path) -> RecordingBank:
        names = sorted(p.name for p in folder.glob("*.wav"))
        return cls(names, *load_clips(folder, names))

    def pool(self, takes: range) -> list[str]:
        """Names of the recordings whose take index is in ``takes``."""
        return [n for n in self.names if parse_recording(n)[2] in takes]

    def noisy(self, paired: np.ndarray, snr_db: float | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Recording names [N] → (noisy spectrograms [N, 112, 112] uint8, the noisy clips [N, 8000] float16
        they were made from), STFT_CHUNK pairs at a time."""
        row = {n: i for i, n in enumerate(self.names)}
        generator = torch.Generator().manual_seed(seed)
        idx = torch.tensor([row[n] for n in paired], dtype=torch.long)
        spectrograms, waveforms = [], []
        for i in tqdm(idx.split(STFT_CHUNK), desc="spectrograms", leave=False, disable=None):
            clips = add_noise(self.clips[i], self.power[i], snr_db, generator)
            spectrograms.append(spectrogram(clips))
            waveforms.append(clips.half())
        return torch.cat(spectrograms).numpy(), torch.cat(waveforms).numpy()


def _flat(images: np.ndarray) -> torch.Tensor:
    """Images [N, 28, 28] → [N, 784]."""
    return torch.from_numpy(images.reshape(-1, IMAGE_DIM))


def _build_split(
    dest: Path,
    split: str,
    index: np.ndarray,
    images: np.ndarray,
    labels: np.ndarray,
    takes: range,
    bank: RecordingBank,
    pca: tuple[torch.Tensor, torch.Tensor],
    snr_db: float | None,
    seeds: np.random.SeedSequence,
) -> None:
    """Pair images ``index`` with recordings of ``takes``, transform, and write the split (MultiBench
    layout + waveform/{split}_data.npy, meta/{split}_recordings.npy, meta/{split}_image_index.npy)."""
    pair_seed, noise_seed = seeds.generate_state(2)
    paired = pair_recordings(labels[index], bank.pool(takes), np.random.default_rng(pair_seed))
    spectrograms, waveforms = bank.noisy(paired, snr_db, int(noise_seed))
    arrays = {
        f"image/{split}_data.npy": project_pca(_flat(images[index]), *pca).numpy(),
        f"audio/{split}_data.npy": spectrograms,
        f"waveform/{split}_data.npy": waveforms,
        f"{split}_labels.npy": labels[index].astype(np.int64),
        f"meta/{split}_recordings.npy": paired,
        f"meta/{split}_image_index.npy": index,
    }
    for relpath, array in arrays.items():
        (dest / relpath).parent.mkdir(parents=True, exist_ok=True)
        np.save(dest / relpath, array)


def _mini_plan(counts: list[int], seed: int) -> dict[str, np.ndarray]:
    return mini_plan(sum(counts), seed)


def _full_plan(counts: list[int], seed: int) -> dict[str, np.ndarray]:
    n_train, n_test = counts
    return {"train": np.arange(n_train), "test": np.arange(n_train, n_train + n_test)}


@dataclass(frozen=True)
class Variant:
    """One AV-MNIST variant: its raw sources, its image split and the FSDD takes each split draws from.

    plan: (rows per image IDX file, seed) → source image indices per split.
    """

    name: str
    raw: RawSources
    plan: Callable[[list[int], int], dict[str, np.ndarray]]
    takes: dict[str, range]


VARIANTS = {
    "avmnist": Variant("avmnist", FULL_SOURCES, _full_plan, FULL_TAKES),
    "avmnist-mini": Variant("avmnist-mini", MINI_SOURCES, _mini_plan, MINI_TAKES),
}


def build(
    variant: Variant | str,
    opts: BuildOptions = BuildOptions(),
    source_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """Build a variant once into ``<cache>/built/<key>`` (staged in a temp folder); return that folder.

    source_dir: a root holding mnist/ and fsdd/recordings/; None → ../shared/data, then the cache
                (downloading what is missing there).
    cache_dir:  where built sets go; None → $LOWRANK_DATA or ~/.cache/lowrank.
    """
    variant = VARIANTS[variant] if isinstance(variant, str) else variant
    dest = Path(cache_dir or sources.cache_dir()) / "built" / _cache_key(variant, opts)
    if dest.is_dir():
        return dest
    start = time.perf_counter()
    images, labels, counts, fsdd = _read_raw(variant.raw, None if source_dir is None else [Path(source_dir)])
    plan = variant.plan(counts, opts.seed)
    bank = RecordingBank.load(fsdd)
    pca = fit_pca(_flat(images[plan["train"]]), opts.energy_kept)
    split_seeds = np.random.SeedSequence(opts.seed).spawn(len(plan))
    with staged(dest, folder=True) as tmp:
        for (split, index), seeds in zip(plan.items(), split_seeds, strict=True):
            takes = variant.takes[split]
            _build_split(tmp, split, index, images, labels, takes, bank, pca, opts.audio_snr, seeds)
        meta = {
            "variant": variant.name,
            "options": asdict(opts),
            "sizes": {split: len(index) for split, index in plan.items()},
            "pca_components": pca[1].shape[1],
            "build_seconds": round(time.perf_counter() - start, 2),
        }
        (tmp / "meta" / "build.json").write_text(json.dumps(meta, indent=2))
    return dest


# ----------------------------------------------------------------------------- MultiBench loader


def _load_array(path: Path, shape_tail: tuple[int, ...]) -> np.ndarray:
    """np.load(path, mmap) checking rank and trailing shape; every failure names the file."""
    if not path.is_file():
        raise MissingFileError(f"{path}: missing (MultiBench layout: image/, audio/, *_labels.npy)")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as err:
        raise CorruptFileError(f"{path}: not a readable .npy file ({err})") from err
    if array.ndim != 1 + len(shape_tail) or array.shape[1:] != shape_tail:
        raise CorruptFileError(f"{path}: shape {array.shape}, expected (N, {', '.join(map(str, shape_tail))})")
    return array


def _load_split_files(data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One split file triple → image [N, 784], audio [N, 112, 112], labels [N], checked for agreement."""
    labels_path = data_dir / f"{split}_labels.npy"
    image = _load_array(data_dir / "image" / f"{split}_data.npy", (IMAGE_DIM,))
    audio = _load_array(data_dir / "audio" / f"{split}_data.npy", (SPEC_SIZE, SPEC_SIZE))
    labels = np.asarray(_load_array(labels_path, ()))
    if not np.issubdtype(labels.dtype, np.integer) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise CorruptFileError(f"{labels_path}: labels must be integers 0–9, got {labels.dtype}")
    if not len(image) == len(audio) == len(labels):
        raise CorruptFileError(
            f"{data_dir}: {split} sizes differ: image {len(image)}, audio {len(audio)}, labels {len(labels)}"
        )
    return image, audio, labels


class AVMNIST(Dataset):
    """Rows ``index`` of MultiBench arrays; item i → {"image": [1, 28, 28], "audio": [1, 112, 112],
    "label": int64 []}, image and audio float32 scaled by 1/255 (MultiBench's normalisation). With
    ``waveform`` [N, 8000] given, "audio" is instead the 1 s clip [8000] float32 at ``sample_rates["audio"]``."""

    def __init__(
        self,
        image: np.ndarray,
        audio: np.ndarray,
        labels: np.ndarray,
        index: np.ndarray,
        waveform: np.ndarray | None = None,
    ):
        self.image, self.audio, self.labels, self.index, self.waveform = image, audio, labels, index, waveform
        self.sample_rates = {} if waveform is None else {"audio": sources.FSDD_SAMPLE_RATE}

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.index[i]
        image = torch.from_numpy(np.array(self.image[row], dtype=np.float32)) / 255.0
        if self.waveform is None:
            audio = (torch.from_numpy(np.array(self.audio[row], dtype=np.float32)) / 255.0).view(
                1, SPEC_SIZE, SPEC_SIZE
            )
        else:
            audio = torch.from_numpy(np.array(self.waveform[row], dtype=np.float32))
        return {
            "image": image.view(1, IMAGE_SIDE, IMAGE_SIDE),
            "audio": audio,
            "label": torch.tensor(int(self.labels[row]), dtype=torch.long),
        }


def load_multibench(data_dir: str | Path, split: str, seed: int = 0, audio: str = "spectrogram") -> AVMNIST:
    """Load ``split`` of a MultiBench-layout folder; val comes from val files if present, else from
    train by ``carve_val(seed)``. ``audio="waveform"``: items carry the 8 kHz clips of waveform/ instead of
    the spectrograms (folders this builder wrote; MultiBench's own have spectrograms only)."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    if audio not in AUDIO_INPUTS:
        raise ConfigError(f"audio must be one of {AUDIO_INPUTS}, got {audio!r}")
    data_dir = Path(data_dir)
    carve = split != "test" and not (data_dir / "val_labels.npy").exists()
    stored = "train" if carve else split
    image, spectrograms, labels = _load_split_files(data_dir, stored)
    waveform = None
    if audio == "waveform":
        if not (data_dir / "waveform" / f"{stored}_data.npy").is_file():
            raise ConfigError(
                f"{data_dir} holds spectrograms only (no waveform/{stored}_data.npy, as in MultiBench's layout), "
                "but the audio encoder reads waveforms: use --dataset avmnist-mini, or avmnist built from the "
                "raw sources (no --data-dir), or a spectrogram encoder such as ast_avmnist_tiny"
            )
        waveform = _load_array(data_dir / "waveform" / f"{stored}_data.npy", (CLIP_SAMPLES,))
        if len(waveform) != len(labels):
            raise CorruptFileError(
                f"{data_dir}: waveform/{stored}_data.npy has {len(waveform)} rows, not {len(labels)}"
            )
    index = carve_val(len(labels), seed)[split] if carve else np.arange(len(labels))
    return AVMNIST(image, spectrograms, labels, index, waveform)


def load_provenance(data_dir: str | Path, split: str) -> dict[str, np.ndarray]:
    """Where each pair of a built split came from: FSDD file names [N] and source image rows [N]."""
    meta = Path(data_dir) / "meta"
    return {key: np.load(meta / f"{split}_{key}.npy") for key in ("recordings", "image_index")}


# ----------------------------------------------------------------------------- registry entries


def load_avmnist(
    variant: str,
    split: str,
    data_dir: str | Path | None = None,
    *,
    audio_snr: float | str | None = -10.0,
    seed: int = 0,
    source_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    audio: str = "spectrogram",
) -> AVMNIST:
    """``split`` of the MultiBench files in ``data_dir`` if given, else of ``variant`` built (once) by
    ``build``; ``seed`` drives the build and, for a train file without val, the 55k/5k carve; ``audio``:
    what an item's "audio" holds, "spectrogram" or "waveform" (load_multibench)."""
    if data_dir is None:
        data_dir = build(variant, BuildOptions(audio_snr=parse_snr(audio_snr), seed=seed), source_dir, cache_dir)
    return load_multibench(data_dir, split, seed, audio)


def avmnist(split: str, data_dir: str | Path | None = None, *, audio: str = "spectrogram", **options) -> AVMNIST:
    """AV-MNIST (55k/5k/10k; MultiBench files or built from downloads): ``load_avmnist("avmnist", …)``.
    Without the network, the DownloadError also names the two ways that need none."""
    try:
        return load_avmnist("avmnist", split, data_dir, audio=audio, **options)
    except DownloadError as error:
        raise DownloadError(
            f"{error}; or give a MultiBench AV-MNIST folder as the data folder (train.py --data-dir), or use the "
            "data set avmnist-mini (train.py --dataset avmnist-mini), which is built offline from ../shared/data"
        ) from error


def avmnist_mini(split: str, data_dir: str | Path | None = None, *, audio: str = "spectrogram", **options) -> AVMNIST:
    """avmnist-mini (8k/1k/1k, offline): ``load_avmnist("avmnist-mini", …)``."""
    return load_avmnist("avmnist-mini", split, data_dir, audio=audio, **options)


# ----------------------------------------------------------------------------- CLI


def save_grid(dataset: AVMNIST, path: Path, n: int = 8) -> None:
    """PNG of the first n pairs (fewer if the split is smaller): images on top, spectrograms below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(n, len(dataset))
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.6), squeeze=False)
    for col in range(n):
        item = dataset[col]
        axes[0, col].imshow(item["image"][0].numpy(), cmap="gray")
        axes[0, col].set_title(f"label {int(item['label'])}", fontsize=9)
        axes[1, col].imshow(item["audio"][0].numpy(), cmap="magma", origin="lower", aspect="auto")
        for ax in axes[:, col]:
            ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Build (or load) a variant, print its split sizes, and with --show save a PNG grid of pairs."""
    parser = ArgumentParser(prog="python -m mmdata.avmnist", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(VARIANTS), default="avmnist-mini")
    parser.add_argument("--data-dir", type=Path, default=None, help="existing MultiBench-layout folder")
    parser.add_argument("--audio-snr", default="-10", help="dB of white noise, or 'clean'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=SPLITS, default="train", help="split shown by --show")
    parser.add_argument("--show", action="store_true", help="save a PNG grid of image/spectrogram pairs")
    parser.add_argument("--out", type=Path, default=Path("avmnist.png"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    options = {"audio_snr": args.audio_snr, "seed": args.seed}
    splits = {s: load_avmnist(args.dataset, s, args.data_dir, **options) for s in SPLITS}
    sizes = ", ".join(f"{s} {len(d):,}" for s, d in splits.items())
    print(f"{args.dataset}: {sizes} (ready in {time.perf_counter() - start:.1f} s)")
    if args.show:
        save_grid(splits[args.split], args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    run_command(main)
