"""Stage 1 on a given pretrained encoder, tuned as --unimodal-tuning says (head, lora folded in, full; auto
follows the method's paper), and the pretraining command whose checkpoint train.py then accepts."""

from __future__ import annotations

import json

import pytest
import torch

import train
from kernels.backend import use_backend
from lowrank_methods import METHODS
from lowrank_train.cli import parse_args
from lowrank_train.data import load_splits
from lowrank_train.pretrain import main as pretrain
from lowrank_train.stage1 import stage1_tuning, unimodal_model
from models import ViT, create_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    create_model("vit_avmnist_tiny").save_pretrained(folder)
    return folder


def config(tmp_path, checkpoint, *extra: str):
    return parse_args([
        "--dataset", "synthetic", "--unimodal-epochs", "1", "--batch-size", "32", "--image-encoder", str(checkpoint),
        "--cache-dir", str(tmp_path / "cache"), "--out-dir", str(tmp_path / "runs"), *extra,
    ], METHODS)[0]  # fmt: skip


@pytest.mark.parametrize(("method", "tuning"), [("u2a", "head"), ("mmlora", "full"), ("mie", "head")])
def test_auto_tuning_follows_the_methods_paper(method, tuning, tmp_path, checkpoint):
    settings = config(tmp_path, checkpoint, "--method", method)
    assert stage1_tuning(settings, "image", METHODS[method].stage1_tuning) == tuning
    assert stage1_tuning(settings, "audio", METHODS[method].stage1_tuning) == "full"  # no checkpoint: from scratch
    assert stage1_tuning(config(tmp_path, checkpoint, "--unimodal-tuning", "lora"), "image", tuning) == "lora"


@pytest.mark.parametrize("tuning", ["head", "lora", "full"])
def test_each_tuning_changes_what_it_should(tuning, tmp_path, checkpoint):
    settings = config(tmp_path, checkpoint)
    splits, _, classes = load_splits(settings)
    given = ViT.from_pretrained(checkpoint).state_dict()
    with use_backend("torch"):
        model, record = unimodal_model(settings, "image", splits, classes, CPU, tuning)
    tuned = model.encoder.state_dict()
    assert tuned.keys() == given.keys()  # LoRA folded into the weights: a plain encoder again
    changed = {name for name in given if not torch.equal(given[name], tuned[name])}
    adapted = {n for n in given if n.endswith("attn.qkv.weight")}  # the default targets q, v: W + s·B A
    expected = {"head": set(), "lora": adapted, "full": set(given)}[tuning]
    assert changed == expected if tuning != "full" else len(changed) > 0.9 * len(given)
    total = sum(p.numel() for p in model.parameters())
    assert record["tuning"] == tuning and 0 < record["trainable_parameters"] <= total
    assert (record["trainable_parameters"] == total) == (tuning == "full")
    cached, again = unimodal_model(settings, "image", splits, classes, CPU, tuning)  # from the cache
    assert all(torch.equal(cached.encoder.state_dict()[k], tuned[k]) for k in tuned) and again == json.loads(
        json.dumps(record)
    )


def test_pretrained_encoder_is_accepted_by_train_py(tmp_path):
    with use_backend("torch"):
        summary = pretrain([
            "--dataset", "synthetic", "--modality", "image", "--epochs", "1", "--batch-size", "32",
            "--out", str(tmp_path / "encoder"), "--cache-dir", str(tmp_path / "cache"),
        ])  # fmt: skip
        assert 0 <= summary["test_accuracy"] <= 1
        assert json.loads((tmp_path / "encoder" / "pretraining.json").read_text())["dataset"] == "synthetic"
        results = train.main([
            "--dataset", "synthetic", "--epochs", "1", "--unimodal-epochs", "1", "--batch-size", "32",
            "--image-encoder", str(tmp_path / "encoder"), "--missing-test", "0,1",
            "--out-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"),
        ])  # fmt: skip
    assert results["merge_check"]["agree"] == results["merge_check"]["total"]
    records = [json.loads(p.read_text()) for p in (tmp_path / "cache").glob("unimodal-image-*/record.json")]
    assert {r["pretrained"] for r in records} == {None, str(tmp_path / "encoder")}  # pretraining's, then train.py's


@pytest.mark.parametrize("epochs", [1, 3])
def test_a_frozen_encoder_runs_once_per_split_however_many_epochs(epochs, tmp_path, checkpoint, monkeypatch):
    """Head-only stage 1 encodes each sample once (train, val, test) and trains the head on the class
    features; the probe it gives agrees with the encoder + head run on the inputs."""
    settings = config(tmp_path, checkpoint, "--unimodal-epochs", str(epochs))
    splits, _, classes = load_splits(settings)
    encoded = []
    forward = ViT.forward

    def counting(self, x, *args, **kwargs):
        encoded.append(len(x))
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(ViT, "forward", counting)
    with use_backend("torch"):
        model, record = unimodal_model(settings, "image", splits, classes, CPU, "head")
        assert sum(encoded) == sum(len(data) for data in splits.values())
        logits = torch.cat([model(batch["image"]) for batch in torch.utils.data.DataLoader(splits["test"], 32)])
    labels = torch.as_tensor([int(splits["test"][i]["label"]) for i in range(len(splits["test"]))])
    assert (logits.argmax(1) == labels).float().mean().item() == pytest.approx(record["test_accuracy"])
