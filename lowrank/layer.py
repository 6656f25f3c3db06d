"""What every LoRA wrapper shares: the wrapped frozen weight, init, merge and unmerge.

A wrapper keeps the wrapped ``nn.Linear``'s own ``weight`` and ``bias`` Parameter
objects under the same attribute names, so a model's state-dict keys for the base
weights do not change, and adds ``lora_a`` / ``lora_b``.

Merge swaps ``weight.data`` for W' = W + ΔW (fp32 sum, one rounding, finiteness
checked before anything is written) and keeps the original tensor aside; unmerge
puts that exact tensor back, so merge → unmerge is bit-exact (no W' − ΔW drift) and
both are idempotent. Memory cost while merged: one extra copy of W.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def check_rank(rank: int, in_features: int, out_features: int, name: str = "layer") -> None:
    """A rank must satisfy 1 ≤ r ≤ min(K, N): beyond that the update is no longer low-rank."""
    if not 1 <= rank <= min(in_features, out_features):
        raise ValueError(
            f"rank {rank} is invalid for {name} with in_features={in_features}, out_features={out_features}: "
            f"need 1 <= rank <= {min(in_features, out_features)}"
        )


def kaiming_lora_a(rank: int, in_features: int, like: torch.Tensor) -> nn.Parameter:
    """A [r, K], Kaiming-uniform as nn.Linear initialises its weight (a = √5)."""
    lora_a = torch.empty(rank, in_features, dtype=like.dtype, device=like.device)
    nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
    return nn.Parameter(lora_a)


class LoRALayer(nn.Module):
    """Base of LoRALinear and LoRAQKVLinear: holds W, b and the merge state."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LoRA wraps an nn.Linear, got {type(linear).__name__}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight.requires_grad_(False)
        self.merged = False
        self._unmerged_weight: torch.Tensor | None = None

    def merged_weight(self) -> torch.Tensor:
        """W + ΔW as a new tensor of W's dtype (fp32 accumulation)."""
        raise NotImplementedError

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Y = X Wᵀ + b + ΔY through the fused kernels (unmerged layers)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.merged:
            return self.adapted_forward(x)
        if self.training and torch.is_grad_enabled():
            raise RuntimeError(
                f"{type(self).__name__} is merged: training now would update an adapter that is not used; "
                "call unmerge_lora(model) before training (or model.eval() / torch.no_grad() for inference)"
            )
        return F.linear(x, self.weight, self.bias)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into W for plain-GEMM inference; a no-op when already merged."""
        if self.merged:
            return
        merged = self.merged_weight()
        if not torch.isfinite(merged).all():
            raise ValueError(f"{type(self).__name__}: merged weight has NaN/Inf; the adapter weights are corrupt")
        self._unmerged_weight = self.weight.data
        self.weight.data = merged
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact original W; a no-op when not merged."""
        if not self.merged:
            return
        self.weight.data = self._unmerged_weight
        self._unmerged_weight = None
        self.merged = False
