"""train.py --method on the synthetic data set: each method's two training steps change exactly the
parameters it should; SAM restores the weights; OGM-GE's coefficients and IGM's T(k) keep their bounds;
bench compare tabulates finished runs."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import train
from bench import compare
from kernels.backend import use_backend
from lowrank_methods import METHODS, Method
from lowrank_methods.mie import igm_projection
from lowrank_methods.ogm_ge import head_shares, ogm_coefficients
from lowrank_train.cli import parse_args
from lowrank_train.config import TrainConfig
from lowrank_train.data import batches, load_splits
from lowrank_train.loop import run_stages
from models import create_model
from models.multimodal import MultimodalClassifier, UnimodalClassifier

CPU = torch.device("cpu")


def config(method: str, *extra: str) -> TrainConfig:
    """Two steps per epoch (128 training samples, batch 64), one epoch per MIE stage."""
    return parse_args(["--method", method, "--dataset", "synthetic", "--batch-size", "64", "--epochs", "1",
                       "--stage-epochs", "1", "--save-every", "0", *extra], METHODS)[0]  # fmt: skip


@pytest.fixture(scope="module")
def splits():
    return load_splits(config("u2a"))[0]


def unimodal_models() -> dict[str, UnimodalClassifier]:
    torch.manual_seed(0)
    return {m: UnimodalClassifier(create_model(name), 10) for m, name in ARCHITECTURES.items()}


ARCHITECTURES = {"image": "vit_avmnist_tiny", "audio": "ast_avmnist_tiny"}


def trained(method_name: str, splits, tmp_path, *extra: str) -> tuple[Method, dict, dict]:
    """(the method, parameters before, parameters after) of a method's training on 2 steps per stage; the
    validation score rises every epoch, so that the last epoch is the one kept."""
    method = METHODS[method_name](config(method_name, *extra))
    model = method.build(unimodal_models(), 10, CPU)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    rising = itertools.count().__next__
    data = method.training_data(splits["train"])  # as train.py runs it
    run_stages(model, method, method.stages(splits["train"]), rising, data, method.config, CPU, tmp_path)
    return method, before, dict(model.named_parameters())


def changed(before: dict, after: dict) -> set[str]:
    return {name for name in before if not torch.equal(before[name], after[name])}


EXPECTED = {  # method → predicate on the names of the parameters its training changes (and no others)
    "linear-probe": lambda name: name.startswith("head."),
    "late-fusion": lambda name: name.startswith(("head.", "encoders.")),
    "ogm-ge": lambda name: name.startswith(("head.", "encoders.")),
    "mmlora": lambda name: name.startswith("head.") or ".lora_" in name,
    "u2a": lambda name: name.startswith(("head.", "mask_tokens.")) or ".lora_" in name,
    "mie": lambda name: name.startswith("head.") or ".lora_" in name,
}


@pytest.mark.parametrize("method_name", EXPECTED)
def test_a_method_changes_exactly_its_parameters(method_name, splits, tmp_path):
    _, before, after = trained(method_name, splits, tmp_path, *(["--epochs", "2"] if method_name == "mie" else []))
    expected = {name for name in before if EXPECTED[method_name](name)}
    assert changed(before, after) == expected  # frozen encoder weights, unused Mask Tokens: bit-identical


def test_the_linear_probe_trains_on_features_that_the_full_model_computes(splits):
    """Its encoders run once (ClassFeatures); the loss on those features is the loss of the whole model
    (encoders with their isolated Mask Tokens appended, then the head) on the inputs."""
    method = METHODS["linear-probe"](config("linear-probe"))
    model = method.build(unimodal_models(), 10, CPU)
    first = next(iter(batches(splits["train"], method.config, order=list(range(64)))))
    encoded = next(iter(batches(method.training_data(splits["train"]), method.config, order=list(range(64)))))
    inputs = {m: first[m] for m in model.modalities}
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(inputs).logits, first["label"])
        assert method.loss(encoded).item() == pytest.approx(expected.item(), rel=1e-5)


def test_mie_fine_tunes_whole_encoders_with_full(splits, tmp_path):
    method, before, after = trained("mie", splits, tmp_path, "--epochs", "2", "--full")
    assert changed(before, after) == set(before)
    assert not any(".lora_" in name for name in before)
    assert len(method.projections) == 1  # second stage: T(image) on the head


def test_mie_stages_alternate_and_train_one_encoder_each(splits, tmp_path):
    method, before, after = trained("mie", splits, tmp_path, "--epochs", "1")  # one stage: image
    assert method.stage == "image" and method.projections == {}
    assert {name.split(".")[1] for name in changed(before, after) if name.startswith("encoders.")} == {"image"}
    rows = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and '"stage": 1' in rows[0]


def test_mie_maps_narrower_encoders_to_the_shared_heads_width_and_trains_the_map_in_their_stage(splits, tmp_path):
    method = METHODS["mie"](config("mie", "--epochs", "2"))
    unimodal = unimodal_models()
    unimodal["image"] = UnimodalClassifier(create_model("vit_avmnist_tiny", hidden_size=32, intermediate_size=64), 10)
    model = method.build(unimodal, 10, CPU)
    assert isinstance(model.to_shared["audio"], torch.nn.Identity) and model.head.in_features == 64
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    data = method.training_data(splits["train"])
    run_stages(model, method, method.stages(splits["train"]), itertools.count().__next__, data, method.config, CPU,
               tmp_path)  # fmt: skip
    assert {"to_shared.image.weight", "to_shared.image.bias"} <= changed(before, dict(model.named_parameters()))


@pytest.mark.parametrize("mixup", [True, False])
def test_mie_trains_on_mixup_of_the_stage_inputs_as_published(mixup, splits):
    method = METHODS["mie"](config("mie", "--mixup" if mixup else "--no-mixup"))
    model = method.build(unimodal_models(), 10, CPU)
    method.begin_stage(0, splits["train"])
    batch = next(iter(batches(splits["train"], method.config))) | {"draws": torch.rand(64, 2)}
    x, y = batch["image"], batch["label"]
    lam, partner = batch["draws"][0, 0], batch["draws"][:, 1].argsort()
    with torch.no_grad():
        if mixup:
            logits = model.modality_logits("image", lam * x + (1 - lam) * x[partner])
            loss = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[partner])
        else:
            loss = F.cross_entropy(model.modality_logits("image", x), y)
        assert method.loss(batch).item() == pytest.approx(loss.item(), rel=1e-6)
    assert sorted(partner.tolist()) == list(range(64))


def test_sam_restores_the_weights_after_its_perturbation(splits):
    gradients = {}
    for rho in ("0", "0.5"):
        method = METHODS["mie"](config("mie", "--sam-rho", f"image={rho},audio={rho}"))
        model = method.build(unimodal_models(), 10, CPU)
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        batch = next(iter(batches(splits["train"], method.config)))
        method.backward(batch | {"draws": torch.rand(64, 2)}, lambda loss: loss)
        assert not changed(before, dict(model.named_parameters()))
        gradients[rho] = model.head.weight.grad.clone()
    assert not torch.equal(gradients["0"], gradients["0.5"])  # the second gradient was taken at θ + ε


def test_ogm_ge_coefficients_are_in_0_1():
    labels = torch.randint(10, (64,), generator=torch.Generator().manual_seed(0))
    confident = torch.nn.functional.one_hot(labels, 10).float() * 60  # softmax of the label ≈ 1
    draw = torch.Generator().manual_seed(1)
    balanced = {"image": 2 * torch.randn(64, 10, generator=draw), "audio": torch.randn(64, 10, generator=draw)}
    for shares in (balanced, {"image": confident, "audio": torch.zeros(64, 10)}):  # ρ = 10: tanh(50) rounds to 1
        k = ogm_coefficients(shares, labels, alpha=5.0)
        assert all(0 < value <= 1 for value in k.values()), k
        assert sorted(k.values())[1] == 1.0  # the weaker modality is not slowed down
    scores = {m: s.softmax(1).gather(1, labels[:, None]).sum().item() for m, s in balanced.items()}
    dominant, other = sorted(scores, key=scores.get, reverse=True)
    ratio = scores[dominant] / scores[other]
    assert ogm_coefficients(balanced, labels, 0.1)[dominant] == pytest.approx(1 - math.tanh(0.1 * ratio))


def test_ogm_ge_scales_each_encoders_gradients_and_adds_noise_of_their_spread(splits, tmp_path):
    method, _, _ = trained("ogm-ge", splits, tmp_path)
    assert set(method.coefficients) == {"image", "audio"}  # set by the last step's loss
    method.coefficients = {"image": 0.25, "audio": 1.0}
    weights = {m: method.model.encoders[m].blocks[0].mlp.fc1.weight for m in method.coefficients}  # 4,096+ entries
    gradients = {m: torch.randn_like(w) * 3 for m, w in weights.items()}
    for m, w in weights.items():
        w.grad = gradients[m].clone()
    torch.manual_seed(0)
    method.modify_gradients()
    for m, k in method.coefficients.items():
        g, modified = gradients[m].flatten(), weights[m].grad.flatten()
        slope = (modified @ g / (g @ g)).item()  # least squares of the modified gradient on the original
        noise = modified - k * g
        assert slope == pytest.approx(k, abs=0.05), m  # scaled by k_m ...
        assert noise.std().item() == pytest.approx(g.std().item(), rel=0.05), m  # ... plus N(0, σ(g)²)
        assert abs(noise.mean().item()) < 0.1


@pytest.mark.parametrize(
    ("window", "epochs", "modulated"),
    [(0.5, 3, 2), (0.5, 100, 50), (0.0, 2, 0), (1.0, 2, 2)],  # published: epochs 0–50 of 100
)
def test_ogm_ge_modulates_only_in_its_window_of_first_epochs(window, epochs, modulated, splits, tmp_path):
    method, _, _ = trained("ogm-ge", splits, tmp_path, "--ogm-window", str(window))
    seen = []
    for epoch in range(epochs):
        method.begin_epoch(epoch, epochs)
        seen.append(method.modulating)
    assert seen == [True] * modulated + [False] * (epochs - modulated)
    weight = method.model.encoders["image"].blocks[0].mlp.fc1.weight
    weight.grad = torch.randn_like(weight)
    before = weight.grad.clone()
    method.modify_gradients()  # after the window: plain late fusion
    assert torch.equal(weight.grad, before) == (epochs > modulated)


def test_head_shares_add_up_to_the_fusion_logits():
    encoders = {m: model.encoder for m, model in unimodal_models().items()}
    model = MultimodalClassifier(encoders, 10)
    features = {"image": torch.randn(4, 64), "audio": torch.randn(4, 64)}
    shares = head_shares(model.head, features)
    torch.testing.assert_close(sum(shares.values()), model.head(torch.cat(list(features.values()), 1)))


def test_igm_projection_is_symmetric_with_eigenvalues_in_0_1():
    z = torch.randn(50, 16, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 3, 16)
    t = igm_projection(z.T @ z, tau=0.4)
    assert torch.equal(t, t.T)
    eigenvalues = torch.linalg.eigvalsh(t.double())
    assert eigenvalues.min() >= math.exp(-0.4) - 1e-5 and eigenvalues.max() <= 1 + 1e-5
    top = torch.linalg.eigh(z.T @ z).eigenvectors[:, -1]  # the direction modality k uses most
    torch.testing.assert_close(t @ top, math.exp(-0.4) * top, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(igm_projection(torch.eye(4), 0.4), torch.eye(4))  # nothing to prefer


def test_mie_right_multiplies_the_head_gradient_by_t():
    method = METHODS["mie"](config("mie"))
    method.build(unimodal_models(), 10, CPU)
    head: nn.Linear = method.model.head
    gradient, t = torch.randn_like(head.weight), igm_projection(torch.randn(64, 64).square(), 0.4)
    head.weight.grad = gradient.clone()
    method.projections = {head: t}
    method.modify_gradients()
    torch.testing.assert_close(head.weight.grad, gradient @ t)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """Runs of unimodal and mmlora through train.main, tabulated by bench compare."""
    root = tmp_path_factory.mktemp("compare")
    options = ["--dataset", "synthetic", "--epochs", "1", "--unimodal-epochs", "1", "--batch-size", "64",
               "--out-dir", str(root), "--cache-dir", str(root / "cache"), "--missing-test", "0,1"]  # fmt: skip
    with use_backend("torch"):  # module scope: conftest's per-test backend fixture is not active yet
        for method in ("unimodal", "mmlora"):
            train.main([*options, "--method", method, "--name", method])
    return [compare.collect(root / method) for method in ("unimodal", "mmlora")]


def test_runs_record_their_cost(compared):
    unimodal, mmlora = compared
    assert mmlora["trainable_parameters"] == mmlora["results"]["trainable_parameters"] > 0
    assert mmlora["train_seconds"] > 0 and mmlora["peak_memory_mib"] > 0
    assert set(unimodal["results"]["unimodal_parameters"]) == {"image", "audio"}


def test_compare_report_has_every_method_and_fill(compared):
    text = compare.report(compared, "synthetic", "python -m bench compare", "notes")
    assert "| unimodal (image) |" in text and "| unimodal (audio) |" in text and "| mmlora | 8 | 1 |" in text
    assert "| mmlora | 8 | zero-input |" in text and "| mmlora | 8 | unimodal |" in text and "mask-token" not in text
    assert text.rstrip().endswith("notes")
