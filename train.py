"""U2A: adapt pretrained unimodal encoders jointly with LoRA, robust to missing modalities (Mask Tokens).

    python train.py --dataset avmnist-mini --rank 8             # offline AV-MNIST, ~8 min on 2 CPU cores
    python train.py --dataset avmnist --data-dir DIR            # MultiBench AV-MNIST folder
    python train.py --image-encoder CKPT --audio-encoder CKPT   # Hugging Face–format ViT / AST checkpoints
    python train.py --resume runs/NAME                          # continue an interrupted run
    torchrun --nproc_per_node 2 train.py --dataset avmnist-mini # data parallel (gloo on CPU, NCCL on CUDA)
    python train.py --method mmlora --seed 1                    # another stage 2 (METHODS), same cached stage 1

1. Pretrained encoders. Given with --{modality}-encoder, each is frozen and gets a linear head (its
   unimodal model). Otherwise each encoder is first trained alone on its modality. Either way the
   unimodal model is cached in --cache-dir under a key of everything it depends on, and reused.
2. U2A. Every encoder is frozen and gets LoRA (rank r on --targets); the adapters, the fusion head and
   one Mask Token per modality train jointly with AdamW (warm-up + cosine) on cross-entropy plus
   --align-weight · alignment loss, with --missing-train-rate of the samples losing one modality.
   The best epoch by validation accuracy is kept.
3. Test on merged weights (checked against unmerged): complete data, then for each modality missing at
   each --missing-test rate with every way of filling it in (models/multimodal.py) and with the
   fallback to the unimodal model of the modality that remains.

--method picks stage 2 (one Method class each, under "stage 2" below; DESIGN.md §4). All start from the
same stage-1 encoders and train --epochs with the same optimiser, schedule and batches:
    u2a           (default) as in 2.
    unimodal      the stage-1 models alone; nothing more trains
    linear-probe  frozen encoders, a linear fusion head on concat(h_m)
    late-fusion   the whole encoders and the fusion head
    ogm-ge        late fusion with OGM-GE gradient modulation (--ogm-alpha)
    mmlora        frozen encoders with LoRA, the fusion head; complete data, no Mask Tokens
    mie           IGM: one shared head, alternating modality stages (--stage-epochs), SAM (--sam-rho,
                  --sam-mix), head gradients × T(k) of the other modality (--igm-tau); LoRA or --full
Methods without Mask Tokens are tested with the other fills and the unimodal fallback.

Outputs in runs/NAME/: config.json, metrics.jsonl, adapter.safetensors (the trained tensors: adapters +
head + tokens, or whole encoders; with the encoders' sha256), state.pt (resume point; MIE: state-stageN.pt),
results.json, results.md, cost.json (wall-clock, training seconds, peak memory), curves.png, missing.png.

Faults: every file is written atomically (temporary file, fsync, os.replace). state.pt is written every
--save-every steps and after each epoch; SIGINT / SIGTERM write it at the next step boundary and exit
with status 128 + signal; --resume continues exactly (same metrics, bit for bit on the CPU). A non-finite
loss or gradient stops the run naming the step and the tensors (--max-bad-steps skips that many first).
Under torchrun each process takes its share of every global batch (--batch-size), gradients are averaged,
and only rank 0 writes files and prints.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from lowrank import LoRAConfig, add_lora, merge_lora, unmerge_lora
from lowrank_util.files import CorruptFileError, read_safetensors, read_torch_file, staged, state_dict_problems
from lowrank_util.memory import PeakMemory
from mmdata import DATASETS, get_dataset
from mmdata.standardize import Standardized, input_statistics
from models import MODEL_REGISTRY, TransformerEncoder, create_model
from models.multimodal import (
    MISSING_FILLS,
    MultimodalClassifier,
    SharedHeadEnsemble,
    UnimodalClassifier,
    alignment_loss,
    head_shares,
)

# ---------------------------------------------------------------------------------------------- config


def option(default: Any, help: str, parse: Callable[[str], Any] | None = None) -> Any:
    """A config field with its command-line help (and a parser for tuple-valued options)."""
    return field(default=default, metadata={"help": help, "parse": parse})


def floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


@dataclass(frozen=True)
class TrainConfig:
    method: str = option("u2a", "stage 2: u2a, unimodal, linear-probe, late-fusion, ogm-ge, mmlora or mie (METHODS)")
    dataset: str = option("avmnist-mini", "data set name (mmdata.DATASETS)")
    data_dir: str | None = option(None, "prepared data folder (AV-MNIST: MultiBench layout); default: build it")
    image_model: str = option("vit_avmnist_tiny", "encoder architecture for images (models registry)")
    audio_model: str = option("ast_avmnist_tiny", "encoder architecture for audio (models registry)")
    image_encoder: str | None = option(None, "pretrained image encoder, HF layout; default: train one")
    audio_encoder: str | None = option(None, "pretrained audio encoder, HF layout; default: train one")
    unimodal_epochs: int = option(12, "epochs of each unimodal model (stage 1)")
    unimodal_lr: float = option(1e-3, "peak learning rate of stage 1")
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
    sam_rho: str = option("image=1e-15,audio=1e-10,text=1e-15", "mie: SAM radius ρ per modality")
    sam_mix: float = option(0.3, "mie: weight of the perturbed loss L(θ+ε) (IGM's flat_ratio)")
    igm_tau: float = option(0.4, "mie: temperature τ of the gradient modification T(k)")
    stage_epochs: int = option(2, "mie: epochs of each modality's stage (stages alternate; --epochs in all)")
    full: bool = option(False, "mie: fine-tune the whole encoders instead of LoRA adapters")
    seed: int = option(0, "seed of initialisation, data order and modality dropout")
    device: str = option("auto", "cpu, cuda, cuda:N; auto picks CUDA when available")
    precision: str = option("fp32", "fp32, or bf16 / fp16 autocast (fp16 with a gradient scaler); weights stay fp32")
    save_every: int = option(100, "also write the resume point every N steps (0: after each epoch only)")
    max_bad_steps: int = option(0, "steps with a non-finite loss or gradient to skip before stopping")
    name: str | None = option(None, "run name; default u2a-DATASET-rRANK-sSEED")
    out_dir: str = option("runs", "folder of the run folders")
    cache_dir: str = option("runs/cache", "folder of the cached unimodal models")

    def __post_init__(self) -> None:
        checks = {
            "rank must be a positive integer": self.rank > 0,
            "epochs and unimodal_epochs must be ≥ 0": min(self.epochs, self.unimodal_epochs) >= 0,
            "batch_size must be positive": self.batch_size > 0,
            "missing_train_rate must be in [0, 1]": 0 <= self.missing_train_rate <= 1,
            "missing_test rates must be in [0, 1]": all(0 <= p <= 1 for p in self.missing_test),
            "warmup must be in [0, 1)": 0 <= self.warmup < 1,
            f"unknown data set {self.dataset!r}; known: {', '.join(sorted(DATASETS))}": self.dataset in DATASETS,
            f"unknown encoder architecture in image_model {self.image_model!r} / audio_model {self.audio_model!r}; "
            f"known: {', '.join(sorted(MODEL_REGISTRY))}": {self.image_model, self.audio_model}
            <= MODEL_REGISTRY.keys(),
            f"precision must be one of {', '.join(AUTOCAST_DTYPES)}, got {self.precision!r}": self.precision
            in AUTOCAST_DTYPES,
            "save_every and max_bad_steps must be ≥ 0": min(self.save_every, self.max_bad_steps) >= 0,
            f"unknown method {self.method!r}; known: {', '.join(METHODS)}": self.method in METHODS,
            "ogm_alpha and igm_tau must be > 0": min(self.ogm_alpha, self.igm_tau) > 0,
            "sam_mix must be in [0, 1]": 0 <= self.sam_mix <= 1,
            "stage_epochs must be ≥ 1": self.stage_epochs >= 1,
        }
        problems = [message for message, ok in checks.items() if not ok]
        if problems:
            raise ValueError("bad config: " + "; ".join(problems))
        self.rho()

    @property
    def run_name(self) -> str:
        return self.name or f"{self.method}-{self.dataset}-r{self.rank}-s{self.seed}"

    def rho(self) -> dict[str, float]:
        """--sam-rho as {modality: ρ}; a malformed value raises naming it."""
        try:
            return {m.strip(): float(v) for m, v in (item.split("=") for item in self.sam_rho.split(","))}
        except ValueError as error:
            raise ValueError(
                f"bad config: sam_rho must look like image=1e-15,audio=1e-10, got {self.sam_rho!r}"
            ) from error

    def model_for(self, modality: str) -> tuple[str, str | None]:
        """(architecture name, pretrained checkpoint or None) of ``modality``'s encoder."""
        if not hasattr(self, f"{modality}_model"):
            raise ValueError(f"no encoder option for modality {modality!r} (expected --{modality}-model)")
        return getattr(self, f"{modality}_model"), getattr(self, f"{modality}_encoder")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "config") -> TrainConfig:
        """The config saved as JSON; errors name ``source`` and what is wrong with it."""
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{source} is not valid JSON: {error}") from error
        unknown = sorted(values.keys() - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{source} has unknown fields {unknown}: not a config of this train.py")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # --precision → autocast dtype
RESUMABLE = ("device", "save_every", "max_bad_steps", "out_dir", "cache_dir")  # may change on --resume: no effect
# on the results (cache_dir: the unimodal models are rebuilt identically or found)


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, Path | None]:
    """TrainConfig from the command line (every field is an option), and --resume's run folder.

    With --resume the run's config.json is used; options may change its RESUMABLE fields only, and
    any other difference is refused naming each field with both values."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resume", type=Path, help="run folder to continue; its config.json is used")
    for f in dataclasses.fields(TrainConfig):  # defaults left out, so that the options given can be told
        flag, parse, text = "--" + f.name.replace("_", "-"), f.metadata["parse"], f.metadata["help"]
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        else:
            kind = parse or (str if f.default is None else type(f.default))
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=f"{text} (default {f.default})")
    given = vars(parser.parse_args(argv))
    resume = given.pop("resume")
    if resume is None:
        return TrainConfig(**given), None
    saved = TrainConfig.from_json(read_text(resume / "config.json"), source=str(resume / "config.json"))
    changed = [
        f"{key} (run {getattr(saved, key)!r}, given {value!r})"
        for key, value in given.items()
        if key not in RESUMABLE and value != getattr(saved, key)
    ]
    if changed:
        parser.error(
            f"--resume {resume}: cannot change {'; '.join(changed)}: the run would no longer be one run. "
            f"Only {', '.join(RESUMABLE)} may change on resume; start a new run (--name) for the rest"
        )
    return dataclasses.replace(saved, **given), resume


def read_text(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    return path.read_text(encoding="utf-8")


def check_paths(config: TrainConfig) -> None:
    """Fail before any work when a given data folder or encoder checkpoint does not exist."""
    given = {"--data-dir": config.data_dir, "--image-encoder": config.image_encoder}
    given |= {"--audio-encoder": config.audio_encoder}
    for option_name, path in given.items():
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{option_name} {path}: no such file or folder")


# ---------------------------------------------------------------------------------------------- setup


def world() -> tuple[int, int]:
    """(rank, number of processes): (0, 1) outside torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_main() -> bool:
    """The process that writes files and prints (rank 0)."""
    return world()[0] == 0


def setup_device(config: TrainConfig) -> torch.device:
    """The device; under torchrun (WORLD_SIZE > 1) also join the process group: NCCL with one GPU per
    process (cuda:LOCAL_RANK), gloo on the CPU. Ranks other than 0 print nothing."""
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device
    )
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes == 1:
        return device
    if config.batch_size % processes:
        raise ValueError(f"batch_size {config.batch_size} (global) must be a multiple of the {processes} processes")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")  # waits for every process
    if not is_main():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    return device


def sum_over_processes(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over the processes, in place (themselves in a single process)."""
    if dist.is_initialized():
        dist.all_reduce(values)
    return values


def mean_over_processes(values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` over the processes (a new tensor; ``values`` in a single process)."""
    return sum_over_processes(values.clone()) / world()[1]


def autocast(config: TrainConfig, device: torch.device) -> torch.autocast:
    """torch.autocast to --precision's dtype (off for fp32); parameters stay fp32."""
    dtype = AUTOCAST_DTYPES[config.precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


# ---------------------------------------------------------------------------------------------- data


def load_splits(config: TrainConfig) -> tuple[dict[str, Dataset], tuple[str, ...], int]:
    """({split: data set, inputs standardised with the training split's statistics}, modalities, classes)."""
    splits = {split: get_dataset(config.dataset, split, config.data_dir) for split in ("train", "val", "test")}
    first = splits["train"][0]
    modalities = tuple(k for k in first if k != "label")
    labels = torch.as_tensor([int(splits["train"][i]["label"]) for i in range(len(splits["train"]))])
    statistics = input_statistics(splits["train"], modalities)
    print("input mean, std: " + ", ".join(f"{m} {mean:.4f}, {std:.4f}" for m, (mean, std) in statistics.items()))
    return {k: Standardized(v, statistics) for k, v in splits.items()}, modalities, int(labels.max()) + 1


def batches(data: Dataset, config: TrainConfig, order: list[int] | None = None) -> DataLoader:
    """This process's training batches over the sample indices ``order`` (see epoch_order), or ordered
    evaluation batches. The loader's own generator keeps torch's global one untouched (exact resume)."""
    size = config.batch_size // world()[1] if order is not None else config.batch_size
    return DataLoader(data, size, sampler=order, generator=torch.Generator())


def epoch_order(data: Dataset, config: TrainConfig, epoch: int, skip_steps: int = 0) -> list[int]:
    """This process's sample indices in ``epoch`` after its first ``skip_steps`` batches: a permutation
    drawn from (seed, epoch), dealt round the processes as DistributedSampler does, so that global
    batch i holds the same samples for any number of processes (when they divide the data set)."""
    rank, processes = world()
    sampler = DistributedSampler(data, num_replicas=processes, rank=rank, shuffle=True, seed=config.seed)
    sampler.set_epoch(epoch)
    return list(sampler)[skip_steps * (config.batch_size // processes) :]


def steps_per_epoch(data: Dataset, config: TrainConfig) -> int:
    processes = world()[1]
    return math.ceil(math.ceil(len(data) / processes) / (config.batch_size // processes))


def step_draws(config: TrainConfig, epoch: int, step: int, size: int) -> torch.Tensor:
    """(size, 2) uniforms for this process's samples at (epoch, step), for modality dropout: drawn for
    the global batch from (seed, epoch, step) and dealt like the samples (process r: rows r, r + P, …)."""
    rank, processes = world()
    seed = int(np.random.SeedSequence([config.seed, epoch, step]).generate_state(1)[0])
    draws = torch.rand(size * processes, 2, generator=torch.Generator().manual_seed(seed))
    return draws[rank::processes]


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def drop_modalities(draws: torch.Tensor, modalities: int, rate: float) -> torch.Tensor:
    """(B, M) bool: each sample loses one modality, chosen uniformly, with probability ``rate``; from the
    (B, 2) uniforms u: sample b loses modality ⌊u₁ · M⌋ when u₀ < rate."""
    hit = draws[:, 0] < rate
    which = (draws[:, 1] * modalities).long().clamp(max=modalities - 1)
    return F.one_hot(which, modalities).bool() & hit[:, None]


def missing_mask(size: int, modalities: int, modality: int, rate: float, seed: int) -> torch.Tensor:
    """(N, M) bool: ``modality`` missing in round(rate · N) samples, drawn with ``seed``."""
    chosen = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[: round(rate * size)]
    mask = torch.zeros(size, modalities, dtype=torch.bool)
    mask[chosen, modality] = True
    return mask


# ---------------------------------------------------------------------------------------------- training


def cosine_schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` of the steps, then cosine decay to zero."""
    warm = max(1, round(warmup * steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, steps - warm))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that training changes: adapters, head, tokens (frozen encoders left out)."""
    return {name: p.detach().clone().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def count_parameters(model: nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f} %)"


Logits = Callable[[dict[str, torch.Tensor], torch.Tensor | None], torch.Tensor]  # (batch, missing rows) → (B, C)


@torch.no_grad()
def predict(
    model: Logits, data: Dataset, config: TrainConfig, device: torch.device, missing: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits (N, C) of ``model`` over ``data`` in order, under --precision's autocast; ``missing`` (N, M)
    goes with its samples. Under torchrun, process r predicts samples r, r + P, … and every process
    receives all N rows."""
    rank, processes = world()
    if len(data) < processes:
        raise ValueError(f"cannot share {len(data)} evaluation samples among {processes} processes")
    shard = list(range(rank, len(data), processes))
    logits, start = [], 0
    for batch in DataLoader(data, config.batch_size, sampler=shard, generator=torch.Generator()):
        size = len(batch["label"])
        rows = None if missing is None else missing[shard[start : start + size]].to(device)
        with autocast(config, device):
            logits.append(model(to_device(batch, device), rows).float())
        start += size
    return gather_shards(torch.cat(logits), len(data)).cpu()


def gather_shards(local: torch.Tensor, total: int) -> torch.Tensor:
    """(total, ...) on every process from each process r's rows r, r + P, … (``local``, on its device)."""
    processes = world()[1]
    if processes == 1:
        return local
    padded = local.new_zeros(math.ceil(total / processes), *local.shape[1:])
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(processes)]
    dist.all_gather(parts, padded)
    gathered = local.new_empty(total, *local.shape[1:])
    for r, part in enumerate(parts):
        gathered[r::processes] = part[: len(range(r, total, processes))]
    return gathered


def labels_of(data: Dataset, config: TrainConfig) -> torch.Tensor:
    return torch.cat([batch["label"] for batch in batches(data, config)])


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).float().mean().item()


@dataclass
class Progress:
    """Where a fit stands: epochs done, steps done in the current one and their losses, the history
    (one row per epoch), the best epoch's validation accuracy and trainable tensors, bad steps skipped."""

    epoch: int = 0
    step: int = 0
    losses: list[float] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)
    best_accuracy: float = -1.0
    best: dict[str, torch.Tensor] = field(default_factory=dict)
    bad_steps: int = 0


class NonFiniteError(FloatingPointError):
    """A step's loss or gradients were NaN/Inf more often than --max-bad-steps allows."""


class Interrupted(SystemExit):
    """SIGINT / SIGTERM honoured at a step boundary, after the resume point was written: exit 128 + signal."""


class StopSignals:
    """Within this block SIGINT and SIGTERM only record ``received``; fit stops at the next step boundary."""

    def __init__(self) -> None:
        self.received = 0
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            self.previous = {s: signal.signal(s, self.record) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def record(self, signum: int, frame: Any) -> None:
        self.received = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step (the resume point will be written)")

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def average_gradients(params: list[nn.Parameter]) -> None:
    """Data parallel: each gradient ← its mean over the processes (one all-reduce of one flat buffer).
    A gradient that is None (parameter unused in this process's batch) counts as zero."""
    processes = world()[1]
    if processes == 1:
        return
    flat = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in params])
    sum_over_processes(flat.div_(processes))
    for p, piece in zip(params, flat.split([p.numel() for p in params]), strict=True):
        p.grad = piece.view_as(p)


def non_finite(loss: float, params: dict[str, nn.Parameter], check_gradients: bool) -> list[str]:
    """What is NaN/Inf after a step's backward: the loss, then the gradients by parameter name."""
    problems = [] if math.isfinite(loss) else [f"loss {loss}"]
    if check_gradients:
        bad = [n for n, p in params.items() if p.grad is not None and not torch.isfinite(p.grad).all()]
        if bad:
            problems.append(f"gradient of {len(bad)} tensors: {', '.join(bad[:8])}{', …' if len(bad) > 8 else ''}")
    return problems


def skip_or_stop(
    problems: list[str], batch: dict[str, torch.Tensor], progress: Progress, config: TrainConfig, where: str
) -> None:
    """Count a bad step; past --max-bad-steps raise NonFiniteError naming the step, the tensors and the inputs."""
    progress.bad_steps += 1
    inputs = [k for k, v in batch.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    message = f"{where}: non-finite {'; '.join(problems)}" + (
        f"; NaN/Inf in the input {', '.join(inputs)}" if inputs else ""
    )
    if progress.bad_steps > config.max_bad_steps:
        raise NonFiniteError(
            f"{message}. Stopped ({progress.bad_steps} bad steps, --max-bad-steps {config.max_bad_steps}); "
            "the last resume point written before this step is kept"
        )
    print(f"{message}: step skipped ({progress.bad_steps} of --max-bad-steps {config.max_bad_steps})")


CHECKPOINT_KEYS = ("progress", "trainable", "optimizer", "scheduler", "scaler", "rng", "config")


def save_checkpoint(path: Path, model: nn.Module, progress: Progress, config: TrainConfig, **stateful: Any) -> None:
    """state.pt (main process only, atomically): trainable tensors, the ``stateful`` objects' state dicts
    (optimizer, scheduler, scaler), RNG states, the progress and the config: all a resume needs."""
    if not is_main():
        return
    state = dict(
        progress=dataclasses.asdict(progress),
        trainable=trainable_state(model),
        rng=get_rng_state(),
        config=dataclasses.asdict(config),
        **{name: obj.state_dict() for name, obj in stateful.items()},
    )
    with staged(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, model: nn.Module, **stateful: Any) -> Progress:
    """Restore what save_checkpoint wrote; errors name the file and what does not fit."""
    state = read_torch_file(path, "train.py checkpoint")
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CorruptFileError(f"{path} is not a checkpoint of this train.py: it lacks {', '.join(missing)}")
    problems = state_dict_problems(trainable_state(model), state["trainable"])
    if problems:
        raise ValueError(f"{path} does not fit the model: " + "; ".join(problems))
    model.load_state_dict(state["trainable"], strict=False)
    for name, obj in stateful.items():
        obj.load_state_dict(state[name])
    set_rng_state(state["rng"])
    return Progress(**state["progress"])


Scale = Callable[[torch.Tensor], torch.Tensor]  # the grad scaler's scale (identity unless fp16)


class Objective:
    """What fit minimises, one step at a time: ``loss(batch)``; ``backward`` leaves the step's gradients in
    ``.grad`` and ``modify_gradients`` may change them before they are averaged and applied (methods
    override these two hooks). ``batch`` holds "draws" (B, 2) uniforms (step_draws) beside the data."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def backward(self, batch: dict[str, torch.Tensor], scale: Scale) -> torch.Tensor:
        """loss under --precision's autocast, then ∇ scale(loss); returns the loss."""
        with autocast(self.config, batch["label"].device):
            loss = self.loss(batch)
        scale(loss).backward()
        return loss

    def modify_gradients(self) -> None:
        """Called after backward, before the gradients are averaged over the processes: nothing by default."""


class LossFunction(Objective):
    """An Objective made of a plain loss function of the batch."""

    def __init__(self, config: TrainConfig, loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor]) -> None:
        super().__init__(config)
        self.loss_fn = loss_fn

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss_fn(batch)


def fit(
    model: nn.Module,
    objective: Objective,
    evaluate: Callable[[], float],
    data: Dataset,
    config: TrainConfig,
    epochs: int,
    lr: float,
    device: torch.device,
    checkpoint: Path | None = None,
    metrics: Path | None = None,
    describe: str = "train",
) -> list[dict[str, float]]:
    """Train ``model``'s trainable parameters to minimise ``objective`` with AdamW + warm-up/cosine.
    After each epoch, ``evaluate()``
    gives the validation accuracy; the best epoch's trainable parameters are restored at the end.

    With ``checkpoint``, the state is written there every --save-every steps, after every epoch and on
    SIGINT/SIGTERM (then Interrupted is raised), and training resumes from it exactly if it exists; with
    ``metrics``, one JSON line per epoch is written there. Returns one metrics dict per epoch."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params.values(), lr=lr, weight_decay=config.weight_decay)
    steps = steps_per_epoch(data, config)
    scheduler = cosine_schedule(optimizer, epochs * steps, config.warmup)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")  # skips inf steps itself
    stateful = dict(optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    progress = Progress(best=trainable_state(model))
    if checkpoint is not None and checkpoint.is_file():
        progress = load_checkpoint(checkpoint, model, **stateful)
        print(f"{describe}: resumed from {checkpoint} at epoch {progress.epoch + 1} step {progress.step + 1}")
    with StopSignals() as stop:
        for epoch in range(progress.epoch, epochs):
            model.train()
            start = time.perf_counter()
            loader = batches(data, config, epoch_order(data, config, epoch, progress.step))
            bar = tqdm(
                loader, desc=f"{describe} epoch {epoch + 1}/{epochs}", leave=False, mininterval=5, disable=not is_main()
            )
            for step, batch in enumerate(bar, start=progress.step):
                batch = to_device(batch | {"draws": step_draws(config, epoch, step, len(batch["label"]))}, device)
                optimizer.zero_grad(set_to_none=True)
                loss = objective.backward(batch, scaler.scale)
                objective.modify_gradients()
                average_gradients(list(params.values()))
                totals = sum_over_processes(
                    torch.stack([loss.detach().float(), torch.tensor(float(stop.received), device=device)])
                )
                mean_loss, stopping = totals[0].item() / world()[1], bool(totals[1])
                problems = non_finite(mean_loss, params, check_gradients=not scaler.is_enabled())
                if problems:
                    skip_or_stop(
                        problems, batch, progress, config, f"{describe} epoch {epoch + 1} step {step + 1}/{steps}"
                    )
                else:
                    scaler.step(optimizer)
                    scaler.update()
                    progress.losses.append(mean_loss)
                scheduler.step()
                progress.step = step + 1
                due = config.save_every and (epoch * steps + step + 1) % config.save_every == 0
                if checkpoint is not None and (due or stopping):
                    save_checkpoint(checkpoint, model, progress, config, **stateful)
                if stopping:
                    where = f"at epoch {epoch + 1} step {step + 1}" + (
                        f"; resume point {checkpoint}" if checkpoint else ""
                    )
                    print(f"{describe}: stopped {where}")
                    raise Interrupted(128 + (stop.received or signal.SIGTERM))
            model.eval()
            val = evaluate()
            loss = float(np.mean(progress.losses)) if progress.losses else math.nan
            progress.history.append(
                dict(epoch=epoch + 1, loss=loss, val_accuracy=val, seconds=time.perf_counter() - start)
            )
            if val > progress.best_accuracy:
                progress.best_accuracy, progress.best = val, trainable_state(model)
            progress.epoch, progress.step, progress.losses = epoch + 1, 0, []
            print(f"{describe} epoch {epoch + 1}/{epochs}: loss {loss:.4f}  val accuracy {val:.4f}")
            if checkpoint is not None:
                save_checkpoint(checkpoint, model, progress, config, **stateful)
            if metrics is not None:
                write_text(metrics, "".join(json.dumps(row) + "\n" for row in progress.history))
    model.load_state_dict(progress.best, strict=False)
    return progress.history


def get_rng_state() -> dict[str, Any]:
    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------- stage 1


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def encoder_checkpoint_file(path: str) -> Path:
    """The model.safetensors of an HF-layout checkpoint given as a folder or as the file itself."""
    p = Path(path)
    return p / "model.safetensors" if p.is_dir() else p


def unimodal_cache_key(config: TrainConfig, modality: str) -> str:
    """Hash of everything a unimodal model depends on: data, architecture, checkpoint, schedule, seed."""
    model, checkpoint = config.model_for(modality)
    facts = dict(
        dataset=config.dataset, data_dir=config.data_dir, modality=modality, model=model,
        checkpoint=None if checkpoint is None else sha256(encoder_checkpoint_file(checkpoint)),
        epochs=config.unimodal_epochs, lr=config.unimodal_lr, batch_size=config.batch_size,
        weight_decay=config.weight_decay, warmup=config.warmup, seed=config.seed, inputs="standardized",
    )  # fmt: skip
    if config.precision != "fp32":  # only then, so that fp32 keys stay those of earlier versions
        facts["precision"] = config.precision
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def unimodal_model(
    config: TrainConfig, modality: str, splits: dict[str, Dataset], num_classes: int, device: torch.device
) -> tuple[UnimodalClassifier, dict[str, Any]]:
    """Stage 1: ``modality``'s unimodal model and its record (accuracies, checkpoint hash), cached.

    A given pretrained encoder is frozen and only the head trains; otherwise the whole model trains.
    The cache folder holds the encoder (HF layout), head.safetensors and record.json; while it trains,
    its resume point is FOLDER.state.pt (the same training for every run with this key).
    """
    name, pretrained = config.model_for(modality)
    folder = Path(config.cache_dir) / f"unimodal-{modality}-{name}-{unimodal_cache_key(config, modality)}"
    partial = folder.with_name(folder.name + ".state.pt")
    encoder_class = type(create_model(name))
    if (folder / "record.json").is_file():
        model = UnimodalClassifier(encoder_class.from_pretrained(folder / "encoder"), num_classes)
        model.head.load_state_dict(read_safetensors(folder / "head.safetensors", "cached head"))
        record = json.loads(read_text(folder / "record.json"))
        print(f"stage 1 [{modality}]: cached unimodal model {folder} (test accuracy {record['test_accuracy']:.4f})")
        return model.to(device).eval(), record
    seed_everything(config.seed)
    encoder = create_model(name) if pretrained is None else encoder_class.from_pretrained(pretrained)
    model = UnimodalClassifier(encoder, num_classes).to(device)
    if pretrained is not None:
        model.encoder.requires_grad_(False)
    how = "training it from scratch" if pretrained is None else f"linear probe on the frozen {pretrained}"
    print(f"stage 1 [{modality}]: no cached unimodal model; {how} ({count_parameters(model)})")
    labels = {split: labels_of(data, config) for split, data in splits.items()}

    def logits_of(split: str) -> torch.Tensor:
        return predict(lambda batch, _: model(batch[modality]), splits[split], config, device)

    history = fit(
        model,
        LossFunction(config, lambda batch: F.cross_entropy(model(batch[modality]), batch["label"])),
        lambda: accuracy(logits_of("val"), labels["val"]),
        splits["train"], config, config.unimodal_epochs, config.unimodal_lr, device,
        checkpoint=partial, describe=f"stage 1 [{modality}]",
    )  # fmt: skip
    record = dict(modality=modality, model=name, pretrained=pretrained, history=history)
    record |= {f"{split}_accuracy": accuracy(logits_of(split), labels[split]) for split in ("val", "test")}
    record["encoder_sha256"] = publish_unimodal(model, record, folder)
    partial.unlink(missing_ok=True)
    print(f"stage 1 [{modality}]: test accuracy {record['test_accuracy']:.4f}; cached in {folder}")
    return model.eval(), record


def publish_unimodal(model: UnimodalClassifier, record: dict[str, Any], folder: Path) -> str:
    """Write the cache folder (main process only; atomically) and return the encoder's sha256."""
    if not is_main():
        return ""
    with staged(folder, folder=True) as tmp:
        model.encoder.save_pretrained(tmp / "encoder")
        save_file(trainable_state(model.head), tmp / "head.safetensors")
        digest = sha256(tmp / "encoder" / "model.safetensors")
        (tmp / "record.json").write_text(json.dumps(record | {"encoder_sha256": digest}, indent=2), encoding="utf-8")
    return digest


# ---------------------------------------------------------------------------------------------- stage 2


def u2a_loss(model: MultimodalClassifier, batch: dict[str, torch.Tensor], config: TrainConfig) -> torch.Tensor:
    """Cross-entropy with modality dropout + align_weight · alignment loss of the Mask Tokens."""
    labels = batch["label"]
    missing = drop_modalities(batch["draws"], len(model.modalities), config.missing_train_rate)
    output = model({m: batch[m] for m in model.modalities}, missing)
    alignment = alignment_loss(output, row_counts=mean_over_processes)
    return F.cross_entropy(output.logits, labels) + config.align_weight * alignment


def fused(model: MultimodalClassifier | SharedHeadEnsemble, fill: str = "mask-token") -> Logits:
    return lambda batch, missing: model({m: batch[m] for m in model.modalities}, missing, fill).logits


def adapt_encoders(encoders: nn.ModuleDict, config: TrainConfig, tuning: str) -> None:
    """Make the encoders train as ``tuning`` says: "lora" (frozen, with LoRA rank r on --targets), "full"
    (every parameter) or "frozen" (none)."""
    if tuning not in ("lora", "full", "frozen"):
        raise ValueError(f"tuning must be lora, full or frozen, got {tuning!r}")
    lora = LoRAConfig(rank=config.rank, alpha=config.alpha, dropout=config.lora_dropout, targets=config.targets)
    for encoder in encoders.values():
        if tuning == "lora":
            add_lora(encoder, lora)
        else:
            encoder.requires_grad_(tuning == "full")


class Method(Objective):
    """One --method of stage 2: the model it builds on copies of the stage-1 encoders (every method starts
    from the same ones), its loss and gradient hooks (Objective), how it trains, and the ways of filling in
    a missing modality that apply to it (``fills``; the unimodal fallback applies to all)."""

    title = ""
    fills: tuple[str, ...] = ("zero-input", "zero-feature")
    model: nn.Module

    def build(
        self, unimodal: dict[str, UnimodalClassifier], num_classes: int, device: torch.device
    ) -> MultimodalClassifier | SharedHeadEnsemble:
        raise NotImplementedError

    def train(self, splits: dict[str, Dataset], device: torch.device, run_dir: Path) -> list[dict[str, float]]:
        """One fit of the trainable parameters over --epochs, keeping the best epoch by validation accuracy."""
        return fit(
            self.model, self, self.validation(splits, device), splits["train"], self.config, self.config.epochs,
            self.config.lr, device, checkpoint=run_dir / "state.pt", metrics=run_dir / "metrics.jsonl",
            describe=self.title,
        )  # fmt: skip

    def validation(self, splits: dict[str, Dataset], device: torch.device) -> Callable[[], float]:
        """Validation accuracy of the model on complete data."""
        labels = labels_of(splits["val"], self.config)
        return lambda: accuracy(predict(fused(self.model, self.fills[0]), splits["val"], self.config, device), labels)


class Unimodal(Method):
    """Each stage-1 unimodal model alone (the reference rows): nothing trains in stage 2."""

    title = "unimodal"


class LateFusion(Method):
    """Full fine-tuning of every encoder and a linear head on concat_m(h_m), cross-entropy on complete data."""

    title = "late fusion"
    tuning = "full"

    def build(
        self, unimodal: dict[str, UnimodalClassifier], num_classes: int, device: torch.device
    ) -> MultimodalClassifier:
        """Copies of the unimodal encoders (tuned as ``tuning`` says), a new fusion head; Mask Tokens only
        where ``fills`` has them (else frozen and unused)."""
        seed_everything(self.config.seed)
        encoders: dict[str, TransformerEncoder] = {m: copy.deepcopy(u.encoder) for m, u in unimodal.items()}
        model = MultimodalClassifier(encoders, num_classes, self.config.mask_tokens_visible)
        for tokens in (model.mask_tokens, model.token_in, model.token_out):
            tokens.requires_grad_("mask-token" in self.fills)
        adapt_encoders(model.encoders, self.config, self.tuning)
        self.model = model.to(device)
        return self.model

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(self.model({m: batch[m] for m in self.model.modalities}).logits, batch["label"])


class LinearProbe(LateFusion):
    """Frozen encoders; only the linear fusion head trains."""

    title = "linear probe"
    tuning = "frozen"


class MMLoRA(LateFusion):
    """MMLoRA (Du et al.): the stage-1 unimodal models, frozen, with LoRA; adapters + fusion head train
    jointly on complete data. No Mask Tokens, no modality dropout."""

    title = "MMLoRA"
    tuning = "lora"


class U2A(MMLoRA):
    """U2A: LoRA on every frozen encoder, the fusion head and one Mask Token per modality train jointly, with
    --missing-train-rate modality dropout and the alignment loss (DESIGN.md §4)."""

    title = "U2A"
    fills = MISSING_FILLS

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return u2a_loss(self.model, batch, self.config)


def ogm_coefficients(shares: dict[str, torch.Tensor], labels: torch.Tensor, alpha: float) -> dict[str, float]:
    """OGM-GE's coefficient k_m ∈ (0, 1] of each modality (Peng et al., CVPR 2022, Eq. 10), from the
    per-modality logits ``shares`` (B, C):

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


class OGMGE(LateFusion):
    """OGM-GE (on-the-fly gradient modulation with generalisation enhancement; GeWu-Lab/OGM-GE_CVPR2022) on
    late fusion: each step, every trainable tensor of encoder m has its gradient g replaced by

        g ← k_m · g + N(0, σ(g)²)     (k_m: ogm_coefficients, α = --ogm-alpha; σ(g): g's own spread)

    so the modality that dominates the batch learns slower, and noise keeps its generalisation. The
    published code modulates the conv kernels of ResNets; here every encoder parameter."""

    title = "OGM-GE"
    coefficients: dict[str, float]

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        output = self.model({m: batch[m] for m in self.model.modalities})
        with torch.no_grad():
            shares = head_shares(self.model.head, output.features)
            self.coefficients = ogm_coefficients(shares, batch["label"], self.config.ogm_alpha)
        return F.cross_entropy(output.logits, batch["label"])

    @torch.no_grad()
    def modify_gradients(self) -> None:
        for m, k in self.coefficients.items():
            for p in self.model.encoders[m].parameters():
                if p.grad is not None:
                    p.grad = k * p.grad + torch.randn_like(p.grad) * (p.grad.std(correction=0) + 1e-8)


def igm_projection(second_moment: torch.Tensor, tau: float) -> torch.Tensor:
    """IGM's gradient modification T(k) (in, in) from Σ z̄ z̄ᵀ (in, in) of modality k's head inputs:

        Σ z̄ z̄ᵀ = V diag(λ) Vᵀ,   T(k) = V · diag(exp(−τ (λ − λmin) / (λmax − λmin))) · Vᵀ

    symmetric, eigenvalues in [e^{−τ}, 1]: the directions modality k's features use most are damped most
    (all equal: T = I)."""
    eigenvalues, vectors = torch.linalg.eigh(second_moment.double())
    span = eigenvalues.max() - eigenvalues.min()
    scaled = (eigenvalues - eigenvalues.min()) / span if span > 0 else torch.zeros_like(eigenvalues)
    t = (vectors * torch.exp(-tau * scaled)) @ vectors.T
    return ((t + t.T) / 2).to(second_moment.dtype)


class MIE(Method):
    """MIE / IGM (modal-aware interactive enhancement, IJCAI-25; njustkmg/IJCAI25-IGM): encoders of one width
    and one shared head (SharedHeadEnsemble), trained in alternating modality stages of --stage-epochs, each
    on head(E_l(x_l)) from the best weights so far with a fresh optimiser. Per step of modality l:

    1. SAM: g = ∇L(θ); ε = ρ_l · g / ‖g‖ per tensor (ρ_l: --sam-rho); the step's gradient is
       (1 − μ) ∇L(θ) + μ ∇L(θ + ε), μ = --sam-mix, taken at θ + ε and applied to the restored θ.
    2. From the second stage on, each head Linear layer's weight gradient G (out, in) ← G · T(k) (igm_projection)
       of the modality k of the previous stage, from its best model over the training set.

    Encoders train through LoRA, or whole with --full. The published code also mixes up the inputs
    (mixup α = 1); left out here, as in every other method, so that the data are the same for all."""

    title = "MIE"
    stage: str
    projections: dict[nn.Linear, torch.Tensor]

    def build(self, unimodal: dict[str, UnimodalClassifier], num_classes: int, device: torch.device) -> nn.Module:
        unknown = set(unimodal) - self.config.rho().keys()
        if unknown:
            raise ValueError(f"--sam-rho {self.config.sam_rho!r} gives no ρ for {sorted(unknown)}")
        seed_everything(self.config.seed)
        model = SharedHeadEnsemble({m: copy.deepcopy(u.encoder) for m, u in unimodal.items()}, num_classes)
        adapt_encoders(model.encoders, self.config, "full" if self.config.full else "lora")
        self.model, self.stage, self.projections = model.to(device), model.modalities[0], {}
        return self.model

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(self.model.modality_logits(self.stage, batch[self.stage]), batch["label"])

    def backward(self, batch: dict[str, torch.Tensor], scale: Scale) -> torch.Tensor:
        """SAM's mixed gradient (1 − μ) ∇L(θ) + μ ∇L(θ + ε); the weights are θ again on return."""
        mix, rho = self.config.sam_mix, self.config.rho()[self.stage]
        with autocast(self.config, batch["label"].device):
            clean = self.loss(batch)
        scale((1 - mix) * clean).backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        origin = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p in params:
                norm = p.grad.norm()
                if norm > 0:
                    p.add_(p.grad / norm, alpha=rho)  # ε = ρ g/‖g‖ (p.grad is g scaled by 1 − μ)
        with autocast(self.config, batch["label"].device):
            perturbed = self.loss(batch)
        scale(mix * perturbed).backward()
        with torch.no_grad():
            for p, weight in zip(params, origin, strict=True):
                p.copy_(weight)
        return ((1 - mix) * clean + mix * perturbed).detach()

    @torch.no_grad()
    def modify_gradients(self) -> None:
        for layer, t in self.projections.items():
            if layer.weight.grad is not None:
                layer.weight.grad = layer.weight.grad @ t

    @torch.no_grad()
    def head_projections(self, modality: str, data: Dataset, device: torch.device) -> dict[nn.Linear, torch.Tensor]:
        """T(modality) of every head Linear layer, from Σ over the batches of z̄ z̄ᵀ, z̄ (1, in) the batch-mean
        input of the layer when the model classifies ``modality``'s training data."""
        layers = [layer for layer in self.model.head.modules() if isinstance(layer, nn.Linear)]
        sums = {layer: torch.zeros(layer.in_features, layer.in_features, device=device) for layer in layers}

        def accumulate(layer: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            mean = inputs[0].float().mean(0, keepdim=True)  # z̄ (1, in)
            sums[layer] += mean.T @ mean

        hooks = [layer.register_forward_hook(accumulate) for layer in layers]
        self.model.eval()
        try:
            for batch in batches(data, self.config):
                self.model.modality_logits(modality, batch[modality].to(device))
        finally:
            for hook in hooks:
                hook.remove()
        return {layer: igm_projection(total, self.config.igm_tau) for layer, total in sums.items()}

    def train(self, splits: dict[str, Dataset], device: torch.device, run_dir: Path) -> list[dict[str, float]]:
        """The alternating stages; each resumes from its own state-stageN.pt. Returns one row per epoch."""
        trained = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        best_accuracy, best = -1.0, trainable_state(self.model)
        evaluate, history = self.validation(splits, device), []
        modalities, stages = self.model.modalities, math.ceil(self.config.epochs / self.config.stage_epochs)
        for i in range(stages):
            self.model.load_state_dict(best, strict=False)
            previous, self.stage = modalities[(i - 1) % len(modalities)], modalities[i % len(modalities)]
            self.projections = self.head_projections(previous, splits["train"], device) if i else {}
            for name, p in trained.items():
                p.requires_grad_(name.startswith(("head.", f"encoders.{self.stage}.")))
            epochs = min(self.config.stage_epochs, self.config.epochs - i * self.config.stage_epochs)
            rows = fit(
                self.model, self, evaluate, splits["train"], self.config, epochs, self.config.lr, device,
                checkpoint=run_dir / f"state-stage{i + 1}.pt", describe=f"MIE stage {i + 1}/{stages} [{self.stage}]",
            )  # fmt: skip
            start = len(history)
            history += [row | dict(epoch=start + row["epoch"], stage=i + 1) for row in rows]
            write_text(run_dir / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history))
            for p in trained.values():
                p.requires_grad_(True)
            if max(row["val_accuracy"] for row in rows) > best_accuracy:
                best_accuracy, best = max(row["val_accuracy"] for row in rows), trainable_state(self.model)
        self.model.load_state_dict(best, strict=False)
        return history


METHODS: dict[str, type[Method]] = {
    "u2a": U2A, "unimodal": Unimodal, "linear-probe": LinearProbe, "late-fusion": LateFusion,
    "ogm-ge": OGMGE, "mmlora": MMLoRA, "mie": MIE,
}  # fmt: skip


def save_adapter_checkpoint(model: nn.Module, path: Path, config: TrainConfig, records: dict) -> None:
    """The trained tensors (adapters or encoders, head, Mask Tokens; safetensors), with the config and the
    encoders' sha256 as metadata."""
    metadata = {
        "config": config.to_json(),
        "encoder_sha256": json.dumps({m: record["encoder_sha256"] for m, record in records.items()}),
    }
    if not is_main():
        return
    with staged(path) as tmp:
        save_file(trainable_state(model), tmp, metadata=metadata)


def load_adapter_checkpoint(model: MultimodalClassifier, path: Path) -> None:
    tensors = read_safetensors(path, "adapter checkpoint")
    problems = state_dict_problems(trainable_state(model), tensors)
    if problems:
        raise ValueError(f"{path} does not fit the model: " + "; ".join(problems))
    model.load_state_dict(tensors, strict=False)


# ---------------------------------------------------------------------------------------------- test


FALLBACK = "unimodal"  # missing modality handled by the unimodal model(s) of the modalities that remain


@torch.no_grad()
def test_multimodal(
    model: MultimodalClassifier | SharedHeadEnsemble,
    unimodal: dict[str, UnimodalClassifier],
    data: Dataset,
    config: TrainConfig,
    device: torch.device,
    fills: tuple[str, ...] = MISSING_FILLS,
) -> dict[str, Any]:
    """Test accuracies: complete; and per modality × missing rate × fill (``fills`` + FALLBACK), on merged
    weights (where there is LoRA). The same missing samples are used for every fill."""
    model.eval()
    labels = labels_of(data, config)
    unmerged = predict(fused(model, fills[0]), data, config, device)
    for encoder in model.encoders.values():
        merge_lora(encoder)
    try:
        complete = predict(fused(model, fills[0]), data, config, device)
        merge_check = dict(
            agree=int((complete.argmax(1) == unmerged.argmax(1)).sum()),
            total=len(labels),
            max_abs_logit_diff=(complete - unmerged).abs().max().item(),
        )
        unimodal_probs = {
            m: predict(lambda batch, _, u=u, m=m: u(batch[m]), data, config, device).softmax(1)
            for m, u in unimodal.items()
        }
        missing_results: dict[str, dict[str, list[float]]] = {}
        for i, modality in enumerate(model.modalities):
            missing_results[modality] = {fill: [] for fill in (*fills, FALLBACK)}
            for rate in config.missing_test:
                missing = missing_mask(len(labels), len(model.modalities), i, rate, seed=config.seed + 1)
                for fill in fills:
                    logits = predict(fused(model, fill), data, config, device, missing)
                    missing_results[modality][fill].append(accuracy(logits, labels))
                fallback = fallback_probabilities(complete.softmax(1), unimodal_probs, missing, model.modalities)
                missing_results[modality][FALLBACK].append(accuracy(fallback, labels))
    finally:
        for encoder in model.encoders.values():
            unmerge_lora(encoder)
    return dict(
        unimodal={m: accuracy(p, labels) for m, p in unimodal_probs.items()},
        complete=accuracy(complete, labels),
        merge_check=merge_check,
        missing_rates=list(config.missing_test),
        missing=missing_results,
    )


def fallback_probabilities(
    complete: torch.Tensor, unimodal: dict[str, torch.Tensor], missing: torch.Tensor, modalities: tuple[str, ...]
) -> torch.Tensor:
    """(N, C): the multimodal model's probabilities where nothing is missing; elsewhere the mean of
    the unimodal models' probabilities over the modalities present."""
    present = (~missing).float()  # (N, M)
    stacked = torch.stack([unimodal[m] for m in modalities], 1)  # (N, M, C)
    remaining = (present[:, :, None] * stacked).sum(1) / present.sum(1, keepdim=True).clamp(min=1)
    return torch.where(missing.any(1, keepdim=True), remaining, complete)


# ---------------------------------------------------------------------------------------------- report


def pct(fraction: float) -> str:
    return f"{100 * fraction:.1f}"


def results_table(results: dict[str, Any], config: TrainConfig) -> str:
    """results.md: unimodal and the method's accuracies, then accuracy vs missing rate per modality and fill."""
    title = METHODS[config.method].title
    lines = [
        f"# {title} on {config.dataset} (seed {config.seed}, rank {config.rank}, targets {','.join(config.targets)})",
        "",
        "| model | test accuracy (%) |",
        "|---|---|",
        *(f"| unimodal {m} | {pct(acc)} |" for m, acc in results["unimodal"].items()),
        f"| {title}, complete | {pct(results['complete'])} |",
        "",
        "Accuracy (%) with one modality missing in a share of the test samples:",
        "",
        "| missing | handled by | " + " | ".join(f"{rate:g}" for rate in results["missing_rates"]) + " |",
        "|---|---|" + "---|" * len(results["missing_rates"]),
    ]
    for modality, by_fill in results["missing"].items():
        lines += [f"| {modality} | {fill} | " + " | ".join(map(pct, accs)) + " |" for fill, accs in by_fill.items()]
    check = results["merge_check"]
    lines += [
        "",
        f"Merged and unmerged weights agree on {check['agree']}/{check['total']} test predictions "
        f"(max |Δlogit| {check['max_abs_logit_diff']:.2e}).",
    ]
    return "\n".join(lines) + "\n"


def plot(
    title: str, history: list[dict[str, float]], records: dict[str, dict], results: dict[str, Any], run_dir: Path
) -> None:
    """curves.png (loss and validation accuracy per epoch) and missing.png (accuracy vs missing rate);
    main process only."""
    if not is_main():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    runs = {title: history, **{f"unimodal {m}": r["history"] for m, r in records.items()}}
    for label, rows in runs.items():
        epochs = [row["epoch"] for row in rows]
        loss_ax.plot(epochs, [row["loss"] for row in rows], marker="o", label=label)
        acc_ax.plot(epochs, [row["val_accuracy"] for row in rows], marker="o", label=label)
    loss_ax.set(xlabel="epoch", ylabel="training loss")
    acc_ax.set(xlabel="epoch", ylabel="validation accuracy")
    acc_ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png", dpi=100)
    plt.close(fig)

    modalities = list(results["missing"])
    fig, axes = plt.subplots(1, len(modalities), figsize=(5 * len(modalities), 4), squeeze=False)
    for ax, modality in zip(axes[0], modalities, strict=True):
        for fill, accs in results["missing"][modality].items():
            ax.plot(results["missing_rates"], accs, marker="o", label=fill)
        ax.set(title=f"{modality} missing", xlabel="missing rate", ylabel="test accuracy")
    axes[0, 0].legend()
    fig.tight_layout()
    fig.savefig(run_dir / "missing.png", dpi=100)
    plt.close(fig)


def write_text(path: Path, text: str) -> None:
    """Write ``path`` atomically (main process only)."""
    if not is_main():
        return
    with staged(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Check the inputs, set up the device (and the process group under torchrun), run, tear down."""
    config, resume = parse_args(argv)
    run_dir = resume or Path(config.out_dir) / config.run_name
    if resume is None and run_dir.exists():
        raise FileExistsError(f"{run_dir} exists: continue it with --resume {run_dir}, or pick another --name")
    check_paths(config)
    device = setup_device(config)  # under torchrun, every process has passed the checks above after this
    try:
        results = run(config, run_dir, device)
        if dist.is_initialized():
            dist.barrier()  # no process tears the group down while another still uses it
        return results
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(config: TrainConfig, run_dir: Path, device: torch.device) -> dict[str, Any]:
    """Stage 1, stage 2 (--method), test and report into ``run_dir``; returns the test results."""
    started = time.perf_counter()
    print(f"{config}\nrun folder {run_dir}, device {device}, processes {world()[1]}")
    write_text(run_dir / "config.json", config.to_json())

    splits, modalities, num_classes = load_splits(config)
    print(f"{config.dataset}: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()) + f"; modalities {modalities}")
    unimodal, records = {}, {}
    for modality in modalities:
        unimodal[modality], records[modality] = unimodal_model(config, modality, splits, num_classes, device)
    method = METHODS[config.method](config)
    if isinstance(method, Unimodal):
        return report_unimodal(unimodal, records, config, run_dir, started)

    with PeakMemory(device) as memory:
        model = method.build(unimodal, num_classes, device)
        print(f"{method.title}: {count_parameters(model)}")
        history = method.train(splits, device, run_dir)
        save_adapter_checkpoint(model, run_dir / "adapter.safetensors", config, records)
        results = test_multimodal(model, unimodal, splits["test"], config, device, method.fills)
    results |= dict(method=config.method, trainable_parameters=trainable_count(model))
    check = results["merge_check"]
    print(f"evaluated on merged weights: merged and unmerged predictions agree on {check['agree']}/{check['total']}")
    table = results_table(results, config)
    write_text(run_dir / "results.json", json.dumps(results, indent=2) + "\n")
    write_text(run_dir / "results.md", table)
    write_cost(run_dir, started, sum(row["seconds"] for row in history), memory.mib)
    plot(method.title, history, records, results, run_dir)
    print(table + f"\nwrote {run_dir}/: results.md, results.json, cost.json, metrics.jsonl, adapter.safetensors, *.png")
    return results


def report_unimodal(
    unimodal: dict[str, UnimodalClassifier],
    records: dict[str, dict],
    config: TrainConfig,
    run_dir: Path,
    started: float,
) -> dict[str, Any]:
    """--method unimodal: results.json / results.md / cost.json of the stage-1 models (cached or just trained)."""
    results = dict(
        method="unimodal",
        unimodal={m: record["test_accuracy"] for m, record in records.items()},
        unimodal_parameters={m: trainable_count(model) for m, model in unimodal.items()},
    )
    rows = [f"| unimodal {m} | {pct(acc)} |" for m, acc in results["unimodal"].items()]
    write_text(run_dir / "results.json", json.dumps(results, indent=2) + "\n")
    write_text(run_dir / "results.md", f"# unimodal on {config.dataset} (seed {config.seed})\n\n" + "\n".join(
        ["| model | test accuracy (%) |", "|---|---|", *rows]) + "\n")  # fmt: skip
    stage1_seconds = {m: sum(row["seconds"] for row in record["history"]) for m, record in records.items()}
    write_cost(run_dir, started, stage1_seconds, math.nan)
    print("\n".join(rows))
    return results


def trainable_count(model: nn.Module) -> int:
    """Parameters that training changes in ``model`` (UnimodalClassifier: all of them, as in stage 1)."""
    if isinstance(model, UnimodalClassifier):
        return sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def write_cost(run_dir: Path, started: float, train_seconds: float | dict[str, float], peak_memory_mib: float) -> None:
    """cost.json: what this run took, apart from results.json (which resumed runs reproduce bit for bit):
    wall-clock seconds of this process, seconds of the training epochs (unimodal: of each modality's
    stage 1), peak memory of stage 2 (MiB)."""
    cost = dict(
        seconds=time.perf_counter() - started,
        train_seconds=train_seconds,
        peak_memory_mib=None if math.isnan(peak_memory_mib) else peak_memory_mib,
    )
    write_text(run_dir / "cost.json", json.dumps(cost, indent=2) + "\n")


if __name__ == "__main__":
    main()
