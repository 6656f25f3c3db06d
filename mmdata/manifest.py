"""Manifest data sets: the data users bring, one row per sample, any subset of image, audio and text.

A folder with ``manifest.csv`` (header row) or ``manifest.jsonl`` (one JSON object per line):

    id        unique sample id
    split     train | val | test        (no val rows: VAL_FRACTION of train is carved out by id, see carve_validation)
    label     the class name; for a multi-label task a ``labels`` column instead: names separated by "|"
              (JSON: a list), possibly none
    image     an image file (Pillow reads it)            paths relative to the folder, or absolute
    audio     an audio file (soundfile reads it)
    text      the text itself, or ``text_file``: a UTF-8 text file

An empty cell (JSON: absent, null or "") means that the modality is missing for that sample: real
missingness, which training and testing carry in the same (B, M) mask as the simulated one. Classes, in
order, come from ``classes.txt`` (one per line) when it exists, else the sorted names the rows use.

Reading a manifest checks every row up front (unknown split or label, a file that does not exist, a
sample with every modality missing, a repeated id) and names the row and column; files are decoded
when a sample is read, and an unreadable one is named the same way. ``python -m mmdata.manifest check
FOLDER`` decodes every file once.

Items of a split (``ManifestSplit``): {modality: processed input, "present": (M,) bool, "label": int64 ()
or, multi-label, float32 (C,) multi-hot}; a missing modality's input is zeros shaped like a present one.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lowrank_util.cli import ArgumentParser, run_command
from lowrank_util.errors import ConfigError, CorruptFileError, MissingFileError
from lowrank_util.files import write_text

MODALITIES = ("image", "audio", "text")  # the order of the (B, M) masks
SPLITS = ("train", "val", "test")
FILE_MODALITIES = ("image", "audio")  # cells that name a file (text: inline, or a text_file column)
MANIFEST_NAMES = ("manifest.csv", "manifest.jsonl")
CLASSES_NAME = "classes.txt"
VAL_FRACTION = 0.1  # of train, carved out as val when a manifest has no val rows
LABEL_SEPARATOR = "|"  # between the names of a csv ``labels`` cell

Raw = Any  # a decoded input: PIL image, (waveform (N,) or (N, channels) float32, sample rate), or str
Processor = Callable[[Raw], torch.Tensor]  # decoded input → the encoder's input tensor


@dataclass(frozen=True)
class Sample:
    """One row. inputs: modality → its file (image, audio) or its text; a missing modality is absent.
    where: the row, for messages ("manifest.csv row 7")."""

    id: str
    split: str
    labels: tuple[str, ...]
    inputs: Mapping[str, Path | str]
    where: str


@dataclass(frozen=True)
class Manifest:
    """The rows of a data set, its classes (in order) and modalities (in MODALITIES order)."""

    samples: tuple[Sample, ...]
    classes: tuple[str, ...]
    multilabel: bool
    modalities: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.modalities:
            used = {m for sample in self.samples for m in sample.inputs}
            object.__setattr__(self, "modalities", tuple(m for m in MODALITIES if m in used))

    def split(self, name: str) -> tuple[Sample, ...]:
        return tuple(s for s in self.samples if s.split == name)


# ---------------------------------------------------------------------------------------------- reading


def manifest_file(folder: Path) -> Path:
    """The manifest.csv or manifest.jsonl in ``folder`` (a user error naming the folder if neither)."""
    found = [folder / name for name in MANIFEST_NAMES if (folder / name).is_file()]
    if not found:
        raise MissingFileError(f"{folder} has no {' or '.join(MANIFEST_NAMES)}; see mmdata/manifest.py for the format")
    if len(found) > 1:
        raise ConfigError(f"{folder} has both {' and '.join(p.name for p in found)}; keep one")
    return found[0]


def read_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """[(where, row)] of a manifest.csv or manifest.jsonl; where names the row for messages."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise CorruptFileError(f"{path}: cannot read it as UTF-8 text ({error})") from error
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        return [(f"{path.name} row {n}", row) for n, row in enumerate(reader, start=2)]
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise CorruptFileError(f"{path.name} line {n}: not valid JSON ({error})") from error
        if not isinstance(row, dict):
            raise CorruptFileError(f"{path.name} line {n}: expected a JSON object, got {type(row).__name__}")
        rows.append((f"{path.name} line {n}", row))
    return rows


def read_manifest(folder: str | Path) -> Manifest:
    """The checked Manifest of a manifest folder (see the module docstring); val carved if absent."""
    folder = Path(folder)
    path = manifest_file(folder)
    rows = read_rows(path)
    if not rows:
        raise CorruptFileError(f"{path}: no rows")
    columns = set().union(*(row.keys() for _, row in rows))
    missing_columns = [c for c in ("id", "split") if c not in columns]
    if missing_columns or not columns & {"label", "labels"}:
        raise CorruptFileError(
            f"{path}: needs columns id, split and label (or labels, for multi-label); it has {sorted(columns)}"
        )
    multilabel = "labels" in columns
    samples = [_sample(where, row, folder, multilabel) for where, row in rows]
    classes_path = folder / CLASSES_NAME
    classes = tuple(_read_classes(classes_path)) if classes_path.is_file() else None
    return checked(samples, classes, multilabel, str(path))


def _sample(where: str, row: Mapping[str, Any], folder: Path, multilabel: bool) -> Sample:
    """One row as a Sample; cells are stripped, empty ones are missing modalities."""

    def cell(column: str) -> Any:
        value = row.get(column)
        return value.strip() if isinstance(value, str) else value

    if multilabel:
        value = row.get("labels")
        names = value if isinstance(value, list) else (value or "").split(LABEL_SEPARATOR)
        labels = tuple(str(n).strip() for n in names if str(n).strip())
    else:
        labels = (str(cell("label") or ""),)
    inputs: dict[str, Path | str] = {}
    for modality in FILE_MODALITIES:
        if cell(modality):
            inputs[modality] = _resolve(folder, cell(modality))
    if cell("text") and cell("text_file"):
        raise CorruptFileError(f"{where}: has both text and text_file; give one")
    if cell("text"):
        inputs["text"] = str(cell("text"))
    elif cell("text_file"):
        inputs["text"] = _read_text_file(_resolve(folder, cell("text_file")), where)
    return Sample(str(cell("id") or ""), str(cell("split") or ""), labels, inputs, where)


def _resolve(folder: Path, name: str) -> Path:
    path = Path(name).expanduser()
    return path if path.is_absolute() else folder / path


def _read_text_file(path: Path, where: str) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError as error:
        raise MissingFileError(f"{where}, column text_file: {path} does not exist") from error
    except (OSError, UnicodeDecodeError) as error:
        raise CorruptFileError(f"{where}, column text_file: cannot read {path} as UTF-8 text ({error})") from error


def _read_classes(path: Path) -> list[str]:
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(set(names)) != len(names):
        raise CorruptFileError(f"{path}: a class name is listed twice")
    return names


def checked(
    samples: Sequence[Sample], classes: Sequence[str] | None, multilabel: bool, source: str, val_seed: int = 0
) -> Manifest:
    """A Manifest of ``samples`` once each passes the checks (every problem names its row and column):
    a known split, known labels (of ``classes`` when given, else the sorted names used), exactly one label
    unless ``multilabel``, at least one modality, files that exist, ids used once. Without val rows,
    VAL_FRACTION of train becomes val (carve_validation, ``val_seed``)."""
    seen: dict[str, str] = {}
    for sample in samples:
        if not sample.id:
            raise CorruptFileError(f"{sample.where}: empty id")
        if sample.id in seen:
            raise CorruptFileError(f"{sample.where}: id {sample.id!r} is used again (first at {seen[sample.id]})")
        seen[sample.id] = sample.where
        if sample.split not in SPLITS:
            raise CorruptFileError(f"{sample.where}, column split: unknown split {sample.split!r}; use {SPLITS}")
        if not multilabel and (len(sample.labels) != 1 or not sample.labels[0]):
            raise CorruptFileError(f"{sample.where}, column label: empty; every sample needs its class")
        if not sample.inputs:
            raise CorruptFileError(
                f"{sample.where}: every modality is missing ({', '.join(MODALITIES)} all empty); drop the row"
            )
        for modality, source_file in sample.inputs.items():
            if modality in FILE_MODALITIES and not Path(source_file).is_file():
                raise MissingFileError(f"{sample.where}, column {modality}: {source_file} does not exist")
    names = sorted({n for s in samples for n in s.labels}) if classes is None else list(classes)
    known = set(names)
    for sample in samples:
        unknown = [n for n in sample.labels if n not in known]
        if unknown:
            column = "labels" if multilabel else "label"
            raise CorruptFileError(
                f"{sample.where}, column {column}: unknown class {unknown[0]!r}, not one of the {len(names)} "
                f"classes (a manifest's {CLASSES_NAME} lists them)"
            )
    if len(names) < 2:
        raise CorruptFileError(f"{source}: {len(names)} class(es); a classification task needs at least two")
    splits = {s.split for s in samples}
    if "train" not in splits or "test" not in splits:
        raise CorruptFileError(f"{source}: needs train and test rows; it has {sorted(splits)}")
    if "val" not in splits:
        samples = carve_validation(samples, VAL_FRACTION, val_seed)
    return Manifest(tuple(samples), tuple(names), multilabel)


def carve_validation(samples: Sequence[Sample], fraction: float, seed: int) -> list[Sample]:
    """``samples`` with round(fraction · |train|) train samples moved to val: a permutation of the train
    ids in sorted order, drawn with ``seed`` (the same ids whatever the row order)."""
    train = sorted(s.id for s in samples if s.split == "train")
    order = np.random.default_rng(seed).permutation(len(train))
    moved = {train[i] for i in order[: round(fraction * len(train))]}
    return [replace(s, split="val") if s.id in moved else s for s in samples]


# ---------------------------------------------------------------------------------------------- decoding


def decode(modality: str, source: Path | str, where: str) -> Raw:
    """One input decoded with a well-kept library: an image → PIL image (loaded), audio → (waveform
    float32 (N,) or (N, channels), sample rate) by soundfile, text → itself. An unreadable file is a
    CorruptFileError naming ``where`` and the column."""
    if modality == "text":
        return source
    try:
        if modality == "image":
            from PIL import Image

            with Image.open(source) as image:
                image.load()
                return image.copy()
        import soundfile

        waveform, rate = soundfile.read(source, dtype="float32")
        if waveform.size == 0:
            raise ValueError("no samples")
        return waveform, rate
    except FileNotFoundError as error:
        raise MissingFileError(f"{where}, column {modality}: {source} does not exist") from error
    except Exception as error:  # Pillow and libsndfile raise many types for a damaged file
        raise CorruptFileError(f"{where}, column {modality}: cannot read {source} ({error})") from error


class ManifestSplit(Dataset):
    """One split of a Manifest, each modality's decoded input turned into its encoder's input by
    ``processors`` (modality → Processor; default: the decoded input as it is).

    present: (N, M) bool, the modalities each sample has (M: the manifest's modalities, in order), known
    without decoding anything; labels: (N,) int64, or (N, C) float32 multi-hot for a multi-label task."""

    def __init__(self, manifest: Manifest, split: str, processors: Mapping[str, Processor] | None = None) -> None:
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; use one of {SPLITS}")
        self.manifest, self.split = manifest, split
        self.samples = manifest.split(split)
        self.modalities, self.classes, self.multilabel = manifest.modalities, manifest.classes, manifest.multilabel
        self.processors = dict(processors or {})
        self.present = torch.tensor([[m in s.inputs for m in self.modalities] for s in self.samples], dtype=torch.bool)
        self.present = self.present.reshape(len(self.samples), len(self.modalities))
        index = {name: i for i, name in enumerate(self.classes)}
        if self.multilabel:
            self.labels = torch.zeros(len(self.samples), len(self.classes))
            for row, sample in enumerate(self.samples):
                self.labels[row, [index[n] for n in sample.labels]] = 1.0
        else:
            self.labels = torch.tensor([index[s.labels[0]] for s in self.samples], dtype=torch.long)
        self._blanks = {m: self._blank(m) for m in self.modalities} if self.processors else {}

    def processed(self, processors: Mapping[str, Processor]) -> ManifestSplit:
        """This split with its inputs turned into encoder inputs by ``processors``."""
        return ManifestSplit(self.manifest, self.split, processors)

    def _blank(self, modality: str) -> torch.Tensor:
        """Zeros shaped like ``modality``'s processed input (of its first sample anywhere in the manifest)."""
        first = next(s for s in self.manifest.samples if modality in s.inputs)
        return torch.zeros_like(self._input(first, modality))

    def _input(self, sample: Sample, modality: str) -> Raw:
        raw = decode(modality, sample.inputs[modality], sample.where)
        processor = self.processors.get(modality)
        return raw if processor is None else processor(raw)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = self.samples[i]
        item: dict[str, Any] = {
            m: self._input(sample, m) if m in sample.inputs else self._blanks.get(m) for m in self.modalities
        }
        return item | {"present": self.present[i], "label": self.labels[i]}


# ---------------------------------------------------------------------------------------------- writing


def write_manifest(manifest: Manifest, folder: str | Path) -> Path:
    """``folder``/manifest.csv (atomically) and classes.txt of ``manifest``: file paths relative to
    ``folder`` where they lie inside it, texts inline. Returns the manifest's path."""
    folder = Path(folder).resolve()
    label_column = "labels" if manifest.multilabel else "label"
    columns = ["id", "split", label_column, *manifest.modalities]
    lines: list[list[str]] = [columns]
    for sample in manifest.samples:
        cells = [sample.id, sample.split, LABEL_SEPARATOR.join(sample.labels)]
        for modality in manifest.modalities:
            value = sample.inputs.get(modality, "")
            cells.append(_relative(Path(value), folder) if modality in FILE_MODALITIES and value else str(value))
        lines.append(cells)
    path = folder / MANIFEST_NAMES[0]
    write_text(path, _csv_text(lines))
    write_text(folder / CLASSES_NAME, "".join(f"{name}\n" for name in manifest.classes))
    return path


def _relative(path: Path, folder: Path) -> str:
    resolved = path.resolve()
    return str(resolved.relative_to(folder)) if resolved.is_relative_to(folder) else str(resolved)


def _csv_text(rows: Iterable[list[str]]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue()


# ---------------------------------------------------------------------------------------------- data sets


def manifest_dataset(
    split: str, data_dir: str | Path | None = None, processors: Mapping[str, Processor] | None = None
) -> ManifestSplit:
    """--dataset manifest: ``split`` of the manifest folder ``data_dir`` (see the module docstring)."""
    if data_dir is None:
        raise ConfigError("--dataset manifest needs --data-dir FOLDER, the folder of manifest.csv or manifest.jsonl")
    return ManifestSplit(read_manifest(data_dir), split, processors)


def describe(manifest: Manifest) -> str:
    """One line per split: samples, and how many lack each modality."""
    lines = []
    for split in SPLITS:
        samples = manifest.split(split)
        missing = {m: sum(m not in s.inputs for s in samples) for m in manifest.modalities}
        lines.append(f"{split}: {len(samples)} samples; missing " + ", ".join(f"{m} {n}" for m, n in missing.items()))
    kind = "multi-label" if manifest.multilabel else "single-label"
    return f"{len(manifest.classes)} classes ({kind}), modalities {', '.join(manifest.modalities)}\n" + "\n".join(lines)


def check_files(manifest: Manifest) -> int:
    """Decode every input of ``manifest`` once (raising on the first unreadable one); returns the count."""
    count = 0
    for sample in manifest.samples:
        for modality, source in sample.inputs.items():
            decode(modality, source, sample.where)
            count += 1
    return count


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m mmdata.manifest", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["check"], help="check: read the manifest and decode every file once")
    parser.add_argument("folder", help="the folder of manifest.csv or manifest.jsonl")
    parser.add_argument("--debug", action="store_true", help="tracebacks for user errors")
    args = parser.parse_args(argv)
    data = read_manifest(args.folder)
    print(describe(data))
    print(f"decoded {check_files(data)} inputs: every file reads")


if __name__ == "__main__":
    run_command(main)
