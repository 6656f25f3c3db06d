"""models/whisper.py and models/whisper_features.py: parity with transformers' Whisper encoder (both checkpoint
directions), the key table, the k-bias slice, LoRA on q, v, o, mlp, and the log-mel front end against
transformers' WhisperFeatureExtractor and mel_filter_bank."""

import math

import numpy as np
import pytest
import torch
from test_models import PARITY_ATOL, max_diff

from lowrank import LoRAConfig, LoRALayer, add_lora, export_peft, merge_lora
from models import ENCODER_CLASSES, MODEL_REGISTRY, CheckpointError, ViT, Whisper, WhisperConfig, create_model
from models.whisper import checkpoint_export_fn, checkpoint_filter_fn, sinusoids
from models.whisper_features import SAMPLES_PER_WINDOW, log_mel_spectrogram, mel_filters, resample

# Odd sizes on purpose; max_source_positions = 10 → transformers' encoder takes exactly 20 frames.
TINY = dict(
    d_model=32,
    encoder_layers=2,
    encoder_attention_heads=4,
    encoder_ffn_dim=48,
    num_mel_bins=12,
    max_source_positions=10,
    init_std=0.2,  # wide, so that attention is far from uniform and a wrong weight shows
)
FRAMES = 2 * TINY["max_source_positions"]


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter and buffer N(0, 0.2²): biases, LayerNorms and positions too, so that each key mapping shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            tensor.copy_(0.2 * torch.randn(tensor.shape, generator=generator))


def tiny_whisper(seed: int = 0) -> Whisper:
    model = Whisper(WhisperConfig(**TINY)).eval()
    randomize(model, seed)
    return model


def mels(batch: int = 2, frames: int = FRAMES, seed: int = 3) -> torch.Tensor:
    return torch.randn(batch, TINY["num_mel_bins"], frames, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def transformers():
    return pytest.importorskip("transformers", reason="parity tests need transformers (the 'ref' extra)")


def hf_whisper(transformers, architecture: str, seed: int):
    """transformers' WhisperModel or WhisperForConditionalGeneration of TINY's shape, fully randomized."""
    hf_config = WhisperConfig(**TINY).to_hf_config()
    config = transformers.AutoConfig.for_model(hf_config.pop("model_type"), **hf_config)
    model = getattr(transformers, architecture)(config).eval()
    randomize(model, seed)
    return model


# ---------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("architecture", ["WhisperModel", "WhisperForConditionalGeneration"])
def test_loads_transformers_checkpoint(architecture, transformers, tmp_path):
    reference = hf_whisper(transformers, architecture, seed=1)
    reference.save_pretrained(tmp_path)  # keys "encoder.*" / "model.encoder.*", plus the decoder's
    model = Whisper.from_pretrained(tmp_path)
    x = mels()
    with torch.no_grad():
        expected = reference.get_encoder()(x).last_hidden_state
        hidden, feature = model(x)
    assert max_diff(hidden, expected) <= PARITY_ATOL
    assert max_diff(feature, expected.mean(dim=1)) <= PARITY_ATOL
    assert max_diff(tiny_whisper()(x)[0], expected) > 1e-2  # the tolerance can fail


def test_transformers_loads_our_checkpoint(transformers, tmp_path):
    model = tiny_whisper()  # randomize gave the k-bias slice a value too: exporting drops it, exactly
    model.save_pretrained(tmp_path)
    reference, info = transformers.WhisperModel.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] and all(k.startswith("decoder.") for k in info["missing_keys"])  # encoder only
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    x = mels()
    with torch.no_grad():
        expected = reference.eval().encoder(x).last_hidden_state
        hidden, _ = model(x)
    assert max_diff(hidden, expected) <= PARITY_ATOL


def test_loads_an_encoder_saved_alone(transformers, tmp_path):
    encoder = hf_whisper(transformers, "WhisperModel", seed=2).encoder  # keys "conv1.*", "layers.*"
    encoder.save_pretrained(tmp_path)
    x = mels()
    with torch.no_grad():
        assert max_diff(Whisper.from_pretrained(tmp_path)(x)[0], encoder(x).last_hidden_state) <= PARITY_ATOL


# ---------------------------------------------------------------------------------------------- keys


def test_filter_and_export_are_inverse():
    model = tiny_whisper()
    ours = model.state_dict()
    hf = checkpoint_export_fn(ours, model)
    assert all(k.startswith("encoder.") for k in hf)
    assert "encoder.layers.0.self_attn.k_proj.bias" not in hf and "encoder.layers.0.self_attn.q_proj.bias" in hf
    back = checkpoint_filter_fn({f"model.{k}": v for k, v in hf.items()} | {"proj_out.weight": torch.zeros(3)}, model)
    assert back.keys() == ours.keys()
    dim = TINY["d_model"]
    for key, value in ours.items():
        expected = value.clone()
        if key.endswith("attn.qkv.bias"):
            expected[dim : 2 * dim] = 0.0  # the k slice comes back zero
        assert torch.equal(back[key], expected), key


def test_k_bias_slice_changes_nothing():
    model, x = tiny_whisper(), mels()
    with torch.no_grad():
        before, _ = model(x)
        model.blocks[1].attn.qkv.bias[32:64] = 5.0
        after, _ = model(x)
    assert max_diff(after, before) <= PARITY_ATOL


def test_incomplete_attention_projection_is_named():
    model = tiny_whisper()
    hf = checkpoint_export_fn(model.state_dict(), model)
    del hf["encoder.layers.1.self_attn.v_proj.bias"]
    with pytest.raises(CheckpointError, match=r"incomplete attention projection.*v_proj\.bias"):
        checkpoint_filter_fn(hf, model)


def test_wrong_architecture_is_refused(tmp_path):
    tiny_whisper().save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"model_type 'whisper'; ViTConfig reads 'vit'"):
        ViT.from_pretrained(tmp_path)


def test_config_reads_real_whisper_config_fields():
    hf_config = {"model_type": "whisper", "num_hidden_layers": 4, "vocab_size": 51864, "decoder_layers": 4}
    shape = dict(d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536)
    config = WhisperConfig.from_hf_config(hf_config | shape)  # decoder fields and HF aliases are ignored
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (384, 4, 1536)  # derived
    with pytest.raises(CheckpointError, match=r"lacks field\(s\) \['encoder_attention_heads', 'encoder_ffn_dim'\]"):
        WhisperConfig.from_hf_config(hf_config | dict(d_model=384, encoder_layers=4))


# ---------------------------------------------------------------------------------------------- forward


def test_positions_are_openai_sinusoids():
    table = sinusoids(1500, 384)
    j, t = 7, 1234
    rate = math.exp(-math.log(10_000.0) * j / (192 - 1))
    assert table[t, j].item() == pytest.approx(math.sin(t * rate), abs=1e-4)
    assert table[t, 192 + j].item() == pytest.approx(math.cos(t * rate), abs=1e-4)
    assert torch.equal(create_model("whisper_smoke").pos_embed, sinusoids(1500, 32))


def test_input_length_slices_positions_and_is_checked():
    model = tiny_whisper()
    with torch.no_grad():
        hidden, feature = model(mels(frames=7))
    assert hidden.shape == (2, 4, 32) and torch.allclose(feature, hidden.mean(dim=1))  # ⌈7 / 2⌉ positions
    with pytest.raises(ValueError, match=r"21 frames give 11 positions; this encoder stores 10"):
        model(mels(frames=21))
    with pytest.raises(ValueError, match=r"log-mel features \(B, 12, T\)"):
        model(torch.randn(2, 13, 20))


def test_class_feature_ignores_extra_tokens_and_padding():
    model, x = tiny_whisper(), mels()
    extra = torch.randn(2, 3, 32)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        _, plain_feature = model(x)
        hidden, feature = model(x, extra_tokens=extra, isolate_extra_tokens=True)
        _, visible_feature = model(x, extra_tokens=extra)
        masked, masked_feature = model(x, attention_mask=mask)
    assert hidden.shape == (2, 13, 32)
    assert max_diff(feature, plain_feature) <= PARITY_ATOL  # isolated extra tokens are not averaged in
    assert max_diff(visible_feature, plain_feature) > 1e-3  # visible ones change the real positions
    assert max_diff(masked_feature[1], masked[1, :6].mean(dim=0)) <= PARITY_ATOL


def test_registry_and_encoder_classes():
    assert Whisper in ENCODER_CLASSES
    tiny = MODEL_REGISTRY["whisper_tiny"]()
    assert (tiny.config.d_model, tiny.config.encoder_layers, tiny.config.encoder_attention_heads) == (384, 4, 6)
    assert tiny.pos_embed.shape == (1500, 384) and tiny.conv1.in_channels == 80
    # tiny.en's encoder has 7,632,384 parameters besides its 1500 × 384 positions; here + 4 zero k-bias slices of 384.
    assert sum(p.numel() for p in tiny.parameters()) == 7_632_384 + 4 * 384


def test_lora_on_q_v_o_mlp_trains_and_merges():
    model = create_model("whisper_smoke", num_hidden_layers=1)  # EncoderConfig's name for encoder_layers
    x = torch.randn(2, 80, 30)
    with torch.no_grad():
        before, _ = model(x)
    add_lora(model, LoRAConfig(rank=4, alpha=8, targets=("q", "v", "o", "mlp")))
    adapted = sorted(name for name, module in model.named_modules() if isinstance(module, LoRALayer))
    assert adapted == ["blocks.0.attn.proj", "blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    assert model.blocks[0].attn.qkv.projections == ("q", "v")
    with torch.no_grad():
        assert max_diff(model(x)[0], before) <= PARITY_ATOL  # B = 0: the identity
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    assert all("lora_" in name for name, p in model.named_parameters() if p.requires_grad)
    hidden, feature = model(x)
    (hidden.square().mean() + feature.square().mean()).backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        unmerged, _ = model(x)
        merge_lora(model)
        merged, _ = model(x)
    assert max_diff(unmerged, before) > 1e-4
    assert max_diff(merged, unmerged) <= PARITY_ATOL


# ---------------------------------------------------------------------------------------------- front end


def test_mel_filters_match_transformers(transformers):
    from transformers.audio_utils import mel_filter_bank

    expected = mel_filter_bank(
        num_frequency_bins=201,
        num_mel_filters=80,
        min_frequency=0.0,
        max_frequency=8000.0,
        sampling_rate=16_000,
        norm="slaney",
        mel_scale="slaney",
    )
    assert np.abs(mel_filters(80).numpy().T - expected).max() <= 1e-8  # weights peak at 0.026


def noise_and_tone(samples: int) -> torch.Tensor:
    """A 16 kHz test signal that does not fade out, so that the frames at the end see real audio."""
    t = torch.arange(samples) / 16_000
    noise = torch.randn(samples, generator=torch.Generator().manual_seed(0))
    return 0.3 * torch.sin(2 * math.pi * 440 * t) + 0.05 * noise


def test_log_mel_matches_whisper_feature_extractor(transformers):
    samples = 12_345  # not a multiple of the hop
    audio = noise_and_tone(samples)
    extractor = transformers.WhisperFeatureExtractor()  # 80 bins, 16 kHz, n_fft 400, hop 160
    unpadded = extractor(audio.numpy(), sampling_rate=16_000, padding="longest", return_tensors="np")
    padded = extractor(audio.numpy(), sampling_rate=16_000, return_tensors="np")  # zero-padded to 30 s
    ours = log_mel_spectrogram(audio)
    assert ours.shape == (80, samples // 160)
    assert np.abs(ours.numpy() - unpadded.input_features[0]).max() <= 1e-5
    assert (
        np.abs(log_mel_spectrogram(audio, num_samples=SAMPLES_PER_WINDOW).numpy() - padded.input_features[0]).max()
        <= 1e-5
    )
    # Unpadded vs padded: frames whose window [160 t − 200, 160 t + 200) lies in the clip agree; the last does not.
    inside = (samples - 200) // 160 + 1
    assert inside == ours.shape[1] - 1
    assert np.abs(ours[:, :inside].numpy() - padded.input_features[0][:, :inside]).max() <= 1e-5
    assert np.abs(ours[:, inside:].numpy() - padded.input_features[0][:, inside : ours.shape[1]]).max() > 1e-4


def test_log_mel_batch_is_per_waveform_and_resamples():
    quiet = noise_and_tone(8_000)
    batch = torch.stack([quiet, 10 * quiet])
    features = log_mel_spectrogram(batch)
    assert features.shape == (2, 80, 50)
    assert max_diff(features[0], log_mel_spectrogram(quiet)) <= 1e-6  # the max − 8 clamp is per waveform
    low = log_mel_spectrogram(quiet[::2], sample_rate=8_000)  # 8 kHz in: resampled to 16 kHz first
    assert low.shape == (80, 50)


def test_resample_8k_to_16k_keeps_a_tone():
    t8, t16 = torch.arange(4_000) / 8_000, torch.arange(8_000) / 16_000
    tone = torch.sin(2 * math.pi * 440 * t8)
    up = resample(torch.stack([tone, -tone]), 8_000)
    assert up.shape == (2, 8_000) and up.dtype == torch.float32
    middle = slice(400, -400)  # away from the filter's edge effects
    assert max_diff(up[0, middle], torch.sin(2 * math.pi * 440 * t16)[middle]) <= 1e-3
    assert torch.equal(up[1], -up[0])


def test_encoder_features_from_a_waveform():
    model = create_model("whisper_smoke")
    features = model.features(noise_and_tone(4_000)[None], sample_rate=8_000)  # 0.5 s at 8 kHz
    assert features.shape == (1, 80, 50)
    hidden, feature = model(features)
    assert hidden.shape == (1, 25, 32) and feature.shape == (1, 32)


def test_peft_adapter_runs_in_transformers(transformers, tmp_path):
    peft = pytest.importorskip("peft", reason="peft interop needs peft (the 'ref' extra)")
    model = tiny_whisper()
    model.save_pretrained(tmp_path / "base")
    add_lora(model, LoRAConfig(rank=2, alpha=4, targets=("q", "k", "v", "o", "mlp")))
    randomize(model, seed=5)  # adapters and weights alike: the base is reloaded from the file below
    model.load_state_dict(Whisper.from_pretrained(tmp_path / "base").state_dict(), strict=False)
    export_peft(model.eval(), tmp_path / "adapter", str(tmp_path / "base"))
    reference = peft.PeftModel.from_pretrained(
        transformers.WhisperModel.from_pretrained(tmp_path / "base"), tmp_path / "adapter"
    )
    x = mels()
    with torch.no_grad():
        expected = reference.eval().base_model.model.encoder(x).last_hidden_state
        hidden, _ = model(x)
        assert max_diff(hidden, expected) <= PARITY_ATOL
        assert max_diff(hidden, Whisper.from_pretrained(tmp_path / "base")(x)[0]) > 1e-2  # the adapters act
