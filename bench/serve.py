"""Finished U2A runs of one stage 1, evaluated in one pass over the test split: ``python -m bench serve RUN ...``.

The runs become one bank of whole U2A models (lowrank_train/bank.py); every test batch goes through it
once, repeated n times with ids 0 … n − 1, so the data are read once for all runs. Each run is also
evaluated alone (its own model, the same batches) and the two compared: accuracy on complete data,
predictions that agree, and the largest logit difference.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch

from lowrank import selected_adapters
from lowrank_methods import METHODS
from lowrank_train.bank import bank_of_runs, read_trained
from lowrank_train.cli import parse_args
from lowrank_train.data import batches, load_splits, to_device
from lowrank_train.stage1 import stage1_tuning, unimodal_model
from models.multimodal import MultimodalClassifier


def evaluate(runs: list[Path], device: torch.device) -> list[dict[str, Any]]:
    """One row per run: its accuracy from the bank (one pass) and alone, agreement, max |Δlogit|, seconds."""
    config = parse_args(["--resume", str(runs[0])], METHODS)[0]
    splits, modalities, classes = load_splits(config)
    unimodal, sha256 = {}, {}
    for m in modalities:
        tuning = stage1_tuning(config, m, METHODS[config.method].stage1_tuning)
        unimodal[m], record = unimodal_model(config, m, splits, classes, device, tuning)
        sha256[m] = record["encoder_sha256"]
    base = MultimodalClassifier({m: copy.deepcopy(u.encoder) for m, u in unimodal.items()}, classes)
    bank = bank_of_runs(base, runs, sha256).to(device).eval()
    started = time.perf_counter()
    with torch.no_grad():
        together, labels = [], []
        for batch in batches(splits["test"], config):
            batch = to_device(batch, device)
            size = len(batch["label"])
            inputs = {m: batch[m].repeat(len(runs), *[1] * (batch[m].dim() - 1)) for m in modalities}
            with selected_adapters(torch.arange(len(runs)).repeat_interleave(size)):
                together.append(bank(inputs).logits.view(len(runs), size, -1))
            labels.append(batch["label"])
        together, labels = torch.cat(together, 1), torch.cat(labels)
    one_pass = time.perf_counter() - started
    rows = []
    for i, run in enumerate(runs):
        tensors, run_config, _ = read_trained(run)
        model = METHODS[run_config.method](run_config).build(unimodal, classes, device)
        model.load_state_dict(tensors, strict=False)
        model.eval()
        started = time.perf_counter()
        with torch.no_grad():
            test_batches = (to_device(batch, device) for batch in batches(splits["test"], config))
            alone = torch.cat([model({m: batch[m] for m in modalities}).logits for batch in test_batches])
        rows.append({
            "run": str(run), "bank_accuracy": (together[i].argmax(1) == labels).float().mean().item(),
            "alone_accuracy": (alone.argmax(1) == labels).float().mean().item(),
            "agree": int((together[i].argmax(1) == alone.argmax(1)).sum()), "total": len(labels),
            "max_abs_logit_diff": (together[i] - alone).abs().max().item(),
            "alone_seconds": time.perf_counter() - started, "bank_seconds_all_runs": one_pass,
        })  # fmt: skip
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| run | bank (one pass) | alone | agree | max abs Δlogit |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['run']} | {100 * row['bank_accuracy']:.1f} | {100 * row['alone_accuracy']:.1f} | "
            f"{row['agree']}/{row['total']} | {row['max_abs_logit_diff']:.2g} |"
        )
    alone = sum(row["alone_seconds"] for row in rows)
    lines.append(
        f"\nOne pass for all {len(rows)} runs: {rows[0]['bank_seconds_all_runs']:.1f} s; one by one: {alone:.1f} s."
    )
    return "\n".join(lines)
