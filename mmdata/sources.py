"""Raw sources of AV-MNIST: where they live, how they are fetched and checked, how they are read.

Sources (official, pinned):
  MNIST  IDX files (LeCun, Cortes, Burges), gzip; checked by the md5 of the *decompressed* bytes,
         because mirrors recompress the archives (the gzip bytes differ, the content does not).
  FSDD   Free Spoken Digit Dataset v1.0.10 (Jakobovski et al.): 3,000 mono 8 kHz 16-bit WAVs
         `recordings/{digit}_{speaker}_{index}.wav`; checked by one sha256 over the sorted
         (name, sha256(bytes)) of all recordings (`recordings_digest`).

Lookup order for raw files: `../shared/data` beside the repository (read-only, offline copy), then the
cache directory `$LOWRANK_DATA` or `~/.cache/lowrank`, where downloads land. Every write is atomic
(temporary file or folder + `os.replace`), so an interrupted download never leaves a half file behind.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tarfile
import urllib.request
import wave
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lowrank_util.errors import CorruptFileError, DownloadError
from lowrank_util.files import staged

SHARED_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FSDD_SAMPLE_RATE = 8000  # Hz; every FSDD recording is 8 kHz mono 16-bit PCM
_IDX_DTYPES = {0x08: np.uint8}  # IDX type codes used by MNIST (0x08 = unsigned byte)
_CHUNK = 1 << 20  # download / hash block size, bytes


class ChecksumError(CorruptFileError):
    """A file's content does not match its pinned checksum."""


__all__ = ["ChecksumError", "DownloadError", "RemoteFile", "fetch"]  # DownloadError: lowrank_util's, raised here


@dataclass(frozen=True)
class RemoteFile:
    """One pinned source file.

    relpath: where it lives under a data root, e.g. "mnist/t10k-images-idx3-ubyte.gz".
    urls:    mirrors, tried in order.
    md5:     md5 of the content (of the decompressed content for ``.gz``).
    """

    relpath: str
    urls: tuple[str, ...]
    md5: str


_MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")


def _mnist(name: str, md5: str) -> RemoteFile:
    return RemoteFile(f"mnist/{name}", tuple(m + name for m in _MNIST_MIRRORS), md5)


MNIST_TRAIN_IMAGES = _mnist("train-images-idx3-ubyte.gz", "6bbc9ace898e44ae57da46a324031adb")
MNIST_TRAIN_LABELS = _mnist("train-labels-idx1-ubyte.gz", "a25bea736e30d166cdddb491f175f624")
MNIST_TEST_IMAGES = _mnist("t10k-images-idx3-ubyte.gz", "2646ac647ad5339dbf082846283269ea")
MNIST_TEST_LABELS = _mnist("t10k-labels-idx1-ubyte.gz", "27ae3e4e09519cfbb04c329615203637")

FSDD_ARCHIVE_URL = "https://github.com/Jakobovski/free-spoken-digit-dataset/archive/refs/tags/v1.0.10.tar.gz"
FSDD_RECORDINGS = "fsdd/recordings"
FSDD_DIGEST = "a2e8a660492f28d9eed6270b290d26cbc5c81d6077ce87d3c0ad5adf4d4ee696"


def cache_dir() -> Path:
    """The writable cache root: ``$LOWRANK_DATA`` if set, else ``~/.cache/lowrank``."""
    return Path(os.environ.get("LOWRANK_DATA") or Path.home() / ".cache" / "lowrank")


def source_roots() -> list[Path]:
    """Data roots searched for raw files, in order: ``../shared/data`` (if present), then the cache."""
    return [root for root in (SHARED_DATA_DIR, cache_dir()) if root.is_dir()]


def find_local(relpath: str, roots: Iterable[Path] | None = None) -> Path | None:
    """First existing ``root / relpath`` over ``roots`` (default: ``source_roots()``), or None."""
    for root in source_roots() if roots is None else roots:
        if (root / relpath).exists():
            return root / relpath
    return None


# ----------------------------------------------------------------------------- checksums


def _read_content(path: Path) -> bytes:
    """File bytes, gunzipped when the name ends in ``.gz``; a damaged file raises naming it."""
    try:
        return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as err:
        raise CorruptFileError(f"{path}: cannot read ({err}); the file is truncated or not gzip") from err


def verify_md5(path: Path, md5: str) -> None:
    """Raise ChecksumError unless md5(content of ``path``) == ``md5`` (content gunzipped for .gz)."""
    got = hashlib.md5(_read_content(path)).hexdigest()
    if got != md5:
        raise ChecksumError(f"{path}: md5 {got} != expected {md5}; delete it and fetch it again")


def recordings_digest(folder: Path) -> str:
    """sha256 over sorted (name, sha256(bytes)) of ``folder/*.wav``: one checksum for a recording set."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.wav")):
        digest.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def verify_recordings(folder: Path, expected: str = FSDD_DIGEST) -> None:
    """Raise ChecksumError unless ``recordings_digest(folder) == expected``."""
    got = recordings_digest(folder)
    if got != expected:
        raise ChecksumError(
            f"{folder}: recordings digest {got} != expected {expected} (FSDD v1.0.10, 3,000 WAVs); "
            "a recording is missing, extra or altered"
        )


# ----------------------------------------------------------------------------- downloads


def _download(url: str, dest: Path) -> None:
    """Stream ``url`` to ``dest`` atomically, with a progress bar."""
    with staged(dest) as tmp, urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
            while block := response.read(_CHUNK):
                out.write(block)
                bar.update(len(block))


def _download_any(urls: tuple[str, ...], dest: Path) -> None:
    """Try each mirror in turn; if all fail, raise DownloadError saying where to put the file."""
    errors = []
    for url in urls:
        try:
            _download(url, dest)
            return
        except OSError as err:
            errors.append(f"{url}: {err}")
    raise DownloadError(
        f"could not download {dest.name} ({'; '.join(errors)}). Download it by hand from {urls[0]} and put it at {dest}"
    )


def fetch(remote: RemoteFile, roots: Iterable[Path] | None = None) -> Path:
    """Path of a verified local copy of ``remote``: found under ``roots``, else downloaded into the cache."""
    path = find_local(remote.relpath, roots)
    if path is None:
        path = cache_dir() / remote.relpath
        _download_any(remote.urls, path)
    verify_md5(path, remote.md5)
    return path


def _extract_recordings(archive: Path, dest: Path) -> None:
    """Extract ``*/recordings/*.wav`` of the FSDD tarball into ``dest`` atomically."""
    with staged(dest, folder=True) as tmp, tarfile.open(archive) as tar:
        for member in tar.getmembers():
            parent, name = os.path.split(member.name)
            if member.isfile() and parent.endswith("/recordings") and name.endswith(".wav"):
                with tar.extractfile(member) as src, open(tmp / name, "wb") as out:
                    shutil.copyfileobj(src, out)


def fetch_fsdd(roots: Iterable[Path] | None = None, expected: str = FSDD_DIGEST) -> Path:
    """Folder of the verified FSDD recordings: found under ``roots``, else downloaded into the cache."""
    folder = find_local(FSDD_RECORDINGS, roots)
    if folder is None:
        folder = cache_dir() / FSDD_RECORDINGS
        archive = cache_dir() / "fsdd" / "free-spoken-digit-dataset-1.0.10.tar.gz"
        try:
            _download_any((FSDD_ARCHIVE_URL,), archive)
        except DownloadError as err:
            raise DownloadError(f"{err}, or put the 3,000 WAVs of its recordings/ folder in {folder}") from err
        _extract_recordings(archive, folder)
        archive.unlink()
    verify_recordings(folder, expected)
    return folder


# ----------------------------------------------------------------------------- readers


def read_idx(path: Path) -> np.ndarray:
    """Decode an IDX file (plain or gzip) → uint8 array of the header's shape, e.g. [N, 28, 28] or [N].

    Layout: 2 zero bytes, type code (0x08 = uint8), ndim, then ndim big-endian uint32 sizes, then data.
    """
    raw = _read_content(path)
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES:
        raise CorruptFileError(f"{path}: not an IDX file of unsigned bytes (magic {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(s) for s in np.frombuffer(raw[4:header], dtype=">u4"))
    if len(shape) != ndim or len(raw) != header + int(np.prod(shape)):
        raise CorruptFileError(
            f"{path}: truncated IDX file: header says shape {shape}, file holds {len(raw) - header} data bytes"
        )
    return np.frombuffer(raw, dtype=_IDX_DTYPES[raw[2]], offset=header).reshape(shape)


def read_wav(path: Path) -> np.ndarray:
    """Read an 8 kHz mono 16-bit PCM WAV → float32 waveform [T] in [-1, 1)."""
    try:
        with wave.open(str(path), "rb") as wav:
            params = wav.getparams()
            frames = wav.readframes(params.nframes)
    except (wave.Error, EOFError) as err:
        raise CorruptFileError(f"{path}: not a readable WAV file ({err})") from err
    if (params.nchannels, params.sampwidth, params.framerate) != (1, 2, FSDD_SAMPLE_RATE):
        raise CorruptFileError(
            f"{path}: expected mono 16-bit {FSDD_SAMPLE_RATE} Hz, got {params.nchannels} channel(s), "
            f"{8 * params.sampwidth}-bit, {params.framerate} Hz"
        )
    if len(frames) != 2 * params.nframes or params.nframes == 0:
        raise CorruptFileError(
            f"{path}: truncated WAV: header says {params.nframes} samples, file holds {len(frames) // 2}"
        )
    return np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0
