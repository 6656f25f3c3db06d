"""Shared transformer encoder: fused-qkv attention, MLP, pre-/post-norm block, HF checkpoint I/O.

Shapes: B batch, T real tokens, k extra tokens, D width (hidden_size), H heads, hd = D / H head_dim,
F MLP width (intermediate_size).

Every encoder (ViT, AST, BERT) is a ``TransformerEncoder`` subclass that adds its own token embedding
(``embed``), its Hugging Face key table (``hf_layout``) and its config dataclass. Checkpoints are the HF
layout: ``config.json`` + ``model.safetensors`` with separate query/key/value weights, which
``checkpoint_filter_fn`` fuses into our ``attn.qkv`` and ``checkpoint_export_fn`` splits back.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lowrank_util.errors import MissingFileError, UnknownNameError, UserError
from lowrank_util.files import load_checked, staged

StateDict = dict[str, torch.Tensor]
ConfigT = TypeVar("ConfigT", bound="EncoderConfig")
EncoderT = TypeVar("EncoderT", bound="TransformerEncoder")

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LORA_MARKER = "lora_"  # keys of adapters injected from outside; the only keys allowed to be missing

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,  # erf form: HF's "gelu"
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}


class CheckpointError(UserError, ValueError):
    """A checkpoint or config.json that does not fit the encoder; the message names the offending keys."""


# ---------------------------------------------------------------------------------------------- config


@dataclass(frozen=True, kw_only=True)
class EncoderConfig:
    """Fields shared by every encoder, named as in HF ``config.json`` so that reading one is a lookup."""

    model_type: ClassVar[str] = ""  # HF "model_type"; a config.json with another one is refused
    hf_architecture: ClassVar[str] = ""  # HF class that loads our saved checkpoints, e.g. "ViTModel"

    hidden_size: int  # D
    num_hidden_layers: int  # number of blocks
    num_attention_heads: int  # H; head_dim = D / H
    intermediate_size: int  # F, MLP width
    hidden_act: str = "gelu"  # key of ACTIVATIONS
    layer_norm_eps: float = 1e-12  # HF default for ViT, AST and BERT
    hidden_dropout_prob: float = 0.0  # after embeddings, attention output and MLP output
    attention_probs_dropout_prob: float = 0.0  # on the attention weights
    qkv_bias: bool = True  # bias of the fused qkv projection
    initializer_range: float = 0.02  # std of the truncated-normal init of weights and tokens
    use_pooler: bool = False  # class feature = tanh(pooler(h_cls)) (HF pooler); not in config.json

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} not supported; known: {sorted(ACTIVATIONS)}")

    @classmethod
    def from_hf_config(cls: type[ConfigT], hf_config: Mapping[str, Any]) -> ConfigT:
        """Our config from a HF ``config.json`` dict; unknown HF fields are ignored.

        Raises CheckpointError if its ``model_type`` is another architecture's or a required field
        (one without a default here) is missing.
        """
        found = hf_config.get("model_type", cls.model_type)
        if found != cls.model_type:
            raise CheckpointError(
                f"config.json has model_type {found!r}; {cls.__name__} reads {cls.model_type!r} checkpoints"
            )
        required = [f.name for f in fields(cls) if f.default is MISSING]
        missing = [name for name in required if name not in hf_config]
        if missing:
            raise CheckpointError(f"config.json lacks field(s) {missing} required by {cls.__name__}")
        names = {f.name for f in fields(cls)} - {"use_pooler"}
        return cls(**{name: hf_config[name] for name in names if name in hf_config})

    def to_hf_config(self) -> dict[str, Any]:
        """The ``config.json`` dict that ``transformers`` reads back into ``hf_architecture``."""
        hf_config = dataclasses.asdict(self)
        del hf_config["use_pooler"]
        return {"architectures": [self.hf_architecture], "model_type": self.model_type, **hf_config}


# ---------------------------------------------------------------------------------------------- layers


class Attention(nn.Module):
    """Multi-head self-attention with one fused projection for q, k, v.

    [q | k | v] = x W_qkvᵀ + b_qkv, W_qkv (3D, D) with rows [0:D] = W_q, [D:2D] = W_k, [2D:3D] = W_v;
    out_h = softmax(q_h k_hᵀ / √hd + mask) v_h per head h;  y = concat_h(out_h) W_projᵀ + b_proj.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D), mask (B|1, 1, 1|T, T) bool, True where a key may be attended (visibility_mask) → (B, T, D)."""
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, hd)
        dropout = self.attn_dropout if self.training else 0.0
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:
            # torch's CPU attention backward is 4× slower in bf16 than in fp32 (bench/README.md, "bf16 on the CPU")
            with torch.autocast("cpu", enabled=False):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, dropout_p=dropout)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)  # (B, H, T, hd)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    """y = fc2(act(fc1(x))): (B, T, D) → (B, T, F) → (B, T, D)."""

    def __init__(self, dim: int, hidden_dim: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = ACTIVATIONS[act]
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Transformer block, (B, T, D) → (B, T, D).

    pre-norm (ViT, AST):  x = x + attn(norm1(x));   x = x + mlp(norm2(x))
    post-norm (BERT):     x = norm1(x + attn(x));   x = norm2(x + mlp(x))
    """

    def __init__(self, config: EncoderConfig, pre_norm: bool) -> None:
        super().__init__()
        dim = config.hidden_size
        self.pre_norm = pre_norm
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attn = Attention(dim, config.num_attention_heads, config.qkv_bias, config.attention_probs_dropout_prob)
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = Mlp(dim, config.intermediate_size, config.hidden_act)
        self.drop = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D), mask from visibility_mask or None → (B, T, D)."""
        if self.pre_norm:
            x = x + self.drop(self.attn(self.norm1(x), mask))
            return x + self.drop(self.mlp(self.norm2(x)))
        x = self.norm1(x + self.drop(self.attn(x, mask)))
        return self.norm2(x + self.drop(self.mlp(x)))


def visibility_mask(
    attention_mask: torch.Tensor | None, num_tokens: int, num_extra: int, isolate_extra: bool = False
) -> torch.Tensor | None:
    """Which keys each query may attend (True = visible), for T real tokens followed by k extra ones.

    attention_mask (B, T): 1 = real token, 0 = padding (None: all real). Returns None when everything
    is visible, else a bool mask that broadcasts over heads:
      isolate_extra False → (B, 1, 1, T + k): padding hidden from every query, extra tokens visible to all;
      isolate_extra True  → (B|1, 1, T + k, T + k): besides, extra token j is visible only to itself, so
                            real tokens' outputs do not depend on the extra tokens (they only read).
    """
    if attention_mask is not None and (attention_mask.ndim != 2 or attention_mask.shape[1] != num_tokens):
        raise ValueError(f"attention_mask must be (B, {num_tokens}), got {tuple(attention_mask.shape)}")
    isolate = isolate_extra and num_extra > 0
    if attention_mask is None and not isolate:
        return None
    real_keys = torch.ones(1, num_tokens, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if not isolate:
        return F.pad(real_keys, (0, num_extra), value=True)[:, None, None, :]
    total = num_tokens + num_extra
    extra_keys = torch.zeros(total, num_extra, dtype=torch.bool, device=real_keys.device)
    extra_keys[num_tokens:] = torch.eye(num_extra, dtype=torch.bool, device=real_keys.device)  # self only
    batch = real_keys.shape[0]
    visible = torch.cat([real_keys[:, None, :].expand(batch, total, num_tokens), extra_keys.expand(batch, -1, -1)], -1)
    return visible[:, None]  # (B|1, 1, T + k, T + k)


def add_class_tokens(patches: torch.Tensor, class_tokens: list[nn.Parameter], pos_embed: nn.Parameter) -> torch.Tensor:
    """patches (B, N, D), n class tokens each (1, 1, D), pos_embed (1, n + N, D) → (B, n + N, D)."""
    tokens = torch.cat([*(t.expand(len(patches), -1, -1) for t in class_tokens), patches], dim=1)
    if tokens.shape[1] != pos_embed.shape[1]:
        raise ValueError(
            f"input gives {tokens.shape[1]} tokens but the position embedding has {pos_embed.shape[1]}: "
            "the input size differs from the config's"
        )
    return tokens + pos_embed


# ---------------------------------------------------------------------------------------------- encoder


class TransformerEncoder(nn.Module):
    """embed(x) (B, T, D) → append extra tokens (B, k, D) → blocks → norm (pre-norm only) → class feature.

    Subclasses set ``config_class``, ``hf_layout``, ``pre_norm``, ``num_class_tokens`` and implement
    ``embed``; they build their embedding modules and then call ``reset_parameters``.
    """

    config_class: ClassVar[type[EncoderConfig]]
    hf_layout: ClassVar[HFLayout]
    pre_norm: ClassVar[bool]
    num_class_tokens: ClassVar[int] = 1  # leading tokens averaged into the class feature (AST: cls, dist)
    raw_input: ClassVar[str] = ""  # what a data set gives it: "image", "waveform", "text", "spectrogram" (processing)

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.drop = nn.Dropout(config.hidden_dropout_prob)
        self.blocks = nn.ModuleList(Block(config, self.pre_norm) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps) if self.pre_norm else nn.Identity()
        self.pooler = nn.Linear(dim, dim) if config.use_pooler else None

    def embed(self, x: torch.Tensor, **inputs: torch.Tensor | None) -> torch.Tensor:
        """Encoder input → real tokens (B, T, D), position embeddings included; ``inputs`` are the
        encoder's own extra inputs (BERT: token_type_ids (B, T)), passed on by ``forward``."""
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """Truncated-normal(std = initializer_range) weights and tokens, zero biases, unit LayerNorms."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Conv2d | nn.Embedding):
                nn.init.trunc_normal_(module.weight, std=std)
            if isinstance(module, nn.Linear | nn.Conv2d) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for token in self.parameters(recurse=False):
            nn.init.trunc_normal_(token, std=std)

    def forward_features(
        self,
        tokens: torch.Tensor,
        extra_tokens: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        isolate_extra_tokens: bool = False,
    ) -> torch.Tensor:
        """tokens (B, T, D), extra_tokens (B, k, D), attention_mask (B, T) → hidden states (B, T + k, D).

        isolate_extra_tokens: the extra tokens only read the sequence (see ``visibility_mask``)."""
        num_extra = 0 if extra_tokens is None else extra_tokens.shape[1]
        mask = visibility_mask(attention_mask, tokens.shape[1], num_extra, isolate_extra_tokens)
        if mask is not None:
            mask = mask.to(tokens.device)
        x = self.drop(tokens)
        if extra_tokens is not None:
            x = torch.cat([x, extra_tokens.to(x.dtype)], dim=1)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def default_attention_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """The attention_mask (B, T) that ``forward`` uses for input ``x`` when it is given none: None here
        (every token real); an encoder whose input marks its own padding (BERT's pad ids) overrides this."""
        return None

    def class_feature(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (B, T, D) of the real tokens → (B, D): mean of the class tokens, through tanh(pooler(·)) if it
        has one (the class tokens need no ``attention_mask``; encoders that pool over tokens use it)."""
        feature = hidden[:, : self.num_class_tokens].mean(dim=1)
        return feature if self.pooler is None else torch.tanh(self.pooler(feature))

    def forward(
        self,
        x: torch.Tensor,
        extra_tokens: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        isolate_extra_tokens: bool = False,
        **inputs: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x, extra_tokens (B, k, D), attention_mask (B, T) 1 = token, 0 = padding, ``inputs`` for ``embed``
        (BERT: token_type_ids (B, T)) → (hidden states (B, T + k, D), class feature (B, D));
        extra tokens' outputs are hidden[:, T:]; the class feature reads the T real tokens only. Without an
        attention_mask, the encoder's ``default_attention_mask(x)`` is used (None, all real, but for BERT)."""
        tokens = self.embed(x, **inputs)
        if attention_mask is None:
            attention_mask = self.default_attention_mask(x)
        hidden = self.forward_features(tokens, extra_tokens, attention_mask, isolate_extra_tokens)
        return hidden, self.class_feature(hidden[:, : tokens.shape[1]], attention_mask)

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> nn.modules.module._IncompatibleKeys:
        """Like nn.Module's, but strict allows missing LoRA keys and raises CheckpointError naming every key
        that does not fit (missing, unexpected, mis-shaped) before anything is loaded."""
        if not strict:
            return super().load_state_dict(state_dict, strict=False, assign=assign)
        return load_checked(
            self,
            state_dict,
            "checkpoint",
            into=type(self).__name__,
            error=CheckpointError,
            may_be_missing=lambda key: LORA_MARKER in key,
            assign=assign,
        )

    @classmethod
    def from_pretrained(
        cls: type[EncoderT], path: str | os.PathLike[str], dtype: torch.dtype = torch.float32
    ) -> EncoderT:
        """Load a HF-layout checkpoint: a directory with config.json + model.safetensors, or the
        .safetensors file itself with config.json beside it. Task heads are dropped; floating-point
        tensors are cast to ``dtype``; returns the model in eval mode, on the CPU."""
        hf_config, hf_state = read_checkpoint(Path(path))
        try:
            config = cls.config_class.from_hf_config(hf_config)
            state_dict = cls.state_from_hf(hf_state, config)
            with torch.device("meta"):  # no random init: every tensor comes from the checkpoint
                model = cls(dataclasses.replace(config, use_pooler="pooler.weight" in state_dict))
            model.load_state_dict(
                {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}, assign=True
            )
        except CheckpointError as error:
            raise CheckpointError(f"{path}: {error}") from error
        return model.eval()

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """Write config.json + model.safetensors in the HF layout, each file atomically.

        ``transformers``' ``config_class.hf_architecture`` loads the result. Adapter tensors (keys with
        "lora_") are not written: merge them into the weights first to export an adapted model.
        """
        hf_state = self.state_to_hf(self.state_dict())
        write_checkpoint(Path(directory), self.config.to_hf_config(), hf_state)

    @classmethod
    def state_from_hf(cls, hf_state: Mapping[str, torch.Tensor], config: EncoderConfig) -> StateDict:
        """HF checkpoint tensors → our state dict for an encoder of ``config`` (pure), by the ``hf_layout``
        key table; an encoder whose keys that table cannot express (Whisper) overrides this and state_to_hf."""
        return hf_to_ours(hf_state, cls.hf_layout, config.num_hidden_layers)

    def state_to_hf(self, state_dict: Mapping[str, torch.Tensor]) -> StateDict:
        """Inverse of state_from_hf (pure): our keys → HF base-model keys, LoRA tensors left out."""
        return ours_to_hf(state_dict, self.hf_layout, self.config.num_hidden_layers)

    def hf_module_paths(self) -> dict[str, dict[str, tuple[str, ...]]]:
        """{naming: {our module path: its module path(s) in the ``transformers`` model}}, for peft adapters.

        A fused projection maps to one path per row block: blocks.{i}.attn.qkv [3D, D] → (q, k, v) paths.
        Namings, preferred first: "modular" is transformers 5 (ViTModel / ASTModel hold
        ``layers.{i}.attention.q_proj``), "legacy" is transformers 4, the checkpoint keys'
        (``encoder.layer.{i}.attention.attention.query``); BERT's two are the same. Only modules this
        model has are listed. ``lowrank.export_peft`` / ``import_peft`` call this without knowing the encoders.
        """
        checkpoint = self.hf_layout.checkpoint_paths()
        namings = {"modular": self.hf_layout.modular or checkpoint, "legacy": checkpoint}
        modules = dict(self.named_modules())
        return {
            naming: {
                mine: theirs
                for mine, theirs in paths.module_map(self.hf_layout.top, self.config.num_hidden_layers).items()
                if mine in modules
            }
            for naming, paths in namings.items()
        }


# ---------------------------------------------------------------------------------------------- HF keys


@dataclass(frozen=True)
class HFModulePaths:
    """Where a ``transformers`` model keeps one block's modules in memory: the paths peft adapter keys use."""

    layers: str  # container of the blocks: block i is "{layers}.{i}"
    qkv: tuple[str, str, str]  # the q, k, v projections inside a block (rows of our attn.qkv, in order)
    layer: tuple[tuple[str, str], ...]  # (HF module, our module) for the block's other modules

    def module_map(self, top: tuple[tuple[str, str], ...], num_layers: int) -> dict[str, tuple[str, ...]]:
        """Our module path → HF module path(s); blocks.{i}.attn.qkv → its (q, k, v) paths, one per D rows."""
        mapping = {mine: (theirs,) for theirs, mine in top}
        for i in range(num_layers):
            block = f"{self.layers}.{i}"
            mapping[f"blocks.{i}.attn.qkv"] = tuple(f"{block}.{name}" for name in self.qkv)
            mapping |= {f"blocks.{i}.{mine}": (f"{block}.{theirs}",) for theirs, mine in self.layer}
        return mapping


@dataclass(frozen=True)
class HFLayout:
    """How Hugging Face names one encoder's tensors: (HF module, our module) name-prefix pairs."""

    base_prefix: str  # base model inside task checkpoints, e.g. "vit." in ViTForImageClassification
    qkv: str  # module holding query/key/value inside encoder.layer.{i}, e.g. "attention.attention"
    layer: tuple[tuple[str, str], ...]  # inside encoder.layer.{i} ↔ blocks.{i}
    top: tuple[tuple[str, str], ...]  # outside the layers
    ignored: tuple[str, ...] = ()  # HF buffers without a counterpart here, e.g. "embeddings.position_ids"
    modular: HFModulePaths | None = None  # transformers 5 module paths where they differ from the keys (ViT, AST)

    def checkpoint_paths(self) -> HFModulePaths:
        """Module paths as checkpoint keys name them, which is also transformers 4's in-memory layout."""
        return HFModulePaths("encoder.layer", tuple(f"{self.qkv}.{name}" for name in QKV_NAMES), self.layer)


QKV_NAMES = ("query", "key", "value")  # HF order = our row order in attn.qkv


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: TransformerEncoder) -> StateDict:
    """HF keys → ours for ``model`` (pure): strip the base prefix (dropping task heads), drop ignored
    buffers, fuse query/key/value into attn.qkv, apply the layout's swap table."""
    return hf_to_ours(state_dict, model.hf_layout, model.config.num_hidden_layers)


def checkpoint_export_fn(state_dict: Mapping[str, torch.Tensor], model: TransformerEncoder) -> StateDict:
    """Inverse of checkpoint_filter_fn (pure): our keys → HF base-model keys, LoRA tensors left out."""
    return ours_to_hf(state_dict, model.hf_layout, model.config.num_hidden_layers)


def hf_to_ours(state_dict: Mapping[str, torch.Tensor], layout: HFLayout, num_layers: int) -> StateDict:
    """See checkpoint_filter_fn; keys outside the swap table pass through (and fail loading by name)."""
    hf = _strip_base_prefix(state_dict, layout.base_prefix)
    hf = {k: v for k, v in hf.items() if k not in layout.ignored}
    fused = _fuse_qkv(hf, layout.qkv, num_layers)
    renames = _renames(layout, num_layers)
    return {_rename(k, renames): v for k, v in fused.items()}


def ours_to_hf(state_dict: Mapping[str, torch.Tensor], layout: HFLayout, num_layers: int) -> StateDict:
    """See checkpoint_export_fn; tensors come out contiguous and unshared, ready for safetensors."""
    ours = {k: v.detach() for k, v in state_dict.items() if LORA_MARKER not in k}
    split = _split_qkv(ours, layout.qkv, num_layers)
    renames = [(mine, theirs) for theirs, mine in _renames(layout, num_layers)]
    return {_rename(k, renames): v.contiguous() for k, v in split.items()}


def _strip_base_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    """Keep only ``prefix``-ed keys, unprefixed, if there are any (task checkpoint); else all keys."""
    if not any(k.startswith(prefix) for k in state_dict):
        return dict(state_dict)
    return {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}


def _fuse_qkv(hf: StateDict, qkv: str, num_layers: int) -> StateDict:
    """encoder.layer.{i}.{qkv}.{query,key,value}.{weight,bias} → blocks.{i}.attn.qkv.{weight,bias}:
    weights (D, D) ×3 → (3D, D), biases (D,) ×3 → (3D,), stacked in q, k, v order."""
    out = dict(hf)
    for i in range(num_layers):
        for param in ("weight", "bias"):
            names = [f"encoder.layer.{i}.{qkv}.{p}.{param}" for p in QKV_NAMES]
            present = [n for n in names if n in out]
            if not present:
                continue  # no qkv bias, or a wrong architecture: loading names what is missing
            if len(present) < len(names):
                raise CheckpointError(f"incomplete attention projection: has {present}, lacks the rest of {names}")
            parts = [out.pop(n) for n in names]
            if len({p.shape for p in parts}) > 1:
                raise CheckpointError(
                    f"query/key/value shapes differ: {[(n, tuple(p.shape)) for n, p in zip(names, parts, strict=True)]}"
                )
            out[f"blocks.{i}.attn.qkv.{param}"] = torch.cat(parts, dim=0)
    return out


def _split_qkv(ours: StateDict, qkv: str, num_layers: int) -> StateDict:
    """Inverse of _fuse_qkv: blocks.{i}.attn.qkv (3D, ...) → three (D, ...) HF tensors, cloned."""
    out = dict(ours)
    for i in range(num_layers):
        for param in ("weight", "bias"):
            fused = out.pop(f"blocks.{i}.attn.qkv.{param}", None)
            if fused is None:
                continue
            for name, part in zip(QKV_NAMES, fused.chunk(3, dim=0), strict=True):
                out[f"encoder.layer.{i}.{qkv}.{name}.{param}"] = part.clone()
    return out


def _renames(layout: HFLayout, num_layers: int) -> list[tuple[str, str]]:
    """(HF prefix, our prefix) for every module of a ``num_layers``-deep encoder."""
    per_layer = [
        (f"encoder.layer.{i}.{theirs}", f"blocks.{i}.{mine}")
        for i in range(num_layers)
        for theirs, mine in layout.layer
    ]
    return [*layout.top, *per_layer]


def _rename(key: str, renames: list[tuple[str, str]]) -> str:
    """Replace the first matching module prefix (whole dotted components only); else keep ``key``."""
    for source, target in renames:
        if key == source or key.startswith(source + "."):
            return target + key[len(source) :]
    return key


# ---------------------------------------------------------------------------------------------- files


def read_checkpoint(path: Path) -> tuple[dict[str, Any], StateDict]:
    """(config.json dict, HF state dict) of a checkpoint directory or of a .safetensors file whose
    directory holds config.json. Unreadable files raise CheckpointError naming the file."""
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    config_file = weights.parent / CONFIG_NAME
    for required in (weights, config_file):
        if not required.is_file():
            raise MissingFileError(f"{required} not found (expected a HF checkpoint: {CONFIG_NAME} + {WEIGHTS_NAME})")
    try:
        hf_config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_file} is not valid JSON: {error}") from error
    try:
        state_dict = load_file(weights)
    except SafetensorError as error:
        raise CheckpointError(
            f"{weights} is not a readable safetensors file (corrupt or truncated?): {error}"
        ) from error
    return hf_config, state_dict


def write_checkpoint(directory: Path, hf_config: dict[str, Any], state_dict: StateDict) -> None:
    """Write ``directory``/model.safetensors, then config.json, each via a temp file + os.replace."""
    with staged(directory / WEIGHTS_NAME) as tmp:
        save_file(state_dict, tmp, metadata={"format": "pt"})
    text = json.dumps(hf_config, indent=2, sort_keys=True) + "\n"
    with staged(directory / CONFIG_NAME) as tmp:
        tmp.write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------------------------------- registry

MODEL_REGISTRY: dict[str, Callable[..., TransformerEncoder]] = {}


def register_model(create: Callable[..., EncoderT]) -> Callable[..., EncoderT]:
    """Decorator: make a named constructor available to ``create_model`` under its function name."""
    MODEL_REGISTRY[create.__name__] = create
    return create


def build_encoder(encoder_class: type[EncoderT], defaults: Mapping[str, Any], overrides: Mapping[str, Any]) -> EncoderT:
    """encoder_class(its config from ``defaults`` updated by ``overrides``), randomly initialised."""
    return encoder_class(encoder_class.config_class(**{**defaults, **overrides}))


def create_model(name: str, **overrides: Any) -> TransformerEncoder:
    """A registered encoder, randomly initialised; ``overrides`` replace its config fields."""
    if name not in MODEL_REGISTRY:
        raise UnknownNameError(f"unknown model {name!r}; registered: {sorted(MODEL_REGISTRY)}")
    return MODEL_REGISTRY[name](**overrides)
