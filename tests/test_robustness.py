"""Faults: kills mid-epoch, truncated checkpoints, torchrun parity, NaN (bad input: tests/test_cli_errors.py).

Runs use the synthetic data set (8 steps of 16 samples, state.pt after every step). Subprocesses run
train.py as a user would, on the torch path (TRITON_INTERPRET removed), so that their numbers match the
in-process reference bit for bit.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import train
from kernels.backend import use_backend
from lowrank.linear import LoRALinear
from lowrank.qkv import LoRAQKVLinear
from lowrank_methods import u2a
from lowrank_train.checkpoint import load_checkpoint
from lowrank_train.loop import NonFiniteError
from lowrank_util.errors import CorruptFileError
from lowrank_util.files import read_safetensors, staged

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8  # 128 synthetic training samples / batch 16
KILL_SEED = 1  # the steps at which the kill test signals (a fixed seed, so that a failure reproduces)
DDP_TOLERANCE = 1e-4  # max |Δw| of one process vs two: fp32 summation order, amplified a little by Adam


def argv(root: Path, name: str, *extra: str) -> list[str]:
    return [
        "--dataset", "synthetic", "--epochs", "1", "--unimodal-epochs", "1", "--batch-size", "16",
        "--missing-test", "0.5", "--save-every", "1", "--device", "cpu",
        "--out-dir", str(root / "runs"), "--cache-dir", str(root / "cache"), "--name", name, *extra,
    ]  # fmt: skip


def numbers(tree: object) -> list[float]:
    """The numbers of a JSON tree, in a fixed order."""
    if isinstance(tree, dict):
        return [x for key in sorted(tree) for x in numbers(tree[key])]
    if isinstance(tree, list):
        return [x for value in tree for x in numbers(value)]
    return [tree]


def command_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, env=command_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def saved_step(state_file: Path) -> int:
    """Steps done by the run whose resume point is ``state_file`` (0 while there is none)."""
    if not state_file.is_file():
        return 0
    progress = torch.load(state_file, weights_only=False)["progress"]  # whole: written atomically
    return progress["epoch"] * STEPS + progress["step"]


def wait_for_step(process: subprocess.Popen, state_file: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while saved_step(state_file) < step:
        assert process.poll() is None, process.stdout.read().decode()
        assert time.monotonic() < deadline, f"no state.pt at step {step} after {timeout} s"
        time.sleep(0.05)


def same_run(a: Path, b: Path) -> None:
    """Same results, adapter tensors (bitwise) and per-epoch metrics (timings aside)."""
    assert json.loads((a / "results.json").read_text()) == json.loads((b / "results.json").read_text())
    left, right = load_file(a / "adapter.safetensors"), load_file(b / "adapter.safetensors")
    assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)
    untimed = [
        [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in (run / "metrics.jsonl").open()]
        for run in (a, b)
    ]
    assert untimed[0] == untimed[1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run's folder (its temporary root also holds the shared unimodal cache)."""
    root = tmp_path_factory.mktemp("robust")
    with use_backend("torch"):  # module scope: conftest's per-test backend fixture is not active yet
        train.main(argv(root, "reference"))
    return root / "runs" / "reference"


# ---------------------------------------------------------------------------------------------- kills


@pytest.mark.slow
def test_sigterm_then_sigkill_mid_epoch_resume_to_the_same_run(reference):
    root = reference.parents[1]
    run_dir, state_file = root / "runs" / "killed", root / "runs" / "killed" / "state.pt"
    rng = random.Random(KILL_SEED)
    first, second = sorted(rng.sample(range(1, STEPS - 1), 2))
    process = start("train.py", *argv(root, "killed"))
    wait_for_step(process, state_file, first)
    process.send_signal(signal.SIGTERM)
    out = process.communicate(timeout=120)[0].decode()
    assert process.returncode == 128 + signal.SIGTERM, out
    assert "SIGTERM: stopping after this step" in out and "Traceback" not in out
    stopped_at = saved_step(state_file)
    assert first <= stopped_at < STEPS  # the step in flight was finished and saved: nothing lost
    process = start("train.py", "--resume", str(run_dir))
    wait_for_step(process, state_file, max(second, stopped_at + 1))
    process.kill()  # SIGKILL: no chance to save; at most the step in flight is lost
    process.wait()
    assert saved_step(state_file) < STEPS, "killed too late to test anything"
    with use_backend("torch"):
        train.main(["--resume", str(run_dir)])
    same_run(reference, run_dir)


# ---------------------------------------------------------------------------------------------- checkpoints


def test_truncated_checkpoints_fail_clearly(reference, tmp_path):
    for name, read in (("state.pt", lambda p: load_checkpoint(p, torch.nn.Linear(1, 1))),
                       ("adapter.safetensors", read_safetensors)):  # fmt: skip
        whole = (reference / name).read_bytes()
        for tenth in range(10):
            cut = tmp_path / f"{tenth}-{name}"
            cut.write_bytes(whole[: len(whole) * tenth // 10])
            with pytest.raises(CorruptFileError, match=rf"{cut}.*truncated or corrupt"):
                read(cut)


def test_resume_from_a_truncated_checkpoint_names_it(reference, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text((reference / "config.json").read_text())
    whole = (reference / "state.pt").read_bytes()
    (run_dir / "state.pt").write_bytes(whole[: len(whole) // 2])
    with use_backend("torch"), pytest.raises(CorruptFileError, match=r"state\.pt is not a readable train\.py"):
        train.main(["--resume", str(run_dir)])


def test_an_interrupted_write_never_replaces_the_good_checkpoint(reference, tmp_path):
    good = tmp_path / "state.pt"
    good.write_bytes((reference / "state.pt").read_bytes())
    whole = good.read_bytes()
    for tenth in range(10):
        with pytest.raises(OSError, match="disk full"), staged(good) as tmp:
            tmp.write_bytes(whole[: len(whole) * tenth // 10])
            raise OSError("disk full")
        assert good.read_bytes() == whole
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temporary file left behind


def test_a_checkpoint_of_another_model_is_refused(reference):
    with pytest.raises(ValueError, match=r"does not fit the model: 2 missing: bias, weight; 20 unexpected"):
        load_checkpoint(reference / "state.pt", torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------- torchrun


@pytest.mark.slow
def test_torchrun_two_processes_match_one(reference):
    root = reference.parents[1]
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "train.py", *argv(root, "ddp")],
        cwd=ROOT, env=command_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("wrote ") == 1  # rank 0 alone prints (and writes)
    one, two = load_file(reference / "adapter.safetensors"), load_file(root / "runs" / "ddp" / "adapter.safetensors")
    assert max((one[k] - two[k]).abs().max().item() for k in one) < DDP_TOLERANCE
    # each process tested half of the samples; gathered back in order, the accuracies are one process's
    single, shared = (json.loads((run / "results.json").read_text()) for run in (reference, root / "runs" / "ddp"))
    assert shared["merge_check"]["total"] == single["merge_check"]["total"]
    accuracies = [numbers(results[key]) for results in (single, shared) for key in ("unimodal", "complete", "missing")]
    assert accuracies[:3] == [pytest.approx(a, abs=1.5 / single["merge_check"]["total"]) for a in accuracies[3:]]
    assert not list((root / "runs" / "ddp").glob(".*"))  # no temporary file from a second writer
    with use_backend("torch"):  # its checkpoint resumes in one process: finished, so only tested again
        resumed = train.main(["--resume", str(root / "runs" / "ddp")])
    tolerance = 1.5 / single["merge_check"]["total"]  # one prediction may flip with the batch composition
    assert numbers({k: resumed[k] for k in ("unimodal", "complete", "missing")}) == pytest.approx(
        numbers({k: shared[k] for k in ("unimodal", "complete", "missing")}), abs=tolerance
    )


# ---------------------------------------------------------------------------------------------- NaN


def test_nan_input_is_skipped_then_stops_the_run_naming_it(reference, monkeypatch, capsys):
    root = reference.parents[1]
    calls, real_loss = 0, u2a.u2a_loss

    def poisoned_loss(model, batch, config):
        nonlocal calls
        calls += 1
        if calls in (3, 5):
            batch["image"][0, 0, 0, 0] = float("nan")
        return real_loss(model, batch, config)

    monkeypatch.setattr(u2a, "u2a_loss", poisoned_loss)
    with use_backend("torch"), pytest.raises(NonFiniteError) as error:
        train.main(argv(root, "nan", "--max-bad-steps", "1", "--precision", "bf16"))
    message = str(error.value)
    assert "U2A epoch 1 step 5/8" in message and "loss nan" in message and "NaN/Inf in the input image" in message
    assert "U2A epoch 1 step 3/8: non-finite loss nan" in capsys.readouterr().out  # skipped
    state = torch.load(root / "runs" / "nan" / "state.pt", weights_only=False)
    assert state["progress"]["step"] == 4 and state["progress"]["bad_steps"] == 1  # the last good state
    assert all(torch.isfinite(t).all() for t in state["trainable"].values())


# ---------------------------------------------------------------------------------------------- autocast


@pytest.mark.parametrize("layer_kind", ["linear", "qkv"])
def test_lora_layers_under_autocast_match_the_cast_reference(layer_kind):
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 3 * 24 if layer_kind == "qkv" else 40)
    layer = LoRAQKVLinear(base, 4, 2.0, ("q", "v")) if layer_kind == "qkv" else LoRALinear(base, 4, 2.0)
    torch.nn.init.normal_(layer.lora_b)
    x = torch.randn(2, 5, 24, requires_grad=True)
    with use_backend("torch"), torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    grads = [t.grad.clone() for t in (x, layer.lora_a, layer.lora_b)]
    assert all(g.dtype == torch.float32 for g in grads)  # fp32 master weights get fp32 gradients
    for t in (x, layer.lora_a, layer.lora_b):
        t.grad = None
    a, b = layer.lora_a.bfloat16(), layer.lora_b.bfloat16()
    if layer_kind == "qkv":  # A stacks (q, v) rows [2r, D], B their outputs [2D, r]; k has no adapter
        zeros = torch.zeros(24, 24, dtype=torch.bfloat16)
        delta = torch.cat([b[:24] @ a[:4], zeros, b[24:] @ a[4:]])  # ΔW (3D, D)
    else:
        delta = b @ a  # ΔW (N, K)
    expected = F.linear(x.bfloat16(), base.weight.bfloat16() + 2.0 * delta, base.bias.bfloat16())
    torch.testing.assert_close(y, expected, atol=3e-2, rtol=2e-2)
    with use_backend("torch"):
        layer(x).square().sum().backward()  # fp32: the gradients that bf16 rounding may only perturb
    for got, want in zip(grads, (x.grad, layer.lora_a.grad, layer.lora_b.grad), strict=True):
        torch.testing.assert_close(got, want, atol=3e-2 * want.abs().max().item(), rtol=3e-2)
