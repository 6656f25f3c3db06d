"""``python -m bench tune``: measure the Triton kernels against the torch path (cuBLAS GEMMs, the same
algebra) for each problem of the kernel grid, and write the dispatch table that kernels/backend.py
reads (docs/design.md §4).

A problem is (dtype, N, K, n·r, M octave, dropout), the key of kernels.backend.Problem: every shape of
``bench kernels``' grid, as a LoRA linear (n = 1) and, where N = K, as fused q, k, v (n = 3), with and
without dropout. Each is timed in fwd+bwd (forward, then the gradients of X, A and B), the mode a
training step runs, with both backends one after the other on the same tensors; the faster one is
the entry's backend.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path

import torch

from bench.kernels import SCALE, Shape
from bench.timing import time_steps
from kernels.backend import BACKENDS, Problem, device_slug, dispatch_path, interpreting, problem_of, use_backend
from kernels.lora_linear import lora_linear
from kernels.lora_qkv import lora_qkv
from lowrank_util.errors import ConfigError

DROPOUTS = (0.0, 0.1)  # without dropout, and LoRA's usual 0.05–0.1 (any p > 0 is the same kernels)


def tune_cases(shapes: list[Shape]) -> list[tuple[Shape, float]]:
    """(shape, dropout p) for every shape as a linear, and as q, k, v where N = K."""
    cases = []
    for shape, dropout_p in itertools.product(shapes, DROPOUTS):
        cases.append((shape, dropout_p))
        if shape.in_features == shape.out_features:
            dim = shape.in_features
            cases.append((Shape(shape.tokens, dim, 3 * dim, shape.rank, adapters=3), dropout_p))
    return cases


def measure_case(shape: Shape, dropout_p: float, dtype: torch.dtype, device: torch.device, timer: dict) -> dict:
    """backend → fwd+bwd median ms of one case."""
    torch.manual_seed(0)
    like = {"device": device, "dtype": dtype}
    x = torch.randn(shape.tokens, shape.in_features, **like, requires_grad=True)
    weight = torch.randn(shape.out_features, shape.in_features, **like) / shape.in_features**0.5
    bias = torch.zeros(shape.out_features, **like)
    lora_a = torch.randn(shape.adapters * shape.rank, shape.in_features, **like, requires_grad=True)
    width = shape.out_features // 3 if shape.adapters == 3 else shape.out_features
    lora_b = torch.randn(shape.adapters * width, shape.rank, **like, requires_grad=True)
    grad = torch.randn(shape.tokens, shape.out_features, **like)

    def op() -> torch.Tensor:
        if shape.adapters == 3:
            return lora_qkv(x, weight, bias, lora_a, lora_b, SCALE, dropout_p=dropout_p, training=True)
        return lora_linear(x, weight, bias, lora_a, lora_b, SCALE, dropout_p=dropout_p, training=True)

    def step(backend: str) -> Callable[[], None]:
        def run() -> None:
            with use_backend(backend):
                torch.autograd.grad(op(), (x, lora_a, lora_b), grad)

        return run

    timings = time_steps({backend: step(backend) for backend in BACKENDS}, device, **timer)
    return {backend: timing.quantiles[1] for backend, timing in timings.items()}


def table_entries(cases, dtypes, device, timer, measure=measure_case) -> list[dict]:
    """One entry per (case, dtype): the Problem's fields, each backend's ms and the faster backend."""
    if measure is measure_case and not (device.type == "cuda" or interpreting()):
        raise ConfigError(f"bench tune times the Triton kernels, which cannot run on {device.type}: use --device cuda")
    entries = []
    for (shape, dropout_p), dtype in itertools.product(cases, dtypes):
        times = measure(shape, dropout_p, dtype, device, timer)
        problem = problem_of(
            dtype, shape.tokens, shape.out_features, shape.in_features, shape.adapters * shape.rank, dropout_p
        )
        entries.append(
            problem._asdict()
            | {f"{backend}_ms": ms for backend, ms in times.items()}
            | {"backend": min(times, key=times.get)}
        )
    return entries


def write_table(device_name: str, entries: list[dict], folder: Path | None = None) -> Path:
    """The dispatch table JSON for ``device_name``, in ``folder`` (default: where the dispatcher reads it)."""
    default = dispatch_path(device_name)
    path = default if folder is None else folder / f"dispatch-{device_slug(device_name)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = set(Problem._fields)
    if any(not fields <= entry.keys() for entry in entries):
        raise ValueError(f"every dispatch entry needs the fields {sorted(fields)}")
    path.write_text(json.dumps({"device": device_name, "entries": entries}, indent=1) + "\n", encoding="utf-8")
    return path


def summary(entries: list[dict]) -> str:
    """A markdown table of the entries: the problem, both times and the choice."""
    lines = ["| dtype | M octave | K→N | n·r | dropout | triton ms | torch ms | backend |", "| --- " * 8 + "|"]
    for e in entries:
        lines.append(
            f"| {e['dtype']} | {e['m_octave']} | {e['in_features']}→{e['out_features']} | {e['rank_columns']} | "
            f"{e['dropout']} | {e['triton_ms']:.4g} | {e['torch_ms']:.4g} | {e['backend']} |"
        )
    return "\n".join(lines)
