"""Triton kernels for LoRA and their PyTorch references; imports nothing else from this repo."""
