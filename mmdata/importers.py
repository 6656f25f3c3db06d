"""Importers: the benchmark layouts users already have, read into a checked manifest (mmdata.manifest).

Each importer lists the layout's folders (one directory listing per folder, no stat per file), builds
one Sample per clip, image or movie, and hands them to ``manifest.checked``, so a repeated id, a
missing file and a sample with nothing in it are reported as for a hand-written manifest. A missing
modality is real missingness: the sample keeps its row with that input absent. File paths are
absolute (ROOT resolved); texts are inline, their whitespace collapsed to single spaces (web-page
and title texts carry layout whitespace, and U+2028-style separators would break a manifest row).
A layout without val rows gets VAL_FRACTION of train carved out as val by ``checked`` (``val_seed``).

CREMA-D, as the OGM-GE code (GeWu-Lab/OGM-GE_CVPR2022, dataset/CramedDataset.py) prepares it:
    ROOT/train.csv, ROOT/test.csv   rows ``1041_TIE_NEU_XX,NEU`` (clip id, emotion); no header, but a
                                    first row whose second cell is not an emotion and whose first
                                    names no clip (``id,label``) is a header, skipped; UTF-8, BOM or not
    audio   ROOT/AudioWAV/{id}.wav  (OGM-GE's --audio_path); also AudioWAV/AudioWAV (the Kaggle
                                    archive unpacks one level deeper) and audio/ (the tree of OGM-GE's
                                    pre-processing README): the first of these holding a .wav
    frames  ROOT/Image-01-FPS/{id}/*.jpg (OGM-GE's --visual_path is ROOT, then Image-{fps:02d}-FPS);
            also any Image-NN-FPS, directly in ROOT or in ROOT/visual (in sorted order, so 01 first),
            then ROOT/visual/{id}/ (the pre-processing README's tree): the first holding a clip folder
    ``audio_dir`` / ``frames_dir`` (CLI --audio-dir, --frames-dir; relative to ROOT) override the search.
    Classes NEU HAP SAD FEA DIS ANG, in OGM-GE's class_dict order, so label ids match its code.
    The image is one frame per clip: the middle one (index n // 2) of the clip's .jpg/.jpeg files in
    sorted name order (frame_00002.jpg of three): the middle of the utterance, the same in every epoch
    and split (OGM-GE draws its frames at random). A clip without a wav lacks audio, one without frames
    (no folder, or an empty one) lacks the image; a clip with neither is an error naming its row.
    Splits: train and test; val carved from train.

UPMC Food-101 (Wang et al. 2015; the layout of YiLunLee/missing_aware_prompts DATA.md and Kaggle):
    images  ROOT/images/{train,test}/{class}/{class}_{n}.jpg (also .jpeg, .png)
    texts   ROOT/texts/{train,test}_titles.csv, rows (image file name, title, class), as Kaggle ships
            them: no header, but a first row whose last cell is not a class and whose first names no
            image is a header; a row with more than three cells (unquoted commas in the title) has
            its middle cells joined back with commas; a folder named texts_txt holding the csv files
            works the same.
            Or, when there is no such csv: one text per image, {texts_txt or texts}/{class}/{stem}.txt
            (the original distribution's page texts, as facebookresearch/mmbt reads them), or the same
            with a {train,test}/ level; read as UTF-8, undecodable bytes replaced (scraped pages).
    Classes: the sorted class folder names of images/train and images/test (101). The id is the
    image file's stem (apple_pie_0; unique across splits in UPMC Food-101). An image without a text
    lacks the text; a csv row (or split-level .txt) whose image is not there lacks the image; a .txt
    without split level and without an image in either split has no split and is left out (counted
    in the notes). A csv class that is not an image folder is an error naming the row.

MM-IMDb (Arevalo et al. 2017; the layout of missing_aware_prompts DATA.md):
    ROOT/images/{id}.jpeg (also .jpg), ROOT/labels/{id}.json, ROOT/split.json {"train": [ids],
    "dev": [ids], "test": [ids]} ("dev", or "val", becomes val); the original archive's single
    ROOT/dataset/ folder of {id}.jpeg + {id}.json is accepted too.
    Multi-label over MMIMDB_GENRES, the paper's 23 genres in its order (by frequency, as every public
    loader lists them); a label file's other genres (Adult, News, Reality-TV, Talk-Show) are dropped,
    counted in the notes, and a movie left with none keeps an all-zero label vector.
    ``plot``: a list of plots or one string. One sample per movie (so that the missing rate is per
    movie, unlike loaders that make one sample per plot): its text is the plots joined by a newline
    (the text encoder's tokenizer truncates). No plot → text missing; no image → image missing; a
    movie of split.json without a label file is an error naming its entry.

Data sets ``cremad``, ``food101``, ``mmimdb`` (``--dataset NAME --data-dir ROOT``) import on every
call, three times a run; for the large layouts import once with the CLI and train on the manifest:
``python -m mmdata.importers {cremad,food101,mmimdb} ROOT --out FOLDER`` writes FOLDER/manifest.csv
and classes.txt (inspect or edit them), then ``--dataset manifest --data-dir FOLDER``.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lowrank_util.cli import ArgumentParser, run_command
from lowrank_util.errors import ConfigError, CorruptFileError, MissingFileError
from mmdata.manifest import Manifest, ManifestSplit, Processor, Sample, checked, describe, write_manifest

CREMAD_CLASSES = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")  # OGM-GE's class_dict order
CREMAD_SPLITS = ("train", "test")  # ROOT/{split}.csv
CREMAD_AUDIO_DIRS = ("AudioWAV", "AudioWAV/AudioWAV", "audio")  # OGM-GE, Kaggle, pre-processing README
CREMAD_FPS_GLOB = "Image-*-FPS"  # OGM-GE's Image-{fps:02d}-FPS
CREMAD_VISUAL_DIR = "visual"  # pre-processing README: visual/{clip}/frames
FRAME_SUFFIXES = (".jpg", ".jpeg")
FOOD101_SPLITS = ("train", "test")
FOOD101_TEXT_DIRS = ("texts", "texts_txt")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MMIMDB_GENRES = (
    "Drama", "Comedy", "Romance", "Thriller", "Crime", "Action", "Adventure", "Horror", "Documentary", "Mystery",
    "Sci-Fi", "Fantasy", "Family", "Biography", "War", "History", "Music", "Animation", "Musical", "Western",
    "Sport", "Short", "Film-Noir",
)  # fmt: skip
MMIMDB_SPLITS = {"train": "train", "dev": "val", "val": "val", "test": "test"}  # split.json key → split
MMIMDB_FOLDERS = (("images", "labels"), ("dataset", "dataset"))  # (images, label files): DATA.md, archive
MMIMDB_IMAGE_SUFFIXES = (".jpeg", ".jpg")  # the first wins when a movie has both

Notes = list[str] | None  # where an importer appends what it chose and what it left out, for the CLI


# ---------------------------------------------------------------------------------------------- listing


def _entries(folder: Path) -> dict[str, bool]:
    """name → is a folder, for every entry of ``folder`` (one listing; no stat per entry on most file
    systems); {} when ``folder`` is not a folder."""
    try:
        with os.scandir(folder) as listing:
            return {entry.name: entry.is_dir() for entry in listing}
    except (FileNotFoundError, NotADirectoryError):
        return {}


def _files(folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    """stem → path of the files of ``folder`` ending in one of ``suffixes`` (any case); for a stem with
    several, the earliest suffix of ``suffixes``."""
    rank = {suffix: i for i, suffix in enumerate(suffixes)}
    named = [
        Path(name) for name, is_dir in _entries(folder).items() if not is_dir and Path(name).suffix.lower() in rank
    ]
    return {path.stem: folder / path for path in sorted(named, key=lambda p: rank[p.suffix.lower()], reverse=True)}


def _folders(folder: Path) -> list[str]:
    """The sorted names of ``folder``'s sub-folders."""
    return sorted(name for name, is_dir in _entries(folder).items() if is_dir)


def _root(root: str | Path, layout: str) -> Path:
    path = Path(root).expanduser().resolve()
    if not path.is_dir():
        raise MissingFileError(
            f"{path} is not a folder; pass the root of the {layout} layout (see mmdata/importers.py)"
        )
    return path


def _choose(
    root: Path, given: str | None, candidates: Iterable[str], holds: Callable[[Path], bool], what: str, fix: str
) -> Path:
    """``root``/``given`` if given (it must be a folder), else the first candidate folder that ``holds`` what
    is needed; ``what`` names the folder and ``fix`` the remedy in the message when none does."""
    if given is not None:
        if not (root / given).is_dir():
            raise MissingFileError(f"{root / given} (the {what} folder given) is not a folder")
        return root / given
    tried = list(candidates)
    found = next((root / name for name in tried if holds(root / name)), None)
    if found is None:
        raise MissingFileError(f"{root}: no {what} folder (looked for {', '.join(tried)}); {fix}")
    return found


# ---------------------------------------------------------------------------------------------- reading


def _csv_rows(path: Path) -> list[tuple[int, list[str]]]:
    """(row number from 1, cells as written) of the non-blank rows of ``path`` (UTF-8, BOM or not)."""
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist; the layout needs it (see mmdata/importers.py)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise CorruptFileError(f"{path}: cannot read it as UTF-8 text ({error})") from error
    rows = enumerate(csv.reader(io.StringIO(text, newline="")), start=1)
    return [(n, cells) for n, cells in rows if "".join(cells).strip()]


def _data_rows(path: Path, width: int, is_item: Callable[[list[str]], bool]) -> list[tuple[int, list[str]]]:
    """The rows of csv ``path``, each of at least ``width`` cells, less a header: a first row whose stripped
    cells are not ``is_item`` (its label is not a class and it names nothing of the layout)."""
    rows = _csv_rows(path)
    if rows and len(rows[0][1]) >= width and not is_item([cell.strip() for cell in rows[0][1]]):
        rows = rows[1:]
    for n, cells in rows:
        if len(cells) < width:
            raise CorruptFileError(f"{path.name} row {n}: {len(cells)} cell(s), expected {width}: {','.join(cells)}")
    return rows


def _read_json(path: Path, where: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise MissingFileError(f"{where}: {path} does not exist") from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptFileError(f"{where}: {path} is not readable JSON ({error})") from error


def _clean(text: str) -> str:
    """``text`` with every run of whitespace (newlines and Unicode separators too) as one space."""
    return " ".join(text.split())


def _note(notes: Notes, line: str) -> None:
    if notes is not None:
        notes.append(line)


# ---------------------------------------------------------------------------------------------- CREMA-D


def import_cremad(
    root: str | Path,
    audio_dir: str | None = None,
    frames_dir: str | None = None,
    val_seed: int = 0,
    notes: Notes = None,
) -> Manifest:
    """The checked Manifest of a CREMA-D folder in the OGM-GE layout (see the module docstring)."""
    root = _root(root, "CREMA-D")
    audio = _choose(
        root, audio_dir, CREMAD_AUDIO_DIRS, lambda f: bool(_files(f, (".wav",))), "audio", "pass --audio-dir FOLDER"
    )
    fps = sorted(
        str(p.relative_to(root)) for base in (root, root / CREMAD_VISUAL_DIR) for p in base.glob(CREMAD_FPS_GLOB)
    )
    frames = _choose(
        root, frames_dir, [*fps, CREMAD_VISUAL_DIR], lambda f: bool(_folders(f)), "frames", "pass --frames-dir FOLDER"
    )
    wavs, clips = _files(audio, (".wav",)), set(_folders(frames))

    def is_clip(cells: list[str]) -> bool:
        return cells[1] in CREMAD_CLASSES or cells[0] in wavs or cells[0] in clips

    samples = []
    for split in CREMAD_SPLITS:
        path = root / f"{split}.csv"
        for n, cells in _data_rows(path, 2, is_clip):
            clip, label = cells[0].strip(), cells[1].strip()
            where = f"{path.name} row {n}"
            if label not in CREMAD_CLASSES:
                raise CorruptFileError(f"{where}, column 2: unknown emotion {label!r}; CREMA-D's are {CREMAD_CLASSES}")
            frame = _middle_frame(frames / clip) if clip in clips else None
            inputs: dict[str, Path | str] = {"image": frame} if frame else {}
            if clip in wavs:
                inputs["audio"] = wavs[clip]
            if not inputs:
                raise MissingFileError(
                    f"{where}: clip {clip} has neither {audio / clip}.wav nor frames in {frames / clip}; "
                    "fix the folders (--audio-dir, --frames-dir) or drop the row"
                )
            samples.append(Sample(clip, split, (label,), inputs, where))
    _note(notes, f"audio from {audio}; image: the middle frame of each clip folder in {frames}")
    return checked(samples, CREMAD_CLASSES, False, str(root), val_seed)


def _middle_frame(clip: Path) -> Path | None:
    """The middle frame (index n // 2 in sorted name order) of a clip folder; None if it has none."""
    frames = sorted(_files(clip, FRAME_SUFFIXES).values())
    return frames[len(frames) // 2] if frames else None


# ---------------------------------------------------------------------------------------------- UPMC Food-101

Images = Mapping[str, Mapping[str, Path]]  # class → image stem → path, of one split


def import_food101(root: str | Path, val_seed: int = 0, notes: Notes = None) -> Manifest:
    """The checked Manifest of a UPMC Food-101 folder (see the module docstring)."""
    root = _root(root, "UPMC Food-101")
    images: dict[str, Images] = {}
    for split in FOOD101_SPLITS:
        folder = root / "images" / split
        images[split] = {label: _files(folder / label, IMAGE_SUFFIXES) for label in _folders(folder)}
    classes = sorted({label for by_class in images.values() for label in by_class})
    if not classes:
        raise MissingFileError(f"{root}: no class folders in images/train or images/test; is it the dataset's root?")
    titles = next((root / d for d in FOOD101_TEXT_DIRS if any((root / d).glob("*_titles.csv"))), None)
    if titles is None:
        samples = _food101_pages(root, images, classes, notes)
    else:
        samples = [s for split in FOOD101_SPLITS for s in _food101_titles(titles, split, images[split])]
        _note(notes, f"texts: the titles of {titles}/{{train,test}}_titles.csv")
    return checked(samples, classes, False, str(root), val_seed)


def _food101_titles(folder: Path, split: str, images: Images) -> list[Sample]:
    """One split's samples: one per csv row (with its image, if there), then one per image no row names."""
    path = folder / f"{split}_titles.csv"

    def is_image(cells: list[str]) -> bool:
        return cells[-1] in images or any(Path(cells[0]).stem in by_stem for by_stem in images.values())

    samples, named = [], set()
    for n, cells in _data_rows(path, 3, is_image):
        stem, label, text = Path(cells[0].strip()).stem, cells[-1].strip(), _clean(",".join(cells[1:-1]))
        where = f"{path.name} row {n}"
        if label not in images:
            raise CorruptFileError(f"{where}, column 3: class {label!r} is not a folder of images/{split}")
        named.add((label, stem))
        inputs: dict[str, Path | str] = {"text": text} if text else {}
        if stem in images[label]:
            inputs["image"] = images[label][stem]
        samples.append(Sample(stem, split, (label,), inputs, where))
    for label, by_stem in images.items():
        samples += [_image_only(split, label, image) for stem, image in by_stem.items() if (label, stem) not in named]
    return samples


def _image_only(split: str, label: str, image: Path, text: str = "") -> Sample:
    """A Food-101 sample of ``image`` (and ``text``, if any), named by its path in the layout."""
    inputs: dict[str, Path | str] = {"image": image, "text": text} if text else {"image": image}
    return Sample(image.stem, split, (label,), inputs, f"images/{split}/{label}/{image.name}")


def _food101_pages(root: Path, images: Mapping[str, Images], classes: Sequence[str], notes: Notes) -> list[Sample]:
    """Samples with one .txt per image: {texts_txt|texts}/[{train,test}/]{class}/{stem}.txt."""

    def has_pages(folder: Path) -> bool:
        return any(_files(folder / label, (".txt",)) for label in classes)

    def holds(folder: Path) -> bool:
        return has_pages(folder) or all(has_pages(folder / split) for split in FOOD101_SPLITS)

    fix = "add texts/{train,test}_titles.csv, or texts_txt/{class}/{image stem}.txt"
    folder = _choose(root, None, FOOD101_TEXT_DIRS[::-1], holds, "texts", fix)
    by_split = not has_pages(folder)
    bases = {split: folder / split if by_split else folder for split in FOOD101_SPLITS}
    samples, left_out = [], 0
    for base in dict.fromkeys(bases.values()):
        splits = [split for split, b in bases.items() if b == base]  # one, or both for a split-less folder
        for label in classes:
            pages = _files(base / label, (".txt",))
            for split in splits:
                for stem, image in images[split].get(label, {}).items():
                    samples.append(_image_only(split, label, image, _read_page(pages[stem]) if stem in pages else ""))
            imaged = {stem for split in splits for stem in images[split].get(label, {})}
            orphans = {stem: page for stem, page in pages.items() if stem not in imaged}
            if not by_split:
                left_out += len(orphans)
                continue
            for stem, page in orphans.items():
                text = _read_page(page)  # an empty page without an image carries nothing: skipped
                if text:
                    samples.append(Sample(stem, splits[0], (label,), {"text": text}, str(page.relative_to(root))))
    lost = f"; {left_out} text(s) with no image in either split left out (no split to put them in)" if left_out else ""
    _note(notes, f"texts: one .txt per image in {folder}{lost}")
    return samples


def _read_page(path: Path) -> str:
    try:
        return _clean(path.read_text(encoding="utf-8", errors="replace"))
    except OSError as error:
        raise CorruptFileError(f"{path}: cannot read it ({error})") from error


# ---------------------------------------------------------------------------------------------- MM-IMDb


def import_mmimdb(root: str | Path, val_seed: int = 0, notes: Notes = None) -> Manifest:
    """The checked multi-label Manifest of an MM-IMDb folder (see the module docstring)."""
    root = _root(root, "MM-IMDb")
    split_path = root / "split.json"
    if not split_path.is_file():
        raise MissingFileError(f"{split_path} does not exist; MM-IMDb needs it (train, dev and test lists of ids)")
    splits = _read_json(split_path, "MM-IMDb")
    if not isinstance(splits, dict) or not all(isinstance(ids, list) for ids in splits.values()):
        raise CorruptFileError(f'{split_path}: expected {{"train": [ids], "dev": [ids], "test": [ids]}}')
    folders = next(((root / i, root / j) for i, j in MMIMDB_FOLDERS if (root / j).is_dir()), None)
    if folders is None:
        raise MissingFileError(f"{root}: no labels/ folder (nor the archive's dataset/); is it the dataset's root?")
    images, labelled = _files(folders[0], MMIMDB_IMAGE_SUFFIXES), _files(folders[1], (".json",))
    dropped: Counter[str] = Counter()
    samples = []
    for key, ids in splits.items():
        if key not in MMIMDB_SPLITS:
            raise CorruptFileError(f"{split_path}: unknown split {key!r}; use {', '.join(MMIMDB_SPLITS)}")
        for i, movie in enumerate(map(str, ids)):
            where = f"split.json {key}[{i}] (movie {movie})"
            if movie not in labelled:
                raise MissingFileError(f"{where}: {folders[1] / movie}.json does not exist; restore it or drop the id")
            info = _read_json(labelled[movie], where)
            genres = info.get("genres") if isinstance(info, dict) else None
            if not isinstance(genres, list):
                raise CorruptFileError(f'{where}: {labelled[movie]} has no "genres" list')
            dropped.update(str(g) for g in genres if g not in MMIMDB_GENRES)
            text = _plots(info.get("plot"), where)
            inputs: dict[str, Path | str] = {"text": text} if text else {}
            if movie in images:
                inputs["image"] = images[movie]
            samples.append(
                Sample(movie, MMIMDB_SPLITS[key], tuple(g for g in MMIMDB_GENRES if g in genres), inputs, where)
            )
    if dropped:
        unlabelled = sum(not s.labels for s in samples)
        counts = ", ".join(f"{g} {n}" for g, n in sorted(dropped.items()))
        _note(notes, f"dropped genres outside the 23: {counts}; {unlabelled} movie(s) with no genre left")
    return checked(samples, MMIMDB_GENRES, True, str(split_path), val_seed)


def _plots(plot: Any, where: str) -> str:
    """A label file's ``plot`` (a list of plots, or one) as one text: the plots joined by newlines."""
    plots = [plot or ""] if plot is None or isinstance(plot, str) else plot
    if not isinstance(plots, list) or not all(isinstance(p, str) for p in plots):
        raise CorruptFileError(f'{where}: "plot" must be a string or a list of strings')
    return "\n".join(text for text in map(_clean, plots) if text)


# ---------------------------------------------------------------------------------------------- data sets

IMPORTERS: dict[str, tuple[Callable[..., Manifest], str]] = {
    "cremad": (import_cremad, "the CREMA-D folder of train.csv, test.csv, AudioWAV/ and Image-01-FPS/"),
    "food101": (import_food101, "the UPMC Food-101 folder of images/ and texts/"),
    "mmimdb": (import_mmimdb, "the MM-IMDb folder of images/, labels/ and split.json"),
}  # name → (importer, what --data-dir is)


def _dataset(
    name: str, split: str, data_dir: str | Path | None, processors: Mapping[str, Processor] | None
) -> ManifestSplit:
    importer, root = IMPORTERS[name]
    if data_dir is None:
        raise ConfigError(f"--dataset {name} needs --data-dir ROOT, {root}")
    return ManifestSplit(importer(data_dir), split, processors)


def cremad(
    split: str, data_dir: str | Path | None = None, processors: Mapping[str, Processor] | None = None
) -> ManifestSplit:
    """--dataset cremad: ``split`` of the CREMA-D folder ``data_dir`` (OGM-GE layout)."""
    return _dataset("cremad", split, data_dir, processors)


def food101(
    split: str, data_dir: str | Path | None = None, processors: Mapping[str, Processor] | None = None
) -> ManifestSplit:
    """--dataset food101: ``split`` of the UPMC Food-101 folder ``data_dir``."""
    return _dataset("food101", split, data_dir, processors)


def mmimdb(
    split: str, data_dir: str | Path | None = None, processors: Mapping[str, Processor] | None = None
) -> ManifestSplit:
    """--dataset mmimdb: ``split`` of the MM-IMDb folder ``data_dir`` (multi-label)."""
    return _dataset("mmimdb", split, data_dir, processors)


# ---------------------------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    """Import a layout, write its manifest folder, and print its summary and what was chosen or left out."""
    parser = ArgumentParser(prog="python -m mmdata.importers", description=__doc__.splitlines()[0])
    common = ArgumentParser(add_help=False)
    common.add_argument("root", type=Path, help="the layout's root folder")
    common.add_argument("--out", type=Path, required=True, help="the manifest folder to write")
    common.add_argument("--val-seed", type=int, default=0, help="seed of the val carved from train, if none")
    common.add_argument("--debug", action="store_true", help="tracebacks for user errors")
    layouts = parser.add_subparsers(dest="layout", required=True, metavar="{" + ",".join(IMPORTERS) + "}")
    for name, (_, what) in IMPORTERS.items():
        layout = layouts.add_parser(name, parents=[common], help=what, description=what)
        if name == "cremad":
            layout.add_argument("--audio-dir", help="the wav folder, relative to ROOT (default: searched)")
            layout.add_argument("--frames-dir", help="the folder of per-clip frame folders (default: searched)")
    args = parser.parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k in ("audio_dir", "frames_dir")}
    notes: list[str] = []
    manifest = IMPORTERS[args.layout][0](args.root, val_seed=args.val_seed, notes=notes, **options)
    path = write_manifest(manifest, args.out)
    print(describe(manifest))
    for line in notes:
        print(line)
    print(f"wrote {path}; train on it with --dataset manifest --data-dir {args.out}")


if __name__ == "__main__":
    run_command(main)
