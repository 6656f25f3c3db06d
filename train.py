"""U2A: adapt pretrained unimodal encoders jointly with LoRA, robust to missing modalities (Mask Tokens).

    python train.py --dataset avmnist-mini --rank 8             # offline AV-MNIST, ~8 min on 2 CPU cores
    python train.py --dataset avmnist --data-dir DIR            # MultiBench AV-MNIST folder
    python train.py --image-encoder CKPT --audio-encoder CKPT   # Hugging Face–format ViT / AST checkpoints
    python train.py --resume runs/NAME                          # continue an interrupted run
    torchrun --nproc_per_node 2 train.py --dataset avmnist-mini # data parallel (gloo on CPU, NCCL on CUDA)
    python train.py --method mmlora --seed 1                    # another stage 2 (METHODS), same cached stage 1
    python train.py --dataset manifest --data-dir DIR --text-encoder CKPT  # your files (mmdata/manifest.py)
    python train.py --dataset cremad|food101|mmimdb --data-dir ROOT        # the papers' layouts (mmdata/importers.py)

Data sets of files (a manifest and the importers) hold any subset of image, audio and text; each encoder
reads them through its own processor (models/processing.py); a sample's empty cells are modalities the
data really lacks, filled in like simulated ones and reported apart. Multi-label tasks (MM-IMDb) train on
binary cross-entropy and report F1 (lowrank_train/metrics.py).

1. Pretrained encoders. Given with --{modality}-encoder, each is frozen and gets a linear head (its
   unimodal model). Otherwise each encoder is first trained alone on its modality. Either way the
   unimodal model is cached in --cache-dir under a key of everything it depends on, and reused.
2. U2A. Every encoder is frozen and gets LoRA (rank r on --targets); the adapters, the fusion head and
   one Mask Token per modality train jointly with AdamW (warm-up + cosine) on cross-entropy plus
   --align-weight · alignment loss, with --missing-train-rate of the samples losing one modality.
   The best epoch by validation accuracy is kept.
3. Test on merged weights (checked against unmerged): complete data, then for each modality missing at
   each --missing-test rate with every way of filling it in (models/multimodal.py) and with the
   fallback to the unimodal model of the modality that remains (lowrank_train/evaluate.py).

--method picks stage 2 (one file each in lowrank_methods/; docs/design.md §5). All start from the
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
and only rank 0 writes files and prints. A user error (bad option, missing or corrupt file, failed
download, refused resume) is one line "error: …" and exit status 2 (--debug: with its traceback).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from lowrank_methods import METHODS
from lowrank_train.checkpoint import save_trained
from lowrank_train.cli import check_inputs, new_run_dir, parse_args
from lowrank_train.config import TrainConfig
from lowrank_train.data import load_splits
from lowrank_train.distributed import is_main, process_group, resolve_device, world
from lowrank_train.evaluate import labels_of, test_multimodal, validation
from lowrank_train.loop import run_stages
from lowrank_train.metrics import is_multilabel
from lowrank_train.report import (
    describe_parameters,
    plot,
    results_table,
    trainable_parameters,
    unimodal_table,
    write_cost,
    write_results,
)
from lowrank_train.stage1 import stage1_tuning, unimodal_model
from lowrank_util.cli import run_command
from lowrank_util.errors import ConfigError
from lowrank_util.files import write_text
from lowrank_util.memory import PeakMemory


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Check the inputs, set up the device (and the process group under torchrun), run; returns the results."""
    config, resume = parse_args(argv, METHODS, __doc__)
    run_dir = resume or new_run_dir(config)
    check_inputs(config)
    with process_group(resolve_device(config.device), config.batch_size) as device:
        return run(config, run_dir, device)


def run(config: TrainConfig, run_dir: Path, device: torch.device) -> dict[str, Any]:
    """Stage 1, stage 2 (--method), test and report into ``run_dir``; returns the test results."""
    started = time.perf_counter()
    print(f"{config}\nrun folder {run_dir}, device {device}, processes {world()[1]}")
    if is_main():
        write_text(run_dir / "config.json", config.to_json())

    # data: {split: data set}, standardised with the training split's statistics
    splits, modalities, num_classes = load_splits(config)
    print(f"{config.dataset}: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()) + f"; modalities {modalities}")
    method = METHODS[config.method](config)
    if is_multilabel(labels_of(splits["val"], config)) and not method.multilabel:
        raise ConfigError(f"--method {config.method} takes single-label tasks only; {config.dataset} is multi-label")

    # stage 1: one unimodal model per modality (a given pretrained encoder tuned as the method's paper does), cached
    unimodal, records = {}, {}
    for modality in modalities:
        tuning = stage1_tuning(config, modality, method.stage1_tuning)
        unimodal[modality], records[modality] = unimodal_model(config, modality, splits, num_classes, device, tuning)
    if not method.multimodal:
        return report_unimodal(records, config, run_dir, started)

    # stage 2: the method's model on copies of the stage-1 encoders, trained stage by stage, then tested
    with PeakMemory(device) as memory:
        model = method.build(unimodal, num_classes, device)
        print(f"{method.title}: {describe_parameters(model)}")
        validation_accuracy = validation(model, method.fills[0], splits["val"], config, device)
        stages = method.stages(splits["train"])
        train_data = method.training_data(splits["train"])
        history = run_stages(model, method, stages, validation_accuracy, train_data, config, device, run_dir)
        encoder_sha256 = {m: record["encoder_sha256"] for m, record in records.items()}
        save_trained(model, run_dir / "adapter.safetensors", config, encoder_sha256)
        results = test_multimodal(model, unimodal, splits["test"], config, device, method.fills)
    results |= dict(method=config.method, trainable_parameters=trainable_parameters(model))

    # report
    check = results["merge_check"]
    print(f"evaluated on merged weights: merged and unmerged predictions agree on {check['agree']}/{check['total']}")
    heading = f"# {method.title} on {config.dataset} (seed {config.seed}, rank {config.rank}, "
    table = results_table(method.title, heading + f"targets {','.join(config.targets)})", [results])
    write_results(run_dir, results, table)
    write_cost(run_dir, started, sum(row["seconds"] for row in history), memory.mib)
    plot(method.title, history, records, results, run_dir)
    print(table + f"\nwrote {run_dir}/: results.md, results.json, cost.json, metrics.jsonl, adapter.safetensors, *.png")
    return results


def report_unimodal(records: dict[str, dict], config: TrainConfig, run_dir: Path, started: float) -> dict[str, Any]:
    """--method unimodal: results.json / results.md / cost.json of the stage-1 models (cached or just trained)."""
    results = dict(
        method="unimodal",
        unimodal={m: record["test_accuracy"] for m, record in records.items()},
        unimodal_parameters={
            m: record.get("trainable_parameters") for m, record in records.items()
        },  # None: older cache
    )
    table = unimodal_table([results], f"# unimodal on {config.dataset} (seed {config.seed})")
    write_results(run_dir, results, table)
    stage1_seconds = {m: sum(row["seconds"] for row in record["history"]) for m, record in records.items()}
    write_cost(run_dir, started, stage1_seconds, float("nan"))
    print(table)
    return results


if __name__ == "__main__":
    run_command(main)
