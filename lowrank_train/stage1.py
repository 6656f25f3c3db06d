"""Stage 1: each modality's unimodal model (its encoder + a linear head), built once and cached.

A given pretrained encoder (--{modality}-encoder) is tuned on the modality as the ``tuning`` says:
"head" (frozen encoder, a linear probe: the encoder runs once per split, and the head trains on its
class features), "lora" (LoRA adapters + head, the adapters folded into the
weights afterwards, so that stage 2 starts from a plain encoder) or "full" (every parameter). An encoder
without a checkpoint trains whole, from scratch. The cache folder's name holds a hash of
everything the model depends on, so every run (method, seed of stage 2 aside) with the same stage 1
reuses it; it holds the encoder (HF layout), head.safetensors and record.json, and while it trains its
resume point is FOLDER.state.pt. Where the data lacks the modality in some samples (a manifest's empty
cells), the unimodal model trains and is scored on the samples that have it. Its record's accuracies are
the task's primary metric (lowrank_train.metrics: accuracy, or F1 macro for a multi-label task)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch.utils.data import Dataset, Subset

from lowrank import LoRAConfig, add_lora, fold_lora
from lowrank_train.checkpoint import seed_everything, trainable_state
from lowrank_train.config import TrainConfig
from lowrank_train.data import has_front_end
from lowrank_train.distributed import is_main
from lowrank_train.evaluate import ClassFeatures, labels_of, predict
from lowrank_train.loop import LossFunction, fit
from lowrank_train.metrics import classification_loss, score
from lowrank_train.report import describe_parameters, trainable_parameters
from lowrank_util.files import read_json, read_safetensors, sha256, staged
from mmdata import dataset_takes
from models import create_model
from models.multimodal import UnimodalClassifier


def encoder_checkpoint_file(path: str) -> Path:
    """The model.safetensors of an HF-layout checkpoint given as a folder or as the file itself."""
    p = Path(path)
    return p / "model.safetensors" if p.is_dir() else p


def unimodal_cache_key(config: TrainConfig, modality: str, tuning: str) -> str:
    """Hash of everything a unimodal model depends on: data, architecture, checkpoint, tuning, schedule, seed."""
    model, checkpoint = config.model_for(modality)
    facts = dict(
        dataset=config.dataset, data_dir=config.data_dir, modality=modality, model=model,
        checkpoint=None if checkpoint is None else sha256(encoder_checkpoint_file(checkpoint)),
        epochs=config.unimodal_epochs, lr=config.unimodal_lr, batch_size=config.batch_size,
        weight_decay=config.weight_decay, warmup=config.warmup, seed=config.seed,
        inputs=f"{model} front end" if has_front_end(config, modality) else "standardized",
    )  # fmt: skip
    if dataset_takes(config.dataset, "processors"):  # files: the encoder's processor reads them
        facts["inputs"] = dict(max_text_tokens=config.max_text_tokens, clip_seconds=config.clip_seconds)
    if config.precision != "fp32":  # only then, so that fp32 keys stay those of earlier versions
        facts["precision"] = config.precision
    if tuning != ("full" if checkpoint is None else "head"):  # likewise: the tuning of earlier versions
        facts["tuning"] = tuning
    if tuning == "lora":
        facts |= dict(rank=config.rank, alpha=config.alpha, lora_dropout=config.lora_dropout, targets=config.targets)
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def stage1_tuning(config: TrainConfig, modality: str, method_default: str) -> str:
    """How stage 1 trains ``modality``'s encoder: "full" from scratch; for a given checkpoint
    --unimodal-tuning, where "auto" is ``method_default`` (the method's paper)."""
    if config.model_for(modality)[1] is None:
        return "full"
    return method_default if config.unimodal_tuning == "auto" else config.unimodal_tuning


def unimodal_model(
    config: TrainConfig,
    modality: str,
    splits: dict[str, Dataset],
    num_classes: int,
    device: torch.device,
    tuning: str = "head",
) -> tuple[UnimodalClassifier, dict[str, Any]]:
    """``modality``'s unimodal model and its record (history, accuracies, trainable parameters, the
    encoder's sha256), from the cache or trained now; ``tuning`` applies to a given pretrained encoder."""
    name, pretrained = config.model_for(modality)
    tuning = "full" if pretrained is None else tuning
    folder = Path(config.cache_dir) / f"unimodal-{modality}-{name}-{unimodal_cache_key(config, modality, tuning)}"
    partial = folder.with_name(folder.name + ".state.pt")
    encoder_class = type(create_model(name))
    if (folder / "record.json").is_file():
        model = UnimodalClassifier(encoder_class.from_pretrained(folder / "encoder"), num_classes)
        model.head.load_state_dict(read_safetensors(folder / "head.safetensors", "cached head"))
        record = read_json(folder / "record.json")
        print(f"stage 1 [{modality}]: cached unimodal model {folder} (test accuracy {record['test_accuracy']:.4f})")
        return model.to(device).eval(), record
    seed_everything(config.seed)
    encoder = create_model(name) if pretrained is None else encoder_class.from_pretrained(pretrained)
    model = UnimodalClassifier(encoder, num_classes).to(device)
    if tuning == "head":
        model.encoder.requires_grad_(False)
    elif tuning == "lora":
        lora = LoRAConfig(rank=config.rank, alpha=config.alpha, dropout=config.lora_dropout, targets=config.targets)
        add_lora(model.encoder, lora)
    how = {"head": "linear probe on the frozen", "lora": "LoRA fine-tuning of", "full": "fine-tuning all of"}
    how = "training it from scratch" if pretrained is None else f"{how[tuning]} {pretrained}"
    print(f"stage 1 [{modality}]: no cached unimodal model; {how} ({describe_parameters(model)})")
    trained_parameters = trainable_parameters(model)
    splits = {split: with_modality(data, modality) for split, data in splits.items()}
    if tuning == "head":  # nothing in the encoder trains: its class features, once per split, feed the head
        encoders = {modality: model.encoder}
        splits = {split: ClassFeatures(encoders, data, config, device) for split, data in splits.items()}
        classify = model.head
    else:
        classify = model
    labels = {split: labels_of(data, config) for split, data in splits.items()}  # of ClassFeatures: no data read

    def logits_of(split: str) -> torch.Tensor:
        return predict(lambda batch, _: classify(batch[modality]), splits[split], config, device)

    history = fit(
        model,
        LossFunction(config, lambda batch: classification_loss(classify(batch[modality]), batch["label"])),
        lambda: score(logits_of("val"), labels["val"]),
        splits["train"], config, config.unimodal_epochs, config.unimodal_lr, device,
        checkpoint=partial, describe=f"stage 1 [{modality}]",
    )  # fmt: skip
    if tuning == "lora":
        fold_lora(model.encoder)  # stage 2 copies a plain encoder: W + s·B A
    record = dict(modality=modality, model=name, pretrained=pretrained, tuning=tuning, history=history)
    record["trainable_parameters"] = trained_parameters
    record |= {f"{split}_accuracy": score(logits_of(split), labels[split]) for split in ("val", "test")}
    record["encoder_sha256"] = publish_unimodal(model, record, folder)
    partial.unlink(missing_ok=True)
    print(f"stage 1 [{modality}]: test accuracy {record['test_accuracy']:.4f}; cached in {folder}")
    return model.eval(), record


def with_modality(data: Dataset, modality: str) -> Dataset:
    """The samples of ``data`` that have ``modality`` (all of them unless the data set says otherwise in its
    ``present`` (N, M) mask, as a manifest split does)."""
    present = getattr(data, "present", None)
    if present is None or bool(present[:, data.modalities.index(modality)].all()):
        return data
    return Subset(data, present[:, data.modalities.index(modality)].nonzero().flatten().tolist())


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
