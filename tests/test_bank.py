"""LoRA banks: many adapters over one frozen layer, chosen per sample, against a per-sample reference loop;
the selection context; banks built from saved adapters of one base (lowrank/bank.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from lora_checks import assert_close_scaled
from torch import nn

from kernels.backend import BACKENDS, use_backend
from kernels.reference import lora_linear_ref, lora_qkv_ref
from lowrank import LoRAConfig, LoRALinear, add_lora, load_adapter, save_adapter
from lowrank.bank import LoRABank, add_adapter_bank, selected_adapters
from lowrank_util.errors import MismatchError
from models import create_model

DTYPES = (torch.float32, torch.bfloat16)


@st.composite
def bank_problems(draw):
    """1 to 4 adapters of ranks 1 … 6 (mixed), a plain linear or a fused qkv with 1 to 3 adapted projections,
    1 to 5 samples of 1 to 4 rows, ids in −1 … n − 1 in any order."""
    adapters = draw(st.integers(1, 4))
    projections = draw(st.sampled_from([None, ("q",), ("q", "v"), ("q", "k", "v")]))
    samples = draw(st.integers(1, 5))
    return {
        "ranks": draw(st.lists(st.integers(1, 6), min_size=adapters, max_size=adapters)),
        "projections": projections,
        "features": draw(st.integers(6, 20)),
        "width": draw(st.integers(6, 12)),
        "tokens": draw(st.integers(1, 4)),
        "ids": draw(st.lists(st.integers(-1, adapters - 1), min_size=samples, max_size=samples)),
        "bias": draw(st.booleans()),
    }


def make_bank(problem: dict, dtype: torch.dtype) -> LoRABank:
    torch.manual_seed(0)
    projections = problem["projections"]
    adapted, segments = (1, 1) if projections is None else (len(projections), 3)
    features, width = problem["features"], problem["width"]
    linear = nn.Linear(features, segments * width, bias=problem["bias"]).to(dtype)
    adapters = [
        (
            torch.randn(adapted * r, features, dtype=dtype),
            torch.randn(adapted * width, r, dtype=dtype),
            2.0 / r,
        )
        for r in problem["ranks"]
    ]
    return LoRABank(linear, adapters, projections)


def per_sample_reference(bank: LoRABank, x: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """Each sample through its own adapter's reference (the base alone for −1), in fp32, from the bank's
    parameters, so that gradients reach them."""
    rows = []
    weight, bias = bank.weight.float(), None if bank.bias is None else bank.bias.float()
    for sample, i in zip(x.float(), ids, strict=True):
        if i < 0:
            rows.append(torch.nn.functional.linear(sample, weight, bias))
            continue
        lora_a, lora_b = bank.lora_a[i].float(), bank.lora_b[i].float()
        if bank.projections is None:
            rows.append(lora_linear_ref(sample, weight, bias, lora_a, lora_b, bank.scales[i]))
        else:
            rows.append(lora_qkv_ref(sample, weight, bias, lora_a, lora_b, bank.scales[i], bank.projections))
    return torch.stack(rows)


def gradients(x: torch.Tensor, bank: LoRABank) -> tuple[torch.Tensor, ...]:
    """dX, dA, dB; an adapter gradient that autograd never reached (only −1 ids) is zero."""
    return x.grad, *(torch.zeros_like(p) if p.grad is None else p.grad for p in (bank.lora_a, bank.lora_b))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(problem=bank_problems())
def test_bank_matches_a_per_sample_loop(backend, dtype, problem):
    """Output and the gradients of x, A and B; an adapter with no rows gets zero gradients."""
    bank = make_bank(problem, dtype)
    ids = problem["ids"]
    x = torch.randn(len(ids), problem["tokens"], problem["features"], dtype=dtype, requires_grad=True)
    with use_backend(backend), selected_adapters(ids):
        out = bank(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    grads = gradients(x, bank)
    x_ref = x.detach().float().requires_grad_()
    bank.lora_a.grad = bank.lora_b.grad = None
    expected = per_sample_reference(bank, x_ref, ids)
    expected.backward(grad_out.float())
    assert_close_scaled(out, expected, dtype, "output")
    for name, got, want in zip(("x", "A", "B"), grads, gradients(x_ref, bank), strict=True):
        assert_close_scaled(got, want, dtype, f"grad of {name}")
    for i in set(range(bank.adapters)) - set(ids):
        assert not grads[1][i].any() and not grads[2][i].any(), f"adapter {i} has no rows but got a gradient"


def test_one_adapter_is_exactly_the_lora_layer_and_minus_one_the_base():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    layer = LoRALinear(base, rank=4, scale=0.5)  # shares base's weight and bias
    nn.init.normal_(layer.lora_b)
    bank = LoRABank(base, [(layer.lora_a.data, layer.lora_b.data, layer.scale)])
    x = torch.randn(3, 5, 12)
    with torch.no_grad():
        with selected_adapters([0, 0, 0]):
            assert torch.equal(bank(x), layer(x))
        with selected_adapters([-1, -1, -1]):
            assert torch.equal(bank(x), torch.nn.functional.linear(x, base.weight, base.bias))


def test_permuted_and_interleaved_samples_give_the_same_rows():
    bank = make_bank({"ranks": [2, 5, 3], "projections": ("q", "v"), "features": 9, "width": 7, "tokens": 3,
                      "ids": [], "bias": True}, torch.float32)  # fmt: skip
    x = torch.randn(6, 3, 9)
    grouped, interleaved = [0, 0, 1, 1, 2, -1], [1, 0, -1, 2, 0, 1]
    order = [2, 0, 5, 4, 1, 3]  # interleaved[j] = grouped[order[j]]
    with torch.no_grad():
        with selected_adapters(grouped):
            first = bank(x)
        with selected_adapters(interleaved):
            second = bank(x[order])
    torch.testing.assert_close(second, first[order], rtol=1e-6, atol=1e-6)


def test_a_cast_bank_keeps_its_scales_exact_and_out_of_the_state_dict():
    """The scales the bank op reads on the device: fp32 bits in an int32 buffer, so model.to(bfloat16) cannot
    round 2/3; not saved (``scales`` is the source)."""
    bank = make_bank({"ranks": [3, 5], "projections": None, "features": 8, "width": 6, "tokens": 2, "ids": [],
                      "bias": False}, torch.float32)  # fmt: skip
    assert "scale_bits" not in bank.state_dict()
    bank.to(torch.bfloat16)
    assert torch.equal(bank.scale_bits.view(torch.float32), torch.tensor(bank.scales, dtype=torch.float32))


def test_selection_is_required_checked_and_reset_even_on_error():
    bank = make_bank({"ranks": [2, 2], "projections": None, "features": 8, "width": 6, "tokens": 2, "ids": [],
                      "bias": False}, torch.float32)  # fmt: skip
    x = torch.randn(2, 2, 8)
    with pytest.raises(RuntimeError, match="selected_adapters"):
        bank(x)
    with pytest.raises(ValueError, match="-1 … 1"), selected_adapters([0, 2]):
        bank(x)
    with pytest.raises(ValueError, match="3 adapter ids"), selected_adapters([0, 1, 1]):
        bank(x)
    with pytest.raises(ZeroDivisionError), selected_adapters([0, 1]):
        raise ZeroDivisionError
    with pytest.raises(RuntimeError, match="selected_adapters"):  # the failed block left no selection behind
        bank(x)


@pytest.fixture
def saved_adapters(tmp_path):
    """Three trained-looking adapters (ranks 2, 8, 4; q, v) of one tiny ViT, saved; and the base model."""
    torch.manual_seed(0)
    base = create_model("vit_avmnist_tiny").eval()
    paths = []
    for i, rank in enumerate((2, 8, 4)):
        model = add_lora(copy.deepcopy(base), LoRAConfig(rank=rank, alpha=2 * rank))
        for name, parameter in model.named_parameters():
            if name.endswith("lora_b"):
                nn.init.normal_(parameter, std=0.05)
        save_adapter(model, tmp_path / f"adapter{i}")
        paths.append(tmp_path / f"adapter{i}")
    return base, paths


def test_a_bank_of_saved_adapters_serves_each_sample_as_its_own_model(saved_adapters):
    base, paths = saved_adapters
    bank = add_adapter_bank(copy.deepcopy(base), paths)
    assert sum(isinstance(m, LoRABank) for m in bank.modules()) == len(base.blocks)  # each block's qkv
    x, ids = torch.randn(5, 1, 28, 28), [2, -1, 0, 1, 2]
    with torch.no_grad(), use_backend("torch"):
        with selected_adapters(ids):
            mixed = bank(x)[1]
        alone = []
        for sample, i in zip(x, ids, strict=True):
            model = base if i < 0 else load_adapter(copy.deepcopy(base), paths[i]).eval()
            alone.append(model(sample[None])[1][0])
    torch.testing.assert_close(mixed, torch.stack(alone), rtol=1e-5, atol=1e-5)


def test_a_bank_refuses_adapters_of_other_layers_naming_the_file(saved_adapters, tmp_path):
    base, paths = saved_adapters
    other = add_lora(copy.deepcopy(base), LoRAConfig(rank=2, targets=("q", "k")))
    save_adapter(other, tmp_path / "qk")
    model = copy.deepcopy(base)
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    with pytest.raises(MismatchError, match="qk adapts"):
        add_adapter_bank(model, [*paths, tmp_path / "qk"])
    bigger = add_lora(create_model("vit_avmnist_small"), LoRAConfig(rank=2))  # same targets, another base
    save_adapter(bigger, tmp_path / "small")
    with pytest.raises(MismatchError, match="small"):
        add_adapter_bank(model, [paths[0], tmp_path / "small"])
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before  # left as it was
    assert not any(isinstance(m, LoRABank) for m in model.modules())
