"""Fixture writers: small copies, in a folder, of the data layouts that mmdata reads.

write_manifest_folder   a manifest folder (mmdata.manifest) of images, WAVs and texts whose content
                        depends on the class, so that a model can learn it: image brightness bands,
                        tone frequencies and class words (see class_image, class_tone, class_text)
write_cremad            CREMA-D as OGM-GE prepares it (mmdata.importers.import_cremad)
write_food101           UPMC Food-101 (import_food101): title csv files or one .txt per image
write_mmimdb            MM-IMDb (import_mmimdb): MOVIES by default, one movie per case the importer handles
write_tiny_bert         a small random BERT checkpoint with a word-level tokenizer.json of the fixture words
write_jpeg, write_wav   one file each

Every writer is deterministic (``seed``) and returns what a test needs to name the samples it wrote.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image

from mmdata.importers import CREMAD_CLASSES
from mmdata.manifest import MODALITIES, Manifest, Sample, read_manifest, write_manifest
from models import Bert, BertConfig

DARK, BRIGHT = 40, 210  # pixel levels of class_image's bands: far apart, so JPEG noise cannot blur them
FILLER = ("a", "small", "plain", "example", "of", "the", "data", "here")  # class_text's words around the class
TONE_CEILING = 0.4  # class_tone's highest frequency, as a fraction of the sample rate (Nyquist is 0.5)


def write_jpeg(path: Path, pixels: np.ndarray) -> Path:
    """``pixels`` (H, W, 3) uint8 as a JPEG at ``path`` (folders made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8), "RGB").save(path, quality=95)
    return path


def write_wav(path: Path, waveform: np.ndarray, rate: int) -> Path:
    """``waveform`` (N,) float in [-1, 1] as a 16-bit WAV at ``path`` (folders made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, waveform, rate, subtype="PCM_16")
    return path


def csv_text(rows: Sequence[Sequence[str]]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue()


# ---------------------------------------------------------------------------------------------- content


def class_image(labels: Sequence[int], n_classes: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) uint8: the rows fall into ``n_classes`` horizontal bands, bright for each class in
    ``labels`` and dark for the others, plus a little noise (needs size ≥ n_classes)."""
    levels = np.full(n_classes, DARK)
    levels[list(labels)] = BRIGHT
    rows = np.repeat(levels, [len(band) for band in np.array_split(np.arange(size), n_classes)])
    noise = rng.integers(-10, 11, (size, size, 3))
    return np.clip(rows[:, None, None] + noise, 0, 255).astype(np.uint8)


def class_tone(labels: Sequence[int], n_classes: int, rate: int, seconds: float, rng: np.random.Generator):
    """(N,) float32: the sum of one sine per class in ``labels``, class c at (c + 1) · TONE_CEILING · rate /
    n_classes Hz, plus a little noise, peak 0.5."""
    t = np.arange(round(rate * seconds)) / rate
    base = TONE_CEILING * rate / n_classes
    wave = sum(np.sin(2 * np.pi * base * (c + 1) * t) for c in labels) + 0.05 * rng.standard_normal(len(t))
    return (0.5 * wave / np.abs(wave).max()).astype(np.float32)


def class_text(names: Sequence[str], rng: np.random.Generator) -> str:
    """A few FILLER words around the class names: 'the plain cat and dog here'."""
    before, after = rng.choice(FILLER, 2), rng.choice(FILLER, 2)
    return " ".join([*before, " and ".join(names), *after])


# ---------------------------------------------------------------------------------------------- manifest folder


def write_manifest_folder(
    folder: Path,
    modalities: Sequence[str] = MODALITIES,
    per_class: int | Mapping[str, int] = 4,
    classes: Sequence[str] = ("cat", "dog"),
    missing: Mapping[str, float] | None = None,
    multilabel: bool = False,
    sample_rate: int = 16_000,
    image_size: int = 16,
    seconds: float = 0.25,
    seed: int = 0,
) -> Manifest:
    """``folder``/manifest.csv + classes.txt (written by mmdata.manifest.write_manifest) with image/{id}.jpg,
    audio/{id}.wav and inline texts; returns the manifest read back.

    per_class: samples per class in each split (an int: in train, val and test alike; a mapping may
    leave val out, which the reader then carves from train). missing: modality → the fraction of all
    samples without it, drawn by ``seed`` among the samples that keep another modality (never all
    missing). multilabel: a ``labels`` column; every other sample of class c also has class c + 1."""
    rng = np.random.default_rng(seed)
    counts = per_class if isinstance(per_class, Mapping) else dict.fromkeys(("train", "val", "test"), per_class)
    rows = [
        (f"{split}-{name}-{i}", split, (c, (c + 1) % len(classes)) if multilabel and i % 2 else (c,))
        for split, count in counts.items()
        for c, name in enumerate(classes)
        for i in range(count)
    ]
    present = {sample_id: set(modalities) for sample_id, _, _ in rows}
    for modality, fraction in (missing or {}).items():
        candidates = sorted(i for i, kept in present.items() if modality in kept and len(kept) > 1)
        for sample_id in rng.permutation(candidates)[: round(fraction * len(rows))]:
            present[sample_id].discard(modality)
    samples = []
    for sample_id, split, labels in rows:
        inputs: dict[str, Path | str] = {}
        if "image" in present[sample_id]:
            image = class_image(labels, len(classes), image_size, rng)
            inputs["image"] = write_jpeg(folder / "image" / f"{sample_id}.jpg", image)
        if "audio" in present[sample_id]:
            tone = class_tone(labels, len(classes), sample_rate, seconds, rng)
            inputs["audio"] = write_wav(folder / "audio" / f"{sample_id}.wav", tone, sample_rate)
        if "text" in present[sample_id]:
            inputs["text"] = class_text([classes[c] for c in labels], rng)
        samples.append(Sample(sample_id, split, tuple(classes[c] for c in labels), inputs, sample_id))
    write_manifest(Manifest(tuple(samples), tuple(classes), multilabel), folder)
    return read_manifest(folder)


# ---------------------------------------------------------------------------------------------- CREMA-D


def write_cremad(
    root: Path,
    per_class: Mapping[str, int] | None = None,
    missing: Mapping[int, Sequence[str]] | None = None,
    frames: int = 3,
    header: bool = False,
    audio_dir: str = "AudioWAV",
    frames_dir: str = "Image-01-FPS",
    sample_rate: int = 16_000,
    seed: int = 0,
) -> list[tuple[str, str, str]]:
    """ROOT/{train,test}.csv, ROOT/``audio_dir``/{clip}.wav and ROOT/``frames_dir``/{clip}/frame_0000k.jpg
    (frame k has brightness 40·k, so a test can tell which one was chosen); returns the clips in csv
    order, [(clip, emotion, split)].

    per_class: clips per emotion in each split (default 2 in train, 1 in test). missing: clip number
    → what it lacks, "audio" and/or "image" (no wav; no frame folder)."""
    rng = np.random.default_rng(seed)
    counts = per_class or {"train": 2, "test": 1}
    order = [(split, label) for split, count in counts.items() for label in CREMAD_CLASSES for _ in range(count)]
    clips = [(f"{1001 + k}_TIE_{label}_XX", label, split) for k, (split, label) in enumerate(order)]
    for k, (clip, label, _) in enumerate(clips):
        lacks = (missing or {}).get(k, ())
        c = CREMAD_CLASSES.index(label)
        if "audio" not in lacks:
            write_wav(
                root / audio_dir / f"{clip}.wav",
                class_tone([c], len(CREMAD_CLASSES), sample_rate, 0.1, rng),
                sample_rate,
            )
        for i in range(frames if "image" not in lacks else 0):
            write_jpeg(root / frames_dir / clip / f"frame_{i + 1:05d}.jpg", np.full((8, 8, 3), 40 * (i + 1)))
    for split in counts:
        lines = [["name", "emotion"]] * header + [[clip, label] for clip, label, s in clips if s == split]
        (root / f"{split}.csv").write_text(csv_text(lines), encoding="utf-8")
    return clips


# ---------------------------------------------------------------------------------------------- UPMC Food-101

FOOD_CLASSES = ("apple_pie", "baby_back_ribs", "baklava")


def write_food101(
    root: Path,
    classes: Sequence[str] = FOOD_CLASSES,
    per_class: Mapping[str, int] | None = None,
    missing: Mapping[int, str] | None = None,
    texts: str = "titles",
    header: bool = False,
    seed: int = 0,
) -> list[tuple[str, str, str]]:
    """ROOT/images/{split}/{class}/{class}_{n}.jpg and their texts; returns [(stem, class, split)].

    texts: "titles" → ROOT/texts/{split}_titles.csv rows (file, title, class) (``header``: with a header
    row); "pages" → ROOT/texts_txt/{class}/{stem}.txt; "split-pages" → ROOT/texts_txt/{split}/{class}/.
    per_class: images per class in each split (default 2 in train, 1 in test; n runs on across the
    splits, as in UPMC Food-101). missing: image number → "image" (a text without its image) or "text"."""
    rng = np.random.default_rng(seed)
    counts = per_class or {"train": 2, "test": 1}
    splits = [split for split, count in counts.items() for _ in range(count)]
    items = [(f"{label}_{n}", label, split) for label in classes for n, split in enumerate(splits)]
    rows: dict[str, list[list[str]]] = {split: [["image_path", "text", "food"]] * header for split in counts}
    for k, (stem, label, split) in enumerate(items):
        lacks = (missing or {}).get(k)
        c = classes.index(label)
        if lacks != "image":
            write_jpeg(root / "images" / split / label / f"{stem}.jpg", class_image([c], len(classes), 8, rng))
        if lacks == "text":
            continue
        title = f"{class_text([label.replace('_', ' ')], rng)}, recipe"  # a comma, so the csv must quote it
        if texts == "titles":
            rows[split].append([f"{stem}.jpg", title, label])
        else:
            folder = root / "texts_txt" / (split if texts == "split-pages" else "")
            (folder / label).mkdir(parents=True, exist_ok=True)
            (folder / label / f"{stem}.txt").write_text(f"{title}\n\nmore   page text", encoding="utf-8")
    if texts == "titles":
        (root / "texts").mkdir(parents=True, exist_ok=True)
        for split, lines in rows.items():
            (root / "texts" / f"{split}_titles.csv").write_text(csv_text(lines), encoding="utf-8")
    return items


# ---------------------------------------------------------------------------------------------- MM-IMDb


@dataclass(frozen=True)
class Movie:
    """One MM-IMDb movie: its id, split.json key, genres, ``plot`` (a list, a string, or None: no key)
    and image suffix (None: no image)."""

    id: str
    split: str
    genres: tuple[str, ...]
    plot: list[str] | str | None
    image: str | None = ".jpeg"


MOVIES = (
    Movie("0000001", "train", ("Drama", "Comedy"), ["First plot.", "Second\n  plot."]),  # two plots, joined
    Movie("0000002", "train", ("Action",), "One plot, as a string.", image=".jpg"),
    Movie("0000003", "train", ("Horror", "Reality-TV"), None),  # no plot; a genre outside the 23
    Movie("0000004", "train", ("Sci-Fi", "Fantasy"), ["Space."], image=None),  # no image
    Movie("0000005", "dev", ("Film-Noir", "Music"), ["Dark."]),
    Movie("0000006", "test", ("Talk-Show",), ["Chat."]),  # no genre left
    Movie("0000007", "test", ("Drama",), []),  # an empty plot list: no text
    Movie("0000008", "test", ("Comedy", "Drama"), ["Fun."]),
)


def write_mmimdb(root: Path, movies: Sequence[Movie] = MOVIES, seed: int = 0) -> None:
    """ROOT/images/{id}.jpeg (or .jpg), ROOT/labels/{id}.json and ROOT/split.json of ``movies``."""
    rng = np.random.default_rng(seed)
    splits: dict[str, list[str]] = {}
    for movie in movies:
        splits.setdefault(movie.split, []).append(movie.id)
        label = {"genres": list(movie.genres), "title": f"Movie {movie.id}"}
        if movie.plot is not None:
            label["plot"] = movie.plot
        (root / "labels").mkdir(parents=True, exist_ok=True)
        (root / "labels" / f"{movie.id}.json").write_text(json.dumps(label), encoding="utf-8")
        if movie.image is not None:
            write_jpeg(root / "images" / f"{movie.id}{movie.image}", rng.integers(0, 256, (8, 8, 3)))
    (root / "split.json").write_text(json.dumps(splits, indent=4), encoding="utf-8")


# ---------------------------------------------------------------------------------------------- text encoder

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")  # BERT's, [PAD] = 0


def write_tiny_bert(folder: Path, words: Sequence[str] = FILLER, width: int = 32) -> Path:
    """A random 2-block BERT of ``width`` in ``folder`` (config.json, model.safetensors) with a word-level
    ``tokenizer.json`` ([CLS] text [SEP], [PAD] = 0) over ``words``: a text encoder checkpoint as
    --text-encoder takes one, in milliseconds, without the all-MiniLM-L6-v2 package."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocabulary = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *sorted(set(words))])}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    config = BertConfig(
        vocab_size=len(vocabulary), hidden_size=width, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=2 * width, max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip
    Bert(config).save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder
