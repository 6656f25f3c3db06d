"""Markdown tables of a run and the issue's targets checked against it (what bench/README.md shows).

Targets (ratios within one run; "limit" = 1 + 2 × the LoRA FLOP share of the mode):
    merged fwd ≤ 1.02 × floor;  lowrank fwd and fwd+bwd ≤ limit;  lowrank faster than peft, with
    lower peak memory;  on CUDA, bf16 fwd+bwd: lowrank ≥ 1.25× faster than peft and than naive;
    a LoRA training step ≤ 0.75 × full fine-tuning's time, with lower peak memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

MERGED_LIMIT = 1.02
GPU_SPEEDUP = 1.25
TRAIN_LIMIT = 0.75
LINEAR_COLUMNS = ("lowrank", "merged", "naive", "compiled", "peft")
QKV_COLUMNS = ("qkv_fused", "qkv_separate")
SHAPE_KEYS = ("group", "dtype", "M", "K", "N", "r", "mode")


def limit(row: dict) -> float:
    """1 + 2 × LoRA FLOP share: the most lowrank may cost relative to the floor."""
    return 1 + 2 * float(row["lora_share"])


def _by_shape(rows: Iterable[dict]) -> dict[tuple, dict[str, dict]]:
    """(group, dtype, M, K, N, r, mode) → provider → row, in first-seen order."""
    table: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        table.setdefault(tuple(row[k] for k in SHAPE_KEYS), {})[row["provider"]] = row
    return table


def _markdown(header: list[str], lines: list[list[str]]) -> str:
    rule = ["---"] * len(header)
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, rule, *lines])


def kernel_table(rows: list[dict], group: str) -> str:
    """One line per shape and mode: the floor's median ms, every provider's ratio to it, and the limit."""
    columns = LINEAR_COLUMNS if group == "linear" else QKV_COLUMNS
    header = ["dtype", "M", "K→N", "r", "mode", "floor ms", *columns, "limit", "lowrank TFLOP/s", "peak MiB ours/peft"]
    lines = []
    for key, providers in _by_shape(r for r in rows if r["group"] == group).items():
        _, dtype, m, k, n, r, mode = key
        floor, ours = next(iter(providers.values())), providers[columns[0]]
        ratios = [f"{float(providers[c]['ratio']):.3f}" if c in providers else "–" for c in columns]
        other = providers.get("peft" if group == "linear" else "qkv_separate")
        memory = f"{float(ours['peak_mb']):.1f} / {float(other['peak_mb']):.1f}" if other else "–"
        lines.append([
            str(dtype), str(m), f"{k}→{n}", str(r), str(mode), f"{float(floor['ms_p50']):.3f}", *ratios,
            f"{limit(ours):.3f}", f"{float(ours['tflops']):.3g}", memory,
        ])  # fmt: skip
    return _markdown(header, lines)


def _count(name: str, checks: list[tuple[bool, str]]) -> str:
    """'name: met at k/n' plus the failing cases (at most 6)."""
    if not checks:
        return f"- {name}: not measured"
    misses = [detail for ok, detail in checks if not ok]
    verdict = "MET" if not misses else "MISSED"
    shown = "; ".join(misses[:6]) + (f"; … {len(misses) - 6} more" if len(misses) > 6 else "")
    return f"- {name}: {verdict} at {len(checks) - len(misses)}/{len(checks)}" + (
        f" (misses: {shown})" if shown else ""
    )


def _label(key: tuple) -> str:
    _, dtype, m, k, n, r, mode = key
    return f"{dtype} {m}×{k}→{n} r{r} {mode}"


def _checks(table: dict, test: Callable[[tuple, dict], tuple[bool, str] | None]) -> list[tuple[bool, str]]:
    return [result for key, providers in table.items() if (result := test(key, providers)) is not None]


def kernel_targets(rows: list[dict], cuda: bool) -> str:
    """The kernel targets as met/missed lines with every miss's figure."""
    table = _by_shape(r for r in rows if r["group"] == "linear")

    def merged(key, p):
        if key[-1] == "fwd" and "merged" in p:
            ratio = float(p["merged"]["ratio"])
            return ratio <= MERGED_LIMIT, f"{_label(key)} {ratio:.3f}"
        return None

    def overhead(key, p):
        ratio, bound = float(p["lowrank"]["ratio"]), limit(p["lowrank"])
        return ratio <= bound, f"{_label(key)} {ratio:.3f} > {bound:.3f}"

    def faster(key, p):
        if "peft" in p:
            ours, theirs = float(p["lowrank"]["ratio"]), float(p["peft"]["ratio"])  # both over the floor
            return ours < theirs, f"{_label(key)} {theirs / ours:.2f}×"
        return None

    def leaner(key, p):
        if "peft" in p and not math.isnan(float(p["lowrank"]["peak_mb"])):
            ours, theirs = float(p["lowrank"]["peak_mb"]), float(p["peft"]["peak_mb"])
            return ours < theirs, f"{_label(key)} {ours:.1f} vs {theirs:.1f} MiB"
        return None

    def speedup(versus):
        def test(key, p):
            if key[1] == "bfloat16" and key[-1] == "fwd+bwd" and versus in p:
                gain = float(p[versus]["ratio"]) / float(p["lowrank"]["ratio"])
                return gain >= GPU_SPEEDUP, f"{_label(key)} {gain:.2f}×"
            return None

        return test

    lines = [
        _count(f"merged fwd ≤ {MERGED_LIMIT}× floor", _checks(table, merged)),
        _count("lowrank overhead ≤ 2× LoRA FLOP share", _checks(table, overhead)),
        _count("lowrank faster than peft", _checks(table, faster)),
        _count("lowrank peak memory below peft's", _checks(table, leaner)),
    ]
    if cuda:
        lines += [
            _count(f"bf16 fwd+bwd ≥ {GPU_SPEEDUP}× faster than peft", _checks(table, speedup("peft"))),
            _count(f"bf16 fwd+bwd ≥ {GPU_SPEEDUP}× faster than naive", _checks(table, speedup("naive"))),
        ]
    return "\n".join(lines)


def train_table(rows: list[dict]) -> str:
    header = ["model", "batch", "dtype", "method", "trainable", "step ms", "× full", "peak MiB", "state MiB"]
    lines = [
        [str(r["model"]), str(r["batch"]), str(r["dtype"]), str(r["method"]), f"{int(r['trainable']):,}",
         f"{float(r['ms_p50']):.1f}", f"{float(r['ratio']):.3f}", f"{float(r['peak_mb']):.0f}",
         f"{float(r['state_mb']):.0f}"]
        for r in rows
    ]  # fmt: skip
    return _markdown(header, lines)


def train_targets(rows: list[dict]) -> str:
    runs: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        runs.setdefault((row["model"], row["dtype"]), {})[row["method"]] = row
    pairs = [(run["lora"], run["full"]) for run in runs.values() if {"lora", "full"} <= run.keys()]
    times = [
        (float(lora["ratio"]) <= TRAIN_LIMIT, f"{lora['model']} {lora['dtype']} {float(lora['ratio']):.3f}")
        for lora, _ in pairs
    ]
    memory = [
        (float(lora["peak_mb"]) < float(full["peak_mb"]),
         f"{lora['model']} {lora['dtype']} {float(lora['peak_mb']):.0f} vs {float(full['peak_mb']):.0f} MiB")
        for lora, full in pairs
    ]  # fmt: skip
    return "\n".join([
        _count(f"LoRA step ≤ {TRAIN_LIMIT}× full fine-tuning", times),
        _count("LoRA step peak memory below full fine-tuning's", memory),
    ])  # fmt: skip
