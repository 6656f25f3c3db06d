"""``python -m bench {kernels,train} --quick`` end to end: a well-formed CSV (and PNG), not its speed."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROVENANCE = ("device", "torch", "triton", "commit", "time_utc")


def run_bench(suite: str, out: Path) -> tuple[list[dict], list[Path]]:
    """Run the suite with --quick --plot into ``out`` (torch path: no Triton interpreter); its rows and files."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "bench", suite, "--quick", "--plot", "--device", "cpu", "--out", str(out)]
    subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
    (path,) = out.glob(f"*-{suite}.csv")
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle)), sorted(out.iterdir())


def assert_timed(row: dict) -> None:
    assert all(row[key] for key in PROVENANCE), row
    p20, p50, p80 = (float(row[key]) for key in ("ms_p20", "ms_p50", "ms_p80"))
    assert 0 < p20 <= p50 <= p80 < math.inf, row


def test_kernels_quick_writes_a_csv_and_a_plot(tmp_path):
    rows, files = run_bench("kernels", tmp_path)
    assert [f.suffix for f in files] == [".csv", ".png"]
    for row in rows:
        assert_timed(row)
    linear = {(r["mode"], r["provider"]) for r in rows if r["group"] == "linear"}
    providers = {"floor", "lowrank", "naive", "compiled"} | ({"peft"} if "peft" in {p for _, p in linear} else set())
    assert {p for m, p in linear if m == "fwd+bwd"} == providers  # merged is inference only
    assert {p for m, p in linear if m == "fwd"} == providers | {"merged"}
    assert {r["provider"] for r in rows if r["group"] == "qkv"} == {"qkv_floor", "qkv_fused", "qkv_separate"}
    for row in rows:
        if row["provider"] in ("floor", "qkv_floor"):
            assert float(row["ratio"]) == pytest.approx(1.0)
        assert 0 < float(row["lora_share"]) < 1


def test_train_quick_writes_a_csv_and_a_plot(tmp_path):
    rows, files = run_bench("train", tmp_path)
    assert [f.suffix for f in files] == [".csv", ".png"]
    for row in rows:
        assert_timed(row)
        assert float(row["state_mb"]) > 0
    assert {(r["model"], r["method"]) for r in rows} == {
        (model, method) for model in ("vit_avmnist_tiny", "ast_avmnist_tiny") for method in ("full", "lora", "frozen")
    }
    trainable = {(r["model"], r["method"]): int(r["trainable"]) for r in rows}
    for model in ("vit_avmnist_tiny", "ast_avmnist_tiny"):
        assert trainable[model, "frozen"] < trainable[model, "lora"] < trainable[model, "full"]


def test_bank_quick_writes_a_csv_with_every_provider_at_every_point(tmp_path):
    rows, files = run_bench("bank", tmp_path)
    assert [f.suffix for f in files] == [".csv"]
    for row in rows:
        assert_timed(row)
    providers = {"single", "bank", "loop"} | ({"peft"} if any(r["provider"] == "peft" for r in rows) else set())
    points = {(r["adapters"], r["run"]) for r in rows}
    assert points == {(n, run) for n in ("1", "4") for run in ("all", "1")}
    for point in points:
        assert {r["provider"] for r in rows if (r["adapters"], r["run"]) == point} == providers
    assert all(float(r["ratio"]) == pytest.approx(1.0) for r in rows if r["provider"] == "single")


def fake_run(folder: Path, seed: int, complete: float, **config_changes) -> Path:
    """A run folder as train.py leaves it (config.json + results.json), with made-up accuracies."""
    folder.mkdir()
    config = {"dataset": "synthetic", "rank": 8, "targets": ["q", "v"], "epochs": 2, "seed": seed} | config_changes
    results = {
        "unimodal": {"image": 0.5, "audio": 0.25},
        "complete": complete,
        "merge_check": {"agree": 10, "total": 10, "max_abs_logit_diff": 0.0},
        "missing_rates": [0.0, 1.0],
        "missing": {"image": {"mask-token": [complete, 0.25]}, "audio": {"mask-token": [complete, 0.5]}},
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def test_runs_summary_gives_mean_and_std_over_seeds(tmp_path):
    from bench import runs

    folders = [fake_run(tmp_path / "a", 0, 0.6), fake_run(tmp_path / "b", 1, 0.8)]
    table = runs.summarize(*runs.load_runs(folders))
    assert "| U2A, complete | 70.0 ± 14.1 |" in table
    assert "| image | mask-token | 70.0 ± 14.1 | 25.0 ± 0.0 |" in table
    assert "20/20" in table
    with pytest.raises(ValueError, match="rank"):
        runs.load_runs([*folders, fake_run(tmp_path / "c", 2, 0.7, rank=4)])
    with pytest.raises(FileNotFoundError, match="finished"):
        runs.load_runs([tmp_path])


def test_tune_writes_the_table_the_dispatcher_reads(tmp_path, monkeypatch):
    """bench tune's table (timings faked: torch faster at q, k, v only) round-trips through the dispatcher."""
    import torch

    from bench import kernels, tune
    from kernels import backend as dispatch

    shape = kernels.Shape(4096, 768, 768, 16)
    cases = tune.tune_cases([shape])
    assert [(case.adapters, p) for case, p in cases] == [(1, 0.0), (3, 0.0), (1, 0.1), (3, 0.1)]

    def fake_measure(case, dropout_p, dtype, device, timer):
        return {"triton": 2.0, "torch": 1.0 if case.adapters == 3 else 3.0}

    entries = tune.table_entries(cases, [torch.bfloat16], torch.device("cuda"), {}, measure=fake_measure)
    path = tune.write_table("Fake GPU", entries, tmp_path)
    assert path.name == "dispatch-fake-gpu.json"
    assert "| bfloat16 | 12 | 768→2304 | 48 | False | 2 | 1 | torch |" in tune.summary(entries)
    monkeypatch.setenv(dispatch.DISPATCH_ENV, str(path))
    dispatch.dispatch_table.cache_clear()
    try:
        qkv = dispatch.problem_of(torch.bfloat16, 4000, 2304, 768, 48, 0.0)  # M = 4000: the same octave
        assert dispatch.measured_backend("Fake GPU", qkv) == "torch"
        assert dispatch.measured_backend("Fake GPU", qkv._replace(dropout=True)) == "triton"  # host seed
        assert dispatch.measured_backend("Fake GPU", qkv._replace(rank_columns=16, out_features=768)) == "triton"
    finally:
        dispatch.dispatch_table.cache_clear()


def test_gpu_script_parses_and_its_correctness_stage_runs(capsys):
    """bench/gpu.sh is valid bash; its correctness stage (Triton, here interpreted) passes at tiny shapes."""
    import torch

    from bench import gpu_checks

    subprocess.run(["bash", "-n", "bench/gpu.sh"], cwd=REPO, check=True)
    shapes = ((5, 7, 6, 3, False), (4, 6, 5, 2, True))
    assert gpu_checks.correctness(torch.device("cpu"), shapes=shapes, dtypes=(torch.float32,))
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 4 and all(line["passed"] and line["stage"] == "correctness" for line in lines)
