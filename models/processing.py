"""Raw inputs → encoder inputs, as each encoder's Hugging Face checkpoint defines them.

Each encoder class declares the raw input it reads (``TransformerEncoder.raw_input``), and ``input_processor``
returns the callable that turns one raw example, as a data set gives it, into one encoder input. Every output
of one processor has the same shape, so a batch is their stack:

    raw_input      encoder   raw example                                → encoder input          processor
    "image"        ViT       PIL.Image.Image, any mode and size          → (C, H, W) float32      ImageProcessor
    "text"         Bert      str                                         → (T,) int64 ids         TextTokenizer
    "waveform"     Whisper   (waveform (N,) or (N, channels), rate)      → (F_mel, T') float32    WaveformProcessor
    "spectrogram"  AST       refused: AV-MNIST's stored spectrograms are already its input

The settings come from the checkpoint folder, where Hugging Face keeps them: ``preprocessor_config.json``
(``ViTImageProcessor``'s fields) and ``tokenizer.json`` + ``tokenizer_config.json`` (the ``tokenizers``
library's file and transformers' settings beside it). Pillow and tokenizers are imported only where used,
so the encoders import without them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lowrank_util.errors import ConfigError, CorruptFileError, MismatchError, MissingFileError
from lowrank_util.files import read_json, write_text
from models.bert import BertConfig
from models.transformer import EncoderConfig, TransformerEncoder, create_model
from models.vit import ViTConfig
from models.whisper_features import SAMPLE_RATE

if TYPE_CHECKING:
    from PIL import Image
    from tokenizers import Tokenizer

__all__ = ["ImageProcessor", "InputProcessor", "TextTokenizer", "WaveformProcessor", "input_processor"]

PREPROCESSOR_NAME = "preprocessor_config.json"  # transformers' image processor settings
TOKENIZER_NAME = "tokenizer.json"  # the tokenizers library's whole tokenizer
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"  # transformers' settings for it (model_max_length, pad_token)
BILINEAR = 2  # PIL.Image.Resampling.BILINEAR, ViTImageProcessor's default (a code: no Pillow import needed)
HF_MEAN = HF_STD = 0.5  # ViTImageProcessor's image_mean / image_std per channel (IMAGENET_STANDARD_*)
HF_RESCALE = 1 / 255  # ViTImageProcessor's rescale_factor: uint8 pixels → [0, 1]
CHANNEL_MODES = {1: "L", 3: "RGB"}  # PIL mode an image is converted to, by the encoder's num_channels


def checkpoint_folder(checkpoint: str | Path | None) -> Path | None:
    """The folder of a checkpoint given as its folder or as its weights file (as ``from_pretrained`` takes it);
    None for None. MissingFileError when it is neither."""
    if checkpoint is None:
        return None
    path = Path(checkpoint)
    if path.is_dir():
        return path
    if path.is_file():
        return path.parent
    raise MissingFileError(f"{path} not found (expected a Hugging Face checkpoint folder)")


def read_settings(folder: Path | None, name: str) -> dict[str, Any]:
    """The JSON object in ``folder``/``name``; {} when there is no folder or no such file."""
    if folder is None or not (folder / name).is_file():
        return {}
    settings = read_json(folder / name)
    if not isinstance(settings, dict):
        raise CorruptFileError(f"{folder / name} is not a JSON object (a Hugging Face {name} holds one)")
    return settings


# ---------------------------------------------------------------------------------------------- images


@dataclass(frozen=True)
class ImageProcessor:
    """PIL image → ViT input (C, H, W) float32, as transformers' ViTImageProcessor (PIL backend) computes it.

    Steps:
        convert to "L" (C = 1) or "RGB" (C = 3)      (ViTImageProcessor converts nothing: it expects C channels)
        resize to (H, W) with Pillow, ``resample``   (skipped when size is None)
        x = (pixels · rescale_factor − mean_c) / std_c   per channel c
    """

    size: tuple[int, int] | None  # (H, W) to resize to; None: keep the image's own (do_resize false)
    num_channels: int  # C, the encoder's; 1 or 3
    image_mean: tuple[float, ...]  # C values, subtracted after rescaling (do_normalize false: zeros)
    image_std: tuple[float, ...]  # C values, divided by (do_normalize false: ones)
    rescale_factor: float = HF_RESCALE  # pixel multiplier (do_rescale false: 1)
    resample: int = BILINEAR  # PIL.Image.Resampling code

    def __post_init__(self) -> None:
        if self.num_channels not in CHANNEL_MODES:
            raise ConfigError(
                f"an image encoder with {self.num_channels} channels has no image mode; "
                f"images convert to {CHANNEL_MODES} channels"
            )
        if len(self.image_mean) != self.num_channels or len(self.image_std) != self.num_channels:
            raise ConfigError(
                f"image_mean {list(self.image_mean)} and image_std {list(self.image_std)} need one value per "
                f"channel of the encoder ({self.num_channels})"
            )

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path | None, config: ViTConfig) -> ImageProcessor:
        """The checkpoint folder's ``preprocessor_config.json`` (do_resize, size as {"height", "width"} or an int,
        resample, do_rescale, rescale_factor, do_normalize, image_mean, image_std; the do_* flags honoured), for an
        encoder of ``config``. Fields it lacks, or all of them without a file or a checkpoint: size =
        config.image_size square, mean = std = 0.5 per channel, 1/255, bilinear (ViTImageProcessor's, but the size).
        """
        folder = checkpoint_folder(checkpoint)
        settings = read_settings(folder, PREPROCESSOR_NAME)
        source = f"{folder}/{PREPROCESSOR_NAME}"
        if settings.get("do_center_crop"):
            raise MismatchError(
                f"{source} asks for a centre crop (do_center_crop), which ImageProcessor does not do; "
                "use a checkpoint whose images are only resized (ViTImageProcessor)"
            )
        channels = config.num_channels
        size = read_size(settings.get("size", config.image_size), source)
        if settings.get("do_normalize", True):
            mean = per_channel(settings.get("image_mean", HF_MEAN), channels)
            std = per_channel(settings.get("image_std", HF_STD), channels)
        else:
            mean, std = (0.0,) * channels, (1.0,) * channels
        rescale = float(settings.get("rescale_factor", HF_RESCALE)) if settings.get("do_rescale", True) else 1.0
        try:
            return cls(
                size=size if settings.get("do_resize", True) else None,
                num_channels=channels,
                image_mean=mean,
                image_std=std,
                rescale_factor=rescale,
                resample=int(settings.get("resample", BILINEAR)),
            )
        except ConfigError as error:
            if not settings:
                raise
            raise MismatchError(f"{source}: {error}") from error

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """image: a PIL image, any size and mode → (C, H, W) float32 (H, W = size, or the image's own)."""
        image = image.convert(CHANNEL_MODES[self.num_channels])
        if self.size is not None:
            height, width = self.size
            image = image.resize((width, height), resample=self.resample)
        pixels = np.array(image, dtype=np.float64).reshape(image.height, image.width, -1) * self.rescale_factor
        pixels = torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1)  # (C, H, W), rescaled as transformers
        mean = torch.tensor(self.image_mean, dtype=torch.float32)[:, None, None]  # (C, 1, 1)
        std = torch.tensor(self.image_std, dtype=torch.float32)[:, None, None]
        return ((pixels - mean) / std).contiguous()

    def save(self, folder: str | Path) -> None:
        """Write ``folder``/preprocessor_config.json (atomically): ViTImageProcessor.from_pretrained(folder) then
        computes what this processor does, and ``from_checkpoint`` reads this processor back."""
        settings: dict[str, Any] = dict(
            image_processor_type="ViTImageProcessor",
            do_resize=self.size is not None,
            resample=self.resample,
            do_rescale=True,
            rescale_factor=self.rescale_factor,
            do_normalize=True,
            image_mean=list(self.image_mean),
            image_std=list(self.image_std),
        )
        if self.size is not None:
            settings["size"] = dict(zip(("height", "width"), self.size, strict=True))
        write_text(Path(folder) / PREPROCESSOR_NAME, json.dumps(settings, indent=2, sort_keys=True) + "\n")


def read_size(size: Any, source: str) -> tuple[int, int]:
    """A preprocessor_config.json "size": an int (square) or {"height": H, "width": W} → (H, W)."""
    if isinstance(size, int):
        return size, size
    if isinstance(size, dict) and {"height", "width"} <= size.keys():
        return int(size["height"]), int(size["width"])
    raise CorruptFileError(f'{source}: size {size!r} is not an int or {{"height": H, "width": W}} (ViTImageProcessor)')


def per_channel(value: float | list[float], channels: int) -> tuple[float, ...]:
    """A preprocessor_config.json mean or std: one number for every channel, or a list of them."""
    return (float(value),) * channels if isinstance(value, int | float) else tuple(float(v) for v in value)


# ---------------------------------------------------------------------------------------------- text


class TextTokenizer:
    """str → (T,) int64 token ids of fixed length T: [CLS] text [SEP] truncated, then padded at the end with the
    pad token (BERT: [PAD] = 0), as transformers' tokenizer(text, padding="max_length", truncation=True,
    max_length=T) gives them. Bert masks the pads itself (``Bert.default_attention_mask``)."""

    def __init__(self, tokenizer: Tokenizer, length: int, pad_id: int, pad_token: str) -> None:
        """Configures ``tokenizer``'s truncation and padding in place, to ``length`` tokens."""
        special = tokenizer.num_special_tokens_to_add(is_pair=False)
        if length <= special:
            raise ConfigError(
                f"{length} text tokens leave no room for text: the tokenizer adds {special} special tokens; "
                f"allow at least {special + 1}"
            )
        tokenizer.enable_truncation(max_length=length)
        tokenizer.enable_padding(length=length, pad_id=pad_id, pad_token=pad_token)
        self.tokenizer = tokenizer
        self.length = length  # T
        self.pad_id = pad_id

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path | None, max_length: int, config: BertConfig) -> TextTokenizer:
        """The checkpoint folder's ``tokenizer.json``, for at most ``max_length`` tokens: T = min(max_length,
        tokenizer_config.json's model_max_length when it is a positive int, config.max_position_embeddings).
        The pad token is tokenizer_config.json's pad_token, else tokenizer.json's padding settings."""
        if checkpoint is None:
            raise ConfigError("a text encoder needs a pretrained checkpoint with its tokenizer (--text-encoder CKPT)")
        folder = checkpoint_folder(checkpoint)
        file = folder / TOKENIZER_NAME
        if not file.is_file():
            raise MissingFileError(
                f"{file} not found: a text encoder needs its {TOKENIZER_NAME} "
                "(e.g. the folder of a Hugging Face BERT checkpoint)"
            )
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(str(file))
        except Exception as error:  # tokenizers raises a bare Exception for any unreadable file
            raise CorruptFileError(f"{file} is not a readable tokenizers file: {error}") from error
        settings = read_settings(folder, TOKENIZER_CONFIG_NAME)
        limit = settings.get("model_max_length")  # transformers writes 1e30-ish or nothing when unlimited
        limits = [limit] if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else []
        length = min(max_length, *limits, config.max_position_embeddings)
        pad_id, pad_token = pad_of(tokenizer, settings, file)
        if config.pad_token_id is not None and config.pad_token_id != pad_id:
            raise MismatchError(
                f"{file} pads with {pad_token!r} = {pad_id} but the encoder's pad_token_id is {config.pad_token_id}: "
                "use the tokenizer of the same checkpoint"
            )
        return cls(tokenizer, length, pad_id, pad_token)

    def __call__(self, text: str) -> torch.Tensor:
        """text → (T,) int64 ids."""
        return torch.tensor(self.tokenizer.encode(text).ids, dtype=torch.int64)


def pad_of(tokenizer: Tokenizer, settings: dict[str, Any], file: Path) -> tuple[int, str]:
    """(id, text) of the pad token: tokenizer_config.json's pad_token (a string, or a saved AddedToken's
    "content") when the vocabulary has it, else the padding settings stored in tokenizer.json."""
    token = settings.get("pad_token")
    token = token.get("content") if isinstance(token, dict) else token
    if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
        return tokenizer.token_to_id(token), token
    if tokenizer.padding is not None:
        return tokenizer.padding["pad_id"], tokenizer.padding["pad_token"]
    raise MismatchError(
        f"{file} has no pad token (neither {TOKENIZER_CONFIG_NAME}'s pad_token nor padding settings): "
        "a text encoder pads every text to one length; use a tokenizer that has one (BERT's [PAD])"
    )


# ---------------------------------------------------------------------------------------------- audio

Features = Callable[[torch.Tensor, int, int | None], torch.Tensor]  # Whisper.features(waveform, rate, num_samples)


@dataclass(frozen=True)
class WaveformProcessor:
    """(waveform, sample rate) → the audio encoder's input, features of a clip of fixed length:

        mono = mean over channels                           (N,)
        clip = centre N₀ samples, or mono + zeros at the end  (N₀,)  N₀ = round(clip_seconds · sample_rate)
        features(clip, sample_rate, round(clip_seconds · 16 kHz))  Whisper: (F_mel, T'), T' = 100 · clip_seconds

    The 16 kHz length passed on makes T' the same at every rate (resampling N₀ samples may give one more
    or one less), so that a batch stacks.
    """

    features: Features  # Whisper.features: waveform (N,) at a rate, samples at 16 kHz → (F_mel, T')
    clip_seconds: float  # every clip's length

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip_seconds) and self.clip_seconds > 0):
            raise ConfigError(f"clip_seconds must be a positive number of seconds, got {self.clip_seconds}")

    def __call__(self, clip: tuple[np.ndarray, int]) -> torch.Tensor:
        """(waveform (N,) or (N, channels), floating point, its sample rate in Hz), as a data set decodes an
        audio file → features (F_mel, T')."""
        waveform, sample_rate = clip
        samples = np.asarray(waveform)
        if samples.ndim not in (1, 2) or not np.issubdtype(samples.dtype, np.floating):
            raise ValueError(f"waveform must be float (N,) or (N, channels), got {samples.dtype} {samples.shape}")
        mono = samples.mean(axis=1) if samples.ndim == 2 else samples
        clip = fit_length(mono.astype(np.float32), round(self.clip_seconds * sample_rate))
        return self.features(torch.from_numpy(clip), sample_rate, round(self.clip_seconds * SAMPLE_RATE))


def fit_length(samples: np.ndarray, length: int) -> np.ndarray:
    """samples (N,) → (length,): the centre ``length`` samples, or zeros appended."""
    if len(samples) >= length:
        start = (len(samples) - length) // 2
        return np.ascontiguousarray(samples[start : start + length])
    return np.pad(samples, (0, length - len(samples)))


# ---------------------------------------------------------------------------------------------- dispatch

InputProcessor = ImageProcessor | TextTokenizer | WaveformProcessor


def input_processor(
    encoder: str | type[TransformerEncoder],
    config: EncoderConfig,
    checkpoint: str | Path | None,
    *,
    max_text_tokens: int = 128,
    clip_seconds: float = 3.0,
) -> InputProcessor:
    """The callable that turns one raw example into an input of ``encoder`` (a registered name or the class) of
    ``config``, by its ``raw_input`` (module docstring): ImageProcessor and TextTokenizer read ``checkpoint``'s
    folder (None: image defaults; a text encoder refuses), WaveformProcessor needs the config only.

    max_text_tokens: the longest token sequence (TextTokenizer); clip_seconds: every clip's length (WaveformProcessor).
    """
    encoder_class = encoder_type(encoder)
    if not isinstance(config, encoder_class.config_class):
        raise TypeError(f"{encoder_class.__name__} takes a {encoder_class.config_class.__name__}, got {config!r}")
    match encoder_class.raw_input:
        case "image":
            return ImageProcessor.from_checkpoint(checkpoint, config)
        case "text":
            return TextTokenizer.from_checkpoint(checkpoint, max_text_tokens, config)
        case "waveform":
            with torch.device("meta"):  # the features need the config only: no weights allocated
                return WaveformProcessor(encoder_class(config).features, clip_seconds)
        case "spectrogram":
            raise ConfigError(
                f"the {encoder_class.__name__} encoder reads AV-MNIST-style spectrograms, not audio files; use a "
                "Whisper-style audio encoder (--audio-model whisper_tiny with --audio-encoder CKPT) for audio files"
            )
        case other:
            raise ConfigError(f"{encoder_class.__name__} declares no raw input it reads (raw_input {other!r})")


def encoder_type(encoder: str | type[TransformerEncoder]) -> type[TransformerEncoder]:
    """The class of a registered encoder name (built on the meta device: nothing allocated), or the class itself."""
    if isinstance(encoder, type):
        return encoder
    with torch.device("meta"):
        return type(create_model(encoder))
