"""train.py end to end on the synthetic data set (seconds): U2A, caching, resume, evaluation, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import train
from kernels.backend import use_backend
from lowrank_methods import METHODS, u2a
from lowrank_train.cli import parse_args
from lowrank_train.config import TrainConfig
from lowrank_train.evaluate import fallback_probabilities, missing_mask, missing_patterns
from lowrank_util.errors import ConfigError

EPOCHS = 2


def argv(tmp_path, *extra: str) -> list[str]:
    return [
        "--dataset", "synthetic", "--epochs", str(EPOCHS), "--unimodal-epochs", "1", "--batch-size", "32",
        "--out-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One complete run: (its folder, its results, the temporary root)."""
    root = tmp_path_factory.mktemp("train")
    with use_backend("torch"):  # module scope: conftest's per-test backend fixture is not active yet
        results = train.main(argv(root, "--name", "full"))
    return root / "runs" / "full", results, root


def test_a_run_writes_every_output(finished):
    run_dir, results, _ = finished
    for name in ("config.json", "metrics.jsonl", "adapter.safetensors", "results.json", "results.md"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "curves.png").stat().st_size > 0 and (run_dir / "missing.png").stat().st_size > 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == list(range(1, EPOCHS + 1))
    assert json.loads((run_dir / "results.json").read_text()) == results
    assert TrainConfig.from_json((run_dir / "config.json").read_text()).name == "full"


def test_results_cover_every_modality_rate_and_fill(finished):
    _, results, _ = finished
    assert set(results["missing"]) == {"image", "audio"}
    for by_fill in results["missing"].values():
        assert set(by_fill) == {"mask-token", "zero-input", "zero-feature", "unimodal"}
        for accuracies in by_fill.values():
            assert len(accuracies) == len(results["missing_rates"])
            assert accuracies[0] == pytest.approx(results["complete"])  # rate 0: nothing missing
    fallback = {m: by_fill["unimodal"][-1] for m, by_fill in results["missing"].items()}
    assert fallback == {"image": results["unimodal"]["audio"], "audio": results["unimodal"]["image"]}
    check = results["merge_check"]
    assert check["agree"] == check["total"] and check["max_abs_logit_diff"] < 1e-4


def test_adapter_checkpoint_holds_only_trained_tensors(finished):
    run_dir, _, _ = finished
    tensors = load_file(run_dir / "adapter.safetensors")
    assert tensors and all(
        "lora_" in k or k.startswith(("head.", "mask_tokens.", "token_in.", "token_out.")) for k in tensors
    )
    assert any(k.startswith("mask_tokens.") for k in tensors)
    from safetensors import safe_open

    with safe_open(run_dir / "adapter.safetensors", "pt") as file:
        hashes = json.loads(file.metadata()["encoder_sha256"])
    assert set(hashes) == {"image", "audio"} and all(len(h) == 64 for h in hashes.values())


def test_unimodal_models_are_cached_and_reused(finished, capsys):
    _, results, root = finished
    again = train.main(argv(root, "--name", "again"))
    assert "cached unimodal model" in capsys.readouterr().out
    assert again == results  # same seed, same cached encoders → same run


def test_an_interrupted_run_resumes_to_the_same_result(finished, monkeypatch):
    _, results, root = finished
    calls = 0
    real_loss = u2a.u2a_loss

    def failing_loss(*args):
        nonlocal calls
        calls += 1
        if calls == 5:  # first step of epoch 2 (4 steps per epoch)
            raise KeyboardInterrupt
        return real_loss(*args)

    monkeypatch.setattr(u2a, "u2a_loss", failing_loss)
    with pytest.raises(KeyboardInterrupt):
        train.main(argv(root, "--name", "interrupted"))
    monkeypatch.setattr(u2a, "u2a_loss", real_loss)
    run_dir = root / "runs" / "interrupted"
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1
    assert train.main(["--resume", str(run_dir)]) == results
    full = load_file(root / "runs" / "full" / "adapter.safetensors")
    resumed = load_file(run_dir / "adapter.safetensors")
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_an_existing_run_is_never_overwritten(finished):
    _, _, root = finished
    with pytest.raises(ConfigError, match="exists: continue it with --resume"):
        train.main(argv(root, "--name", "full"))


def test_resume_refuses_options_that_change_the_results(finished):
    run_dir, _, _ = finished
    with pytest.raises(ConfigError) as error:
        parse_args(["--resume", str(run_dir), "--rank", "4", "--lr", "0.1"], METHODS)
    assert "rank (run 8, given 4)" in str(error.value) and "lr (run 0.002, given 0.1)" in str(error.value)
    config, _ = parse_args(["--resume", str(run_dir), "--device", "cpu", "--save-every", "7"], METHODS)
    assert (config.device, config.save_every, config.rank) == ("cpu", 7, 8)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (("--rank", "0"), "--rank"),
        (("--missing-train-rate", "1.5"), "--missing-train-rate"),
        (("--warmup", "1"), "warmup"),
    ],
)
def test_bad_config_is_named(option, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(list(option), METHODS)


def test_modality_dropout_removes_at_most_one_modality():
    draws = torch.rand(10_000, 2, generator=torch.Generator().manual_seed(0))
    dropped = u2a.drop_modalities(draws, 2, 0.3)
    assert dropped.sum(1).max() == 1
    assert 0.27 < dropped.any(1).float().mean() < 0.33
    assert 0.45 < dropped[:, 0].sum() / dropped.sum() < 0.55
    assert not u2a.drop_modalities(draws, 2, 0.0).any()


def test_modality_dropout_never_takes_a_samples_last_modality():
    draws = torch.rand(4000, 2, generator=torch.Generator().manual_seed(0))
    given = torch.zeros(4000, 3, dtype=torch.bool)
    given[:2000, 1] = True  # half the samples lack audio; a quarter of those lack text too
    given[:500, 2] = True
    missing = u2a.training_missing(draws, 3, 1.0, given)
    assert (missing | ~given).all()  # what the data lacks stays missing
    assert (~missing).any(1).all()  # every sample keeps a modality
    assert torch.equal(missing[:500], given[:500])  # one modality left: nothing dropped
    assert (missing[2000:].sum(1) == 1).all()  # complete samples at rate 1 lose exactly one
    assert torch.equal(u2a.training_missing(draws, 3, 0.3, None), u2a.drop_modalities(draws, 3, 0.3))


def test_missing_mask_hits_the_requested_share():
    mask = missing_mask(200, 2, pattern=(1,), rate=0.25, seed=0)
    assert mask[:, 1].sum() == 50 and not mask[:, 0].any()
    assert torch.equal(mask, missing_mask(200, 2, pattern=(1,), rate=0.25, seed=0))
    pair = missing_mask(200, 3, pattern=(0, 2), rate=0.25, seed=0)  # a pair: missing together, same samples
    assert torch.equal(pair[:, 0], mask[:, 1]) and torch.equal(pair[:, 2], mask[:, 1]) and not pair[:, 1].any()


def test_missing_patterns_are_each_modality_then_the_pairs():
    assert missing_patterns(("image", "audio")) == [(0,), (1,)]
    assert missing_patterns(("image", "audio", "text")) == [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2)]


def test_fallback_uses_the_remaining_unimodal_model():
    complete = torch.tensor([[0.9, 0.1], [0.9, 0.1]])
    unimodal = {"image": torch.tensor([[0.2, 0.8], [0.2, 0.8]]), "audio": torch.tensor([[0.6, 0.4], [0.3, 0.7]])}
    missing = torch.tensor([[False, False], [True, False]])
    out = fallback_probabilities(complete, unimodal, missing, ("image", "audio"))
    assert torch.equal(out, torch.tensor([[0.9, 0.1], [0.3, 0.7]]))
