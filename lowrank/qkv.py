"""LoRAQKVLinear: LoRA on any subset of q, k, v of a fused ``nn.Linear(K, 3D)`` projection.

    W_qkv [3D, K] = [W_q; W_k; W_v]          lora_a [n·r, K] = [A_p₁; …; A_pₙ]
                                               lora_b [n·D, r] = [B_p₁; …; B_pₙ]
    Y[:, p·D:(p+1)·D] = X W_pᵀ + b_p (+ s · (Xd A_pᵀ) B_pᵀ if p is adapted)

for the n adapted projections p₁ < … < pₙ in q, k, v order; one fused kernel call
(kernels/lora_qkv.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kernels.lora_qkv import PROJECTIONS, lora_qkv, qkv_slots
from kernels.merge import merge_weight
from lowrank.layer import LoRALayer, check_rank, kaiming_lora_a


class LoRAQKVLinear(LoRALayer):
    """A fused qkv projection whose ``projections`` (subset of "q", "k", "v") carry adapters."""

    def __init__(
        self, linear: nn.Linear, rank: int, scale: float, projections: Sequence[str] = PROJECTIONS, dropout: float = 0.0
    ) -> None:
        super().__init__(linear)
        if self.out_features % 3:
            raise ValueError(f"a fused qkv layer needs out_features divisible by 3, got {self.out_features}")
        qkv_slots(projections)  # validates the subset
        self.projection_width = self.out_features // 3
        check_rank(rank, self.in_features, self.projection_width, name="LoRAQKVLinear")
        self.projections = tuple(p for p in PROJECTIONS if p in projections)
        self.rank, self.scale, self.dropout = rank, scale, dropout
        adapted, like = len(self.projections), self.weight
        self.lora_a = kaiming_lora_a(adapted * rank, self.in_features, like=like)
        self.lora_b = nn.Parameter(
            torch.zeros(adapted * self.projection_width, rank, dtype=like.dtype, device=like.device)
        )

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        return lora_qkv(
            x,
            self.weight,
            self.bias,
            self.lora_a,
            self.lora_b,
            self.scale,
            self.projections,
            self.dropout,
            self.training,
        )

    def merged_weight(self) -> torch.Tensor:
        """W_p + s · B_p A_p on each adapted projection's rows; other rows copied unchanged."""
        merged, width, adapted = self.weight.detach().clone(), self.projection_width, len(self.projections)
        for projection, lora_a, lora_b in zip(
            self.projections, self.lora_a.chunk(adapted), self.lora_b.chunk(adapted), strict=True
        ):
            start = PROJECTIONS.index(projection) * width
            merged[start : start + width] = merge_weight(self.weight[start : start + width], lora_a, lora_b, self.scale)
        return merged

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, projections={self.projections}, "
            f"rank={self.rank}, scale={self.scale:g}, dropout={self.dropout}, merged={self.merged}"
        )
