"""Vision Transformer (Dosovitskiy et al., 2021) that loads HF ``ViTModel`` checkpoints.

x (B, C, H, W) → patches (B, N, D), N = (H/p)(W/p) → [cls | patches] + pos_embed (B, 1 + N, D)
→ pre-norm blocks → LayerNorm → class feature h_cls (tanh(pooler(h_cls)) when the checkpoint has a pooler).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from models.transformer import (
    EncoderConfig,
    HFLayout,
    HFModulePaths,
    TransformerEncoder,
    add_class_tokens,
    build_encoder,
    checkpoint_export_fn,
    checkpoint_filter_fn,
    register_model,
)

__all__ = [
    "MODULAR_PRE_NORM_LAYER",
    "PRE_NORM_LAYER",
    "ViT",
    "ViTConfig",
    "checkpoint_export_fn",
    "checkpoint_filter_fn",
    "vit_avmnist_small",
    "vit_avmnist_tiny",
    "vit_family_layout",
]

# HF ViTLayer / ASTLayer module names → ours (q, k, v live in "attention.attention" and are fused).
PRE_NORM_LAYER = (
    ("attention.output.dense", "attn.proj"),
    ("intermediate.dense", "mlp.fc1"),
    ("output.dense", "mlp.fc2"),
    ("layernorm_before", "norm1"),
    ("layernorm_after", "norm2"),
)
# The same modules in memory under transformers 5 (checkpoints keep the names above; peft adapters use these).
MODULAR_PRE_NORM_LAYER = HFModulePaths(
    layers="layers",
    qkv=("attention.q_proj", "attention.k_proj", "attention.v_proj"),
    layer=(
        ("attention.o_proj", "attn.proj"),
        ("mlp.fc1", "mlp.fc1"),
        ("mlp.fc2", "mlp.fc2"),
        ("layernorm_before", "norm1"),
        ("layernorm_after", "norm2"),
    ),
)


def vit_family_layout(base_prefix: str, class_tokens: tuple[tuple[str, str], ...]) -> HFLayout:
    """The HF key table of a ViT-family encoder (ViT, AST): ViTLayer blocks, the base model under ``base_prefix``
    in task checkpoints, and ``class_tokens`` as (HF name under "embeddings.", our parameter) pairs."""
    return HFLayout(
        base_prefix=base_prefix,
        qkv="attention.attention",
        layer=PRE_NORM_LAYER,
        modular=MODULAR_PRE_NORM_LAYER,
        top=(
            *((f"embeddings.{theirs}", mine) for theirs, mine in class_tokens),
            ("embeddings.position_embeddings", "pos_embed"),
            ("embeddings.patch_embeddings.projection", "patch_embed"),
            ("layernorm", "norm"),
            ("pooler.dense", "pooler"),
        ),
    )


@dataclass(frozen=True, kw_only=True)
class ViTConfig(EncoderConfig):
    """HF ViTConfig fields that shape the encoder (others: see EncoderConfig)."""

    model_type: ClassVar[str] = "vit"
    hf_architecture: ClassVar[str] = "ViTModel"

    image_size: int  # H = W
    patch_size: int  # p; the image side must be a multiple of it
    num_channels: int = 3  # C


class ViT(TransformerEncoder):
    """ViT encoder; forward(x (B, C, H, W)) → (hidden (B, 1 + N + k, D), class feature (B, D))."""

    config_class = ViTConfig
    raw_input = "image"  # a decoded picture (models.processing.ImageProcessor)
    pre_norm = True
    hf_layout = vit_family_layout("vit.", (("cls_token", "cls_token"),))

    def __init__(self, config: ViTConfig) -> None:
        super().__init__(config)
        dim, patch = config.hidden_size, config.patch_size
        num_patches = (config.image_size // patch) ** 2
        self.patch_embed = nn.Conv2d(config.num_channels, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.empty(1, 1 + num_patches, dim))
        self.reset_parameters()

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) → (B, 1 + N, D)."""
        patches = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        return add_class_tokens(patches, [self.cls_token], self.pos_embed)


AVMNIST_IMAGE = dict(image_size=28, num_channels=1)  # AV-MNIST digits: 1×28×28


@register_model
def vit_avmnist_tiny(**overrides: Any) -> ViT:
    """1×28×28: 4×4 patches → 1 + 7·7 tokens, D = 64, 4 blocks, 4 heads."""
    args = dict(patch_size=4, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256)
    return build_encoder(ViT, {**AVMNIST_IMAGE, **args}, overrides)


@register_model
def vit_avmnist_small(**overrides: Any) -> ViT:
    """1×28×28: 4×4 patches → 1 + 7·7 tokens, D = 192, 6 blocks, 3 heads."""
    args = dict(patch_size=4, hidden_size=192, num_hidden_layers=6, num_attention_heads=3, intermediate_size=768)
    return build_encoder(ViT, {**AVMNIST_IMAGE, **args}, overrides)
