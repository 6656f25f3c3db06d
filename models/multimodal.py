"""Multimodal classification over pretrained unimodal encoders, with U2A Mask Tokens for missing modalities
(the methods that train them are in lowrank_methods).

Shapes: B batch, M modalities (in ``encoders`` order), D_m width of modality m's encoder, C classes.

    h_m = E_m(x_m)[class feature]                                   (B, D_m)
    logits = W_head · concat_m(f_m) + b_head,  f_m = h_m if m is present, else a stand-in  (B, C)

Stand-ins for a missing modality m (``MISSING_FILLS``), per sample (``missing`` (B, M) bool):
    "mask-token"   ĥ_m = mean over present n of  out_{n→m}( E_n([x_n ; in_{m→n}(t_m)])[appended position] )
                   t_m (1, 1, D_m) is m's learnable Mask Token; in/out are Linear maps between widths
                   (identity when D_m = D_n). The token is isolated (it reads x_n's tokens, they do not
                   read it) unless ``mask_tokens_visible``, so h_n is the same with or without it.
    "zero-input"   h_m of an all-zero input (the protocol most papers report)
    "zero-feature" 0, i.e. the branch is dropped from the linear head
Missing inputs are always zeroed before encoding, so nothing of a missing modality can leak.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from models.transformer import TransformerEncoder

MISSING_FILLS = ("mask-token", "zero-input", "zero-feature")


class UnimodalClassifier(nn.Module):
    """One encoder + a linear head on its class feature: x → logits (B, C)."""

    def __init__(self, encoder: TransformerEncoder, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x)[1])


@dataclass
class FusionOutput:
    """logits (B, C); features: h_m (B, D_m) of each modality's own input (zeroed where missing);
    generated: ĥ_m (B, D_m) from the Mask Tokens; present: (B, M) bool."""

    logits: torch.Tensor
    features: dict[str, torch.Tensor]
    generated: dict[str, torch.Tensor]
    present: torch.Tensor


class MultimodalClassifier(nn.Module):
    """Late fusion of unimodal encoders with a linear head, and one Mask Token per modality (U2A)."""

    def __init__(
        self, encoders: Mapping[str, TransformerEncoder], num_classes: int, mask_tokens_visible: bool = False
    ) -> None:
        super().__init__()
        if len(encoders) < 2:
            raise ValueError(f"a multimodal classifier needs at least two encoders, got {list(encoders)}")
        self.modalities = tuple(encoders)
        self.mask_tokens_visible = mask_tokens_visible
        self.encoders = nn.ModuleDict(encoders)
        width = {m: encoder.config.hidden_size for m, encoder in encoders.items()}
        self.head = nn.Linear(sum(width.values()), num_classes)
        self.mask_tokens = nn.ParameterDict({m: nn.Parameter(torch.zeros(1, 1, width[m])) for m in encoders})
        for token in self.mask_tokens.values():
            nn.init.trunc_normal_(token, std=0.02)
        pairs = [(m, n) for m in encoders for n in encoders if m != n]
        self.token_in = nn.ModuleDict({f"{m}_to_{n}": width_projection(width[m], width[n]) for m, n in pairs})
        self.token_out = nn.ModuleDict({f"{n}_to_{m}": width_projection(width[n], width[m]) for m, n in pairs})

    def others(self, modality: str) -> tuple[str, ...]:
        return tuple(m for m in self.modalities if m != modality)

    def forward(
        self, inputs: Mapping[str, torch.Tensor], missing: torch.Tensor | None = None, fill: str = "mask-token"
    ) -> FusionOutput:
        """inputs: modality → batch (B, ...); missing (B, M) bool, True = absent (None: all present)."""
        if fill not in MISSING_FILLS:
            raise ValueError(f"fill must be one of {MISSING_FILLS}, got {fill!r}")
        batch = len(inputs[self.modalities[0]])
        present = self._present(missing, batch, inputs[self.modalities[0]].device)
        features: dict[str, torch.Tensor] = {}
        proposals: dict[str, list[torch.Tensor]] = {m: [] for m in self.modalities}  # m → [(B, D_m) per n]
        for i, n in enumerate(self.modalities):
            keep = present[:, i].view(-1, *[1] * (inputs[n].ndim - 1))
            tokens = torch.cat([self.token_in[f"{m}_to_{n}"](self.mask_tokens[m]) for m in self.others(n)], 1)
            hidden, features[n] = self.encoders[n](
                inputs[n] * keep,
                extra_tokens=tokens.expand(batch, -1, -1),
                isolate_extra_tokens=not self.mask_tokens_visible,
            )
            first = hidden.shape[1] - tokens.shape[1]
            for j, m in enumerate(self.others(n)):
                proposals[m].append(self.token_out[f"{n}_to_{m}"](hidden[:, first + j]))
        generated = {m: self._average_over_present(proposals[m], present, m) for m in self.modalities}
        return FusionOutput(self.fill_logits(features, generated, present, fill), features, generated, present)

    def fill_logits(
        self,
        features: Mapping[str, torch.Tensor],
        generated: Mapping[str, torch.Tensor],
        present: torch.Tensor,
        fill: str,
    ) -> torch.Tensor:
        """The head's logits (B, C) on a forward's ``features``, ``generated`` and ``present`` (FusionOutput's),
        a missing modality's filled in by ``fill``: one forward serves every fill (only the stand-in differs)."""
        if fill not in MISSING_FILLS:
            raise ValueError(f"fill must be one of {MISSING_FILLS}, got {fill!r}")
        fused = []
        for i, m in enumerate(self.modalities):
            stand_in = {"mask-token": generated[m], "zero-input": features[m], "zero-feature": 0.0}[fill]
            fused.append(torch.where(present[:, i, None], features[m], stand_in))
        return self.head(torch.cat(fused, dim=1))

    def _present(self, missing: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        expected = (batch, len(self.modalities))
        if missing is None:
            return torch.ones(expected, dtype=torch.bool, device=device)
        if missing.shape != expected or missing.dtype != torch.bool:
            raise ValueError(
                f"missing must be a bool tensor of shape {expected} (batch, modalities {self.modalities}), "
                f"got {missing.dtype} {tuple(missing.shape)}"
            )
        return ~missing

    def _average_over_present(
        self, proposals: list[torch.Tensor], present: torch.Tensor, modality: str
    ) -> torch.Tensor:
        """Mean of the proposals for ``modality`` over the other modalities present in each sample (0 if none)."""
        weights = torch.stack([present[:, self.modalities.index(n)] for n in self.others(modality)], 1).float()
        total = torch.einsum("bn,nbd->bd", weights, torch.stack(proposals))
        return total / weights.sum(1, keepdim=True).clamp(min=1.0)


def width_projection(source: int, target: int) -> nn.Module:
    """Linear map between encoder widths; identity when they agree."""
    return nn.Identity() if source == target else nn.Linear(source, target)
