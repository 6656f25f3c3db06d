"""Methods × seeds (× LoRA ranks) of train.py on one data set, as subprocesses, and the comparison table.

    python -m bench compare --dataset avmnist-mini --methods unimodal linear-probe late-fusion ogm-ge mmlora mie u2a \\
        --seeds 0 1 2 [--rank 8] [--ranks 1 4 16 [--sweep-seeds 0]] [--jobs 2] [--train-args "--epochs 10"]

Each run is ``train.py --method M --seed S --rank R --name M[-rR]-sS`` in ``--runs-dir``/DATASET (their
stage-1 unimodal models come from the shared --cache-dir of train.py, so every method of a seed starts
from the same encoders); a finished run (results.json) is reused, an unfinished one resumed. Every run
has LoRA rank --rank; the methods in RANKED also run at each of --ranks (the sweep) on --sweep-seeds.
``--jobs`` processes run at a time, each with OMP_NUM_THREADS=--threads.

Writes OUT/DATASET.csv (one row per run) and OUT/DATASET.md: accuracy mean ± std over the seeds,
trainable parameters, training time and peak memory per method; accuracy per LoRA rank; and accuracy
with a modality missing, per method and way of filling it in.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowrank_train.report import percent
from lowrank_util.cli import ArgumentParser

RANKED = ("u2a", "mmlora")  # methods whose LoRA rank --ranks sweeps
LORA = ("u2a", "mmlora", "mie")  # methods that train LoRA adapters (mie: unless --full)
METHODS = ("unimodal", "linear-probe", "late-fusion", "ogm-ge", "mmlora", "mie", "u2a")  # table order
TRAIN = Path(__file__).resolve().parent.parent / "train.py"


@dataclass(frozen=True)
class Planned:
    """One train.py run of the comparison."""

    method: str
    seed: int
    rank: int

    @property
    def name(self) -> str:
        return f"{self.method}{f'-r{self.rank}' if self.method in RANKED else ''}-s{self.seed}"


def plan(methods: list[str], seeds: list[int], rank: int, sweep: list[int], sweep_seeds: list[int]) -> list[Planned]:
    """Every method × seed at ``rank``; the methods in RANKED also at each rank of ``sweep`` × ``sweep_seeds``."""
    runs = []
    for method in methods:
        for r in dict.fromkeys([rank, *(sweep if method in RANKED else [])]):
            runs += [Planned(method, seed, r) for seed in (seeds if r == rank else sweep_seeds)]
    return runs


def command(run: Planned, dataset: str, runs_dir: Path, train_args: list[str]) -> list[str]:
    """train.py's command line for ``run``: a new run, or --resume of an unfinished one."""
    run_dir = runs_dir / run.name
    if run_dir.exists():
        return [sys.executable, str(TRAIN), "--resume", str(run_dir)]
    options = ["--method", run.method, "--seed", str(run.seed), "--rank", str(run.rank), "--dataset", dataset]
    return [sys.executable, str(TRAIN), *options, "--out-dir", str(runs_dir), "--name", run.name, *train_args]


def execute(runs: list[Planned], dataset: str, runs_dir: Path, train_args: list[str], jobs: int, threads: int) -> None:
    """Run the unfinished ``runs``, ``jobs`` at a time; each logs to RUNS_DIR/NAME.log. Raises if one fails."""
    todo = [run for run in runs if not (runs_dir / run.name / "results.json").is_file()]
    print(f"{len(runs) - len(todo)} of {len(runs)} runs already finished; running {len(todo)}, {jobs} at a time")
    runs_dir.mkdir(parents=True, exist_ok=True)
    environment = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    active: list[tuple[Planned, subprocess.Popen, float]] = []
    failed = []
    while todo or active:
        while todo and len(active) < jobs:
            run = todo.pop(0)
            with (runs_dir / f"{run.name}.log").open("a") as log:
                process = subprocess.Popen(
                    command(run, dataset, runs_dir, train_args), stdout=log, stderr=subprocess.STDOUT, env=environment
                )
            active.append((run, process, time.perf_counter()))
        time.sleep(1)
        for entry in [entry for entry in active if entry[1].poll() is not None]:
            run, process, started = entry
            active.remove(entry)
            print(f"{run.name}: exit {process.returncode} after {time.perf_counter() - started:.0f} s")
            if process.returncode:
                failed.append(run.name)
    if failed:
        raise RuntimeError(f"runs failed: {', '.join(failed)} (see their .log in {runs_dir})")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def collect(run_dir: Path) -> dict[str, Any]:
    """One finished run as a row: method, rank, seed, accuracy, parameters, time, memory, missing results.

    Runs of an older train.py (U2A only; no parameter count or cost.json) give None for what they lack."""
    config, results = read_json(run_dir / "config.json"), read_json(run_dir / "results.json")
    cost = read_json(run_dir / "cost.json") if (run_dir / "cost.json").is_file() else {}
    row = dict(
        run=run_dir.name, method=config.get("method", "u2a"), rank=config["rank"], seed=config["seed"],
        epochs=config["epochs"], accuracy=results.get("complete"), results=results,
        trainable_parameters=results.get("trainable_parameters"), train_seconds=cost.get("train_seconds"),
        peak_memory_mib=cost.get("peak_memory_mib"),
        lora=config.get("method", "u2a") in LORA and not config.get("full"),
    )  # fmt: skip
    return row


def mean_of(values: list[float | None], digits: int) -> str:
    """Mean of the known values, rounded; n/a when none is known."""
    known = [v for v in values if v is not None]
    return f"{statistics.fmean(known):,.{digits}f}" if known else "n/a"


def groups(rows: list[dict[str, Any]]) -> dict[tuple[str, int | None], list[dict[str, Any]]]:
    """Rows grouped by (method, LoRA rank; None for methods without LoRA), in first-seen order."""
    grouped: dict[tuple[str, int | None], list[dict[str, Any]]] = {}
    for row in rows:
        grouped.setdefault((row["method"], row["rank"] if row["lora"] else None), []).append(row)
    return grouped


def accuracy_table(rows: list[dict[str, Any]]) -> str:
    """Per method (and rank): seeds, test accuracy mean ± std, trainable parameters, time, memory."""
    lines = [
        "| method | LoRA rank | seeds | test accuracy (%) | trainable parameters | training time (s) "
        "| peak memory (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for (method, rank), runs in groups(rows).items():
        memory = mean_of([r["peak_memory_mib"] for r in runs], 0)
        if method == "unimodal":
            for m in runs[0]["results"]["unimodal"]:
                accuracy = percent([r["results"]["unimodal"][m] for r in runs])
                size = runs[0]["results"]["unimodal_parameters"][m]
                seconds = mean_of([r["train_seconds"][m] for r in runs], 0)
                lines.append(f"| unimodal ({m}) | – | {len(runs)} | {accuracy} | {size:,} | {seconds} | {memory} |")
            continue
        size = next((r["trainable_parameters"] for r in runs if r["trainable_parameters"]), None)
        seconds = mean_of([r["train_seconds"] for r in runs], 0)
        lines.append(
            f"| {method} | {rank or '–'} | {len(runs)} | {percent([r['accuracy'] for r in runs])} | "
            f"{'n/a' if size is None else f'{size:,}'} | {seconds} | {memory} |"
        )
    return "\n".join(lines)


MISSING_RATES = (0.5, 1.0)  # test missing rates shown in the report (results.json has them all)


def missing_table(rows: list[dict[str, Any]], rank: int) -> str:
    """Accuracy mean ± std with one modality missing in half / all of the test samples, per method (LoRA
    methods at ``rank``) and way of filling it in."""
    with_missing = {
        (method, r): runs
        for (method, r), runs in groups(rows).items()
        if "missing" in runs[0]["results"] and r in (None, rank)
    }
    if not with_missing:
        return ""
    first = next(iter(with_missing.values()))[0]["results"]
    modalities, rates = list(first["missing"]), first["missing_rates"]
    columns = [(m, i, rate) for m in modalities for i, rate in enumerate(rates) if rate in MISSING_RATES]
    lines = [
        "| method | LoRA rank | handled by | " + " | ".join(f"{m} missing {rate:.0%}" for m, _, rate in columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for (method, rank), runs in with_missing.items():
        for fill in runs[0]["results"]["missing"][modalities[0]]:
            cells = [percent([r["results"]["missing"][m][fill][i] for r in runs]) for m, i, _ in columns]
            lines.append(f"| {method} | {rank or '–'} | {fill} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


CSV_FIELDS = ("run", "method", "rank", "seed", "epochs", "accuracy", "trainable_parameters", "train_seconds")
CSV_FIELDS += ("peak_memory_mib",)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """One line per run; unimodal accuracies as unimodal_<modality> columns."""
    modalities = sorted({m for row in rows for m in row["results"]["unimodal"]})
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow([*CSV_FIELDS, *(f"unimodal_{m}" for m in modalities)])
        for row in rows:
            unimodal = row["results"]["unimodal"]
            writer.writerow([row[k] for k in CSV_FIELDS] + [unimodal.get(m) for m in modalities])


def report(rows: list[dict[str, Any]], dataset: str, invocation: str, notes: str, rank: int = 8) -> str:
    """The markdown of the comparison."""
    epochs = sorted({row["epochs"] for row in rows if row["method"] != "unimodal"})
    sections = [
        f"# Methods on {dataset}",
        f"Produced by `{invocation}` ({time.strftime('%Y-%m-%d', time.gmtime())}, {os.cpu_count()} CPU cores). "
        f"Stage 2: {', '.join(map(str, epochs))} epochs; test accuracy mean ± std over the seeds (sample std). "
        "Training time: the stage-2 epochs (stage 1, cached and shared, not counted; unimodal rows: stage 1). "
        "Peak memory: stage 2 beyond what the process held before it (CPU: resident-set growth).",
        accuracy_table(rows),
        f"## With a modality missing (LoRA rank {rank})",
        missing_table(rows, rank),
    ]
    return "\n\n".join([*sections, notes.strip()]).strip() + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m bench compare", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="avmnist-mini")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of every run")
    parser.add_argument("--ranks", nargs="+", type=int, default=[], help=f"more LoRA ranks of {', '.join(RANKED)}")
    parser.add_argument("--sweep-seeds", nargs="+", type=int, default=None, help="seeds of --ranks (default --seeds)")
    parser.add_argument("--jobs", type=int, default=2, help="train.py processes at a time")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each process")
    parser.add_argument("--train-args", default="", help='more train.py options, e.g. "--epochs 5"')
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/compare"), help="runs go to RUNS_DIR/DATASET")
    parser.add_argument("--include", nargs="*", type=Path, default=[], help="finished run folders to add")
    parser.add_argument("--notes", type=Path, default=None, help="markdown appended to the report")
    parser.add_argument("--no-train", action="store_true", help="report the finished runs only; list the others")
    parser.add_argument("--out", type=Path, default=Path("results"), help="folder of DATASET.md and DATASET.csv")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    runs_dir = args.runs_dir / args.dataset
    runs = plan(args.methods, args.seeds, args.rank, args.ranks, args.sweep_seeds or args.seeds)
    if not args.no_train:
        execute(runs, args.dataset, runs_dir, shlex.split(args.train_args), args.jobs, args.threads)
    finished = [runs_dir / run.name for run in runs if (runs_dir / run.name / "results.json").is_file()]
    rows = [collect(path) for path in [*finished, *args.include]]
    unfinished = [run.name for run in runs if runs_dir / run.name not in finished]
    rows.sort(key=lambda row: (METHODS.index(row["method"]), row["rank"] != args.rank, row["rank"], row["seed"]))
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out / f"{args.dataset}.csv")
    notes = args.notes.read_text(encoding="utf-8") if args.notes else ""
    invocation = "python -m bench compare " + shlex.join(argv)
    if unfinished:
        notes = f"Not run (or unfinished) from the plan: {', '.join(unfinished)}.\n\n{notes}"
    text = report(rows, args.dataset, invocation, notes, args.rank)
    (args.out / f"{args.dataset}.md").write_text(text, encoding="utf-8")
    print(text + f"\nwrote {args.out / args.dataset}.md and .csv")
