"""LoRA linear and fused-QKV microbenchmarks: every provider on the same weights, in one run.

A LoRA linear Y = X Wᵀ + b + s · (X Aᵀ) Bᵀ, X [M, K], W [N, K], A [r, K], B [N, r], computed by
    floor      F.linear with the frozen base weight, no adapter (the lower bound)
    lowrank    our fused op (Triton on CUDA, the torch path on CPU)
    merged     our merged weight W + s · B A: one plain GEMM (inference only)
    naive      eager PyTorch, three matmuls + add, autograd-derived backward
    compiled   torch.compile of the naive version
    peft       peft's LoRA Linear (when the ``ref`` extra is installed)
and, for the attention projection (K = D, 3 outputs of width D, LoRA on q, k and v),
    qkv_floor F.linear with the frozen W_qkv [3D, D]; qkv_fused our LoRAQKVLinear (one kernel);
    qkv_separate three separate LoRALinear (q, k, v) and a concatenation.

Modes: ``fwd`` (inference, no autograd) and ``fwd+bwd`` (forward, then the gradients of
X and of the adapters for a random dY; W frozen). FLOPs per GEMM pass: base 2MKN, LoRA
2Mr(aK + N) for a adapters sharing X (a = 3 for q, k, v); fwd is one pass, fwd+bwd two
base passes (Y, dX) and three LoRA passes (S and the expand; dS and dS A; dA and dB).
"""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bench.timing import time_steps
from kernels.merge import merge_weight
from lowrank import LoRALinear, LoRAQKVLinear
from lowrank_util.memory import peak_memory_mb

MODES = ("fwd", "fwd+bwd")
# GEMM passes per mode: (base, LoRA), see the module docstring.
PASSES = {"fwd": (1, 1), "fwd+bwd": (2, 3)}
SCALE = 2.0  # s = alpha / r; any value times the same work


@dataclass(frozen=True)
class Shape:
    """One benchmarked problem: X [tokens, in_features] through ``adapters`` LoRA adapters of rank ``rank``."""

    tokens: int  # M (batch × sequence)
    in_features: int  # K
    out_features: int  # N (3D for the qkv projection)
    rank: int  # r, per adapter
    adapters: int = 1  # a: 1 for a linear, 3 for q, k, v

    def flops(self, mode: str, adapted: bool) -> float:
        """Matmul FLOPs of one call in ``mode``; only the base GEMMs when not ``adapted``."""
        base_passes, lora_passes = PASSES[mode]
        m, k, n, r = self.tokens, self.in_features, self.out_features, self.rank
        return base_passes * 2 * m * k * n + adapted * lora_passes * 2 * m * r * (self.adapters * k + n)

    def lora_share(self, mode: str) -> float:
        """LoRA FLOPs over base FLOPs: r(aK + N)/(KN) per pass, times LoRA passes / base passes."""
        return self.flops(mode, adapted=True) / self.flops(mode, adapted=False) - 1

    def bytes_moved(self, mode: str, adapted: bool, element_size: int) -> float:
        """Fewest bytes one call must move: each operand read once, each result written once.

        fwd: X, W, A, B in, Y out. fwd+bwd adds dY, W, X, A, B in and dX, dA, dB out.
        """
        m, k, n, r = self.tokens, self.in_features, self.out_features, self.rank
        adapter = adapted * r * (self.adapters * k + n)
        forward = m * k + n * k + m * n + adapter
        backward = m * n + n * k + 2 * m * k + 2 * adapter
        return element_size * (forward + (backward if mode == "fwd+bwd" else 0))


def full_shapes(
    dims: tuple[int, ...] = (384, 768, 1024),
    tokens: tuple[int, ...] = (197 * 8, 4096),
    ranks: tuple[int, ...] = (8, 16, 64),
) -> list[Shape]:
    """Attention (D → D) and MLP (D → 4D) layers of ViT-S/B/L-wide encoders.

    Default tokens: 197·8 (ViT, batch 8) and 4096 (= 512·8, BERT-length batch of 8).
    """
    return [
        Shape(m, dim, out, rank)
        for dim, m, rank in itertools.product(dims, tokens, ranks)
        for out in (dim, 4 * dim)
    ]  # fmt: skip


QUICK_SHAPES = full_shapes(dims=(64,), tokens=(128,), ranks=(8,))


@dataclass(frozen=True)
class Provider:
    """fn(x) → Y, the tensors whose gradients fwd+bwd computes (besides x), and whether it does LoRA work."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    trainable: tuple[torch.Tensor, ...]
    adapted: bool = True
    inference_only: bool = False


def naive_lora(x, weight, bias, lora_a, lora_b, scale):
    """Y = X Wᵀ + b + s · (X Aᵀ) Bᵀ as three eager matmuls and an add."""
    return F.linear(x, weight, bias) + scale * F.linear(F.linear(x, lora_a), lora_b)


def lora_providers(shape: Shape, dtype: torch.dtype, device: torch.device) -> dict[str, Provider]:
    """Every provider of one LoRA linear, on the same W, b, A, B (B nonzero)."""
    torch.manual_seed(0)
    linear = nn.Linear(shape.in_features, shape.out_features, device=device, dtype=dtype).requires_grad_(False)
    layer = LoRALinear(linear, shape.rank, scale=SCALE)  # W and b frozen, as add_lora and peft leave them
    nn.init.normal_(layer.lora_b, std=0.02)
    adapter = (layer.lora_a, layer.lora_b)
    merged_weight = merge_weight(layer.weight, *adapter, layer.scale)
    params = (layer.weight, layer.bias, *adapter, layer.scale)
    compiled = torch.compile(naive_lora, dynamic=False)
    providers = {
        "floor": Provider(lambda x: F.linear(x, layer.weight, layer.bias), (), adapted=False),
        "lowrank": Provider(layer, adapter),
        "merged": Provider(lambda x: F.linear(x, merged_weight, layer.bias), (), adapted=False, inference_only=True),
        "naive": Provider(lambda x: naive_lora(x, *params), adapter),
        "compiled": Provider(lambda x: compiled(x, *params), adapter),
    }
    peft_layer = peft_lora(layer)
    if peft_layer is not None:
        providers["peft"] = Provider(peft_layer, tuple(p for p in peft_layer.parameters() if p.requires_grad))
    return providers


def peft_lora(layer: LoRALinear) -> nn.Module | None:
    """peft's LoRA Linear holding the same W, b, A, B and scale as ``layer``; None without peft."""
    if importlib.util.find_spec("peft") is None:
        return None
    import peft

    base = nn.Linear(layer.in_features, layer.out_features, device=layer.weight.device, dtype=layer.weight.dtype)
    base.load_state_dict({"weight": layer.weight, "bias": layer.bias})
    config = peft.LoraConfig(r=layer.rank, lora_alpha=layer.scale * layer.rank, target_modules=["proj"])
    model = peft.get_peft_model(nn.ModuleDict({"proj": base}), config)
    proj = model.base_model.model["proj"]
    with torch.no_grad():
        proj.lora_A["default"].weight.copy_(layer.lora_a)
        proj.lora_B["default"].weight.copy_(layer.lora_b)
    return proj


def qkv_providers(dim: int, rank: int, dtype: torch.dtype, device: torch.device) -> dict[str, Provider]:
    """Base qkv GEMM, fused LoRA on q, k, v, and three separate LoRA projections (same weights)."""
    torch.manual_seed(0)
    fused = LoRAQKVLinear(
        nn.Linear(dim, 3 * dim, device=device, dtype=dtype).requires_grad_(False), rank, SCALE, ("q", "k", "v")
    )
    nn.init.normal_(fused.lora_b, std=0.02)
    separate = []
    for i in range(3):
        part = LoRALinear(nn.Linear(dim, dim, device=device, dtype=dtype).requires_grad_(False), rank, SCALE)
        rows, adapter_rows = slice(i * dim, (i + 1) * dim), slice(i * rank, (i + 1) * rank)
        with torch.no_grad():
            for mine, theirs in ((part.weight, fused.weight[rows]), (part.bias, fused.bias[rows])):
                mine.copy_(theirs)
            part.lora_a.copy_(fused.lora_a[adapter_rows])
            part.lora_b.copy_(fused.lora_b[rows])
        separate.append(part)
    return {
        "qkv_floor": Provider(lambda x: F.linear(x, fused.weight, fused.bias), (), adapted=False),
        "qkv_fused": Provider(fused, (fused.lora_a, fused.lora_b)),
        "qkv_separate": Provider(
            lambda x: torch.cat([p(x) for p in separate], dim=-1),
            tuple(t for p in separate for t in (p.lora_a, p.lora_b)),
        ),
    }


def make_step(provider: Provider, x: torch.Tensor, grad: torch.Tensor, mode: str) -> Callable[[], None]:
    """fn(x) under no_grad (fwd), or fn(x) and the gradients of x and the adapters for dY = grad (fwd+bwd).

    torch.autograd.grad returns fresh gradients instead of accumulating into ``.grad``,
    so every call does the same work.
    """
    if mode == "fwd":

        def forward() -> None:
            with torch.no_grad():
                provider.fn(x)

        return forward

    def forward_backward() -> None:
        torch.autograd.grad(provider.fn(x), (x, *provider.trainable), grad)

    return forward_backward


def measure_group(
    group: str, shape: Shape, providers: dict[str, Provider], dtype: torch.dtype, device: torch.device, timer: dict
) -> list[dict]:
    """One row per (mode, provider) of one group; the group's first provider is the floor of its ratios."""
    x = torch.randn(shape.tokens, shape.in_features, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(shape.tokens, shape.out_features, device=device, dtype=dtype)
    rows = []
    for mode in MODES:
        chosen = {name: p for name, p in providers.items() if mode == "fwd" or not p.inference_only}
        steps = {name: make_step(p, x, grad, mode) for name, p in chosen.items()}
        timings = time_steps(steps, device, **timer)
        floor = next(iter(timings.values()))
        for name, timing in timings.items():
            (p20, p50, p80), adapted = timing.quantiles, chosen[name].adapted
            rows.append({
                "group": group, "dtype": str(dtype).removeprefix("torch."), "M": shape.tokens,
                "K": shape.in_features, "N": shape.out_features, "r": shape.rank, "mode": mode, "provider": name,
                "timer": timing.timer, "ms_p20": p20, "ms_p50": p50, "ms_p80": p80, "ratio": timing.ratio_to(floor),
                "lora_share": shape.lora_share(mode),
                "tflops": shape.flops(mode, adapted) / p50 / 1e9,
                "gbps": shape.bytes_moved(mode, adapted, x.element_size()) / p50 / 1e6,
                "peak_mb": peak_memory_mb(steps[name], device),
            })  # fmt: skip
    return rows


def run(shapes: list[Shape], dtypes: list[torch.dtype], device: torch.device, timer: dict | None = None) -> list[dict]:
    """Rows for every shape × dtype: the LoRA linear group, and the qkv group where N = K.

    ``timer``: keyword arguments of bench.timing.time_steps (warmup, reps on the CPU; cuda_graph).
    """
    rows = []
    for shape, dtype in itertools.product(shapes, dtypes):
        torch._dynamo.reset()  # a fresh compile per shape: no recompile limit, no dynamic shapes
        rows += measure_group("linear", shape, lora_providers(shape, dtype, device), dtype, device, timer or {})
        if shape.in_features == shape.out_features:
            dim = shape.in_features
            qkv = Shape(shape.tokens, dim, 3 * dim, shape.rank, adapters=3)
            rows += measure_group("qkv", qkv, qkv_providers(dim, shape.rank, dtype, device), dtype, device, timer or {})
    return rows
