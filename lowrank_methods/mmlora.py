"""MMLoRA (Du et al.): each unimodal model is first fine-tuned alone on its modality (stage 1: with a given
pretrained encoder, --unimodal-tuning auto means full fine-tuning), then frozen with LoRA (rank --rank on
--targets); the adapters and the fusion head train jointly on cross-entropy over complete data. No Mask
Tokens, no modality dropout (docs/design.md §5)."""

from __future__ import annotations

from lowrank_methods.base import Method


class MMLoRA(Method):
    title = "MMLoRA"
    tuning = "lora"
    stage1_tuning = "full"
