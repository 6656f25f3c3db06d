"""LoRA linear and fused-QKV microbenchmarks: every provider on the same weights, one run.

Providers for a LoRA linear Y = X Wᵀ + b + s · (X Aᵀ) Bᵀ:
    floor      F.linear with the frozen base weight (no adapter: the lower bound)
    lowrank    our fused op (Triton on CUDA, the torch path on CPU)
    merged     our merged weight: one plain GEMM
    naive      eager PyTorch, three matmuls + add, autograd-derived backward
    compiled   torch.compile of the naive version
    peft       peft's LoRA Linear (when the ``ref`` extra is installed)
For the attention projection: fused LoRAQKVLinear vs three separate LoRALinear (q, k, v).
"""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bench.timing import device_name, git_commit, peak_memory_mb, time_interleaved
from kernels.merge import merge_weight
from lowrank import LoRALinear, LoRAQKVLinear


@dataclass(frozen=True)
class Shape:
    tokens: int  # M (batch × sequence)
    in_features: int  # K
    out_features: int  # N
    rank: int  # r

    def flops(self, backward: bool) -> float:
        """Matmul FLOPs of one LoRA linear: base 2MKN + shrink 2MKr + expand 2MNr (backward ≈ 2× more)."""
        forward = (
            2
            * self.tokens
            * (self.in_features * self.out_features + self.rank * (self.in_features + self.out_features))
        )
        return forward * (3 if backward else 1)


QUICK_SHAPES = [Shape(197 * 8, 768, 768, 16), Shape(197 * 8, 768, 3072, 16)]


def full_shapes() -> list[Shape]:
    """D ∈ {384, 768, 1024}, attention (D→D) and MLP (D→4D), M ∈ {197·8, 512·8, 4096}, r ∈ {8, 16, 64}."""
    return [
        Shape(tokens, dim, out, rank)
        for dim, tokens, rank in itertools.product((384, 768, 1024), (197 * 8, 512 * 8, 4096), (8, 16, 64))
        for out in (dim, 4 * dim)
    ]


def naive_lora(x, weight, bias, lora_a, lora_b, scale):
    return F.linear(x, weight, bias) + scale * F.linear(F.linear(x, lora_a), lora_b)


def lora_providers(shape: Shape, dtype: torch.dtype, device: torch.device) -> dict[str, Callable]:
    """name → fn(x) computing the same LoRA linear on shared weights."""
    torch.manual_seed(0)
    linear = nn.Linear(shape.in_features, shape.out_features, device=device, dtype=dtype).requires_grad_(False)
    layer = LoRALinear(linear, shape.rank, scale=2.0)
    nn.init.normal_(layer.lora_b, std=0.02)
    merged_weight = merge_weight(layer.weight, layer.lora_a, layer.lora_b, layer.scale)
    params = (layer.weight, layer.bias, layer.lora_a, layer.lora_b, layer.scale)
    compiled = torch.compile(naive_lora)
    providers = {
        "floor": lambda x: F.linear(x, layer.weight, layer.bias),
        "lowrank": layer,
        "merged": lambda x: F.linear(x, merged_weight, layer.bias),
        "naive": lambda x: naive_lora(x, *params),
        "compiled": lambda x: compiled(x, *params),
    }
    peft_model = peft_lora(layer)
    if peft_model is not None:
        providers["peft"] = peft_model
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


def qkv_providers(dim: int, rank: int, dtype: torch.dtype, device: torch.device) -> dict[str, Callable]:
    """Fused qkv with LoRA on q, k, v vs three separate LoRA projections (same weights)."""
    torch.manual_seed(0)
    fused_linear = nn.Linear(dim, 3 * dim, device=device, dtype=dtype)
    fused = LoRAQKVLinear(fused_linear, rank, 2.0, ("q", "k", "v"))
    nn.init.normal_(fused.lora_b, std=0.02)
    separate = []
    for i in range(3):
        part = nn.Linear(dim, dim, device=device, dtype=dtype)
        part.load_state_dict(
            {"weight": fused.weight[i * dim : (i + 1) * dim], "bias": fused.bias[i * dim : (i + 1) * dim]}
        )
        adapter = LoRALinear(part, rank, 2.0)
        adapter.load_state_dict(
            {"lora_a": fused.lora_a[i * rank : (i + 1) * rank], "lora_b": fused.lora_b[i * dim : (i + 1) * dim]},
            strict=False,
        )
        separate.append(adapter)
    return {"qkv_fused": fused, "qkv_separate": lambda x: torch.cat([p(x) for p in separate], dim=-1)}


def training_step(fn: Callable, x: torch.Tensor, backward: bool) -> Callable[[], None]:
    """fn(x) alone under no_grad (forward), or fn(x).sum().backward() (forward + backward)."""

    def step() -> None:
        if backward:
            x.grad = None
            fn(x).sum().backward()
        else:
            with torch.no_grad():
                fn(x)

    return step


def measure(providers: dict[str, Callable], x: torch.Tensor, backward: bool, device: torch.device) -> list[dict]:
    steps = {name: training_step(fn, x, backward) for name, fn in providers.items()}
    timings = time_interleaved(steps, device)
    return [
        {"provider": name, "mode": "fwd+bwd" if backward else "fwd", "ms_p20": p20, "ms_p50": p50, "ms_p80": p80,
         "peak_mb": peak_memory_mb(steps[name], device)}
        for name, (p20, p50, p80) in timings.items()
    ]  # fmt: skip


def run(shapes: list[Shape], dtypes: list[torch.dtype], device: torch.device) -> list[dict]:
    """One row per (shape, dtype, mode, provider), with the ratio to the floor of the same run."""
    rows, context = [], {"device": device_name(device), "commit": git_commit(), "torch": torch.__version__}
    for shape, dtype in itertools.product(shapes, dtypes):
        x = torch.randn(shape.tokens, shape.in_features, device=device, dtype=dtype, requires_grad=True)
        groups = [lora_providers(shape, dtype, device)]
        if shape.in_features == shape.out_features:
            groups.append(qkv_providers(shape.in_features, shape.rank, dtype, device))
        for backward, providers in itertools.product((False, True), groups):
            results = measure(providers, x, backward, device)
            baseline = results[0]["ms_p50"]
            for result in results:
                flops = shape.flops(backward) * (3 if result["provider"].startswith("qkv") else 1)
                rows.append(
                    context | {"M": shape.tokens, "K": shape.in_features, "N": shape.out_features, "r": shape.rank,
                               "dtype": str(dtype).removeprefix("torch.")} | result
                    | {"ratio": result["ms_p50"] / baseline, "tflops": flops / result["ms_p50"] / 1e9}
                )  # fmt: skip
    return rows
