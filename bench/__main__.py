"""python -m bench {kernels,train,tune,report,runs,compare} — see bench/README.md.

    python -m bench kernels [--quick] [--dims 384 768 1024] [--tokens 1576 4096] [--ranks 8 16 64]
                            [--dtype float32 bfloat16] [--device cuda] [--out bench/results] [--plot]
    python -m bench train   [--quick] [--dtype ...] [--device ...] [--out ...] [--plot]
    python -m bench bank    [--quick] [--dims 384 768] [--tokens 4096] [--dtype ...] [--device ...] [--out ...]
    python -m bench tune    [--quick] [--dims ...] [--tokens ...] [--ranks ...] [--dtype ...] [--out DIR]
    python -m bench report  bench/results/<file>.csv ...
    python -m bench runs    runs/NAME-s0 runs/NAME-s1 ... [--out FILE.md]
    python -m bench serve   runs/u2a-r4 runs/u2a-r8 ...   (U2A runs of one stage 1, tested in one pass)
    python -m bench compare --dataset avmnist-mini --methods ... --seeds 0 1 2 [--ranks 1 4 16] ...

kernels/train append rows to ``<out>/<device>-<UTC date>-<suite>.csv``, print the markdown
tables and the targets met or missed; ``--plot`` also writes a PNG beside the CSV. runs prints
(and with ``--out`` writes) the mean ± std over the seeds of train.py runs. compare runs train.py
methods × seeds and writes the comparison table (its own options: ``python -m bench compare --help``).
tune times the Triton and torch paths per problem and writes the dispatch table kernels/backend.py
reads (default: bench/results/dispatch-<device>.json, or $LOWRANK_DISPATCH; ``--out DIR``: DIR/…).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

from bench import bank, compare, kernels, report, runs, serve, train, tune
from bench.plot import plot_kernels, plot_train
from bench.results import RESULTS, append_rows, device_name, provenance, results_path
from lowrank_util.cli import ArgumentParser, run_command

# CPU repetitions (CUDA: do_bench's own): full runs, and --quick (under a minute on 2 cores).
CPU_TIMER = {"warmup": 3, "reps": 15}
QUICK_TIMER = {"warmup": 1, "reps": 3}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("suite", choices=["kernels", "train", "bank", "tune", "report", "runs", "serve", "compare"])
    parser.add_argument("paths", nargs="*", type=Path, help="report: CSV files to tabulate; runs, serve: run folders")
    parser.add_argument("--quick", action="store_true", help="tiny shapes / small models, few repetitions")
    parser.add_argument(
        "--dims",
        nargs="+",
        type=int,
        default=None,
        help="kernels: D (MLP: D → 4D), default 384 768 1024; bank: D, default 384 768",
    )
    parser.add_argument(
        "--tokens",
        nargs="+",
        type=int,
        default=None,
        help="kernels: M, default 1576 4096; bank: M (the first), default 4096",
    )
    parser.add_argument("--ranks", nargs="+", type=int, default=[8, 16, 64], help="kernels: r")
    parser.add_argument("--dtype", nargs="+", default=None, help="default: float32 on CPU, bfloat16 float32 on CUDA")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=None, help="CPU timed repetitions (default 15, --quick 3)")
    parser.add_argument(
        "--cuda-graph", action="store_true", help="kernels: time CUDA graph replays (no launch overhead)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help=f"folder of the CSV and PNG (default {RESULTS}); runs: a .md"
    )
    parser.add_argument("--plot", action="store_true", help="also write a PNG bar chart beside the CSV")
    return parser.parse_args(argv)


def summary(suite: str, rows: list[dict]) -> str:
    """Markdown tables and target lines for rows of one suite."""
    if suite == "train":
        return report.train_table(rows) + "\n\n" + report.train_targets(rows)
    if suite == "bank":
        return bank.table(rows) + "\n\n" + bank.targets(rows)
    cuda = not rows[0]["device"].startswith("CPU")
    tables = [report.kernel_table(rows, group) for group in ("linear", "qkv") if any(r["group"] == group for r in rows)]
    return "\n\n".join([*tables, report.kernel_targets(rows, cuda)])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:
        compare.main(argv[1:])
        return
    args = parse_args(argv)
    if args.suite == "runs":
        table = runs.summarize(*runs.load_runs(args.paths))
        print(table)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(table, encoding="utf-8")
        return
    if args.suite == "serve":
        print(serve.table(serve.evaluate(args.paths, torch.device(args.device))))
        return
    if args.suite == "report":
        for path in args.paths:
            with path.open(newline="") as handle:
                rows = list(csv.DictReader(handle))
            suite = "train" if "method" in rows[0] else "bank" if "adapters" in rows[0] else "kernels"
            print(f"## {path.name}: {rows[0]['device']}, torch {rows[0]['torch']}, commit {rows[0]['commit']}\n")
            print(summary(suite, rows) + "\n")
        return

    device = torch.device(args.device)
    dtypes = [
        getattr(torch, name)
        for name in args.dtype or (["bfloat16", "float32"] if device.type == "cuda" else ["float32"])
    ]
    timer = dict(QUICK_TIMER if args.quick else CPU_TIMER) | ({"reps": args.reps} if args.reps else {})
    if args.cuda_graph:
        timer["cuda_graph"] = True
    if args.suite == "bank":
        quick = dict(adapter_counts=(1, 4), runs=("all", 1)) if args.quick else {}
        dims, rows = args.dims or ([32] if args.quick else list(bank.DIMS)), (args.tokens or [bank.ROWS])[0]
        rows = bank.run(dims, 64 if args.quick else rows, dtypes, device, timer, **quick)
    shapes = (
        kernels.QUICK_SHAPES
        if args.quick
        else kernels.full_shapes(args.dims or [384, 768, 1024], args.tokens or [197 * 8, 4096], args.ranks)
    )
    if args.suite == "tune":
        entries = tune.table_entries(tune.tune_cases(shapes), dtypes, device, timer)
        print(tune.summary(entries))
        print(f"\nwrote {tune.write_table(device_name(device), entries, args.out)}")
        return
    if args.suite == "kernels":
        rows = kernels.run(shapes, dtypes, device, timer)
    elif args.suite == "train":
        rows = train.run(dtypes, device, quick=args.quick, timer=timer)
    context = provenance(device)
    rows = [context | row for row in rows]
    path = append_rows(results_path(args.out or RESULTS, device, args.suite), rows)
    print(summary(args.suite, rows))
    print(f"\nwrote {path}")
    if args.plot and args.suite != "bank":
        plot = plot_kernels if args.suite == "kernels" else plot_train
        print(f"wrote {plot(rows, path.with_suffix('.png'))}")


if __name__ == "__main__":
    run_command(main)
