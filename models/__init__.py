"""Encoders that load Hugging Face checkpoints: ViT (images), AST (spectrograms), BERT (text)."""

from models.ast import AST, ASTConfig
from models.bert import Bert, BertConfig
from models.transformer import MODEL_REGISTRY, CheckpointError, TransformerEncoder, create_model
from models.vit import ViT, ViTConfig

__all__ = [
    "AST",
    "MODEL_REGISTRY",
    "ASTConfig",
    "Bert",
    "BertConfig",
    "CheckpointError",
    "TransformerEncoder",
    "ViT",
    "ViTConfig",
    "create_model",
]
