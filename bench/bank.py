"""Mixed-adapter batches: a LoRA bank of n adapters over one frozen linear (lowrank/bank.py), forward only
(serving), each provider on the same weights and rows in one run.

X [M, K] is M samples of one token each, so a sample's adapter is a row's; ids are laid out in runs of
``run`` consecutive rows of one adapter, adapters taking turns (run "all": one run per adapter, M / n rows)
    single   one LoRALinear on all M rows (one adapter: the cost to match)
    bank     the LoRABank of n adapters with those ids
    loop     each adapter's LoRALinear on its own rows, gathered and scattered back (serial sub-batches)
    peft     peft's LoRA Linear with n adapters and ``adapter_names=`` per row (when peft is installed)
Ratios are to ``single`` in the same run.
"""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Callable

import torch
from torch import nn

from bench.timing import time_steps
from lowrank import LoRABank, LoRALinear, selected_adapters

DIMS, ROWS = (384, 768), 4096
ADAPTERS = (1, 4, 16, 64)
RUNS: tuple[int | str, ...] = ("all", 64, 1)
RANK, SCALE = 8, 2.0


def adapter_ids(rows: int, adapters: int, run: int | str) -> torch.Tensor:
    """Each row's adapter: runs of ``run`` rows (``"all"``: rows / adapters) of adapters 0, 1, …, n − 1, 0, …"""
    length = max(1, rows // adapters) if run == "all" else run
    return (torch.arange(rows) // length) % adapters


def layers(dim: int, adapters: int, dtype: torch.dtype, device: torch.device) -> list[LoRALinear]:
    """``adapters`` LoRALinear layers of rank RANK on one frozen D × D linear, B drawn off zero."""
    torch.manual_seed(0)
    base = nn.Linear(dim, dim).to(device, dtype)
    made = []
    for _ in range(adapters):
        layer = LoRALinear(base, RANK, SCALE)  # every adapter wraps the one frozen base
        nn.init.normal_(layer.lora_b, std=0.02)
        made.append(layer.eval())
    return made


def looped(adapters: list[LoRALinear], ids: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Serial sub-batches: each adapter's rows through its own layer, written back in place."""
    groups = [(layer, (ids == i).nonzero().squeeze(1)) for i, layer in enumerate(adapters)]

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty(x.shape[0], adapters[0].out_features)
        for layer, rows in groups:
            if len(rows):
                out[rows] = layer(x[rows])
        return out

    return forward


def peft_mixed(adapters: list[LoRALinear], ids: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """peft's mixed-adapter batch over the same adapters, or None without peft."""
    if importlib.util.find_spec("peft") is None:
        return None
    import peft

    base = nn.Sequential()
    base.add_module("proj", nn.Linear(adapters[0].in_features, adapters[0].out_features))
    base.proj.weight, base.proj.bias = adapters[0].weight, adapters[0].bias
    config = peft.LoraConfig(r=RANK, lora_alpha=SCALE * RANK, target_modules=["proj"])
    model = peft.get_peft_model(base, config, adapter_name="a0")
    for i in range(1, len(adapters)):
        model.add_adapter(f"a{i}", config)
    proj = model.base_model.model.proj
    for i, layer in enumerate(adapters):
        proj.lora_A[f"a{i}"].weight.data.copy_(layer.lora_a.data)
        proj.lora_B[f"a{i}"].weight.data.copy_(layer.lora_b.data)
    model.eval()
    names = [f"a{i}" for i in ids.tolist()]
    return lambda x: model(x, adapter_names=names)


def providers(dim: int, adapters: int, run: int | str, rows: int, dtype, device) -> dict[str, Callable]:
    made = layers(dim, adapters, dtype, device)
    ids = adapter_ids(rows, adapters, run).to(device)
    bank = LoRABank(made[0], [(m.lora_a.data, m.lora_b.data, m.scale) for m in made]).eval()

    def banked(x: torch.Tensor) -> torch.Tensor:
        with selected_adapters(ids):
            return bank(x)

    found = {"single": made[0], "bank": banked, "loop": looped(made, ids), "peft": peft_mixed(made, ids)}
    return {name: fn for name, fn in found.items() if fn is not None}


def run(dims: list[int], rows: int, dtypes: list[torch.dtype], device: torch.device, timer: dict,
        adapter_counts=ADAPTERS, runs=RUNS) -> list[dict]:  # fmt: skip
    """One row per (D, n, run, provider); ``single`` is the floor of the ratios."""
    results = []
    for dim, dtype, adapters, run_length in itertools.product(dims, dtypes, adapter_counts, runs):
        x = torch.randn(rows, dim, device=device, dtype=dtype)
        chosen = providers(dim, adapters, run_length, rows, dtype, device)
        with torch.no_grad():
            expected = chosen["loop"](x)  # the same rows as every other provider computes (single: n = 1 only)
            for name in ("bank", "peft", *(("single",) if adapters == 1 else ())):
                if name in chosen:
                    torch.testing.assert_close(chosen[name](x), expected, rtol=1e-4, atol=1e-4, msg=name)
            timings = time_steps({name: lambda fn=fn, x=x: fn(x) for name, fn in chosen.items()}, device, **timer)
        floor = timings["single"]
        for name, timing in timings.items():
            results.append({
                "group": "bank", "dtype": str(dtype).removeprefix("torch."), "M": rows, "K": dim, "N": dim,
                "r": RANK, "adapters": adapters, "run": run_length, "provider": name, "timer": timing.timer,
                "ms_p20": timing.quantiles[0], "ms_p50": timing.quantiles[1], "ms_p80": timing.quantiles[2],
                "ratio": timing.ratio_to(floor),
            })  # fmt: skip
    return results


def table(rows: list[dict]) -> str:
    """Markdown: ratio to a single adapter per (D, n, run), one column per provider."""
    names = list(dict.fromkeys(row["provider"] for row in rows))
    lines = ["| D | adapters | run | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for key, group in itertools.groupby(rows, key=lambda row: (row["K"], row["adapters"], row["run"])):
        ratios = {row["provider"]: float(row["ratio"]) for row in group}
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | "
            + " | ".join(f"{ratios.get(n, float('nan')):.2f}" for n in names)
            + " |"
        )
    return "\n".join(lines)


def targets(rows: list[dict]) -> str:
    """The issue's targets, each MET or MISSED with its figures."""

    def ratios(provider, adapters, run):
        return [
            float(r["ratio"])
            for r in rows
            if (r["provider"], int(r["adapters"]), str(r["run"])) == (provider, adapters, str(run))
        ]

    lines = []
    for label, provider, adapters, run, limit in (
        ("bank, 1 adapter ≤ 1.02× a single adapter", "bank", 1, "all", 1.02),
        ("bank, 16 adapters, contiguous ≤ 1.10× a single adapter", "bank", 16, "all", 1.10),
    ):
        found = ratios(provider, adapters, run)
        if found:
            met = all(value <= limit for value in found)
            lines.append(f"- {label}: {'MET' if met else 'MISSED'} ({', '.join(f'{v:.2f}×' for v in found)})")
    bank16 = {
        (r["K"], str(r["run"])): float(r["ratio"]) for r in rows if r["provider"] == "bank" and int(r["adapters"]) == 16
    }
    peft16 = {
        (r["K"], str(r["run"])): float(r["ratio"]) for r in rows if r["provider"] == "peft" and int(r["adapters"]) == 16
    }
    speedups = [peft16[key] / bank16[key] for key in bank16 if key in peft16]
    if speedups:
        met = all(s >= 3 for s in speedups)
        lines.append(
            f"- bank ≥ 3× faster than peft's mixed batch at 16 adapters: {'MET' if met else 'MISSED'} "
            f"({', '.join(f'{s:.1f}×' for s in speedups)})"
        )
    return "\n".join(lines)
