"""python -m lowrank_train.pretrain: pretrain an encoder on one modality of a data set (e.g. the disjoint
corpus Fashion-MNIST) and save it in the Hugging Face layout that train.py's --{modality}-encoder reads.

    python -m lowrank_train.pretrain --dataset fashion-mnist --model vit_avmnist_tiny --epochs 10 \\
        --out runs/encoders/vit-fashion
    python train.py --dataset avmnist-mini --image-encoder runs/encoders/vit-fashion

It is stage 1 run on its own: the encoder + a linear head train from scratch with AdamW and warm-up/cosine
on standardised inputs, the best epoch by validation accuracy is kept, the model is cached (and resumed
after an interruption) in --cache-dir. OUT gets config.json + model.safetensors and pretraining.json (the
data set, history and validation/test accuracy).
"""

from __future__ import annotations

import json
from pathlib import Path

from lowrank_train.config import TrainConfig
from lowrank_train.data import load_splits
from lowrank_train.distributed import resolve_device
from lowrank_train.stage1 import unimodal_model
from lowrank_util.cli import ArgumentParser, run_command
from lowrank_util.errors import ConfigError
from lowrank_util.files import write_text


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(prog="python -m lowrank_train.pretrain", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="fashion-mnist", help="data set name (mmdata.DATASETS)")
    parser.add_argument("--data-dir", default=None, help="its prepared folder (default: found or built)")
    parser.add_argument("--modality", default=None, help="the modality to train on (default: the only one)")
    parser.add_argument("--model", default="vit_avmnist_tiny", help="encoder architecture (models registry)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cache-dir", default="runs/cache")
    parser.add_argument("--out", type=Path, required=True, help="folder of the saved encoder (HF layout)")
    args = parser.parse_args(argv)
    config = TrainConfig(
        dataset=args.dataset, data_dir=args.data_dir, image_model=args.model, audio_model=args.model,
        unimodal_epochs=args.epochs, unimodal_lr=args.lr, batch_size=args.batch_size, seed=args.seed,
        device=args.device, cache_dir=args.cache_dir,
    )  # fmt: skip
    device = resolve_device(config.device)
    splits, modalities, num_classes = load_splits(config)
    modality = args.modality or (modalities[0] if len(modalities) == 1 else None)
    if modality not in modalities or modality not in ("image", "audio"):
        raise ConfigError(f"--modality must name one of the data set's modalities {modalities}, got {modality!r}")
    model, record = unimodal_model(config, modality, splits, num_classes, device)
    model.encoder.save_pretrained(args.out)
    summary = dict(dataset=args.dataset, modality=modality, model=args.model, classes=num_classes) | record
    write_text(args.out / "pretraining.json", json.dumps(summary, indent=2) + "\n")
    print(f"{args.model} on {args.dataset} [{modality}]: test accuracy {record['test_accuracy']:.4f}; wrote {args.out}")
    return summary


if __name__ == "__main__":
    run_command(main)
