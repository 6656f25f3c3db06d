"""MultimodalClassifier: missing-modality fills, Mask Token isolation and gradients, per-sample masks."""

from __future__ import annotations

import pytest
import torch

from lowrank_methods.u2a import alignment_loss
from models import create_model
from models.multimodal import MISSING_FILLS, MultimodalClassifier, UnimodalClassifier

BATCH = 4


def tiny_classifier(mask_tokens_visible: bool = False, audio_width: int = 32) -> MultimodalClassifier:
    torch.manual_seed(0)
    encoders = {
        "image": create_model("vit_avmnist_tiny", hidden_size=32, num_hidden_layers=1, intermediate_size=64),
        "audio": create_model("ast_avmnist_tiny", hidden_size=audio_width, num_hidden_layers=1, intermediate_size=64),
    }
    return MultimodalClassifier(encoders, num_classes=10, mask_tokens_visible=mask_tokens_visible).eval()


def tiny_inputs() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {"image": torch.randn(BATCH, 1, 28, 28), "audio": torch.randn(BATCH, 1, 112, 112)}


def mask(*rows: tuple[bool, bool]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


NONE_MISSING = mask(*[(False, False)] * BATCH)
MIXED = mask((False, False), (True, False), (False, True), (False, False))


@pytest.mark.parametrize("fill", MISSING_FILLS)
def test_all_present_mask_equals_the_complete_path(fill):
    model, inputs = tiny_classifier(), tiny_inputs()
    with torch.no_grad():
        complete = model(inputs).logits
        masked = model(inputs, NONE_MISSING, fill).logits
    assert torch.equal(complete, masked)


@pytest.mark.parametrize("fill", MISSING_FILLS)
def test_a_missing_modality_does_not_leak(fill):
    model, inputs = tiny_classifier(), tiny_inputs()
    changed = dict(inputs, image=torch.randn_like(inputs["image"]))
    with torch.no_grad():
        before = model(inputs, MIXED, fill).logits
        after = model(changed, MIXED, fill).logits
    assert torch.equal(before[1], after[1])  # sample 1 lacks the image: its logits ignore it
    assert not torch.allclose(before[0], after[0])  # sample 0 has it


@pytest.mark.parametrize("fill", MISSING_FILLS)
def test_each_sample_is_handled_on_its_own(fill):
    model, inputs = tiny_classifier(), tiny_inputs()
    with torch.no_grad():
        together = model(inputs, MIXED, fill).logits
        for i in range(BATCH):
            alone = model({m: x[i : i + 1] for m, x in inputs.items()}, MIXED[i : i + 1], fill).logits
            torch.testing.assert_close(alone[0], together[i], atol=1e-5, rtol=1e-5)


def test_one_forward_serves_every_fill():
    """What the evaluation does (lowrank_train.evaluate.every_fill): one forward, each fill's logits from it."""
    model, inputs = tiny_classifier(audio_width=48), tiny_inputs()
    with torch.no_grad():
        output = model(inputs, MIXED, "zero-input")
        for fill in MISSING_FILLS:
            recombined = model.fill_logits(output.features, output.generated, output.present, fill)
            assert torch.equal(recombined, model(inputs, MIXED, fill).logits), fill


def test_fills_differ_only_where_a_modality_is_missing():
    model, inputs = tiny_classifier(), tiny_inputs()
    with torch.no_grad():
        logits = {fill: model(inputs, MIXED, fill).logits for fill in MISSING_FILLS}
    for fill in MISSING_FILLS:
        torch.testing.assert_close(logits[fill][[0, 3]], logits["mask-token"][[0, 3]])
    assert not torch.allclose(logits["mask-token"][1], logits["zero-feature"][1])
    assert not torch.allclose(logits["mask-token"][1], logits["zero-input"][1])


def test_isolated_mask_tokens_do_not_change_present_features():
    model, inputs = tiny_classifier(), tiny_inputs()
    with torch.no_grad():
        before = model(inputs).features
        for token in model.mask_tokens.values():
            token.add_(torch.randn_like(token))  # not a constant: LayerNorm would cancel that
        after = model(inputs)
    for m in model.modalities:
        torch.testing.assert_close(after.features[m], before[m], atol=1e-6, rtol=1e-6)
    visible = tiny_classifier(mask_tokens_visible=True)
    with torch.no_grad():
        plain = visible(inputs).features["image"]
        visible.mask_tokens["audio"].add_(torch.randn_like(visible.mask_tokens["audio"]))
        assert not torch.allclose(visible(inputs).features["image"], plain)


@pytest.mark.parametrize("audio_width", [32, 48])
def test_mask_token_gradients_flow(audio_width):
    model, inputs = tiny_classifier(audio_width=audio_width).train(), tiny_inputs()
    output = model(inputs, MIXED)
    (output.logits.square().mean() + alignment_loss(output)).backward()
    for m in model.modalities:
        grad = model.mask_tokens[m].grad
        assert grad is not None and grad.abs().sum() > 0, m
    if audio_width != 32:  # the widths differ: tokens are projected in and out
        assert model.token_in["audio_to_image"].weight.grad.abs().sum() > 0
        assert model.token_out["image_to_audio"].weight.grad.abs().sum() > 0


def test_generated_feature_averages_the_present_modalities_only():
    model, inputs = tiny_classifier(), tiny_inputs()
    with torch.no_grad():
        output = model(inputs, mask((True, True), (True, False), (False, True), (False, False)))
    assert torch.equal(output.generated["image"][0], torch.zeros(32))  # nothing present to generate from
    assert output.generated["image"][1].abs().sum() > 0


def test_alignment_loss_is_zero_when_generation_matches():
    model, inputs = tiny_classifier(), tiny_inputs()
    with torch.no_grad():
        output = model(inputs)
    output.generated = {m: f.clone() for m, f in output.features.items()}
    assert alignment_loss(output).item() == 0.0


def test_alignment_loss_with_global_row_counts_is_exact_under_data_parallelism():
    """Shards holding 2 and 1 complete samples: with the row counts summed over the 2 shards and divided
    by 2, the mean of the shards' gradients is the whole batch's (with each shard's own counts it is not)."""
    model, inputs = tiny_classifier(), tiny_inputs()
    missing = mask((False, False), (False, False), (False, False), (True, False))

    def mask_token_grads(rows: slice, row_counts=None) -> torch.Tensor:
        model.zero_grad()
        output = model({m: x[rows] for m, x in inputs.items()}, missing[rows])
        alignment_loss(output, row_counts).backward()
        return torch.cat([model.mask_tokens[m].grad.flatten() for m in model.modalities])

    def global_counts(counts: torch.Tensor) -> torch.Tensor:
        return torch.full_like(counts, (2 + 1) / 2)

    whole, shards = mask_token_grads(slice(0, 4)), (slice(0, 2), slice(2, 4))
    torch.testing.assert_close(sum(mask_token_grads(s, global_counts) for s in shards) / 2, whole)
    assert not torch.allclose(sum(mask_token_grads(s) for s in shards) / 2, whole)


@pytest.mark.parametrize(
    ("missing", "fill", "message"),
    [
        (torch.zeros(BATCH, 3, dtype=torch.bool), "mask-token", "shape"),
        (torch.zeros(BATCH, 2), "mask-token", "bool"),
        (None, "mean", "fill must be one of"),
    ],
)
def test_bad_arguments_are_named(missing, fill, message):
    model, inputs = tiny_classifier(), tiny_inputs()
    with pytest.raises(ValueError, match=message):
        model(inputs, missing, fill)


def test_one_encoder_is_refused():
    with pytest.raises(ValueError, match="at least two"):
        MultimodalClassifier({"image": create_model("vit_avmnist_tiny")}, 10)


def test_unimodal_classifier_maps_inputs_to_logits():
    model = UnimodalClassifier(create_model("vit_avmnist_tiny", num_hidden_layers=1), num_classes=7)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 7)
