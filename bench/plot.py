"""PNG bar charts of a run: kernel ratios to the floor, and training-step times relative to full fine-tuning."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

PANELS_PER_ROW = 6


def bar_panels(panels: dict[str, list[tuple[str, float]]], ylabel: str, title: str, path: Path) -> Path:
    """One bar panel per key (bars: (label, value)), a line at 1, saved as ``path``."""
    columns = min(PANELS_PER_ROW, len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.8 * columns, 3.4 * rows), squeeze=False)
    for axis in axes.flat[len(panels) :]:
        axis.set_visible(False)
    for axis, (name, bars) in zip(axes.flat, panels.items(), strict=False):
        axis.bar([label for label, _ in bars], [value for _, value in bars], color="tab:blue")
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_title(name, fontsize=7)
        axis.tick_params(axis="x", labelrotation=60, labelsize=7)
    for axis in axes[:, 0]:
        axis.set_ylabel(ylabel)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_kernels(rows: list[dict], path: Path) -> Path:
    """Median time / floor's for every provider, one panel per (group, dtype, shape, mode)."""
    panels: dict[str, list[tuple[str, float]]] = {}
    for row in rows:
        key = f"{row['group']} {row['dtype']} M={row['M']}\n{row['K']}→{row['N']} r={row['r']} {row['mode']}"
        panels.setdefault(key, []).append((row["provider"], float(row["ratio"])))
    return bar_panels(panels, "median time / floor's", rows[0]["device"], path)


def plot_train(rows: list[dict], path: Path) -> Path:
    """Step time / full fine-tuning's, one panel per (model, dtype)."""
    panels: dict[str, list[tuple[str, float]]] = {}
    for row in rows:
        panels.setdefault(f"{row['model']} {row['dtype']}\nbatch {row['batch']}", []).append(
            (row["method"], float(row["ratio"]))
        )
    return bar_panels(panels, "step time / full's", rows[0]["device"], path)
