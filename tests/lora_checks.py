"""The one helper that checks a LoRA op's output and every gradient against its reference.

Tolerances: the op runs in the test dtype; the reference runs in fp32 on the same
(already rounded) inputs. An element passes when |actual - expected| ≤ tol · max(1, max|expected|),
i.e. the error is measured against the tensor's scale, as fp32 accumulation promises.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from kernels.backend import Backend
from kernels.lora_linear import regenerate_mask

# Where kernel tests put their tensors: the CPU (Triton kernels interpreted, see conftest.py)
# unless LOWRANK_TEST_DEVICE names another device, e.g. ``cuda`` for the compiled kernels.
DEVICE = torch.device(os.environ.get("LOWRANK_TEST_DEVICE", "cpu"))

# dtype → relative tolerance (against the tensor's max magnitude). About 4 units in
# the last place of the dtype: fp32 2⁻²³·K-ish accumulation noise, fp16 2⁻¹⁰, bf16 2⁻⁷.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def mask_of(rows: int, cols: int, dropout_p: float, seed: int, backend: Backend) -> torch.Tensor:
    """The dropout mask D [rows, cols] that ``backend`` draws from the int ``seed`` (on DEVICE)."""
    return regenerate_mask(rows, cols, dropout_p, torch.tensor([seed], device=DEVICE), backend)


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    """Fail with the worst element, its index and the count of mismatches (NaN/Inf always fail)."""
    actual, expected = actual.float(), expected.float()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bound = TOLERANCE[dtype] * max(1.0, expected.abs().max().item() if expected.numel() else 1.0)
    error = (actual - expected).abs()
    bad = ~(error <= bound)  # NaN compares False, so it counts as bad
    if bad.any():
        worst = int(torch.nan_to_num(error, nan=float("inf")).argmax())
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), error.shape))
        got, want = actual.flatten()[worst].item(), expected.flatten()[worst].item()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{error.numel()} elements off by more than {bound:.3g} ({dtype}); "
            f"worst at {index}: actual {got:.6g}, expected {want:.6g}"
        )


def check_against_reference(
    op: Callable[..., torch.Tensor],
    reference: Callable[..., torch.Tensor],
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
) -> None:
    """Compare op(x, W, b, A, B) and the gradients of x, A, B (and b if it requires grad) with
    reference(...) evaluated in fp32; W must get no gradient."""
    dtype = x.dtype
    trainable = {"x": x, "lora_a": lora_a, "lora_b": lora_b} | ({"bias": bias} if bias is not None else {})
    for tensor in trainable.values():
        tensor.grad = None
    out = op(x, weight, bias, lora_a, lora_b)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)

    upcast = {name: tensor.detach().float().requires_grad_(tensor.requires_grad) for name, tensor in trainable.items()}
    expected = reference(upcast["x"], weight.float(), upcast.get("bias"), upcast["lora_a"], upcast["lora_b"])
    expected.backward(grad_out.float())

    assert_close_scaled(out, expected, dtype, "output")
    for name, tensor in trainable.items():
        if tensor.requires_grad:
            assert tensor.grad is not None, f"{name} got no gradient"
            assert_close_scaled(tensor.grad, upcast[name].grad, dtype, f"grad of {name}")
    assert weight.grad is None, "the frozen weight got a gradient"
