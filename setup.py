"""Packaging for lowrank: a LoRA core for PyTorch with fused Triton kernels."""

from pathlib import Path

from setuptools import setup

setup(
    name="lowrank",
    version="0.1.0",
    description="LoRA for PyTorch with fused Triton kernels, for multimodal adaptation of unimodal encoders",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["lowrank_util", "kernels", "lowrank", "models", "mmdata", "lowrank_train", "lowrank_methods", "bench"],
    install_requires=[
        "torch>=2.10",  # F.grouped_mm (the adapter bank's CPU path)
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "safetensors",
        "einops",
        "tqdm",
        "matplotlib",
        "soxr",  # Whisper's front end resamples audio to 16 kHz (models/whisper_features.py)
        "Pillow",  # image files (mmdata/manifest.py, models/processing.py)
        "soundfile",  # audio files
        "tokenizers",  # text: the text encoder's own tokenizer.json
    ],
    extras_require={
        "dev": ["pytest", "hypothesis", "ruff"],
        "ref": ["transformers", "peft", "scikit-learn"],  # references in tests and benches only
    },
)
