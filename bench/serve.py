"""Finished U2A runs of one stage 1, evaluated in one pass over the test split: ``python -m bench serve RUN ...``.

The runs become one bank of whole U2A models (lowrank_train/bank.py); every test batch goes through it
once, repeated n times with ids 0 … n − 1, so the data are read once for all runs. Each run is also
evaluated alone (its own model, the same batches) and the two compared, on the test split as given and
with each modality (and, for three, each pair) missing from every sample, filled in by each run's own
Mask Tokens: the score (accuracy, or F1 macro for multi-label), predictions that agree, and the largest
logit difference.
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
from lowrank_train.data import Batch, load_splits
from lowrank_train.evaluate import fused, given_missing, labels_of, missing_patterns, pattern_name, predict
from lowrank_train.metrics import score
from lowrank_train.stage1 import stage1_tuning, unimodal_model
from models.multimodal import MultimodalClassifier


def protocols(modalities: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """What each run is tested on: the test split as given, then each set of modalities missing from every
    sample (lowrank_train.evaluate.missing_patterns), filled in by the runs' Mask Tokens."""
    return {"as given": ()} | {f"{pattern_name(modalities, p)} missing": p for p in missing_patterns(modalities)}


def evaluate(runs: list[Path], device: torch.device) -> list[dict[str, Any]]:
    """One row per run and protocol (``protocols``): its score from the bank (one pass for all runs) and
    alone, agreement, max |Δlogit|, seconds."""
    config = parse_args(["--resume", str(runs[0])], METHODS)[0]
    splits, modalities, classes = load_splits(config)
    unimodal, sha256 = {}, {}
    for m in modalities:
        tuning = stage1_tuning(config, m, METHODS[config.method].stage1_tuning)
        unimodal[m], record = unimodal_model(config, m, splits, classes, device, tuning)
        sha256[m] = record["encoder_sha256"]
    base = MultimodalClassifier({m: copy.deepcopy(u.encoder) for m, u in unimodal.items()}, classes)
    bank = bank_of_runs(base, runs, sha256).to(device).eval()
    alone = []
    for run in runs:
        tensors, run_config, _ = read_trained(run)
        model = METHODS[run_config.method](run_config).build(unimodal, classes, device)
        model.load_state_dict(tensors, strict=False)
        alone.append(model.eval())

    def every_run(batch: Batch, missing: torch.Tensor) -> torch.Tensor:
        """The bank's logits (B, n, C): the batch repeated once per run, run i on copy i."""
        n, size = len(runs), len(batch["label"])
        inputs = {m: batch[m].repeat(n, *[1] * (batch[m].dim() - 1)) for m in modalities}
        with selected_adapters(torch.arange(n).repeat_interleave(size)):
            return bank(inputs, missing.repeat(n, 1), "mask-token").logits.view(n, size, -1).transpose(0, 1)

    test, rows = splits["test"], []
    labels = labels_of(test, config)
    with torch.no_grad():
        for protocol, pattern in protocols(modalities).items():
            missing = given_missing(test, len(modalities)).clone()  # what the data lacks, and the pattern
            missing[:, list(pattern)] = True
            started = time.perf_counter()
            together = predict(every_run, test, config, device, missing)  # (N, n, C)
            one_pass = time.perf_counter() - started
            for i, (run, model) in enumerate(zip(runs, alone, strict=True)):
                started = time.perf_counter()
                logits = predict(fused(model, "mask-token"), test, config, device, missing)
                rows.append({
                    "run": str(run), "protocol": protocol, "bank_score": score(together[:, i], labels),
                    "alone_score": score(logits, labels),
                    "agree": int((together[:, i].argmax(1) == logits.argmax(1)).sum()), "total": len(labels),
                    "max_abs_logit_diff": (together[:, i] - logits).abs().max().item(),
                    "alone_seconds": time.perf_counter() - started, "bank_seconds_all_runs": one_pass,
                })  # fmt: skip
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| run | test | bank (one pass) | alone | agree | max abs Δlogit |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['run']} | {row['protocol']} | {100 * row['bank_score']:.1f} | {100 * row['alone_score']:.1f} | "
            f"{row['agree']}/{row['total']} | {row['max_abs_logit_diff']:.2g} |"
        )
    protocols = {row["protocol"]: row["bank_seconds_all_runs"] for row in rows}
    alone = sum(row["alone_seconds"] for row in rows)
    lines.append(
        f"\nOne pass per test for all {len({row['run'] for row in rows})} runs: "
        f"{sum(protocols.values()):.1f} s in all; one by one: {alone:.1f} s."
    )
    return "\n".join(lines)
