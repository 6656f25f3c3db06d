"""python -m bench kernels [--full] [--dtype float32 bfloat16] [--device cuda] [--out results/]

Writes results/bench_kernels.csv (appended, with device and commit) and a PNG of the
median-time ratios to the frozen-base floor.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.kernels import QUICK_SHAPES, full_shapes, run
from bench.plot import plot_ratios
from bench.timing import append_rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("suite", choices=["kernels"])
    parser.add_argument("--full", action="store_true", help="the full shape grid (default: two ViT-B shapes)")
    parser.add_argument("--dtype", nargs="+", default=None, help="default: float32 on CPU, float32 bfloat16 on CUDA")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()

    device = torch.device(args.device)
    dtypes = [
        getattr(torch, name)
        for name in (args.dtype or (["float32", "bfloat16"] if device.type == "cuda" else ["float32"]))
    ]
    rows = run(full_shapes() if args.full else QUICK_SHAPES, dtypes, device)
    csv_path = args.out / "bench_kernels.csv"
    append_rows(csv_path, rows)
    for row in rows:
        print(
            f"{row['dtype']:>8} M={row['M']:<5} K={row['K']:<5} N={row['N']:<5} r={row['r']:<3} {row['mode']:<7} "
            f"{row['provider']:<13} {row['ms_p50']:9.3f} ms  x{row['ratio']:.2f}  {row['tflops']:.2f} TFLOP/s"
        )
    print(f"wrote {csv_path} and {plot_ratios(rows, args.out / 'bench_kernels.png')}")


if __name__ == "__main__":
    main()
