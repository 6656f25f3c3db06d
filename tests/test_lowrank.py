"""The LoRA API: config, LoRALinear, add_lora, trainable set, merge/unmerge, adapter files."""

from __future__ import annotations

import pytest
import torch
from lora_checks import assert_close_scaled
from toy import toy_model

import lowrank
from kernels.backend import use_backend
from kernels.merge import merge_weight
from kernels.reference import merge_ref
from lowrank import (
    LoRAConfig,
    LoRALinear,
    LoRAQKVLinear,
    add_lora,
    load_adapter,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    remove_lora,
    save_adapter,
    unmerge_lora,
)

# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"rank": 0}, "rank must be a positive integer"),
        ({"rank": 2.5}, "rank must be a positive integer"),
        ({"alpha": -1.0}, "alpha must be a positive finite"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"targets": ()}, "targets must be a non-empty"),
        ({"bias": "some"}, "bias must be one of"),
    ],
)
def test_config_validation(fields, message):
    with pytest.raises(ValueError, match=message):
        LoRAConfig(**fields)


def test_config_scale_and_round_trip():
    assert LoRAConfig(rank=8, alpha=16).scale == 2.0
    assert LoRAConfig(rank=16, alpha=8, rslora=True).scale == 2.0
    config = LoRAConfig(rank=4, targets=("q", "o"), dropout=0.1)
    assert LoRAConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown LoRAConfig fields: \\['lora_rank'\\]"):
        LoRAConfig.from_dict({"lora_rank": 4})


# ---------------------------------------------------------------- LoRALinear


def test_lora_linear_keeps_the_weight_object_and_starts_as_identity():
    linear = torch.nn.Linear(12, 10)
    layer = LoRALinear(linear, rank=3, scale=2.0)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert not layer.weight.requires_grad
    assert torch.count_nonzero(layer.lora_b) == 0 and torch.count_nonzero(layer.lora_a) > 0
    x = torch.randn(4, 12)
    torch.testing.assert_close(layer(x), linear(x))


@pytest.mark.parametrize("rank", [0, 11])
def test_rank_out_of_range_is_rejected(rank):
    with pytest.raises(ValueError, match=rf"rank {rank} is invalid .* need 1 <= rank <= 10"):
        LoRALinear(torch.nn.Linear(12, 10), rank=rank, scale=1.0)


def _trained_layer(dtype=torch.float32):
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(40, 24, dtype=dtype), rank=4, scale=2.0)
    with torch.no_grad():
        layer.lora_b.normal_()
    return layer


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_merge_weight_matches_reference(backend, dtype):
    torch.manual_seed(1)
    weight, lora_a, lora_b = (
        torch.randn(37, 45, dtype=dtype),
        torch.randn(5, 45, dtype=dtype),
        torch.randn(37, 5, dtype=dtype),
    )
    with use_backend(backend):
        merged = merge_weight(weight, lora_a, lora_b, 0.5)
    expected = merge_ref(weight, lora_a, lora_b, 0.5)
    assert merged.dtype == dtype
    # Both sum the r products in fp32 and round once to the dtype, so they differ by the fp32 summation
    # order (at most r · eps₃₂ · s · Σ_j |B_nj A_jk|, the dot product's error bound, which cancellation
    # can make many ulps of the result) plus one rounding to the dtype.
    rank, fp32_eps = lora_a.shape[0], torch.finfo(torch.float32).eps
    order = rank * fp32_eps * 0.5 * (lora_b.float().abs() @ lora_a.float().abs())
    rounding = torch.finfo(dtype).eps * expected.float().abs().clamp_min(torch.finfo(dtype).tiny)
    assert ((merged.float() - expected.float()).abs() <= order + rounding).all()


def test_merge_weight_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="cannot merge lora_a"):
        merge_weight(torch.randn(6, 8), torch.randn(2, 7), torch.randn(6, 2), 1.0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_merge_unmerge_is_bit_exact_and_idempotent(backend):
    layer = _trained_layer(torch.bfloat16).eval()
    original = layer.weight.detach().clone()
    x = torch.randn(3, 40, dtype=torch.bfloat16)
    with use_backend(backend), torch.no_grad():
        unmerged_out = layer(x)
        for _ in range(1000 if backend == "torch" else 20):  # peft drifts by 1.5e-2 over 1000 bf16 cycles
            layer.merge()
            layer.unmerge()
        assert torch.equal(layer.weight, original)
        layer.merge()
        merged_weight = layer.weight.detach().clone()
        layer.merge()  # a second merge is a no-op
        assert torch.equal(layer.weight, merged_weight)
        assert_close_scaled(layer(x), unmerged_out, torch.bfloat16, "merged output")
        layer.unmerge()
        layer.unmerge()
    assert torch.equal(layer.weight, original)


def test_training_while_merged_raises():
    layer = _trained_layer()
    layer.merge()
    with pytest.raises(RuntimeError, match=r"is merged.*unmerge_lora"):
        layer(torch.randn(2, 40))
    with torch.no_grad():
        layer(torch.randn(2, 40))  # inference is fine


def test_merge_refuses_non_finite_adapter_and_leaves_weight_untouched():
    layer = _trained_layer()
    original = layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_b[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        layer.merge()
    assert torch.equal(layer.weight, original) and not layer.merged


# ---------------------------------------------------------------- add_lora


def _lora_module_names(model):
    return {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, lowrank.LoRALayer)}


def test_add_lora_adapts_exactly_the_targets():
    model = add_lora(toy_model(), LoRAConfig(rank=2, targets=("q", "k", "v", "o")))
    assert _lora_module_names(model) == {
        f"blocks.{i}.attn.{name}": kind
        for i in range(2)
        for name, kind in (("qkv", "LoRAQKVLinear"), ("proj", "LoRALinear"))
    }
    assert all(m.projections == ("q", "k", "v") for m in model.modules() if isinstance(m, LoRAQKVLinear))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.attn.{m}.lora_{ab}" for i in range(2) for m in ("qkv", "proj") for ab in "ab"}


def test_add_lora_q_v_adapts_two_thirds_and_mlp_target():
    model = add_lora(toy_model(), LoRAConfig(rank=2, targets=("q", "v", "mlp")))
    qkv = model.blocks[0].attn.qkv
    assert qkv.projections == ("q", "v") and qkv.lora_a.shape == (4, 24) and qkv.lora_b.shape == (48, 2)
    assert isinstance(model.blocks[1].mlp.fc2, LoRALinear) and isinstance(model.blocks[0].attn.proj, torch.nn.Linear)
    assert isinstance(model.head, torch.nn.Linear)


def test_add_lora_with_regex_targets_and_bias_policy():
    model = add_lora(toy_model(), LoRAConfig(rank=2, targets=(r"head",), bias="lora_only"))
    assert _lora_module_names(model) == {"head": "LoRALinear"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head.lora_a", "head.lora_b", "head.bias"}
    assert set(lora_state_dict(model)) == {"head.lora_a", "head.lora_b", "head.bias"}


def test_add_lora_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"target 'query' .* matches no nn.Linear .* are: blocks\.0\.attn\.qkv"):
        add_lora(toy_model(), LoRAConfig(targets=("query",)))
    model = add_lora(toy_model(), LoRAConfig(rank=2))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        add_lora(model, LoRAConfig(rank=2))
    with pytest.raises(ValueError, match="rank 30 is invalid"):
        add_lora(toy_model(), LoRAConfig(rank=30, targets=("q",)))


def test_untrained_adapters_leave_the_model_unchanged_and_train():
    model, x = toy_model(), torch.randn(3, 6, 24)
    expected = model(x)
    add_lora(model, LoRAConfig(rank=4, targets=("all",)))
    torch.testing.assert_close(model(x), expected)
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    for _ in range(3):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    assert not torch.allclose(model(x), expected)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_merge_lora_on_a_model():
    model = add_lora(toy_model(), LoRAConfig(rank=4, targets=("all",)))
    for p in lora_parameters(model):
        torch.nn.init.normal_(p, std=0.2)
    model.eval()
    x = torch.randn(2, 5, 24)
    with torch.no_grad():
        before = model(x)
        assert merge_lora(model) == 8  # per block: qkv, proj, fc1, fc2
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-4)
        assert unmerge_lora(model) == 8
        torch.testing.assert_close(model(x), before, atol=0, rtol=0)


def test_remove_lora_restores_the_plain_model():
    model, x = toy_model(), torch.randn(2, 5, 24)
    weights = {name: p for name, p in model.named_parameters()}
    expected = model(x)
    add_lora(model, LoRAConfig(rank=4, targets=("all",)))
    merge_lora(model)
    assert remove_lora(model) is model
    assert not any(isinstance(m, lowrank.LoRALayer) for m in model.modules())
    assert not hasattr(model, "lora_config")
    assert {name: p for name, p in model.named_parameters()} == weights  # the same Parameter objects
    torch.testing.assert_close(model(x), expected, atol=0, rtol=0)  # unmerged first: W bit for bit
    add_lora(model, LoRAConfig(rank=2))  # adaptable again


def test_fold_lora_leaves_a_plain_model_with_w_plus_s_b_a():
    model, x = add_lora(toy_model(), LoRAConfig(rank=3, alpha=6, targets=("o", "mlp"))), torch.randn(2, 5, 24)
    for p in lora_parameters(model):
        torch.nn.init.normal_(p, std=0.1)
    adapted = {name: m for name, m in model.named_modules() if isinstance(m, lowrank.LoRALayer)}
    folded = {  # W + s·B A in fp64, from the layers' own tensors
        name: m.weight.double() + m.scale * m.lora_b.double() @ m.lora_a.double() for name, m in adapted.items()
    }
    expected = model.eval()(x)
    assert lowrank.fold_lora(model) is model
    assert not any(isinstance(m, lowrank.LoRALayer) for m in model.modules()) and not hasattr(model, "lora_config")
    assert not any("lora_" in key for key in model.state_dict())
    for name, weight in folded.items():
        torch.testing.assert_close(model.get_submodule(name).weight.double(), weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- adapter files


def _trained_toy():
    model = add_lora(toy_model(), LoRAConfig(rank=3, alpha=6, targets=("q", "v", "o")))
    for p in lora_parameters(model):
        torch.nn.init.normal_(p, std=0.1)
    return model.eval()


def test_adapter_round_trip_into_a_fresh_model(tmp_path):
    model, x = _trained_toy(), torch.randn(2, 5, 24)
    save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    fresh = load_adapter(toy_model().eval(), tmp_path / "adapter")
    assert fresh.lora_config == model.lora_config
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_adapter_load_errors(tmp_path):
    save_adapter(_trained_toy(), tmp_path / "a")
    wrong_width = toy_model(dim=30)
    mismatch = r"shape mismatch: blocks\.0\.attn\.proj\.lora_a \(checkpoint \(3, 24\), model \(3, 30"
    with pytest.raises(ValueError, match=mismatch):
        load_adapter(wrong_width, tmp_path / "a")
    deeper = toy_model(depth=3)
    with pytest.raises(ValueError, match=r"4 missing: blocks\.2\.attn\.proj\.lora_a, "):
        load_adapter(deeper, tmp_path / "a")
    other = add_lora(toy_model(), LoRAConfig(rank=2))
    with pytest.raises(ValueError, match="built with"):
        load_adapter(other, tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable adapter weights"):
        load_adapter(toy_model(), tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable JSON file"):
        load_adapter(toy_model(), tmp_path / "a")
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json not found"):
        load_adapter(toy_model(), tmp_path / "missing")


def test_failed_adapter_load_leaves_the_model_as_it_was(tmp_path):
    save_adapter(_trained_toy(), tmp_path / "a")
    model = toy_model(dim=30)
    model.blocks[0].attn.proj.requires_grad_(False)
    before = [(name, type(m)) for name, m in model.named_modules()]
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match="shape mismatch"):
        load_adapter(model, tmp_path / "a")
    assert [(name, type(m)) for name, m in model.named_modules()] == before
    assert {name: p.requires_grad for name, p in model.named_parameters()} == trainable
    assert not hasattr(model, "lora_config")


def test_save_adapter_needs_an_adapted_model(tmp_path):
    with pytest.raises(ValueError, match="no lora_config"):
        save_adapter(toy_model(), tmp_path)


# ---------------------------------------------------------------- torch.compile


def test_torch_compile_matches_eager():
    model = _trained_toy().train()
    x = torch.randn(2, 5, 24)
    eager = model(x)
    eager.sum().backward()
    eager_grads = [p.grad.clone() for p in lora_parameters(model)]
    model.zero_grad()
    compiled = torch.compile(model)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager)
    for p, g in zip(lora_parameters(model), eager_grads, strict=True):
        torch.testing.assert_close(p.grad, g)


def test_adapted_model_agrees_across_backends():
    """The whole adapted toy transformer (3-D activations, fused qkv, q/v/o targets) on the Triton
    kernels (interpreter) and on the torch path: same outputs and adapter gradients."""
    results = {}
    for backend in ("triton", "torch"):
        model = _trained_toy()
        x = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(0))
        with use_backend(backend):
            out = model(x)
            out.square().sum().backward()
        results[backend] = (out, [p.grad for p in lora_parameters(model)])
    (out_triton, grads_triton), (out_torch, grads_torch) = results["triton"], results["torch"]
    assert_close_scaled(out_triton, out_torch, torch.float32, "output")
    for i, (g_triton, g_torch) in enumerate(zip(grads_triton, grads_torch, strict=True)):
        assert_close_scaled(g_triton, g_torch, torch.float32, f"grad of adapter tensor {i}")
