"""Importers of benchmark layouts (mmdata.importers) on small fixtures (tests/layouts.py), their CLI, and
the manifest format's own errors on hand-written manifests (mmdata.manifest)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from layouts import (
    FOOD_CLASSES,
    MOVIES,
    Movie,
    csv_text,
    write_cremad,
    write_food101,
    write_jpeg,
    write_manifest_folder,
    write_mmimdb,
    write_wav,
)

from lowrank_util.cli import run_command
from lowrank_util.errors import ConfigError, CorruptFileError, MissingFileError
from mmdata import get_dataset, importers, manifest
from mmdata.importers import CREMAD_CLASSES, MMIMDB_GENRES, import_cremad, import_food101, import_mmimdb
from mmdata.manifest import Manifest, ManifestSplit, decode, read_manifest, write_manifest

IMPORT = {"cremad": (write_cremad, import_cremad), "food101": (write_food101, import_food101)}
IMPORT["mmimdb"] = (write_mmimdb, import_mmimdb)


def by_id(data: Manifest) -> dict[str, manifest.Sample]:
    return {s.id: s for s in data.samples}


def present(data: Manifest, split: str) -> dict[str, list[str]]:
    """sample id → the modalities it has, read from ManifestSplit's (N, M) mask."""
    dataset = ManifestSplit(data, split)
    return {
        s.id: [m for m, has in zip(dataset.modalities, row, strict=True) if has]
        for s, row in zip(dataset.samples, dataset.present, strict=True)
    }


def content(data: Manifest) -> list[tuple]:
    """What a manifest says, without where each row came from."""
    rows = [(s.id, s.split, s.labels, dict(s.inputs)) for s in data.samples]
    return [data.classes, data.multilabel, data.modalities, rows]


# ---------------------------------------------------------------------------------------------- CREMA-D


def test_cremad_splits_classes_labels_and_middle_frame(tmp_path):
    clips = write_cremad(tmp_path, frames=3)
    data = import_cremad(tmp_path)
    assert data.classes == CREMAD_CLASSES and not data.multilabel and data.modalities == ("image", "audio")
    sizes = {split: len(data.split(split)) for split in ("train", "val", "test")}
    assert sizes == {"train": 11, "val": 1, "test": 6}  # 12 train clips, round(0.1 · 12) carved as val
    test = ManifestSplit(data, "test")
    assert test.labels.tolist() == [CREMAD_CLASSES.index(label) for _, label, split in clips if split == "test"]
    frame = by_id(data)[clips[0][0]].inputs["image"]
    assert frame.name == "frame_00002.jpg"  # the middle of three
    assert abs(np.asarray(decode("image", frame, "here")).mean() - 80) < 3  # frame k is 40·k bright


def test_cremad_middle_frame_of_an_even_count(tmp_path):
    clips = write_cremad(tmp_path, frames=4)
    assert by_id(import_cremad(tmp_path))[clips[0][0]].inputs["image"].name == "frame_00003.jpg"  # index 4 // 2


def test_cremad_real_missingness(tmp_path):
    clips = write_cremad(tmp_path, missing={0: ["audio"], 1: ["image"]})
    for frame in (tmp_path / "Image-01-FPS" / clips[2][0]).iterdir():  # an empty frame folder: no image either
        frame.unlink()
    data = import_cremad(tmp_path)
    has = {**present(data, "train"), **present(data, "val")}
    assert has[clips[0][0]] == ["image"] and has[clips[1][0]] == ["audio"] and has[clips[2][0]] == ["audio"]
    assert has[clips[3][0]] == ["image", "audio"]


VARIANTS = [("AudioWAV", "Image-01-FPS"), ("AudioWAV/AudioWAV", "visual/Image-01-FPS"), ("audio", "Image-03-FPS")]


@pytest.mark.parametrize(("audio_dir", "frames_dir"), [*VARIANTS, ("audio", "visual")])
def test_cremad_folder_variants_and_header(tmp_path, audio_dir, frames_dir):
    write_cremad(tmp_path, audio_dir=audio_dir, frames_dir=frames_dir, header=True)
    (tmp_path / "test.csv").write_text("\ufeff" + (tmp_path / "test.csv").read_text())  # a BOM, as Excel writes
    (tmp_path / "AudioWAV").mkdir(exist_ok=True)  # an empty AudioWAV (Kaggle's outer one) is passed over
    notes: list[str] = []
    data = import_cremad(tmp_path, notes=notes)
    assert len(data.samples) == 18 and all(len(s.inputs) == 2 for s in data.samples)
    assert str(tmp_path / audio_dir) in notes[0] and str(tmp_path / frames_dir) in notes[0]


def test_cremad_folders_given(tmp_path):
    write_cremad(tmp_path, audio_dir="wavs", frames_dir="jpgs")
    with pytest.raises(MissingFileError, match=r"no audio folder .*; pass --audio-dir FOLDER"):
        import_cremad(tmp_path)
    assert len(import_cremad(tmp_path, audio_dir="wavs", frames_dir="jpgs").samples) == 18
    with pytest.raises(MissingFileError, match=r"nowhere \(the frames folder given\) is not a folder"):
        import_cremad(tmp_path, audio_dir="wavs", frames_dir="nowhere")


def test_cremad_errors_name_the_file_and_row(tmp_path):
    clips = write_cremad(tmp_path, missing={2: ["audio", "image"]})
    with pytest.raises(MissingFileError, match=rf"train.csv row 3: clip {clips[2][0]} has neither"):
        import_cremad(tmp_path)
    write_cremad(tmp_path)
    rows = (tmp_path / "train.csv").read_text().splitlines()
    (tmp_path / "train.csv").write_text("\n".join([*rows[:4], f"{clips[4][0]},BORED", *rows[5:]]))
    with pytest.raises(CorruptFileError, match=r"train.csv row 5, column 2: unknown emotion 'BORED'"):
        import_cremad(tmp_path)
    (tmp_path / "train.csv").write_text("\n".join([f"{clips[0][0]},BORED", *rows[1:]]))  # not a header: a clip
    with pytest.raises(CorruptFileError, match=r"train.csv row 1, column 2: unknown emotion 'BORED'"):
        import_cremad(tmp_path)
    (tmp_path / "train.csv").write_text("\n".join([rows[0], f"{clips[1][0]}"]))
    with pytest.raises(CorruptFileError, match=r"train.csv row 2: 1 cell\(s\), expected 2"):
        import_cremad(tmp_path)
    (tmp_path / "test.csv").unlink()
    (tmp_path / "train.csv").write_text("\n".join(rows))
    with pytest.raises(MissingFileError, match=r"test.csv does not exist"):
        import_cremad(tmp_path)


# ---------------------------------------------------------------------------------------------- UPMC Food-101


@pytest.mark.parametrize("header", [False, True])
def test_food101_titles(tmp_path, header):
    items = write_food101(tmp_path, missing={0: "image", 1: "text"}, header=header)
    data = import_food101(tmp_path)
    assert data.classes == FOOD_CLASSES and data.modalities == ("image", "text")
    assert [len(data.split(s)) for s in ("train", "val", "test")] == [5, 1, 3]
    has = {**present(data, "train"), **present(data, "val")}
    assert has["apple_pie_0"] == ["text"] and has["apple_pie_1"] == ["image"] and has["baklava_0"] == ["image", "text"]
    samples = by_id(data)
    assert "baklava" in samples["baklava_0"].inputs["text"]
    assert samples["baklava_0"].inputs["text"].endswith(", recipe")  # the quoted comma kept
    assert samples["apple_pie_0"].where == f"train_titles.csv row {1 + header}"
    assert samples["apple_pie_1"].where == "images/train/apple_pie/apple_pie_1.jpg"
    labels = ManifestSplit(data, "test").labels.tolist()
    assert labels == [FOOD_CLASSES.index(label) for _, label, split in items if split == "test"]


def test_food101_title_with_unquoted_commas(tmp_path):
    write_food101(tmp_path)
    rows = (tmp_path / "texts" / "test_titles.csv").read_text().splitlines()
    rows[0] = "apple_pie_2.jpg,Pie, apple,  with cream,apple_pie"
    (tmp_path / "texts" / "test_titles.csv").write_text("\n".join(rows))
    assert by_id(import_food101(tmp_path))["apple_pie_2"].inputs["text"] == "Pie, apple, with cream"


@pytest.mark.parametrize("texts", ["pages", "split-pages"])
def test_food101_text_per_image(tmp_path, texts):
    write_food101(tmp_path, missing={0: "image", 1: "text"}, texts=texts)
    notes: list[str] = []
    data = import_food101(tmp_path, notes=notes)
    samples = by_id(data)
    assert "baklava" in samples["baklava_2"].inputs["text"]
    assert samples["baklava_2"].inputs["text"].endswith(", recipe more page text")  # whitespace collapsed
    assert list(samples["apple_pie_1"].inputs) == ["image"]
    if texts == "pages":  # a text without an image and without a split level has no split: left out, counted
        assert "apple_pie_0" not in samples and "1 text(s) with no image" in notes[0]
    else:
        assert list(samples["apple_pie_0"].inputs) == ["text"]


def test_food101_errors(tmp_path):
    write_food101(tmp_path)
    rows = (tmp_path / "texts" / "train_titles.csv").read_text().splitlines()
    (tmp_path / "texts" / "train_titles.csv").write_text("\n".join([*rows, "pizza_1.jpg,Pizza,pizza"]))
    with pytest.raises(CorruptFileError, match=r"train_titles.csv row 7, column 3: class 'pizza' is not a folder"):
        import_food101(tmp_path)
    (tmp_path / "texts" / "train_titles.csv").write_text("\n".join(rows))
    (tmp_path / "texts" / "test_titles.csv").unlink()
    with pytest.raises(MissingFileError, match=r"texts/test_titles.csv does not exist"):
        import_food101(tmp_path)
    (tmp_path / "texts" / "train_titles.csv").unlink()
    with pytest.raises(MissingFileError, match=r"no texts folder .*; add texts/\{train,test\}_titles.csv"):
        import_food101(tmp_path)


def test_unreadable_jpeg_names_row_and_column(tmp_path):
    write_food101(tmp_path)
    (tmp_path / "images" / "test" / "baklava" / "baklava_2.jpg").write_bytes(b"not a jpeg at all")
    test = ManifestSplit(import_food101(tmp_path), "test")
    row = [s.id for s in test.samples].index("baklava_2")
    with pytest.raises(CorruptFileError, match=r"test_titles.csv row 3, column image: cannot read .*baklava_2.jpg"):
        test[row]


# ---------------------------------------------------------------------------------------------- MM-IMDb


def test_mmimdb_splits_labels_texts_missing(tmp_path):
    write_mmimdb(tmp_path)
    notes: list[str] = []
    data = import_mmimdb(tmp_path, notes=notes)
    assert data.multilabel and data.classes == MMIMDB_GENRES and data.modalities == ("image", "text")
    assert [len(data.split(s)) for s in ("train", "val", "test")] == [4, 1, 3]  # dev → val
    samples = by_id(data)
    assert samples["0000001"].inputs["text"] == "First plot.\nSecond plot."  # one sample per movie, plots joined
    assert (
        samples["0000002"].inputs["text"] == "One plot, as a string."
        and samples["0000002"].inputs["image"].suffix == ".jpg"
    )
    val = ManifestSplit(data, "val")
    assert val.labels.dtype == torch.float32 and val.labels.shape == (1, 23)
    assert val.labels[0].nonzero().flatten().tolist() == [
        MMIMDB_GENRES.index("Music"),
        MMIMDB_GENRES.index("Film-Noir"),
    ]
    test = ManifestSplit(data, "test")
    assert test.labels[0].sum() == 0  # Talk-Show only: no genre of the 23 left
    assert test.labels[2].nonzero().flatten().tolist() == [0, 1]  # Drama, Comedy in the class order
    has = present(data, "train") | present(data, "test")
    assert has["0000003"] == ["image"] and has["0000004"] == ["text"] and has["0000007"] == ["image"]
    assert notes == ["dropped genres outside the 23: Reality-TV 1, Talk-Show 1; 1 movie(s) with no genre left"]


def test_mmimdb_archive_layout(tmp_path):
    write_mmimdb(tmp_path)

    def summary(data: Manifest) -> list[tuple]:
        return [(s.id, s.split, s.labels, sorted(s.inputs), s.inputs.get("text")) for s in data.samples]

    expected = summary(import_mmimdb(tmp_path))
    (tmp_path / "labels").rename(tmp_path / "dataset")  # the original archive: one folder of both
    for image in (tmp_path / "images").iterdir():
        image.rename(tmp_path / "dataset" / image.name)
    assert summary(import_mmimdb(tmp_path)) == expected and len(expected) == len(MOVIES)


def test_mmimdb_errors(tmp_path):
    with pytest.raises(MissingFileError, match=r"split.json does not exist"):
        import_mmimdb(tmp_path)
    write_mmimdb(tmp_path, [*MOVIES, Movie("0000009", "train", ("Drama",), None, image=None)])
    with pytest.raises(CorruptFileError, match=r"split.json train\[4\] \(movie 0000009\): every modality is missing"):
        import_mmimdb(tmp_path)
    (tmp_path / "labels" / "0000009.json").unlink()
    with pytest.raises(
        MissingFileError, match=r"split.json train\[4\] \(movie 0000009\): .*0000009.json does not exist"
    ):
        import_mmimdb(tmp_path)
    (tmp_path / "split.json").write_text(json.dumps({"train": ["0000001"], "validation": [], "test": []}))
    with pytest.raises(CorruptFileError, match=r"unknown split 'validation'"):
        import_mmimdb(tmp_path)


# ---------------------------------------------------------------------------------------------- all three


@pytest.mark.parametrize("layout", ["cremad", "food101", "mmimdb"])
def test_written_manifest_reads_back_the_same(tmp_path, layout):
    write, read = IMPORT[layout]
    write(tmp_path / "root")
    data = read(tmp_path / "root")
    write_manifest(data, tmp_path / "out")
    assert content(read_manifest(tmp_path / "out")) == content(data)


@pytest.mark.parametrize("layout", sorted(IMPORT))
def test_cli_writes_a_manifest_that_check_reads(tmp_path, layout, capsys):
    IMPORT[layout][0](tmp_path / "root")
    importers.main([layout, str(tmp_path / "root"), "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert "train:" in printed and f"--dataset manifest --data-dir {tmp_path / 'out'}" in printed
    manifest.main(["check", str(tmp_path / "out")])
    assert "every file reads" in capsys.readouterr().out


def test_cli_user_error_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        run_command(importers.main, ["cremad", str(tmp_path / "absent"), "--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().startswith(f"error: {tmp_path / 'absent'} is not a folder")
    assert not (tmp_path / "out").exists()


def test_data_sets_by_name(tmp_path):
    write_mmimdb(tmp_path)
    assert get_dataset("mmimdb", "val", data_dir=tmp_path).labels.shape == (1, 23)
    for name in IMPORT:
        with pytest.raises(ConfigError, match=rf"--dataset {name} needs --data-dir ROOT"):
            get_dataset(name, "train")


# ---------------------------------------------------------------------------------------------- general fixture


def test_manifest_folder_content_follows_the_class(tmp_path):
    data = write_manifest_folder(tmp_path, per_class=2, sample_rate=8_000, missing={"image": 0.25, "text": 0.5})
    assert [len(data.split(s)) for s in ("train", "val", "test")] == [4, 4, 4]
    counts = [sum(m not in s.inputs for s in data.samples) for m in ("image", "audio", "text")]
    assert counts == [3, 0, 6]  # round(fraction · 12), never a sample with nothing
    for sample in data.samples:
        c = data.classes.index(sample.labels[0])
        if "image" in sample.inputs:
            rows = np.asarray(decode("image", sample.inputs["image"], sample.where)).mean(axis=(1, 2))
            top, bottom = rows[: len(rows) // 2].mean(), rows[len(rows) // 2 :].mean()
            assert (top > bottom + 100) if c == 0 else (bottom > top + 100)  # class c: band c bright
        waveform, rate = decode("audio", sample.inputs["audio"], sample.where)
        peak = np.abs(np.fft.rfft(waveform)).argmax() * rate / len(waveform)
        assert rate == 8_000 and abs(peak - 1_600 * (c + 1)) < 10  # (c + 1) · 0.4 · rate / 2 classes
        assert sample.labels[0] in sample.inputs.get("text", sample.labels[0])


def test_manifest_folder_multilabel(tmp_path):
    per_class = {"train": 2, "test": 2}
    data = write_manifest_folder(tmp_path, ("audio", "text"), per_class, ("a", "b", "c"), multilabel=True)
    assert data.multilabel and data.modalities == ("audio", "text") and len(data.split("val")) == 1
    labels = ManifestSplit(data, "test").labels
    assert labels.tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 1, 1], [0, 0, 1], [1, 0, 1]]


# ---------------------------------------------------------------------------------------------- manifest format errors


HEAD = ["id", "split", "label", "image", "audio", "text", "text_file"]
GOOD = [["x", "train", "cat", "a.jpg", "", "", ""], ["y", "test", "dog", "", "a.wav", "hi", ""]]
BAD_ROWS = {  # a third row → what the error says about it
    "unknown split": (["z", "dev", "cat", "a.jpg", "", "", ""], r"row 4, column split: unknown split 'dev'"),
    "unknown label": (["z", "train", "cow", "a.jpg", "", "", ""], r"row 4, column label: unknown class 'cow'"),
    "missing file": (["z", "train", "cat", "b.jpg", "", "", ""], r"row 4, column image: .*b.jpg does not exist"),
    "nothing": (["z", "train", "cat", "", "", "", ""], r"row 4: every modality is missing"),
    "repeated id": (
        ["x", "test", "cat", "a.jpg", "", "", ""],
        r"row 4: id 'x' is used again \(first at manifest.csv row 2\)",
    ),
    "text twice": (["z", "train", "cat", "", "", "hi", "t.txt"], r"row 4: has both text and text_file"),
}


@pytest.fixture
def manifest_files(tmp_path: Path) -> Path:
    """A folder with a.jpg, a.wav, t.txt and classes.txt (cat, dog), for hand-written manifests."""
    write_jpeg(tmp_path / "a.jpg", np.zeros((4, 4, 3)))
    write_wav(tmp_path / "a.wav", np.zeros(80), 8_000)
    (tmp_path / "t.txt").write_text("a text")
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    return tmp_path


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_manifest_csv_errors_name_row_and_column(manifest_files, case):
    row, message = BAD_ROWS[case]
    (manifest_files / "manifest.csv").write_text(csv_text([HEAD, *GOOD, row]))
    with pytest.raises((CorruptFileError, MissingFileError), match=rf"^manifest.csv {message}"):
        read_manifest(manifest_files)


def test_manifest_jsonl_bad_line(manifest_files):
    lines = [json.dumps({"id": "x", "split": "train", "label": "cat", "image": "a.jpg"}), "{not json"]
    (manifest_files / "manifest.jsonl").write_text("\n".join(lines))
    with pytest.raises(CorruptFileError, match=r"^manifest.jsonl line 2: not valid JSON"):
        read_manifest(manifest_files)
