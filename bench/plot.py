"""Bar chart of median-time ratios to the floor, one panel per (shape, dtype, mode)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot_ratios(rows: list[dict], path: Path) -> Path:
    panels: dict[str, list[dict]] = {}
    for row in rows:
        key = f"{row['dtype']} M={row['M']} K={row['K']} N={row['N']} r={row['r']}\n{row['mode']}"
        panels.setdefault(key, []).append(row)
    figure, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for axis, (title, group) in zip(axes[0], panels.items(), strict=True):
        axis.bar([r["provider"] for r in group], [r["ratio"] for r in group], color="tab:blue")
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_title(title, fontsize=8)
        axis.tick_params(axis="x", labelrotation=60, labelsize=7)
    axes[0][0].set_ylabel("median time / floor's")
    figure.suptitle(rows[0]["device"], fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
