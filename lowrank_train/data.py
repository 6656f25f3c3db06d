"""Data for training: the splits (standardised with the training split's statistics), batches, the seeded
epoch order dealt over the processes, and the per-sample uniforms that randomise a step."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lowrank_train.config import TrainConfig
from lowrank_train.distributed import world
from lowrank_util.errors import ConfigError
from lowrank_util.files import read_json
from mmdata import dataset_takes, get_dataset
from mmdata.manifest import ManifestSplit, Processor, describe
from mmdata.standardize import Standardized, input_statistics
from models import create_model
from models.processing import checkpoint_folder, input_processor

SPLITS = ("train", "val", "test")

Batch = dict[str, torch.Tensor]  # modality → (B, ...) inputs, "label" (B,) or multi-hot (B, C), in training
# "draws" (B, 2), and for a data set of files "present" (B, M) bool


FRONT_END_BATCH = 256  # waveforms per call of an encoder's front end


def has_front_end(config: TrainConfig, modality: str) -> bool:
    """True if ``modality``'s encoder class turns waveforms into its inputs itself (a ``features`` method, as
    Whisper's 16 kHz log-mel); the others read the data set's inputs as they are."""
    return hasattr(type(create_model(config.model_for(modality)[0])), "features")


def front_end(config: TrainConfig, modality: str) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """The ``features(waveform (B, N), sample_rate) → inputs`` of ``modality``'s encoder (see has_front_end),
    from its checkpoint where one is given (its mel bins)."""
    name, checkpoint = config.model_for(modality)
    encoder = create_model(name) if checkpoint is None else type(create_model(name)).from_pretrained(checkpoint)
    return encoder.features


def load_splits(config: TrainConfig) -> tuple[dict[str, Dataset], tuple[str, ...], int]:
    """({split: data set}, modalities, classes). A data set of files (a manifest, mmdata.manifest) has each
    decoded input turned into its encoder's input by the encoder's own processor (``load_file_splits``).
    Otherwise a modality whose encoder has a front end (``front_end``) gets the data set's waveforms turned
    into that encoder's inputs, once per split, and the others are standardised with the training split's
    statistics."""
    if dataset_takes(config.dataset, "processors"):
        return load_file_splits(config)
    waveform_audio = dataset_takes(config.dataset, "audio") and has_front_end(config, "audio")
    options = {"audio": "waveform"} if waveform_audio else {}
    splits = {split: get_dataset(config.dataset, split, config.data_dir, **options) for split in SPLITS}
    first, rates = splits["train"][0], getattr(splits["train"], "sample_rates", {})
    modalities = tuple(k for k in first if k != "label")
    featurized = tuple(m for m in modalities if has_front_end(config, m))
    without_waveforms = [m for m in featurized if m not in rates]
    if without_waveforms:
        modality = without_waveforms[0]
        raise ConfigError(
            f"the {modality} encoder {config.model_for(modality)[0]} reads waveforms, which data set "
            f"{config.dataset!r} does not provide; use a data set with waveforms (avmnist-mini) or another encoder"
        )
    labels = torch.as_tensor([int(splits["train"][i]["label"]) for i in range(len(splits["train"]))])
    statistics = input_statistics(splits["train"], tuple(m for m in modalities if m not in featurized))
    print("input mean, std: " + ", ".join(f"{m} {mean:.4f}, {std:.4f}" for m, (mean, std) in statistics.items()))
    splits = {k: Standardized(v, statistics) for k, v in splits.items()}
    for modality in featurized:
        features = front_end(config, modality)
        splits = {k: Featurized(v, modality, features, rates[modality]) for k, v in splits.items()}
        print(f"{modality}: the encoder's front end computed its inputs {tuple(splits['train'][0][modality].shape)}")
    return splits, modalities, int(labels.max()) + 1


def input_processor_for(config: TrainConfig, modality: str) -> Processor:
    """``modality``'s encoder's processor of decoded inputs (models.processing), from its checkpoint folder
    (config.json, and where they are kept preprocessor_config.json, tokenizer.json) or its architecture."""
    name, checkpoint = config.model_for(modality)
    with torch.device("meta"):  # the architecture's config only: no weights allocated
        encoder = create_model(name)
    folder = checkpoint_folder(checkpoint)
    hf_config = None if folder is None else read_json(folder / "config.json")
    encoder_config = encoder.config if hf_config is None else type(encoder).config_class.from_hf_config(hf_config)
    options = dict(max_text_tokens=config.max_text_tokens, clip_seconds=config.clip_seconds)
    return input_processor(type(encoder), encoder_config, folder, **options)


def load_file_splits(config: TrainConfig) -> tuple[dict[str, ManifestSplit], tuple[str, ...], int]:
    """The splits of a data set of files, each modality processed by its encoder's processor; the samples
    keep the modalities the data really lacks in their "present" (M,) mask."""
    raw = {split: get_dataset(config.dataset, split, config.data_dir) for split in SPLITS}
    train = raw["train"]
    processors = {m: input_processor_for(config, m) for m in train.modalities}
    print(describe(train.manifest))  # each split's samples and how many lack each modality
    return {split: data.processed(processors) for split, data in raw.items()}, train.modalities, len(train.classes)


class Featurized(Dataset):
    """``data`` with ``modality`` (waveforms (N,) at ``sample_rate``) replaced by ``features`` of them, computed
    once for the whole split in batches of FRONT_END_BATCH (a front end runs on the CPU, without gradients)."""

    def __init__(
        self, data: Dataset, modality: str, features: Callable[[torch.Tensor, int], torch.Tensor], sample_rate: int
    ) -> None:
        self.data, self.modality = data, modality
        waveforms = torch.stack([data[i][modality] for i in range(len(data))])  # (N, samples)
        with torch.no_grad():
            self.inputs = torch.cat([features(w, sample_rate) for w in waveforms.split(FRONT_END_BATCH)])

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return dict(self.data[i]) | {self.modality: self.inputs[i]}


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
    """(size, 2) uniforms for this process's samples at (epoch, step), which a method may use to randomise
    the step per sample (U2A: modality dropout): drawn for the global batch from (seed, epoch, step) and
    dealt like the samples (process r: rows r, r + P, …), so that they do not depend on the process count
    and a resumed run draws the same."""
    rank, processes = world()
    seed = int(np.random.SeedSequence([config.seed, epoch, step]).generate_state(1)[0])
    draws = torch.rand(size * processes, 2, generator=torch.Generator().manual_seed(seed))
    return draws[rank::processes]


def missing_in(batch: Batch) -> torch.Tensor | None:
    """(B, M) bool: the modalities the data itself lacks in each sample of ``batch`` (its "present" mask),
    None for a data set that always has every modality."""
    return ~batch["present"] if "present" in batch else None


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
