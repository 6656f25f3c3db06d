"""Whisper audio encoder (Radford et al., 2022) that loads HF ``WhisperModel`` / ``WhisperForConditionalGeneration``
checkpoints (the encoder half; the decoder is dropped).

Shapes: B batch, F_mel mel bins, T log-mel frames (100 per second), T' = ⌈T / 2⌉ positions, k extra tokens,
D width (d_model).

    x (B, F_mel, T)  log-mel features (models/whisper_features.py; ``Whisper.features`` from a waveform)
    h = GELU(conv1(x))                  (B, D, T)    kernel 3, padding 1
    h = GELU(conv2(h))                  (B, D, T')   kernel 3, padding 1, stride 2
    h = hᵀ + pos[0:T']                  (B, T', D)   pos: the stored sinusoids (a buffer, never trained)
    h = pre-norm blocks, final LayerNorm (B, T' + k, D)
    class feature = mean_{t < T'} h_t   (B, D)       Whisper has no CLS token; extra tokens and padding excluded

pos[t, j] = sin(t · 10000^(−j / (D/2 − 1))) for j < D/2 and cos(t · 10000^(−(j − D/2) / (D/2 − 1))) for the
other half (OpenAI's ``sinusoids``); checkpoints store the table (HF ``embed_positions.weight``, (1500, D)).

**No 30 s padding.** OpenAI's models always see 3,000 frames (30 s, zero-padded audio) and positions
0 … 1499. Here the positions are sliced to the input: a 1 s clip is 100 frames → 50 positions, and
attention runs over those 50 only. That is 30× less work, but it is not the same function: in a padded
run every position also attends to the ~1450 positions of padding, so outputs (and features) differ
from a padded run of the same clip. Feed ``log_mel_spectrogram(..., num_samples=SAMPLES_PER_WINDOW)``
(3,000 frames) to reproduce the original models exactly.

**Attention biases.** Whisper's q and v projections have a bias and k has none. Here q, k, v are one fused
``attn.qkv`` (as in every encoder of this project, so LoRA's q/k/v targets apply unchanged) whose bias has a
k slice that loads as zero and is dropped on export. Any value there is exact: a k bias b adds q·b to every
logit q·k_j of a query, the same for every key j, and softmax is invariant to that shift. So the slice
may even train (its gradient is zero up to rounding) without changing what the model computes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from models.transformer import (
    LORA_MARKER,
    CheckpointError,
    EncoderConfig,
    HFModulePaths,
    StateDict,
    TransformerEncoder,
    build_encoder,
    register_model,
)
from models.whisper_features import log_mel_spectrogram

__all__ = [
    "Whisper",
    "WhisperConfig",
    "checkpoint_export_fn",
    "checkpoint_filter_fn",
    "sinusoids",
    "whisper_smoke",
    "whisper_tiny",
]

# Where WhisperModel keeps the encoder's modules (checkpoint keys and in-memory paths alike, transformers 4 and 5).
WHISPER_LAYERS = HFModulePaths(
    layers="encoder.layers",
    qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    layer=(
        ("self_attn.out_proj", "attn.proj"),
        ("self_attn_layer_norm", "norm1"),
        ("fc1", "mlp.fc1"),
        ("fc2", "mlp.fc2"),
        ("final_layer_norm", "norm2"),
    ),
)
WHISPER_TOP = (("encoder.conv1", "conv1"), ("encoder.conv2", "conv2"), ("encoder.layer_norm", "norm"))
POSITIONS = ("encoder.embed_positions.weight", "pos_embed")  # (HF key, our buffer)
ENCODER_PREFIX = "encoder."  # WhisperModel's; WhisperForConditionalGeneration nests it under "model."
TASK_PREFIX = "model."
# EncoderConfig's field → WhisperConfig's (HF's) field holding its value; presets accept either name.
GENERIC_NAMES = {
    "hidden_size": "d_model",
    "num_hidden_layers": "encoder_layers",
    "num_attention_heads": "encoder_attention_heads",
    "intermediate_size": "encoder_ffn_dim",
    "hidden_act": "activation_function",
    "hidden_dropout_prob": "dropout",
    "attention_probs_dropout_prob": "attention_dropout",
    "initializer_range": "init_std",
}


@dataclass(frozen=True, kw_only=True)
class WhisperConfig(EncoderConfig):
    """HF WhisperConfig's encoder fields, by their HF names; EncoderConfig's own fields are derived from them.

    Defaults are HF's (init_std and the dropouts as OpenAI trained: none).
    """

    model_type: ClassVar[str] = "whisper"
    hf_architecture: ClassVar[str] = "WhisperModel"

    d_model: int  # D
    encoder_layers: int  # number of blocks
    encoder_attention_heads: int  # H; head_dim = D / H
    encoder_ffn_dim: int  # MLP width
    num_mel_bins: int = 80  # F_mel: 80, or 128 for large-v3
    max_source_positions: int = 1500  # stored positions; inputs may have up to 2× as many frames
    activation_function: str = "gelu"  # MLP activation (the conv stem always uses erf GELU, as HF and OpenAI)
    dropout: float = 0.0  # after the embedding, attention output and MLP output
    attention_dropout: float = 0.0  # on the attention weights
    init_std: float = 0.02  # std of the truncated-normal init of weights

    # EncoderConfig's names for the fields above, set in __post_init__ (neither arguments nor in config.json).
    hidden_size: int = field(init=False, default=0, repr=False)
    num_hidden_layers: int = field(init=False, default=0, repr=False)
    num_attention_heads: int = field(init=False, default=0, repr=False)
    intermediate_size: int = field(init=False, default=0, repr=False)
    hidden_act: str = field(init=False, default="gelu", repr=False)
    hidden_dropout_prob: float = field(init=False, default=0.0, repr=False)
    attention_probs_dropout_prob: float = field(init=False, default=0.0, repr=False)
    initializer_range: float = field(init=False, default=0.02, repr=False)
    layer_norm_eps: float = field(init=False, default=1e-5, repr=False)  # nn.LayerNorm's, which Whisper uses
    qkv_bias: bool = field(init=False, default=True, repr=False)  # q and v biases; the k slice is zero

    def __post_init__(self) -> None:
        for generic, hf_name in GENERIC_NAMES.items():
            object.__setattr__(self, generic, getattr(self, hf_name))
        super().__post_init__()

    @classmethod
    def from_hf_config(cls, hf_config: Mapping[str, Any]) -> WhisperConfig:
        """Our config from a HF WhisperConfig ``config.json`` dict: its encoder fields; the rest is ignored."""
        arguments = {f.name for f in fields(cls) if f.init} | {"model_type"}
        return super().from_hf_config({k: v for k, v in hf_config.items() if k in arguments})

    def to_hf_config(self) -> dict[str, Any]:
        """config.json for ``WhisperModel``: the encoder fields, and decoder shape fields that mirror them.

        The checkpoint holds no decoder; the mirrored fields only let transformers build ``WhisperModel``
        around the encoder (it then initialises a decoder at random and reports its keys as missing).
        """
        encoder = {f.name: getattr(self, f.name) for f in fields(self) if f.init and f.name != "use_pooler"}
        decoder = dict(
            decoder_layers=self.encoder_layers,
            decoder_attention_heads=self.encoder_attention_heads,
            decoder_ffn_dim=self.encoder_ffn_dim,
        )
        return {"architectures": [self.hf_architecture], "model_type": self.model_type, **encoder, **decoder}


def sinusoids(length: int, dim: int, max_timescale: float = 10_000.0) -> torch.Tensor:
    """Whisper's position table (length, dim): [sin(t · ω_j) | cos(t · ω_j)], ω_j = max_timescale^(−j / (dim/2 − 1)),
    j = 0 … dim/2 − 1, t = 0 … length − 1; created on the current default device."""
    if dim % 2 or dim < 4:
        raise ValueError(f"sinusoidal positions need an even width ≥ 4, got {dim}")
    half = dim // 2
    rates = torch.exp(-math.log(max_timescale) / (half - 1) * torch.arange(half, dtype=torch.float32))  # (dim/2,)
    angles = torch.arange(length, dtype=torch.float32)[:, None] * rates[None, :]  # (length, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class Whisper(TransformerEncoder):
    """Whisper encoder; forward(log-mel (B, F_mel, T), ...) → (hidden (B, ⌈T/2⌉ + k, D), class feature (B, D)).

    ``attention_mask`` (B, ⌈T/2⌉) is over positions, not frames (1 = real, 0 = padding); HF's encoder has none.
    There is no ``hf_layout``: Whisper's keys (``encoder.layers.{i}.self_attn.q_proj``, no k bias) are not the
    ViT/BERT family's, so state_from_hf, state_to_hf and hf_module_paths use WHISPER_LAYERS instead.
    """

    config_class = WhisperConfig
    raw_input = "waveform"  # samples at any rate (models.processing.WaveformProcessor)
    pre_norm = True
    num_class_tokens = 0  # no class token: the class feature is the mean over positions (class_feature)

    def __init__(self, config: WhisperConfig) -> None:
        super().__init__(config)
        dim = config.d_model
        self.conv1 = nn.Conv1d(config.num_mel_bins, dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, kernel_size=3, stride=2, padding=1)
        self.register_buffer("pos_embed", torch.empty(config.max_source_positions, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The shared init, truncated-normal conv weights with zero biases, and the sinusoid table."""
        super().reset_parameters()
        for conv in (self.conv1, self.conv2):
            nn.init.trunc_normal_(conv.weight, std=self.config.initializer_range)
            nn.init.zeros_(conv.bias)
        with torch.no_grad(), self.pos_embed.device:
            self.pos_embed.copy_(sinusoids(*self.pos_embed.shape))

    def features(self, waveform: torch.Tensor, sample_rate: int, num_samples: int | None = None) -> torch.Tensor:
        """waveform (B, N) or (N,) at ``sample_rate`` → this encoder's input, log-mel (B, F_mel, T) or (F_mel, T).

        See ``models.whisper_features.log_mel_spectrogram`` (resampled to 16 kHz, T = N16 // 160 frames).
        """
        return log_mel_spectrogram(waveform, sample_rate, self.config.num_mel_bins, num_samples)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, F_mel, T) → (B, T', D), T' = ⌈T/2⌉ ≤ max_source_positions (T ≤ 3000 for the released models)."""
        mels, positions = self.config.num_mel_bins, self.pos_embed.shape[0]
        if x.ndim != 3 or x.shape[1] != mels:
            raise ValueError(f"Whisper takes log-mel features (B, {mels}, T), got shape {tuple(x.shape)}")
        h = F.gelu(self.conv2(F.gelu(self.conv1(x)))).transpose(1, 2)  # (B, T', D)
        if h.shape[1] > positions:
            raise ValueError(f"{x.shape[2]} frames give {h.shape[1]} positions; this encoder stores {positions}")
        return h + self.pos_embed[: h.shape[1]]

    def class_feature(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (B, T', D) of the real positions, attention_mask (B, T') or None → mean over positions (B, D)."""
        if attention_mask is None:
            return hidden.mean(dim=1)
        weights = attention_mask.to(hidden.dtype)[..., None]  # (B, T', 1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)

    @classmethod
    def state_from_hf(cls, hf_state: Mapping[str, torch.Tensor], config: EncoderConfig) -> StateDict:
        """See checkpoint_filter_fn."""
        return whisper_from_hf(hf_state, config.num_hidden_layers)

    def state_to_hf(self, state_dict: Mapping[str, torch.Tensor]) -> StateDict:
        """See checkpoint_export_fn."""
        return whisper_to_hf(state_dict, self.config.num_hidden_layers)

    def hf_module_paths(self) -> dict[str, dict[str, tuple[str, ...]]]:
        """{"whisper": {our module path: its path(s) in ``WhisperModel``}}, for peft adapters (one naming:
        WhisperModel's paths are the same in transformers 4 and 5); blocks.{i}.attn.qkv → its q, k, v paths."""
        modules = dict(self.named_modules())
        paths = WHISPER_LAYERS.module_map(WHISPER_TOP, self.config.num_hidden_layers)
        return {"whisper": {mine: theirs for mine, theirs in paths.items() if mine in modules}}


# ---------------------------------------------------------------------------------------------- HF keys


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: Whisper) -> StateDict:
    """HF Whisper keys → ours for ``model`` (pure).

    Detects the source by its keys: WhisperForConditionalGeneration ("model.encoder.*"), WhisperModel
    ("encoder.*") or a WhisperEncoder saved alone (bare "conv1.*", "layers.*"); keeps the encoder half
    (decoder and proj_out dropped); fuses q_proj / k_proj / v_proj into attn.qkv with a zero k-bias
    slice; applies the key table (WHISPER_LAYERS, WHISPER_TOP, POSITIONS). Keys left over pass through,
    so that loading names them as unexpected.
    """
    return whisper_from_hf(state_dict, model.config.num_hidden_layers)


def checkpoint_export_fn(state_dict: Mapping[str, torch.Tensor], model: Whisper) -> StateDict:
    """Inverse of checkpoint_filter_fn (pure): our keys → WhisperModel's "encoder.*" keys; the k-bias slice
    and LoRA tensors are left out."""
    return whisper_to_hf(state_dict, model.config.num_hidden_layers)


def encoder_half(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """A Whisper checkpoint's encoder tensors, under WhisperModel's "encoder." prefix (see checkpoint_filter_fn)."""
    nested = TASK_PREFIX + ENCODER_PREFIX
    if any(k.startswith(nested) for k in state_dict):
        return {k.removeprefix(TASK_PREFIX): v for k, v in state_dict.items() if k.startswith(nested)}
    if any(k.startswith(ENCODER_PREFIX) for k in state_dict):
        return {k: v for k, v in state_dict.items() if k.startswith(ENCODER_PREFIX)}
    return {ENCODER_PREFIX + k: v for k, v in state_dict.items()}


def whisper_from_hf(state_dict: Mapping[str, torch.Tensor], num_layers: int) -> StateDict:
    """See checkpoint_filter_fn."""
    hf = encoder_half(state_dict)
    ours: StateDict = {}
    for mine, theirs in WHISPER_LAYERS.module_map(WHISPER_TOP, num_layers).items():
        if len(theirs) == 1:
            ours |= {f"{mine}.{p}": hf.pop(f"{theirs[0]}.{p}") for p in ("weight", "bias") if f"{theirs[0]}.{p}" in hf}
            continue
        weights = [f"{module}.weight" for module in theirs]
        biases = [f"{theirs[0]}.bias", f"{theirs[2]}.bias"]  # q and v only
        present = [key for key in (*weights, *biases) if key in hf]
        if not present:
            continue  # a wrong architecture: loading names what is missing
        if len(present) < len(weights) + len(biases):
            expected = weights + biases
            raise CheckpointError(f"incomplete attention projection: has {present}, lacks the rest of {expected}")
        q_bias, v_bias = (hf.pop(key) for key in biases)
        ours[f"{mine}.weight"] = torch.cat([hf.pop(key) for key in weights], dim=0)  # (3D, D): q, k, v rows
        ours[f"{mine}.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])  # (3D,): k slice zero
    hf_positions, our_positions = POSITIONS
    if hf_positions in hf:
        ours[our_positions] = hf.pop(hf_positions)
    return ours | hf


def whisper_to_hf(state_dict: Mapping[str, torch.Tensor], num_layers: int) -> StateDict:
    """See checkpoint_export_fn; tensors come out contiguous and unshared, ready for safetensors."""
    ours = {k: v.detach() for k, v in state_dict.items() if LORA_MARKER not in k}
    hf: StateDict = {}
    for mine, theirs in WHISPER_LAYERS.module_map(WHISPER_TOP, num_layers).items():
        if len(theirs) == 1:
            hf |= {f"{theirs[0]}.{p}": ours.pop(f"{mine}.{p}") for p in ("weight", "bias") if f"{mine}.{p}" in ours}
            continue
        if f"{mine}.weight" not in ours:
            continue
        for module, weight in zip(theirs, ours.pop(f"{mine}.weight").chunk(3, dim=0), strict=True):
            hf[f"{module}.weight"] = weight
        q_bias, _, v_bias = ours.pop(f"{mine}.bias").chunk(3)  # the k slice is irrelevant (module docstring)
        hf[f"{theirs[0]}.bias"], hf[f"{theirs[2]}.bias"] = q_bias, v_bias
    hf_positions, our_positions = POSITIONS
    if our_positions in ours:
        hf[hf_positions] = ours.pop(our_positions)
    return {k: v.clone().contiguous() for k, v in (hf | ours).items()}


# ---------------------------------------------------------------------------------------------- registry


def build_whisper(defaults: Mapping[str, Any], overrides: Mapping[str, Any]) -> Whisper:
    """build_encoder for Whisper; ``overrides`` may use EncoderConfig's names (hidden_size, num_hidden_layers, …)."""
    return build_encoder(Whisper, defaults, {GENERIC_NAMES.get(k, k): v for k, v in overrides.items()})


@register_model
def whisper_tiny(**overrides: Any) -> Whisper:
    """Whisper tiny / tiny.en's encoder: 80 mels, 1500 positions, D = 384, 4 blocks, 6 heads, MLP 1536 (7.6M)."""
    return build_whisper(
        dict(d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536), overrides
    )


@register_model
def whisper_smoke(**overrides: Any) -> Whisper:
    """A small random Whisper for tests and smoke runs: 80 mels, 1500 positions, D = 32, 2 blocks, 4 heads."""
    return build_whisper(dict(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64), overrides)
