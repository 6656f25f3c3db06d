"""LoRALinear: a LoRA adapter around an existing nn.Linear.

            ┌──────────── W [N, K] (frozen) ────────────┐
    X ──────┤                                            ├──(+ b)──► Y
            └─ dropout ─► A [r, K] ─► B [N, r] ─► × s ──┘
                         Kaiming     zeros

B starts at zero, so an untrained adapter is exactly the wrapped layer.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.lora_linear import lora_linear
from kernels.merge import merge_weight
from lowrank.layer import LoRALayer, check_rank, kaiming_lora_a


class LoRALinear(LoRALayer):
    """Y = X Wᵀ + b + s · (Xd Aᵀ) Bᵀ with W, b the wrapped layer's own parameters."""

    def __init__(self, linear: nn.Linear, rank: int, scale: float, dropout: float = 0.0) -> None:
        super().__init__(linear)
        check_rank(rank, self.in_features, self.out_features, name="LoRALinear")
        self.rank, self.scale, self.dropout = rank, scale, dropout
        self.lora_a = kaiming_lora_a(rank, self.in_features, like=self.weight)
        self.lora_b = nn.Parameter(
            torch.zeros(self.out_features, rank, dtype=self.weight.dtype, device=self.weight.device)
        )

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        return lora_linear(x, self.weight, self.bias, self.lora_a, self.lora_b, self.scale, self.dropout, self.training)

    def merged_weight(self) -> torch.Tensor:
        return merge_weight(self.weight, self.lora_a, self.lora_b, self.scale)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"scale={self.scale:g}, dropout={self.dropout}, merged={self.merged}"
        )
