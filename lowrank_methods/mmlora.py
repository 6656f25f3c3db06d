"""MMLoRA (Du et al.): the stage-1 unimodal models, frozen, each with LoRA (rank --rank on --targets);
the adapters and the fusion head train jointly on cross-entropy over complete data. No Mask Tokens, no
modality dropout (docs/design.md §5)."""

from __future__ import annotations

from lowrank_methods.base import Method


class MMLoRA(Method):
    title = "MMLoRA"
    tuning = "lora"
