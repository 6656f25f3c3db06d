"""BERT encoder (Devlin et al., 2019) that loads HF ``BertModel`` checkpoints (e.g. all-MiniLM-L6-v2).

ids (B, T) → LayerNorm(word[ids] + type[token_type_ids] + pos[0..T-1]) (B, T, D) → post-norm blocks
→ class feature tanh(pooler(h_cls)) when the checkpoint has a pooler, else h_cls.

**Padding without a mask.** Given no ``attention_mask``, a config with a ``pad_token_id`` (every HF BERT
checkpoint: [PAD] = 0) masks the pad ids itself (``Bert.default_attention_mask``). HF ``BertModel`` instead
attends to pads when it gets no mask; here ids padded to a fixed length (``models.processing.TextTokenizer``)
carry their mask in the ids, so a data set needs to store nothing else, and a forgotten mask cannot
silently mix padding into the features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from models.transformer import (
    EncoderConfig,
    HFLayout,
    TransformerEncoder,
    build_encoder,
    checkpoint_export_fn,
    checkpoint_filter_fn,
    register_model,
)

__all__ = ["Bert", "BertConfig", "bert_minilm_l6", "checkpoint_export_fn", "checkpoint_filter_fn"]


@dataclass(frozen=True, kw_only=True)
class BertConfig(EncoderConfig):
    """HF BertConfig fields that shape the encoder (others: see EncoderConfig); defaults are HF's."""

    model_type: ClassVar[str] = "bert"
    hf_architecture: ClassVar[str] = "BertModel"

    vocab_size: int
    max_position_embeddings: int = 512  # longest sequence
    type_vocab_size: int = 2  # token types (segments)
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    position_embedding_type: str = "absolute"  # the only kind implemented
    pad_token_id: int | None = None  # [PAD]'s id (HF checkpoints: 0); None: no default mask (default_attention_mask)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.position_embedding_type != "absolute":
            raise ValueError(f"position_embedding_type {self.position_embedding_type!r} not supported")


class Bert(TransformerEncoder):
    """BERT encoder; forward(ids (B, T), ..., token_type_ids=(B, T) or None) → (hidden (B, T + k, D),
    class feature (B, D)): the shared forward, which passes token_type_ids on to ``embed``."""

    config_class = BertConfig
    raw_input = "text"  # a string (models.processing.TextTokenizer)
    pre_norm = False
    hf_layout = HFLayout(
        base_prefix="bert.",
        qkv="attention.self",
        layer=(
            ("attention.output.dense", "attn.proj"),
            ("attention.output.LayerNorm", "norm1"),
            ("intermediate.dense", "mlp.fc1"),
            ("output.dense", "mlp.fc2"),
            ("output.LayerNorm", "norm2"),
        ),
        top=(
            ("embeddings.word_embeddings", "word_embed"),
            ("embeddings.position_embeddings", "pos_embed"),
            ("embeddings.token_type_embeddings", "type_embed"),
            ("embeddings.LayerNorm", "embed_norm"),
            ("pooler.dense", "pooler"),
        ),
        ignored=("embeddings.position_ids", "embeddings.token_type_ids"),
    )

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        dim = config.hidden_size
        self.word_embed = nn.Embedding(config.vocab_size, dim)
        self.pos_embed = nn.Embedding(config.max_position_embeddings, dim)
        self.type_embed = nn.Embedding(config.type_vocab_size, dim)
        self.embed_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.reset_parameters()

    def embed(self, x: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T) token ids, token_type_ids (B, T) (default 0) → (B, T, D)."""
        if x.shape[1] > self.pos_embed.num_embeddings:
            raise ValueError(f"{x.shape[1]} tokens exceed max_position_embeddings {self.pos_embed.num_embeddings}")
        types = torch.zeros_like(x) if token_type_ids is None else token_type_ids
        positions = torch.arange(x.shape[1], device=x.device)
        return self.embed_norm(self.word_embed(x) + self.type_embed(types) + self.pos_embed(positions))

    def default_attention_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """x (B, T) ids → (B, T) bool, False where x = pad_token_id, except position 0; None without a pad_token_id.

        HF BertModel differs: it attends to pads when it gets no mask (see the module docstring). Position 0 stays
        visible: it is the [CLS] of real text, and for an all-padding row (a zeroed missing text) it keeps one
        key visible, so that attention stays defined instead of a softmax over no key (NaN).
        """
        if self.config.pad_token_id is None:
            return None
        real = x != self.config.pad_token_id
        real[:, 0] = True
        return real


@register_model
def bert_minilm_l6(**overrides: Any) -> Bert:
    """all-MiniLM-L6-v2's shape: vocab 30522, 512 positions, D = 384, 6 blocks, 12 heads, MLP 1536, [PAD] = 0
    (22.6M without the pooler, which from_pretrained adds when the checkpoint has one)."""
    args = dict(vocab_size=30522, max_position_embeddings=512, hidden_size=384, num_hidden_layers=6)
    args |= dict(num_attention_heads=12, intermediate_size=1536, pad_token_id=0)
    return build_encoder(Bert, args, overrides)
