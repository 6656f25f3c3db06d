"""python -m models.convert: adapters between lowrank and peft, and merged Hugging Face checkpoints.

    python -m models.convert to-peft   ADAPTER  --base CHECKPOINT --out DIR [--base-model-name-or-path NAME]
                                                [--naming legacy]
    python -m models.convert from-peft PEFT_DIR --base CHECKPOINT --out DIR
    python -m models.convert merge     ADAPTER  --base CHECKPOINT --out DIR    (ADAPTER: lowrank's or peft's)

CHECKPOINT is the base model's Hugging Face checkpoint directory (config.json + model.safetensors); ``merge``
writes one in the same layout, with W + s · B A in place of each adapted W, which ``transformers`` loads
without peft. The encoder class that reads CHECKPOINT is the one whose ``config_class.model_type`` is
config.json's (``ENCODER_CLASSES``). The command lives here, above both lowrank and the encoders, so
that lowrank never imports models/. Bad input is one ``error: …`` line and exit status 2.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from lowrank.adapter_io import load_adapter, save_adapter
from lowrank.peft_io import export_peft, import_peft, load_any_adapter
from lowrank.state import merge_lora
from lowrank_util.cli import ArgumentParser, run_command
from lowrank_util.files import read_json
from models import ENCODER_CLASSES
from models.transformer import CONFIG_NAME, CheckpointError, TransformerEncoder


def load_base(checkpoint: Path) -> TransformerEncoder:
    """The encoder that reads ``checkpoint``'s model_type (config.json), loaded from it."""
    model_type = read_json(checkpoint / CONFIG_NAME, " (expected a Hugging Face checkpoint folder)").get("model_type")
    readers = {cls.config_class.model_type: cls for cls in ENCODER_CLASSES}
    if model_type not in readers:
        raise CheckpointError(
            f"{checkpoint}: model_type {model_type!r} is not an encoder of this project; known: {sorted(readers)}"
        )
    return readers[model_type].from_pretrained(checkpoint)


def to_peft(args: argparse.Namespace) -> None:
    model = load_adapter(load_base(args.base), args.adapter)
    export_peft(model, args.out, args.base_model_name_or_path or str(args.base), naming=args.naming)


def from_peft(args: argparse.Namespace) -> None:
    save_adapter(import_peft(load_base(args.base), args.adapter), args.out)


def merge(args: argparse.Namespace) -> None:
    model = load_base(args.base)
    load_any_adapter(model, args.adapter)
    merge_lora(model)
    model.save_pretrained(args.out)


def parser() -> argparse.ArgumentParser:
    main_parser = ArgumentParser(prog="python -m models.convert", description=__doc__.split("\n")[0])
    commands = main_parser.add_subparsers(dest="command", required=True)
    for name, run, summary in (
        ("to-peft", to_peft, "lowrank adapter → peft adapter"),
        ("from-peft", from_peft, "peft adapter → lowrank adapter"),
        ("merge", merge, "base checkpoint + adapter (either kind) → merged Hugging Face checkpoint"),
    ):
        command = commands.add_parser(name, help=summary, description=summary)
        command.set_defaults(run=run)
        command.add_argument("adapter", type=Path, help="adapter directory to read")
        command.add_argument("--base", type=Path, required=True, help="base model: HF checkpoint directory")
        command.add_argument("--out", type=Path, required=True, help="directory to write")
        if name == "to-peft":
            command.add_argument("--base-model-name-or-path", help="recorded in adapter_config.json (default: --base)")
            command.add_argument("--naming", help="HF module naming, e.g. 'legacy' for transformers 4 ViT/AST")
    return main_parser


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    args.run(args)
    print(f"{args.command}: wrote {args.out}")


if __name__ == "__main__":
    run_command(main)
