"""TrainConfig: one frozen dataclass with every option of train.py, checked when built (bad values raise
ConfigError naming each problem), printed at the start of a run and saved with every checkpoint."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lowrank_util.errors import ConfigError
from mmdata import DATASETS
from models import MODEL_REGISTRY


def option(default: Any, help: str, parse: Callable[[str], Any] | None = None) -> Any:
    """A config field with its command-line help (and a parser for tuple-valued options)."""
    return field(default=default, metadata={"help": help, "parse": parse})


def floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # --precision → autocast dtype
STAGE1_TUNINGS = ("auto", "head", "lora", "full")  # --unimodal-tuning


@dataclass(frozen=True)
class TrainConfig:
    method: str = option("u2a", "stage 2: u2a, unimodal, linear-probe, late-fusion, ogm-ge, mmlora or mie")
    dataset: str = option("avmnist-mini", "data set name (mmdata.DATASETS)")
    data_dir: str | None = option(None, "prepared data folder (AV-MNIST: MultiBench layout); default: build it")
    image_model: str = option("vit_avmnist_tiny", "encoder architecture for images (models registry)")
    audio_model: str = option("ast_avmnist_tiny", "encoder architecture for audio (models registry)")
    text_model: str = option("bert_minilm_l6", "encoder architecture for text (models registry; BERT family)")
    image_encoder: str | None = option(None, "pretrained image encoder, HF layout; default: train one")
    audio_encoder: str | None = option(None, "pretrained audio encoder, HF layout; default: train one")
    text_encoder: str | None = option(None, "pretrained text encoder, HF layout with its tokenizer.json (needed)")
    max_text_tokens: int = option(128, "text: tokens per sample, truncated or padded to this length")
    clip_seconds: float = option(3.0, "audio files: seconds per clip, centre-cropped or zero-padded to it")
    unimodal_epochs: int = option(12, "epochs of each unimodal model (stage 1)")
    unimodal_lr: float = option(1e-3, "peak learning rate of stage 1")
    unimodal_tuning: str = option(
        "auto",
        "stage 1 of a given --{modality}-encoder: head (linear probe), lora (adapters, then folded into the "
        "weights), full (fine-tune); auto: the method's paper (mmlora: full; others: head, i.e. stage 2 "
        "adapts the pretrained weights). An encoder trained from scratch always trains whole",
    )
    rank: int = option(8, "LoRA rank r")
    alpha: float = option(16.0, "LoRA alpha (scale alpha / r)")
    targets: tuple[str, ...] = option(("q", "v"), "adapted projections: q,k,v,o,mlp or all", names)
    lora_dropout: float = option(0.0, "dropout on the LoRA branch input")
    epochs: int = option(10, "epochs of joint U2A training")
    lr: float = option(2e-3, "peak learning rate of U2A")
    weight_decay: float = option(0.01, "AdamW weight decay")
    warmup: float = option(0.05, "share of steps spent on the linear warm-up")
    batch_size: int = option(64, "batch size (global: split over the processes under torchrun)")
    missing_train_rate: float = option(0.3, "share of training samples that lose one modality (at random)")
    align_weight: float = option(0.2, "weight λ of the Mask Token alignment loss")
    mask_tokens_visible: bool = option(False, "let the present modality's tokens attend to the Mask Token")
    missing_test: tuple[float, ...] = option((0.0, 0.25, 0.5, 0.75, 1.0), "test missing rates", floats)
    ogm_alpha: float = option(0.8, "ogm-ge: α in the gradient coefficient 1 - tanh(α·ρ)")
    ogm_window: float = option(0.5, "ogm-ge: share of the epochs, from the first, with modulated gradients")
    sam_rho: str = option("image=1e-15,audio=1e-10,text=1e-15", "mie: SAM radius ρ per modality (IGM's)")
    sam_mix: float = option(0.3, "mie: weight of the perturbed loss L(θ+ε) (IGM's flat_ratio)")
    igm_tau: float = option(0.4, "mie: temperature τ of the gradient modification T(k)")
    stage_epochs: int = option(2, "mie: epochs of each modality's stage (stages alternate; --epochs in all)")
    mixup: bool = option(True, "mie: train on mixup of the inputs, λ ~ U(0, 1) (the published α = 1)")
    full: bool = option(False, "mie: fine-tune the whole encoders instead of LoRA adapters")
    seed: int = option(0, "seed of initialisation, data order and modality dropout")
    device: str = option("auto", "cpu, cuda, cuda:N; auto picks CUDA when available")
    precision: str = option("fp32", "fp32, or bf16 / fp16 autocast (fp16 with a gradient scaler); weights stay fp32")
    save_every: int = option(100, "also write the resume point every N steps (0: after each epoch only)")
    max_bad_steps: int = option(0, "steps with a non-finite loss or gradient to skip before stopping")
    name: str | None = option(None, "run name; default METHOD-DATASET-rRANK-sSEED")
    out_dir: str = option("runs", "folder of the run folders")
    cache_dir: str = option("runs/cache", "folder of the cached unimodal models")

    def __post_init__(self) -> None:
        checks = {
            f"--rank must be a positive integer, got {self.rank}": self.rank > 0,
            "--epochs and --unimodal-epochs must be ≥ 0": min(self.epochs, self.unimodal_epochs) >= 0,
            "--batch-size must be positive": self.batch_size > 0,
            f"--missing-train-rate must be in [0, 1], got {self.missing_train_rate}": 0 <= self.missing_train_rate <= 1,
            "--missing-test rates must be in [0, 1]": all(0 <= p <= 1 for p in self.missing_test),
            "--warmup must be in [0, 1)": 0 <= self.warmup < 1,
            "--lr and --unimodal-lr must be > 0": min(self.lr, self.unimodal_lr) > 0,
            "--lora-dropout must be in [0, 1)": 0 <= self.lora_dropout < 1,
            f"unknown data set {self.dataset!r}; known: {', '.join(sorted(DATASETS))}": self.dataset in DATASETS,
            f"unknown encoder architecture in --image-model {self.image_model!r} / --audio-model "
            f"{self.audio_model!r} / --text-model {self.text_model!r}; known: {', '.join(sorted(MODEL_REGISTRY))}": {
                self.image_model,
                self.audio_model,
                self.text_model,
            }
            <= MODEL_REGISTRY.keys(),
            "--max-text-tokens and --clip-seconds must be > 0": min(self.max_text_tokens, self.clip_seconds) > 0,
            f"--precision must be one of {', '.join(AUTOCAST_DTYPES)}, got {self.precision!r}": self.precision
            in AUTOCAST_DTYPES,
            "--save-every and --max-bad-steps must be ≥ 0": min(self.save_every, self.max_bad_steps) >= 0,
            "--ogm-alpha and --igm-tau must be > 0": min(self.ogm_alpha, self.igm_tau) > 0,
            "--sam-mix must be in [0, 1]": 0 <= self.sam_mix <= 1,
            "--ogm-window must be in [0, 1]": 0 <= self.ogm_window <= 1,
            "--stage-epochs must be ≥ 1": self.stage_epochs >= 1,
            f"--unimodal-tuning must be one of {', '.join(STAGE1_TUNINGS)}, got {self.unimodal_tuning!r}": (
                self.unimodal_tuning in STAGE1_TUNINGS
            ),
        }
        problems = [message for message, ok in checks.items() if not ok]
        if problems:
            raise ConfigError("bad config: " + "; ".join(problems))
        self.rho()

    @property
    def run_name(self) -> str:
        return self.name or f"{self.method}-{self.dataset}-r{self.rank}-s{self.seed}"

    def rho(self) -> dict[str, float]:
        """--sam-rho as {modality: ρ}; a malformed value raises ConfigError naming it."""
        try:
            return {m.strip(): float(v) for m, v in (item.split("=") for item in self.sam_rho.split(","))}
        except ValueError as error:
            raise ConfigError(
                f"bad config: --sam-rho must look like image=1e-15,audio=1e-10, got {self.sam_rho!r}"
            ) from error

    def model_for(self, modality: str) -> tuple[str, str | None]:
        """(architecture name, pretrained checkpoint or None) of ``modality``'s encoder."""
        if not hasattr(self, f"{modality}_model"):
            raise ConfigError(f"no encoder option for modality {modality!r} (expected --{modality}-model)")
        return getattr(self, f"{modality}_model"), getattr(self, f"{modality}_encoder")

    def autocast(self, device: torch.device) -> torch.autocast:
        """torch.autocast to --precision's dtype (off for fp32); parameters stay fp32."""
        dtype = AUTOCAST_DTYPES[self.precision]
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "config") -> TrainConfig:
        """The config saved as JSON; errors name ``source`` and what is wrong with it."""
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{source} is not valid JSON: {error}") from error
        if not isinstance(values, dict):
            raise ConfigError(f"{source} is not a config of this train.py: not a JSON object")
        unknown = sorted(values.keys() - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"{source} has unknown fields {unknown}: not a config of this train.py")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
