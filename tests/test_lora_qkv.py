"""Fused QKV LoRA (one kernel for all of q, k, v) against the reference and three separate lora_linear calls."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from lora_checks import DEVICE, assert_close_scaled, check_against_reference, mask_of

from kernels.backend import BACKENDS, use_backend
from kernels.lora_linear import lora_linear
from kernels.lora_qkv import lora_qkv, qkv_slots
from kernels.reference import lora_qkv_ref
from lowrank import LoRAQKVLinear

SUBSETS = [combo for n in (1, 2, 3) for combo in itertools.combinations("qkv", n)]


def make_qkv(tokens, in_features, width, rank, projections, dtype, seed, bias=True):
    torch.manual_seed(seed)
    n, like = len(projections), {"dtype": dtype, "device": DEVICE}
    x = torch.randn(tokens, in_features, **like, requires_grad=True)
    weight = torch.randn(3 * width, in_features, **like) / in_features**0.5
    bias_ = torch.randn(3 * width, **like) if bias else None
    lora_a = (torch.randn(n * rank, in_features, **like) / in_features**0.5).requires_grad_()
    lora_b = (torch.randn(n * width, rank, **like) / rank**0.5).requires_grad_()
    return x, weight, bias_, lora_a, lora_b


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@given(
    projections=st.sampled_from(SUBSETS),
    tokens=st.integers(1, 50),
    in_features=st.integers(1, 40),
    width=st.integers(1, 23),
    rank=st.integers(1, 8),
    dropout_p=st.sampled_from([0.0, 0.2]),
    seed=st.integers(0, 10_000),
)
def test_qkv_matches_reference(backend, dtype, projections, tokens, in_features, width, rank, dropout_p, seed):
    tensors = make_qkv(tokens, in_features, width, rank, projections, dtype, seed)
    with use_backend(backend):
        mask = mask_of(tokens, in_features, dropout_p, seed, backend) if dropout_p else None
        check_against_reference(
            lambda *t: lora_qkv(*t, 0.75, projections, dropout_p=dropout_p, training=True, seed=seed),
            lambda *t: lora_qkv_ref(*t, 0.75, projections, dropout_p=dropout_p, dropout_mask=mask),
            *tensors,
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("projections", SUBSETS, ids="".join)
@pytest.mark.parametrize("rank", [3, 17], ids=["r3", "r17"])  # torch path: n·r above SPREAD_COLUMNS too
def test_qkv_equals_three_separate_lora_linear_calls(backend, projections, rank):
    """Adapted thirds are lora_linear with their own A_p, B_p; the others are the plain linear."""
    width, in_features = 19, 21
    x, weight, bias, lora_a, lora_b = make_qkv(37, in_features, width, rank, projections, torch.float32, seed=1)
    with use_backend(backend):
        fused = lora_qkv(x, weight, bias, lora_a, lora_b, 2.0, projections)
        fused.sum().backward()
        x_separate = x.detach().clone().requires_grad_()
        leaves = [
            t.detach().clone().requires_grad_()
            for t in (*lora_a.chunk(len(projections)), *lora_b.chunk(len(projections)))
        ]
        adapters = {name: (leaves[j], leaves[len(projections) + j]) for j, name in enumerate(projections)}
        parts = []
        for i, name in enumerate("qkv"):
            rows = slice(i * width, (i + 1) * width)
            unadapted = (torch.zeros(rank, in_features, device=DEVICE), torch.zeros(width, rank, device=DEVICE))
            a, b = adapters.get(name, unadapted)
            parts.append(lora_linear(x_separate, weight[rows], bias[rows], a, b, 2.0))
        separate = torch.cat(parts, dim=-1)
        separate.sum().backward()
    assert_close_scaled(fused, separate, torch.float32, "output")
    assert_close_scaled(x.grad, x_separate.grad, torch.float32, "grad of x")
    for j, name in enumerate(projections):
        a_ref, b_ref = adapters[name]
        assert_close_scaled(lora_a.grad.chunk(len(projections))[j], a_ref.grad, torch.float32, f"grad of A_{name}")
        assert_close_scaled(lora_b.grad.chunk(len(projections))[j], b_ref.grad, torch.float32, f"grad of B_{name}")


def test_projection_slots():
    assert qkv_slots(("q", "v")) == (0, -1, 1)
    assert qkv_slots(("v", "k", "q")) == (0, 1, 2)
    with pytest.raises(ValueError, match="subset"):
        qkv_slots(("q", "o"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_qkv_layer_zero_b_merge_unmerge(backend):
    torch.manual_seed(0)
    linear = torch.nn.Linear(20, 3 * 16, dtype=torch.bfloat16, device=DEVICE)
    original = linear.weight.detach().clone()
    layer = LoRAQKVLinear(linear, rank=4, scale=2.0, projections=("q", "v"))
    x = torch.randn(2, 7, 20, dtype=torch.bfloat16, device=DEVICE)
    with use_backend(backend), torch.no_grad():
        assert_close_scaled(layer(x), linear(x), torch.bfloat16, "output with B = 0")  # the plain layer
        if backend == "torch":  # same addmm as F.linear, then + 0: bit for bit
            assert torch.equal(layer(x), linear(x))
        torch.nn.init.normal_(layer.lora_b)
        unmerged = layer(x)
        layer.eval()
        layer.merge()
        assert torch.equal(layer.weight[16:32], original[16:32])  # k is not adapted: rows untouched
        assert_close_scaled(layer(x), unmerged, torch.bfloat16, "merged output")
        layer.unmerge()
    assert torch.equal(layer.weight, original)
    assert layer.weight is linear.weight


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_qkv_at_rank_64_loops_over_rank_chunks(dropout_p):
    """q, k, v at r = 64: S, dS and dA are n·r = 192 wide, three 64-wide chunks of the capped rank block."""
    tensors = make_qkv(6, 21, 5, 64, ("q", "k", "v"), torch.float32, seed=2)
    mask = mask_of(6, 21, dropout_p, 2, "triton") if dropout_p else None
    with use_backend("triton"):
        check_against_reference(
            lambda *t: lora_qkv(*t, 0.5, ("q", "k", "v"), dropout_p=dropout_p, training=True, seed=2),
            lambda *t: lora_qkv_ref(*t, 0.5, ("q", "k", "v"), dropout_p=dropout_p, dropout_mask=mask),
            *tensors,
        )
