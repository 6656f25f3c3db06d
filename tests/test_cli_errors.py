"""Every user error of the command lines is one line ``error: …`` on stderr and exit status 2, without a
traceback, and leaves nothing that blocks running the same command again; a bug keeps its traceback."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from layouts import write_manifest_folder, write_tiny_bert

import train
from kernels.backend import use_backend
from lowrank_util.cli import run_command
from models import create_model

ROOT = Path(__file__).resolve().parents[1]


def argv(root: Path, *extra: str) -> list[str]:
    return [
        "--dataset", "synthetic", "--epochs", "0", "--unimodal-epochs", "0", "--batch-size", "16",
        "--device", "cpu", "--out-dir", str(root / "runs"), "--cache-dir", str(root / "cache"), "--name", "run", *extra,
    ]  # fmt: skip


def multibench(folder: Path, image_shape: tuple[int, ...] = (4, 784)) -> Path:
    """A tiny MultiBench-layout folder; the image arrays get ``image_shape``."""
    for split in ("train", "test"):
        (folder / "image").mkdir(parents=True, exist_ok=True)
        (folder / "audio").mkdir(exist_ok=True)
        np.save(folder / "image" / f"{split}_data.npy", np.zeros(image_shape, np.float32))
        np.save(folder / "audio" / f"{split}_data.npy", np.zeros((4, 112, 112), np.float32))
        np.save(folder / f"{split}_labels.npy", np.arange(4))
    return folder


def encoder_checkpoint(folder: Path, name: str) -> Path:
    create_model(name).save_pretrained(folder)
    return folder


def truncated_encoder(folder: Path) -> Path:
    weights = encoder_checkpoint(folder, "vit_avmnist_tiny") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return folder


def corrupt_npy(folder: Path) -> Path:
    (multibench(folder) / "image" / "train_data.npy").write_bytes(b"\x93NUMPY garbage")
    return folder


def run_folder(folder: Path, *files: str) -> Path:
    """A run folder holding ``files`` (made-up contents)."""
    folder.mkdir(parents=True)
    for name in files:
        (folder / name).write_text("{}")
    return folder


def manifest_folder(folder: Path, *modalities: str, damage: str = "") -> Path:
    """A small manifest folder of ``modalities``; damage "missing": its first image deleted, "corrupt": overwritten."""
    manifest = write_manifest_folder(folder, modalities=modalities, per_class=2)
    image = Path(manifest.samples[0].inputs["image"]) if "image" in modalities else None
    if damage == "missing":
        image.unlink()
    elif damage == "corrupt":
        image.write_bytes(b"not a jpeg")
    return folder


def bert_without_tokenizer(folder: Path) -> Path:
    (write_tiny_bert(folder) / "tokenizer.json").unlink()
    return folder


def files_options(d: Path, *modalities: str, damage: str = "") -> list[str]:
    return ["--dataset", "manifest", "--data-dir", str(manifest_folder(d / "data", *modalities, damage=damage))]


def written_config(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(text)
    return folder


BAD_INPUTS = {  # name: (options, given the temporary folder; a regex of what the line says)
    "rank 0": (lambda d: ["--rank", "0"], "--rank must be a positive integer, got 0"),
    "negative rank": (lambda d: ["--rank", "-3"], "--rank must be a positive integer, got -3"),
    "rank not a number": (lambda d: ["--rank", "eight"], "argument --rank: invalid int value: 'eight'"),
    "unknown option": (lambda d: ["--colour", "blue"], "unrecognized arguments: --colour blue"),
    "unknown data set": (lambda d: ["--dataset", "mnist3d"], "unknown data set 'mnist3d'; known: avmnist"),
    "unknown method": (lambda d: ["--method", "lora-plus"], "unknown method .lora-plus.; known: u2a, unimodal"),
    "unknown encoder": (lambda d: ["--image-model", "vit_huge"], "unknown encoder architecture"),
    "missing-train-rate": (lambda d: ["--missing-train-rate", "1.5"], r"--missing-train-rate must be in \[0, 1\]"),
    "missing-test rate": (lambda d: ["--missing-test", "0,2"], r"--missing-test rates must be in \[0, 1\]"),
    "precision": (lambda d: ["--precision", "fp8"], "--precision must be one of fp32, bf16, fp16"),
    "negative max-bad-steps": (lambda d: ["--max-bad-steps", "-1"], "--max-bad-steps must be ≥ 0"),
    "sam-rho": (lambda d: ["--sam-rho", "image:1"], "--sam-rho must look like image=1e-15,audio=1e-10"),
    "lora-dropout": (lambda d: ["--lora-dropout", "1"], r"--lora-dropout must be in \[0, 1\)"),
    "target that adapts nothing": (lambda d: ["--targets", "q,ffn"], r"LoRA target 'ffn' \(pattern 'ffn'\) matches no"),
    "device that does not exist": (lambda d: ["--device", "cuda:99"], "--device cuda:99: no such CUDA device"),
    "device name": (lambda d: ["--device", "tpu"], "--device 'tpu' is not a device name"),
    "missing data folder": (
        lambda d: ["--dataset", "avmnist", "--data-dir", str(d / "none")],
        "--data-dir .*none: no such file or folder",
    ),
    "data file of the wrong shape": (
        lambda d: ["--dataset", "avmnist", "--data-dir", str(multibench(d / "mb", (4, 10)))],
        r"image/train_data\.npy: shape \(4, 10\), expected \(N, 784\)",
    ),
    "corrupt .npy": (
        lambda d: ["--dataset", "avmnist", "--data-dir", str(corrupt_npy(d / "mb"))],
        r"train_data\.npy: not a readable \.npy file",
    ),
    "missing encoder checkpoint": (lambda d: ["--image-encoder", str(d / "vit")], "--image-encoder .*vit: no such"),
    "encoder file without config.json": (
        lambda d: ["--image-encoder", str(run_folder(d / "enc", "weights.bin") / "weights.bin")],
        r"enc/config\.json not found \(a Hugging Face checkpoint is a folder",
    ),
    "truncated encoder checkpoint": (
        lambda d: ["--image-encoder", str(truncated_encoder(d / "vit"))],
        r"model\.safetensors is not a readable safetensors file",
    ),
    "encoder of another architecture": (
        lambda d: ["--image-encoder", str(encoder_checkpoint(d / "ast", "ast_avmnist_tiny"))],
        "model_type 'audio-spectrogram-transformer'; ViTConfig reads 'vit'",
    ),
    "resume of a folder that does not exist": (lambda d: ["--resume", str(d / "gone")], "gone: no such run folder"),
    "resume of a folder without config.json": (
        lambda d: ["--resume", str(run_folder(d / "empty"))],
        r"empty/config\.json not found",
    ),
    "resume of a corrupt config.json": (
        lambda d: ["--resume", str(written_config(d / "junk", "{ not json"))],
        r"config\.json is not valid JSON",
    ),
    "resume of another program's config.json": (
        lambda d: ["--resume", str(written_config(d / "other", json.dumps({"rank": 8, "colour": "blue"})))],
        r"unknown fields \['colour'\]: not a config of this train.py",
    ),
    "manifest without its folder": (lambda d: ["--dataset", "manifest"], "--dataset manifest needs --data-dir"),
    "manifest row naming a missing file": (
        lambda d: files_options(d, "image", "text", damage="missing"),
        r"manifest\.csv row 2, column image: .*train-cat-0\.jpg does not exist",
    ),
    "unreadable image file": (
        lambda d: [*files_options(d, "image", "audio", damage="corrupt"), "--audio-model", "whisper_smoke"],
        r"manifest\.csv row 2, column image: cannot read .*train-cat-0\.jpg",
    ),
    "text without a text encoder": (
        lambda d: files_options(d, "image", "text"),
        r"a text encoder needs a pretrained checkpoint with its tokenizer \(--text-encoder CKPT\)",
    ),
    "text encoder without tokenizer.json": (
        lambda d: [*files_options(d, "image", "text"), "--text-encoder", str(bert_without_tokenizer(d / "bert"))],
        r"bert/tokenizer\.json not found: a text encoder needs its tokenizer\.json",
    ),
    "audio files for a spectrogram encoder": (
        lambda d: files_options(d, "image", "audio"),
        "the AST encoder reads AV-MNIST-style spectrograms, not audio files; use a Whisper-style audio encoder",
    ),
    "a finished run again": (
        lambda d: ["--name", run_folder(d / "runs" / "done", "config.json", "results.json").name],
        "exists: continue it with --resume .*done, or pick another --name",
    ),
}


def one_line_error(capsys, args: list[str]) -> str:
    """The error line of train.py ``args`` run as its command line does, after checking it is the only line
    on stderr, carries no traceback and came with exit status 2."""
    with use_backend("torch"), pytest.raises(SystemExit) as exit_info:
        run_command(train.main, args)
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2, stderr
    assert "Traceback" not in stderr and len(stderr.splitlines()) == 1 and stderr.startswith("error: "), stderr
    return stderr


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_status_2(case, tmp_path, capsys):
    options, message = BAD_INPUTS[case]
    line = one_line_error(capsys, argv(tmp_path, *options(tmp_path)))
    assert re.search(message, line), line
    run_dir = tmp_path / "runs" / "run"
    assert not (run_dir / "state.pt").exists()
    if run_dir.exists() and case != "a finished run again":  # what a failed run leaves: its config at most
        assert {p.name for p in run_dir.iterdir()} <= {"config.json"}


def test_a_run_that_failed_before_its_first_checkpoint_can_be_run_again(tmp_path, capsys):
    args = argv(tmp_path, "--dataset", "avmnist", "--data-dir", str(corrupt_npy(tmp_path / "mb")))
    for _ in range(2):  # the same error both times, not "exists: continue it with --resume"
        assert "not a readable .npy file" in one_line_error(capsys, args)


def test_failed_download_says_where_to_put_the_files_and_that_avmnist_mini_is_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LOWRANK_DATA", str(tmp_path / "data"))

    def offline(url: str, timeout: float) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    for _ in range(2):  # a failed download leaves a retry possible
        line = one_line_error(capsys, argv(tmp_path, "--dataset", "avmnist"))
        assert "could not download" in line and f"put it at {tmp_path / 'data'}" in line, line
        assert "--dataset avmnist-mini" in line and "--data-dir" in line, line


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    def broken(*args: object) -> None:
        raise ZeroDivisionError("a bug, not the user's mistake")

    monkeypatch.setattr(train, "run", broken)
    with use_backend("torch"), pytest.raises(ZeroDivisionError):
        run_command(train.main, argv(tmp_path))


def command(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | (env or {})
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=environment, capture_output=True, text=True)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("train.py", "--rank", "0"), "error: bad config: --rank must be a positive integer, got 0"),
        (("-m", "models.convert", "merge", "nowhere", "--base", "nothing", "--out", "x"), r"nothing/config\.json"),
        (("-m", "bench", "runs", "nowhere"), r"nowhere/config\.json not found"),
        (("-m", "mmdata.avmnist", "--dataset", "avmnist", "--data-dir", "nowhere"), r"nowhere/image/train_data"),
    ],
)
def test_each_command_line_prints_one_line(args, message):
    result = command(*args)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1 and re.search(message, result.stderr)


def test_debug_shows_the_traceback_of_a_user_error():
    for args, env in (((), {"LOWRANK_DEBUG": "1"}), (("--debug",), {})):
        result = command("train.py", "--rank", "0", *args, env=env)
        assert result.returncode == 1 and "Traceback" in result.stderr and "ConfigError" in result.stderr
