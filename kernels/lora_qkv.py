"""Fused q, k, v projection with LoRA on any subset of the three (docs/design.md §3).

Shapes: X [..., K], W_qkv [3D, K] (rows: q, then k, then v), b [3D]; n adapted
projections p₁ < … < pₙ in q, k, v order, stacked A [n·r, K] (rows j·r … j·r + r - 1
are A_{pⱼ}), stacked B [n·D, r] (rows j·D … j·D + D - 1 are B_{pⱼ}).

    S = Xd Aᵀ                      [M, n·r]   (one shrink for all adapters)
    Y[:, p·D : (p+1)·D] = X W_pᵀ + b_p + s · S_j B_jᵀ   for p = pⱼ adapted
    Y[:, p·D : (p+1)·D] = X W_pᵀ + b_p                  for p not adapted

One fused kernel computes all of Y; each output tile reads only its own projection's
r columns of S and D rows of B, and non-adapted projections cost nothing beyond the
base GEMM. The backward is LoRA linear's, per adapter:
dS_j = s · G_p B_j, dX = G W + (dS A) ⊙ D / (1 - p), dA = dSᵀ Xd, dB_j = s · G_pᵀ S_j.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels.lora_linear import apply_lora

PROJECTIONS = ("q", "k", "v")


def qkv_slots(projections: Sequence[str]) -> tuple[int, int, int]:
    """Adapter slot of each of q, k, v (-1: not adapted), e.g. ("q", "v") → (0, -1, 1)."""
    unknown = sorted(set(projections) - set(PROJECTIONS))
    if unknown or not projections:
        raise ValueError(f"projections must be a non-empty subset of {PROJECTIONS}, got {tuple(projections)}")
    adapted = [p for p in PROJECTIONS if p in projections]
    return tuple(adapted.index(p) if p in adapted else -1 for p in PROJECTIONS)


def lora_qkv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    projections: Sequence[str] = PROJECTIONS,
    dropout_p: float = 0.0,
    training: bool = False,
    seed: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Y [..., 3D] of the module docstring for X [..., K]; dropout only when ``training``."""
    slots = qkv_slots(projections)
    return apply_lora(x, weight, bias, lora_a, lora_b, scale, dropout_p, training, seed, slots)
