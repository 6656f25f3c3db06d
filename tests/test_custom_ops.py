"""The LoRA op as torch.library custom ops: opcheck of both ops on both backends, and a whole adapted
encoder under torch.compile(fullgraph=True) with no graph break, matching eager."""

from __future__ import annotations

import pytest
import torch
from lora_checks import DEVICE, assert_close_scaled

import models
from kernels.backend import BACKENDS, use_backend
from kernels.lora_linear import lora_backward_op, lora_forward_op
from lowrank import LoRAConfig, add_lora, lora_parameters

SLOTS = {"linear": [0], "qkv (q, v)": [0, -1, 1]}


def op_inputs(slots: list[int], dropout_p: float, bias: bool):
    """Forward-op arguments for X [2, 5, 12] through W [N, 12], rank 3 per adapter (grad on x, A, B)."""
    torch.manual_seed(0)
    adapted, width, rank = sum(j >= 0 for j in slots), 7, 3
    x = torch.randn(2, 5, 12, device=DEVICE, requires_grad=True)
    weight = torch.randn(len(slots) * width, 12, device=DEVICE)
    bias_ = torch.randn(len(slots) * width, device=DEVICE) if bias else None
    lora_a = torch.randn(adapted * rank, 12, device=DEVICE, requires_grad=True)
    lora_b = torch.randn(adapted * width, rank, device=DEVICE, requires_grad=True)
    seed = torch.tensor([3], device=DEVICE) if dropout_p else None
    return x, weight, bias_, lora_a, lora_b, 0.5, dropout_p, seed, slots


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("slots", SLOTS.values(), ids=SLOTS.keys())
@pytest.mark.parametrize(("dropout_p", "bias"), [(0.0, True), (0.25, False)], ids=["bias", "dropout"])
def test_opcheck(backend, slots, dropout_p, bias):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of both ops."""
    args = op_inputs(slots, dropout_p, bias)
    with use_backend(backend):
        torch.library.opcheck(lora_forward_op, (*args, True, backend))
        x, weight, _, lora_a, lora_b, scale, p, seed, slots = args
        out, shrunk = lora_forward_op(*args, True, backend)
        grad = torch.randn_like(out)
        backward_args = (grad, x.detach(), weight, lora_a.detach(), lora_b.detach(), shrunk.detach(), scale, p, seed)
        torch.library.opcheck(lora_backward_op, (*backward_args, slots, [True, True, True], backend))
        torch.library.opcheck(lora_backward_op, (*backward_args, slots, [False, True, False], backend))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_compiled_adapted_encoder_has_no_graph_break(dropout):
    """torch.compile(fullgraph=True) of the tiny ViT with LoRA on q, k, v, o (fused qkv and plain linears):
    it fails on any graph break. Without dropout it matches eager in outputs and adapter gradients."""
    torch.manual_seed(0)
    config = LoRAConfig(targets=("q", "k", "v", "o"), dropout=dropout)
    encoder = add_lora(models.create_model("vit_avmnist_tiny"), config)
    for p in lora_parameters(encoder):
        if p.abs().max() == 0:  # B = 0 at init: give the adapters something to add
            torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(2, 1, 28, 28)
    compiled = torch.compile(encoder, fullgraph=True, backend="aot_eager")
    results = []
    for model in (encoder, compiled):
        encoder.zero_grad()
        hidden, feature = model(x)
        (hidden.square().mean() + feature.sum()).backward()
        results.append((hidden.detach(), [p.grad.clone() for p in lora_parameters(encoder)]))
    (eager, eager_grads), (traced, traced_grads) = results
    assert all(g.isfinite().all() for g in traced_grads)
    if dropout == 0:
        assert_close_scaled(traced, eager, torch.float32, "hidden states")
        for i, (got, want) in enumerate(zip(traced_grads, eager_grads, strict=True)):
            assert_close_scaled(got, want, torch.float32, f"grad of adapter tensor {i}")
