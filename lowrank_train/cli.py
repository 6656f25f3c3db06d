"""train.py's command line: every TrainConfig field is an option; --resume continues a run folder.

Bad input raises a UserError (one ``error: …`` line from lowrank_util.cli), before any work is done."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Collection
from pathlib import Path

from lowrank import LoRAConfig, add_lora
from lowrank_train.config import TrainConfig
from lowrank_train.stage1 import encoder_checkpoint_file
from lowrank_util.cli import ArgumentParser
from lowrank_util.errors import ConfigError, MissingFileError, UnknownNameError
from lowrank_util.files import read_text
from mmdata.manifest import MODALITIES
from models import create_model

RESUMABLE = ("device", "save_every", "max_bad_steps", "out_dir", "cache_dir")  # may change on --resume: no effect
# on the results (cache_dir: the unimodal models are rebuilt identically or found)
FRESH_RUN_FILES = {"config.json"}  # all a run folder holds until its first checkpoint: no reason to refuse it


def parse_args(
    argv: list[str] | None, methods: Collection[str], description: str = ""
) -> tuple[TrainConfig, Path | None]:
    """TrainConfig from the command line, and --resume's run folder (None for a new run).

    With --resume the run's config.json is used; options may change its RESUMABLE fields only, and
    any other difference is refused naming each field with both values. ``methods``: the --method names."""
    parser = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resume", type=Path, help="run folder to continue; its config.json is used")
    parser.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
    for f in dataclasses.fields(TrainConfig):  # defaults left out, so that the options given can be told
        flag, parse, text = "--" + f.name.replace("_", "-"), f.metadata["parse"], f.metadata["help"]
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        else:
            kind = parse or (str if f.default is None else type(f.default))
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=f"{text} (default {f.default})")
    given = vars(parser.parse_args(argv))
    resume, _ = given.pop("resume"), given.pop("debug")
    config = TrainConfig(**given) if resume is None else resumed_config(resume, given)
    if config.method not in methods:
        raise UnknownNameError(f"unknown method {config.method!r}; known: {', '.join(methods)}")
    return config, resume


def resumed_config(run_dir: Path, given: dict[str, object]) -> TrainConfig:
    """The config of the run in ``run_dir`` with the RESUMABLE options in ``given`` applied."""
    if not run_dir.is_dir():
        raise MissingFileError(f"--resume {run_dir}: no such run folder")
    config_file = run_dir / "config.json"
    saved = TrainConfig.from_json(read_text(config_file), source=str(config_file))
    changed = [
        f"{key} (run {getattr(saved, key)!r}, given {value!r})"
        for key, value in given.items()
        if key not in RESUMABLE and value != getattr(saved, key)
    ]
    if changed:
        raise ConfigError(
            f"--resume {run_dir}: cannot change {'; '.join(changed)}: the run would no longer be one run. "
            f"Only {', '.join(RESUMABLE)} may change on resume; start a new run (--name) for the rest"
        )
    return dataclasses.replace(saved, **given)


def check_inputs(config: TrainConfig) -> None:
    """Fail before any work when a given data folder or encoder checkpoint does not exist, or when the LoRA
    options do not apply to the encoder architectures (a --targets name or pattern that adapts nothing)."""
    encoders = {f"--{m}-encoder": config.model_for(m)[1] for m in MODALITIES}
    for option_name, path in ({"--data-dir": config.data_dir} | encoders).items():
        if path is not None and not Path(path).exists():
            raise MissingFileError(f"{option_name} {path}: no such file or folder")
    for option_name, path in encoders.items():
        weights = None if path is None else encoder_checkpoint_file(path)
        for required in () if weights is None else (weights, weights.parent / "config.json"):
            if not required.is_file():
                raise MissingFileError(
                    f"{option_name} {path}: {required} not found (a Hugging Face checkpoint is a folder with "
                    "config.json and model.safetensors)"
                )
    checked = [m for m in MODALITIES if m != "text" or config.text_encoder]  # text: only with its encoder
    for option_name, architecture in ((f"--{m}-model", config.model_for(m)[0]) for m in checked):
        try:
            lora = LoRAConfig(rank=config.rank, alpha=config.alpha, dropout=config.lora_dropout, targets=config.targets)
            add_lora(create_model(architecture), lora)
        except ValueError as error:  # LoRAConfig's and add_lora's checks name the option's value
            raise ConfigError(
                f"--targets {','.join(config.targets)} on {option_name} {architecture}: {error}"
            ) from error


def new_run_dir(config: TrainConfig) -> Path:
    """The folder of a new run; refused (naming --resume) once it holds more than a run leaves before its
    first checkpoint, so that a run that failed early (no data, no network) can simply be started again."""
    run_dir = Path(config.out_dir) / config.run_name
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is a file, not a run folder: pick another --name or --out-dir")
    if run_dir.exists() and {p.name for p in run_dir.iterdir()} - FRESH_RUN_FILES:
        raise ConfigError(f"{run_dir} exists: continue it with --resume {run_dir}, or pick another --name")
    return run_dir
