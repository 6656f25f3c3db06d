"""Merged weight for inference: W' = W + s · B A, accumulated in fp32 and cast once.

Shapes: W [N, K], A [r, K], B [N, r]. Rounding happens once, at the store, so the
merged weight is the correctly rounded fp32 sum, whatever W's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.backend import interpreting, select_backend
from kernels.lowrank_matmul import load_tile, rank_block, store_tile

# Output tile: elementwise-bound (one read and one write of W), so square, moderate tiles.
BLOCK_N = 64
BLOCK_K = 64


@triton.jit
def _merge_kernel(
    w_ptr, a_ptr, b_ptr, out_ptr,
    N, K, RANK,
    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br, stride_on, stride_ok,
    scale,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out[n, k] = W[n, k] + scale · Σ_j B[n, j] A[j, k], all in fp32 (IEEE dot, no TF32), in rank chunks of BLOCK_R."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    delta = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for r0 in range(0, RANK, BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R)
        b = load_tile(b_ptr, offs_n, ranks, stride_bn, stride_br, offs_n < N, ranks < RANK, True)
        a = load_tile(a_ptr, ranks, offs_k, stride_ar, stride_ak, ranks < RANK, offs_k < K, True)
        delta = tl.dot(b, a, delta, input_precision="ieee")
    w = load_tile(w_ptr, offs_n, offs_k, stride_wn, stride_wk, offs_n < N, offs_k < K, True)
    store_tile(out_ptr, w + scale * delta, offs_n, offs_k, stride_on, stride_ok, offs_n < N, offs_k < K)


@torch.no_grad()
def merge_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """A new tensor W + s · B A (fp32 accumulation, one cast to W's dtype, no autograd); W is not modified."""
    (out_features, in_features), rank = weight.shape, lora_a.shape[0]
    if lora_a.shape != (rank, in_features) or lora_b.shape != (out_features, rank):
        raise ValueError(
            f"cannot merge lora_a {tuple(lora_a.shape)} and lora_b {tuple(lora_b.shape)} into weight "
            f"{tuple(weight.shape)}: expected lora_a [r, {in_features}] and lora_b [{out_features}, r]"
        )
    if select_backend(weight.device) != "triton":  # torch (or the reference: the same fp32 sum)
        # out = W + scale * B @ A, in fp32
        return torch.addmm(weight.float(), lora_b.float(), lora_a.float(), alpha=scale).to(weight.dtype)
    out = torch.empty_like(weight)
    if out.numel() == 0:
        return out
    grid = (triton.cdiv(out_features, BLOCK_N), triton.cdiv(in_features, BLOCK_K))
    _merge_kernel[grid](
        weight, lora_a, lora_b, out,
        out_features, in_features, rank,
        weight.stride(0), weight.stride(1), lora_a.stride(0), lora_a.stride(1),
        lora_b.stride(0), lora_b.stride(1), out.stride(0), out.stride(1),
        scale,
        BLOCK_R=rank_block(rank), BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        num_warps=1 if interpreting() else 4,
    )  # fmt: skip
    return out
