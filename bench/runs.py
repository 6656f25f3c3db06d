"""Mean ± std over seeds of train.py runs: ``python -m bench runs runs/NAME-s0 runs/NAME-s1 ...``.

Each run folder holds results.json (written by train.py). The runs must share their config apart
from seed and name, so that the spread is the seeds' alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lowrank_methods import METHODS
from lowrank_train.report import results_table
from lowrank_util.errors import ConfigError, MissingFileError

SEED_FIELDS = {"seed", "name"}  # config fields allowed to differ between the runs summarised


def load_runs(run_dirs: list[Path]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the shared config, each run's results); errors name a run without results or a differing field."""
    configs, results = [], []
    for run_dir in run_dirs:
        for name in ("config.json", "results.json"):
            if not (run_dir / name).is_file():
                raise MissingFileError(f"{run_dir / name} not found: is {run_dir} a finished train.py run?")
        configs.append(json.loads((run_dir / "config.json").read_text(encoding="utf-8")))
        results.append(json.loads((run_dir / "results.json").read_text(encoding="utf-8")))
    differing = sorted(
        k for k in configs[0] if k not in SEED_FIELDS and any(c.get(k) != configs[0][k] for c in configs)
    )
    if differing:
        raise ConfigError(f"the runs differ in more than the seed: {differing}")
    return configs[0], results


def summarize(config: dict[str, Any], results: list[dict[str, Any]]) -> str:
    """Markdown: unimodal and complete accuracies, then accuracy vs missing rate per modality and fill."""
    title = METHODS[config.get("method", "u2a")].title  # runs of older versions were U2A
    heading = (
        f"{title} on {config['dataset']}, rank {config['rank']}, targets {','.join(config['targets'])}, "
        f"{config['epochs']} epochs; test accuracy (%), mean ± std over {len(results)} seeds."
    )
    return results_table(title, heading, results)
