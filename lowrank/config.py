"""LoRAConfig: what to adapt and how (one frozen, validated dataclass)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

BIAS_POLICIES = ("none", "lora_only", "all")


@dataclass(frozen=True)
class LoRAConfig:
    """Hyper-parameters of the adapters that ``add_lora`` inserts.

    Each adapted layer computes Y = X Wᵀ + b + s · (Xd Aᵀ) Bᵀ with s = alpha / r
    (LoRA, Hu et al. 2021, §4.1) or s = alpha / √r with ``rslora`` (Kalajdzievski 2023).
    """

    rank: int = 8  # r: inner dimension of A [r, K] and B [N, r]
    alpha: float = 16.0  # numerator of the scale s; alpha = 2r is the common default
    dropout: float = 0.0  # dropout probability on the LoRA branch's input (training only)
    targets: tuple[str, ...] = ("q", "v")  # short names of lowrank.targets.TARGET_PATTERNS, "all", or regexes
    rslora: bool = False  # scale by alpha / √r instead of alpha / r
    bias: str = "none"  # trainable biases: "none", "lora_only" (of adapted layers), or "all"

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise ValueError(f"LoRAConfig.rank must be a positive integer, got {self.rank!r}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"LoRAConfig.alpha must be a positive finite number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(f"LoRAConfig.targets must be a non-empty tuple of names, got {self.targets!r}")
        if self.bias not in BIAS_POLICIES:
            raise ValueError(f"LoRAConfig.bias must be one of {BIAS_POLICIES}, got {self.bias!r}")

    @property
    def scale(self) -> float:
        """s = alpha / r, or alpha / √r with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"targets": list(self.targets)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoRAConfig:
        """Inverse of ``to_dict``; unknown fields raise a ValueError naming them."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LoRAConfig fields: {unknown}; known fields are {sorted(known)}")
        return cls(**data)
