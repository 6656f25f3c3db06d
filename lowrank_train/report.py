"""What a run reports: results.json and results.md (the accuracy table, for one run or the mean ± std of
several seeds), cost.json (time and memory, kept apart because a resumed run reproduces results.json bit
for bit but not its time), the plots, and parameter counts."""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from torch import nn

from lowrank_train.distributed import is_main
from lowrank_train.loop import History
from lowrank_util.files import write_text


def trainable_parameters(model: nn.Module) -> int:
    """Parameters of ``model`` that training changes (requires_grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def describe_parameters(model: nn.Module) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = trainable_parameters(model)
    return f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f} %)"


def percent(values: list[float]) -> str:
    """Scores in percent: the value of one run; 'mean ± std' (sample std) of several."""
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.fmean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def results_table(title: str, heading: str, runs: list[dict[str, Any]]) -> str:
    """Markdown under ``heading``: unimodal and ``title``'s scores on the test set as given, the score vs
    missing rate per set of missing modalities and fill, where the data lacks modalities the scores on
    those samples, and the merge check, over the results.json of one or more ``runs`` (seeds). Scores are
    the task's primary metric (results' "metric": accuracy, or F1 macro for multi-label)."""
    first, rates = runs[0], runs[0]["missing_rates"]
    primary = first.get("metric", "accuracy")  # results.json of older versions: accuracy
    metric = primary.replace("_", " ")
    lines = [
        heading,
        "",
        f"| model | test {metric} (%) |",
        "|---|---|",
        *(f"| unimodal {m} | {percent([r['unimodal'][m] for r in runs])} |" for m in first["unimodal"]),
        f"| {title}, {'as given' if 'given_missing' in first else 'complete'} | "
        f"{percent([r['complete'] for r in runs])} |",
        *(
            f"| {title}, {name.replace('_', ' ')} | {percent([r['scores'][name] for r in runs])} |"
            for name in first.get("scores", {})
            if name != primary
        ),
        "",
        f"{metric.capitalize()} (%) with modalities missing in a share of the test samples:",
        "",
        "| missing | handled by | " + " | ".join(f"{rate:g}" for rate in rates) + " |",
        "|---|---|" + "---|" * len(rates),
    ]
    for modality, by_fill in first["missing"].items():
        for fill in by_fill:
            cells = [percent([r["missing"][modality][fill][i] for r in runs]) for i in range(len(rates))]
            lines.append(f"| {modality} | {fill} | " + " | ".join(cells) + " |")
    if "given_missing" in first:
        given = first["given_missing"]
        lacking = ", ".join(f"{m} {n}" for m, n in given["lacking"].items())
        fills = [k for k in given if k not in ("samples", "lacking")]
        lines += [
            "",
            f"On the {given['samples']} test samples the data leaves incomplete (lacking {lacking}), {metric} (%): "
            + ", ".join(f"{fill} {percent([r['given_missing'][fill] for r in runs])}" for fill in fills)
            + ".",
        ]
    checks = [r["merge_check"] for r in runs]
    agree, total = sum(c["agree"] for c in checks), sum(c["total"] for c in checks)
    largest = max(c["max_abs_logit_diff"] for c in checks)
    lines += [
        "",
        f"Merged and unmerged weights agree on {agree}/{total} test predictions (max |Δlogit| {largest:.2e}).",
    ]
    return "\n".join(lines) + "\n"


def unimodal_table(runs: list[dict[str, Any]], heading: str) -> str:
    """Markdown under ``heading``: the test accuracy of each unimodal model (--method unimodal)."""
    rows = [f"| unimodal {m} | {percent([r['unimodal'][m] for r in runs])} |" for m in runs[0]["unimodal"]]
    return "\n".join([heading, "", "| model | test accuracy (%) |", "|---|---|", *rows]) + "\n"


def write_results(run_dir: Path, results: dict[str, Any], table: str) -> None:
    """results.json and results.md (main process only)."""
    if is_main():
        write_text(run_dir / "results.json", json.dumps(results, indent=2) + "\n")
        write_text(run_dir / "results.md", table)


def write_cost(run_dir: Path, started: float, train_seconds: float | dict[str, float], peak_memory_mib: float) -> None:
    """cost.json: wall-clock seconds of this process, seconds of the training epochs (unimodal: of each
    modality's stage 1), peak memory of stage 2 in MiB (null where not measured); main process only."""
    if not is_main():
        return
    cost = dict(
        seconds=time.perf_counter() - started,
        train_seconds=train_seconds,
        peak_memory_mib=None if math.isnan(peak_memory_mib) else peak_memory_mib,
    )
    write_text(run_dir / "cost.json", json.dumps(cost, indent=2) + "\n")


def plot(title: str, history: History, records: dict[str, dict], results: dict[str, Any], run_dir: Path) -> None:
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
