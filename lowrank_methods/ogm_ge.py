"""OGM-GE (on-the-fly gradient modulation with generalisation enhancement; Peng et al., CVPR 2022; code
GeWu-Lab/OGM-GE_CVPR2022) on late fusion (every encoder parameter and the fusion head train). Each step,
every trainable tensor of encoder m has its gradient g replaced by

    g ← k_m · g + N(0, σ(g)²)     (k_m: ogm_coefficients, α = --ogm-alpha; σ(g): g's own spread)

so the modality that dominates the batch learns slower, and the noise keeps its generalisation. As
published, only in the first epochs: epochs 0 … ⌈w · E⌉ − 1 of E, w = --ogm-window (the published code:
epochs 0–50 of 100, w = 0.5); plain late fusion after them. The published code modulates the conv
kernels of its ResNets, nearly all of their parameters; here every encoder parameter (on a transformer,
its conv-only counterpart would be the patch embedding alone)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping

import torch
from torch import nn

from lowrank_methods.base import Method
from lowrank_train.data import Batch, missing_in
from lowrank_train.metrics import classification_loss


def head_shares(head: nn.Linear, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each modality's share of a concatenation head's logits (OGM-GE's per-modality outputs):

        logits = W · concat_m(h_m) + b = Σ_m (W_m h_m + b / M),   W_m: the columns of W that read h_m

    so share_m = h_m W_mᵀ + b / M  (B, C), in ``features`` order."""
    shares, start = {}, 0
    for m, h in features.items():
        shares[m] = h @ head.weight[:, start : start + h.shape[1]].T + head.bias / len(features)
        start += h.shape[1]
    return shares


def ogm_coefficients(shares: dict[str, torch.Tensor], labels: torch.Tensor, alpha: float) -> dict[str, float]:
    """OGM-GE's coefficient k_m ∈ (0, 1] of each modality (Eq. 10), from the per-modality logits ``shares``
    (B, C):

        s_m = Σ_i softmax(share_m)_i[y_i],   ρ_m = s_m / mean_{n≠m} s_n,
        k_m = 1 − tanh(α·ρ_m) if ρ_m > 1 else 1

    1 − tanh(x) is computed as 2e^{−2x} / (1 + e^{−2x}), which stays > 0 where tanh(x) rounds to 1 (x > 19),
    up to x ≈ 370."""
    scores = {m: share.float().softmax(1).gather(1, labels[:, None]).sum().item() for m, share in shares.items()}
    coefficients = {}
    for m, score in scores.items():
        ratio = score / statistics.fmean(s for n, s in scores.items() if n != m)
        decay = math.exp(-2 * alpha * ratio)
        coefficients[m] = 2 * decay / (1 + decay) if ratio > 1 else 1.0
    return coefficients


class OGMGE(Method):
    title = "OGM-GE"
    tuning = "full"
    multilabel = False  # s_m reads the softmax of the true class
    coefficients: dict[str, float]  # k_m of the current step
    modulating: bool = True  # inside the window of --ogm-window

    def begin_epoch(self, epoch: int, epochs: int) -> None:
        self.modulating = epoch < math.ceil(self.config.ogm_window * epochs)

    def loss(self, batch: Batch) -> torch.Tensor:
        output = self.model({m: batch[m] for m in self.model.modalities}, missing_in(batch), self.fills[0])
        with torch.no_grad():
            shares = head_shares(self.model.head, output.features)
            self.coefficients = ogm_coefficients(shares, batch["label"], self.config.ogm_alpha)
        return classification_loss(output.logits, batch["label"])

    @torch.no_grad()
    def modify_gradients(self) -> None:
        if not self.modulating:
            return
        for m, k in self.coefficients.items():
            for p in self.model.encoders[m].parameters():
                if p.grad is not None:
                    p.grad = k * p.grad + torch.randn_like(p.grad) * (p.grad.std(correction=0) + 1e-8)
