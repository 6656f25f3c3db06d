"""A bank of finished U2A runs (lowrank_train/bank.py): each sample through its own run's whole model (LoRA,
head, Mask Tokens), in one batch; runs of another method or other encoders refused, naming the run."""

from __future__ import annotations

import copy

import pytest
import torch

import train
from bench import serve
from kernels.backend import use_backend
from lowrank import selected_adapters
from lowrank_methods import METHODS
from lowrank_train.bank import bank_of_runs, read_trained
from lowrank_train.cli import parse_args
from lowrank_train.data import batches, load_splits
from lowrank_train.stage1 import unimodal_model
from lowrank_util.errors import MismatchError
from models.multimodal import MultimodalClassifier

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """U2A runs on one stage 1 (seed 0) at ranks 4 and 8, an MMLoRA run, and a U2A run of another seed."""
    root = tmp_path_factory.mktemp("bank")
    common = ["--dataset", "synthetic", "--epochs", "1", "--unimodal-epochs", "1", "--batch-size", "32",
              "--missing-test", "0,1", "--out-dir", str(root / "runs"), "--cache-dir", str(root / "cache")]  # fmt: skip
    made = {}
    with use_backend("torch"):
        for name, extra in {"r4": ["--rank", "4"], "r8": [], "mmlora": ["--method", "mmlora"],
                            "seed1": ["--seed", "1"]}.items():  # fmt: skip
            train.main([*common, "--name", name, *extra])
            made[name] = root / "runs" / name
    return made


def stage1(run):
    """The run's config, data splits, stage-1 models (from the cache) and their encoders' sha256."""
    config = parse_args(["--resume", str(run)], METHODS)[0]
    splits, _, classes = load_splits(config)
    models = {m: unimodal_model(config, m, splits, classes, CPU, "head") for m in ("image", "audio")}
    return (
        config,
        splits,
        classes,
        {m: model for m, (model, _) in models.items()},
        {m: record["encoder_sha256"] for m, (_, record) in models.items()},
    )


def own_model(run, unimodal, classes):
    """The run's own model, as train.py built and trained it."""
    tensors, config, _ = read_trained(run)
    model = METHODS["u2a"](config).build(unimodal, classes, CPU)
    model.load_state_dict(tensors, strict=False)
    return model.eval()


def test_each_sample_gets_its_own_runs_whole_model(runs):
    config, splits, classes, unimodal, sha256 = stage1(runs["r4"])
    bases = {m: copy.deepcopy(u.encoder) for m, u in unimodal.items()}
    bank = bank_of_runs(MultimodalClassifier(bases, classes), [runs["r4"], runs["r8"]], sha256).eval()
    batch = next(iter(batches(splits["test"], config)))
    inputs, size = {m: batch[m] for m in ("image", "audio")}, len(batch["label"])
    ids = torch.arange(size) % 2
    missing = torch.zeros(size, 2, dtype=torch.bool)
    missing[::3, 0] = True  # the image missing in every third sample: its Mask Token stands in
    with torch.no_grad(), use_backend("torch"):
        with selected_adapters(ids):
            mixed = bank(inputs, missing, "mask-token").logits
        for i, run in enumerate((runs["r4"], runs["r8"])):
            alone = own_model(run, unimodal, classes)(inputs, missing, "mask-token").logits
            torch.testing.assert_close(mixed[ids == i], alone[ids == i], rtol=1e-5, atol=1e-5)
            other = own_model(runs["r8"] if i == 0 else runs["r4"], unimodal, classes)(inputs, missing, "mask-token")
            assert not torch.allclose(mixed[ids == i], other.logits[ids == i], atol=1e-4)  # the runs differ


@pytest.mark.parametrize(("other", "message"), [("mmlora", "is a mmlora run"), ("seed1", "other encoders")])
def test_runs_of_another_method_or_other_encoders_are_refused(runs, other, message):
    _, _, classes, unimodal, sha256 = stage1(runs["r4"])
    model = MultimodalClassifier({m: copy.deepcopy(u.encoder) for m, u in unimodal.items()}, classes)
    with pytest.raises(MismatchError, match=message):
        bank_of_runs(model, [runs["r4"], runs[other]], sha256)


def test_runs_tested_in_one_pass_give_what_each_gives_alone(runs):
    with use_backend("torch"):
        rows = serve.evaluate([runs["r4"], runs["r8"]], CPU)
    assert [row["protocol"] for row in rows] == ["as given"] * 2 + ["image missing"] * 2 + ["audio missing"] * 2
    for row in rows:
        assert row["agree"] == row["total"] and row["bank_score"] == row["alone_score"]
        assert row["max_abs_logit_diff"] < 1e-4
