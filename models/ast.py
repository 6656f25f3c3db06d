"""Audio Spectrogram Transformer (Gong et al., 2021) that loads HF ``ASTModel`` checkpoints.

x (B, T_time, F_mel) → conv over (B, 1, F_mel, T_time), kernel p, stride (s_f, s_t) → patches (B, N, D),
N = ((F_mel - p) // s_f + 1)((T_time - p) // s_t + 1) → [cls | dist | patches] + pos_embed (B, 2 + N, D)
→ pre-norm blocks → LayerNorm → class feature (h_cls + h_dist) / 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from models.transformer import (
    EncoderConfig,
    TransformerEncoder,
    add_class_tokens,
    build_encoder,
    checkpoint_export_fn,
    checkpoint_filter_fn,
    register_model,
)
from models.vit import vit_family_layout

__all__ = ["AST", "ASTConfig", "ast_avmnist_small", "ast_avmnist_tiny", "checkpoint_export_fn", "checkpoint_filter_fn"]


@dataclass(frozen=True, kw_only=True)
class ASTConfig(EncoderConfig):
    """HF ASTConfig fields that shape the encoder (others: see EncoderConfig)."""

    model_type: ClassVar[str] = "audio-spectrogram-transformer"
    hf_architecture: ClassVar[str] = "ASTModel"

    max_length: int  # T_time, spectrogram frames
    num_mel_bins: int  # F_mel, frequency bins
    patch_size: int  # p, square patches
    frequency_stride: int  # s_f; < p gives overlapping patches
    time_stride: int  # s_t

    @property
    def patch_grid(self) -> tuple[int, int]:
        """(frequency patches, time patches)."""
        frequencies = (self.num_mel_bins - self.patch_size) // self.frequency_stride + 1
        return frequencies, (self.max_length - self.patch_size) // self.time_stride + 1


class AST(TransformerEncoder):
    """AST encoder; forward(x (B, T_time, F_mel) or (B, 1, T_time, F_mel)) → (hidden, class feature)."""

    config_class = ASTConfig
    raw_input = "spectrogram"  # AV-MNIST's stored spectrograms, already its input
    pre_norm = True
    num_class_tokens = 2
    hf_layout = vit_family_layout(
        "audio_spectrogram_transformer.", (("cls_token", "cls_token"), ("distillation_token", "dist_token"))
    )

    def __init__(self, config: ASTConfig) -> None:
        super().__init__(config)
        dim = config.hidden_size
        frequencies, times = config.patch_grid
        strides = (config.frequency_stride, config.time_stride)
        self.patch_embed = nn.Conv2d(1, dim, kernel_size=config.patch_size, stride=strides)
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
        self.dist_token = nn.Parameter(torch.empty(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.empty(1, 2 + frequencies * times, dim))
        self.reset_parameters()

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T_time, F_mel) or (B, 1, T_time, F_mel) → (B, 2 + N, D)."""
        if x.ndim == 4:
            if x.shape[1] != 1:
                raise ValueError(f"AST takes one-channel spectrograms, got shape {tuple(x.shape)}")
            x = x[:, 0]
        patches = self.patch_embed(x.unsqueeze(1).transpose(2, 3)).flatten(2).transpose(1, 2)  # (B, N, D)
        return add_class_tokens(patches, [self.cls_token, self.dist_token], self.pos_embed)


AVMNIST_SPECTROGRAM = dict(max_length=112, num_mel_bins=112)  # AV-MNIST audio: 112 frames × 112 bins


@register_model
def ast_avmnist_tiny(**overrides: Any) -> AST:
    """1×112×112: 16×16 patches, stride 16 → 2 + 7·7 tokens, D = 64, 4 blocks, 4 heads."""
    args = dict(patch_size=16, frequency_stride=16, time_stride=16, hidden_size=64, num_hidden_layers=4)
    args |= dict(num_attention_heads=4, intermediate_size=256)
    return build_encoder(AST, {**AVMNIST_SPECTROGRAM, **args}, overrides)


@register_model
def ast_avmnist_small(**overrides: Any) -> AST:
    """1×112×112: 16×16 patches, stride 12 (overlapping) → 2 + 9·9 tokens, D = 192, 6 blocks, 3 heads."""
    args = dict(patch_size=16, frequency_stride=12, time_stride=12, hidden_size=192, num_hidden_layers=6)
    args |= dict(num_attention_heads=3, intermediate_size=768)
    return build_encoder(AST, {**AVMNIST_SPECTROGRAM, **args}, overrides)
