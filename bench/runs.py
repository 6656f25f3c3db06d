"""Mean ± std over seeds of train.py runs: ``python -m bench runs runs/NAME-s0 runs/NAME-s1 ...``.

Each run folder holds results.json (written by train.py). The runs must share their config apart
from seed and name, so that the spread is the seeds' alone.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

SEED_FIELDS = {"seed", "name"}  # config fields allowed to differ between the runs summarised


def load_runs(run_dirs: list[Path]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the shared config, each run's results); errors name a run without results or a differing field."""
    configs, results = [], []
    for run_dir in run_dirs:
        for name in ("config.json", "results.json"):
            if not (run_dir / name).is_file():
                raise FileNotFoundError(f"{run_dir / name} not found: is {run_dir} a finished train.py run?")
        configs.append(json.loads((run_dir / "config.json").read_text(encoding="utf-8")))
        results.append(json.loads((run_dir / "results.json").read_text(encoding="utf-8")))
    differing = sorted(
        k for k in configs[0] if k not in SEED_FIELDS and any(c.get(k) != configs[0][k] for c in configs)
    )
    if differing:
        raise ValueError(f"the runs differ in more than the seed: {differing}")
    return configs[0], results


def mean_std(values: list[float]) -> str:
    """'m ± s' in percent (s: sample standard deviation; 0 for one run)."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.1f} ± {100 * spread:.1f}"


def summarize(config: dict[str, Any], results: list[dict[str, Any]]) -> str:
    """Markdown: unimodal and complete accuracies, then accuracy vs missing rate per modality and fill."""
    from train import METHODS  # the top-level train.py (not bench.train); runs of older versions were U2A

    seeds, method = len(results), METHODS[config.get("method", "u2a")].title
    lines = [
        f"{method} on {config['dataset']}, rank {config['rank']}, targets {','.join(config['targets'])}, "
        f"{config['epochs']} epochs; test accuracy (%), mean ± std over {seeds} seeds.",
        "",
        "| model | accuracy |",
        "|---|---|",
        *(f"| unimodal {m} | {mean_std([r['unimodal'][m] for r in results])} |" for m in results[0]["unimodal"]),
        f"| {method}, complete | {mean_std([r['complete'] for r in results])} |",
        "",
        "| missing | handled by | " + " | ".join(f"{rate:g}" for rate in results[0]["missing_rates"]) + " |",
        "|---|---|" + "---|" * len(results[0]["missing_rates"]),
    ]
    for modality, by_fill in results[0]["missing"].items():
        for fill in by_fill:
            cells = [
                mean_std([r["missing"][modality][fill][i] for r in results])
                for i in range(len(results[0]["missing_rates"]))
            ]
            lines.append(f"| {modality} | {fill} | " + " | ".join(cells) + " |")
    agree = sum(r["merge_check"]["agree"] for r in results)
    total = sum(r["merge_check"]["total"] for r in results)
    lines += ["", f"Merged and unmerged weights agree on {agree}/{total} test predictions."]
    return "\n".join(lines) + "\n"
