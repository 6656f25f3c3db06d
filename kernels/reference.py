"""Plain PyTorch references: the spec every kernel is tested against (docs/design.md §3).

Shape convention (nn.Linear's): x [..., K], weight W [N, K], bias b [N],
lora_a A [r, K], lora_b B [N, r], scale s = alpha / r (rsLoRA: alpha / √r).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Y = X Wᵀ + b + s · (Xd Aᵀ) Bᵀ with Xd = D ⊙ X / (1 - p); no dropout when ``dropout_mask`` is None.

    ``dropout_mask`` D is a {0, 1} tensor of x's shape.
    """
    x_dropped = x if dropout_mask is None else x * dropout_mask / (1.0 - dropout_p)
    return F.linear(x, weight, bias) + scale * F.linear(F.linear(x_dropped, lora_a), lora_b)


def merge_ref(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """W' = W + s · B A, computed in fp32 and cast once to W's dtype."""
    return (weight.float() + scale * (lora_b.float() @ lora_a.float())).to(weight.dtype)


def lora_qkv_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    projections: tuple[str, ...],
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Y = X W_qkvᵀ + b, plus s · (Xd A_pᵀ) B_pᵀ on projection p's third of Y for each adapted p.

    ``lora_a`` [n·r, K] and ``lora_b`` [n·D, r] stack the adapters of the n adapted
    projections in q, k, v order.
    """
    x_dropped = x if dropout_mask is None else x * dropout_mask / (1.0 - dropout_p)
    parts = list(F.linear(x, weight, bias).chunk(3, dim=-1))
    adapted = [i for i, name in enumerate("qkv") if name in projections]
    for i, a, b in zip(adapted, lora_a.chunk(len(adapted)), lora_b.chunk(len(adapted)), strict=True):
        parts[i] = parts[i] + scale * F.linear(F.linear(x_dropped, a), b)
    return torch.cat(parts, dim=-1)
