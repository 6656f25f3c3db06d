"""One training step of an encoder: LoRA (``lowrank.add_lora``) vs full fine-tuning.

A step is: zero the gradients, forward a batch, cross-entropy of a linear head on the
class feature, backward, AdamW step. LoRA trains the adapters and the head (the base
weights are frozen: no dW GEMMs, no optimizer state for them); full fine-tuning trains
every parameter. Per encoder, ``P`` parameters and ``T`` tokens: full ≈ 6PT FLOPs (fwd
2PT, dX 2PT, dW 2PT), LoRA ≈ 4PT plus its small share, so LoRA's floor is ≈ 0.67× in
GEMMs; attention, norms and activations cost both the same. The "frozen" row (no adapters,
dX through every layer) measures that floor.

Memory: ``peak_mb`` is the most a step allocates beyond what exists before it
(activations, gradients, temporaries; see lowrank_util/memory.py for how, per device);
``state_mb`` is what exists before it: parameters plus optimizer state, summed exactly.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bench.timing import time_steps
from lowrank import LoRAConfig, add_lora, lora_parameters
from lowrank_util.memory import peak_memory_mb
from models import ViT, ViTConfig, create_model

# "frozen": no adapters, every encoder weight frozen, the patch embedding's output requiring grad, so
# backward still runs dX through every transformer block: the floor of any adapter method.
METHODS = ("full", "lora", "frozen")
# The library's defaults (r = 8, alpha = 16, q and v): what a user gets from LoRAConfig().
LORA = LoRAConfig()
CLASSES = 10  # AV-MNIST digits


@dataclass(frozen=True)
class Encoder:
    """A model to train: how to build it, its input shape (without the batch) and a batch size."""

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    batch: int


def vit_base() -> ViT:
    """ViT-B/16 at 224×224 (86M parameters; 197 tokens, D = 768, 12 blocks, 12 heads, MLP 3072)."""
    config = ViTConfig(
        image_size=224, patch_size=16, num_channels=3, hidden_size=768, num_hidden_layers=12,
        num_attention_heads=12, intermediate_size=3072,
    )  # fmt: skip
    return ViT(config)


def encoders(quick: bool) -> list[Encoder]:
    """AV-MNIST's small encoders and ViT-B; with ``quick``, the tiny AV-MNIST encoders (D = 64) alone."""
    size = "tiny" if quick else "small"
    avmnist = [
        Encoder(f"vit_avmnist_{size}", lambda: create_model(f"vit_avmnist_{size}"), (1, 28, 28), 64),
        Encoder(f"ast_avmnist_{size}", lambda: create_model(f"ast_avmnist_{size}"), (1, 112, 112), 64),
    ]
    return avmnist if quick else [*avmnist, Encoder("vit_base_patch16_224", vit_base, (3, 224, 224), 8)]


@dataclass(frozen=True)
class Training:
    """A ready training step and what it holds: the model with its head, and the optimizer."""

    step: Callable[[], None]
    modules: nn.ModuleList  # encoder and head
    optimizer: torch.optim.Optimizer
    trainable: int  # trained parameter count

    def state_mb(self) -> float:
        """MiB resident between steps: every parameter (frozen or not) and the optimizer state (after a step)."""
        tensors = list(self.modules.parameters())
        tensors += [t for state in self.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def training_setup(encoder: Encoder, method: str, dtype: torch.dtype, device: torch.device) -> Training:
    """A training step for ``method`` ∈ METHODS on fresh weights and one fixed random batch."""
    torch.manual_seed(0)
    model = encoder.build().to(device=device, dtype=dtype)
    head = nn.Linear(model.config.hidden_size, CLASSES, device=device, dtype=dtype)
    if method == "lora":
        add_lora(model, LORA)
        trainable = [*lora_parameters(model), *head.parameters()]
    elif method == "frozen":
        model.requires_grad_(False)
        model.patch_embed.register_forward_hook(lambda module, args, patches: patches.requires_grad_())
        trainable = list(head.parameters())
    else:
        trainable = [*model.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    inputs = torch.randn(encoder.batch, *encoder.input_shape, device=device, dtype=dtype)
    labels = torch.randint(0, CLASSES, (encoder.batch,), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        _, cls = model(inputs)
        F.cross_entropy(head(cls).float(), labels).backward()
        optimizer.step()

    return Training(step, nn.ModuleList([model, head]), optimizer, sum(p.numel() for p in trainable))


def run(dtypes: list[torch.dtype], device: torch.device, quick: bool = False, timer: dict | None = None) -> list[dict]:
    """One row per encoder × dtype × method; ``ratio`` is the time over full fine-tuning's in the same run."""
    rows = []
    for encoder, dtype in itertools.product(encoders(quick), dtypes):
        setups = {method: training_setup(encoder, method, dtype, device) for method in METHODS}
        timings = time_steps({method: setup.step for method, setup in setups.items()}, device, **(timer or {}))
        for method, setup in setups.items():
            timing = timings[method]
            (p20, p50, p80) = timing.quantiles
            rows.append({
                "model": encoder.name, "batch": encoder.batch, "dtype": str(dtype).removeprefix("torch."),
                "method": method, "trainable": setup.trainable, "timer": timing.timer,
                "ms_p20": p20, "ms_p50": p50, "ms_p80": p80,
                "ratio": timing.ratio_to(timings["full"]), "peak_mb": peak_memory_mb(setup.step, device),
                "state_mb": setup.state_mb(),
            })  # fmt: skip
    return rows
