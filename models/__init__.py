"""Encoders that load Hugging Face checkpoints: ViT (images), AST (spectrograms), BERT (text), Whisper (audio);
the preprocessing of the raw inputs each reads (models.processing)."""

from models.ast import AST, ASTConfig
from models.bert import Bert, BertConfig
from models.processing import ImageProcessor, TextTokenizer, WaveformProcessor, input_processor
from models.transformer import MODEL_REGISTRY, CheckpointError, TransformerEncoder, create_model
from models.vit import ViT, ViTConfig
from models.whisper import Whisper, WhisperConfig

ENCODER_CLASSES: tuple[type[TransformerEncoder], ...] = (ViT, AST, Bert, Whisper)  # by config_class.model_type

__all__ = [
    "AST",
    "ENCODER_CLASSES",
    "MODEL_REGISTRY",
    "ASTConfig",
    "Bert",
    "BertConfig",
    "CheckpointError",
    "ImageProcessor",
    "TextTokenizer",
    "TransformerEncoder",
    "ViT",
    "ViTConfig",
    "WaveformProcessor",
    "Whisper",
    "WhisperConfig",
    "create_model",
    "input_processor",
]
