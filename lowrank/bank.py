"""Many LoRA adapters over one frozen model, chosen per sample within one batch.

A bank layer stands where add_lora would put a LoRALinear or LoRAQKVLinear, and holds n adapters trained
on the same base. With P adapted projections of width w (P = 1, w = N for a plain linear; the adapted
ones of q, k, v for a fused qkv) and r the largest rank of the n (smaller ranks are zero-padded):

    lora_a [n, P·r, K]   rows p·r … p·r + r_i − 1 of adapter i are its A_p; the rest of each block is 0
    lora_b [n, P·w, r]   rows p·w … of adapter i are its B_p; columns r_i … r − 1 are 0
    Y[m] = X[m] Wᵀ + b + s_i · Σ_p (X[m] A_{i,p}ᵀ) B_{i,p}ᵀ on projection p's columns,  i = id of row m

and id −1 means the base layer alone. The padding is exact and stays so in training: a zero row of A
meets a zero column of B, so both get zero gradients (and zero AdamW updates). What it costs: every row
pays the largest rank in its shrink and expand, P·r·(K + N) multiply-adds next to the base GEMM's N·K, and
A, B hold n·P·r·(K + w) values, so a bank of ranks {4, 16} pays rank 16 for both (on Triton a rank under 16
fills a 16-wide block anyway); the base GEMM is the same for any rank.

The ids come from ``selected_adapters(ids)``, one per sample of every batch that reaches a bank layer
inside the block (each sample's rows — its tokens — take its id), so no encoder's forward needs a new
argument; the selection is reset when the block ends, also on an error.

A mixed batch runs kernels/bank_matmul.py's op: the base GEMM once (F.linear), then the shrink and expand of
every row through its own adapter, rows grouped by adapter on the device (Triton on CUDA, F.grouped_mm on
the CPU), differentiable, so several adapters can train in one batch. A batch whose ids were selected on the
CPU and are all one adapter runs that adapter's fused op (kernels/lora_linear.py), exactly as a LoRA layer
would, and all −1 the base alone: the host holds those ids, so deciding costs no device sync.

Syncs left: ``sample_ids`` checks the ids' range on the host (a device sync only for ids selected as a CUDA
tensor) and copies CPU ids to the layer's device (a blocking host-to-device copy). The op itself reads
nothing on the host: to capture a bank in a CUDA graph, call kernels.bank_matmul.bank_lora with device ids.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kernels.bank_matmul import bank_lora
from kernels.lora_linear import apply_lora
from kernels.lora_qkv import PROJECTIONS, qkv_slots
from lowrank.config import LoRAConfig
from lowrank.inject import remove_lora
from lowrank.layer import LoRALayer
from lowrank.peft_io import load_any_adapter
from lowrank.state import lora_layers
from lowrank_util.errors import MismatchError

_selected: ContextVar[torch.Tensor | None] = ContextVar("lowrank_adapter_ids", default=None)


@contextlib.contextmanager
def selected_adapters(ids: torch.Tensor | Sequence[int]) -> Iterator[None]:
    """Inside the block, sample b of every batch that reaches a bank layer uses adapter ``ids[b]`` (−1: none)."""
    ids = torch.as_tensor(ids)
    if ids.dim() != 1 or ids.dtype.is_floating_point:
        raise ValueError(f"adapter ids must be a 1-D integer tensor, one per sample; got {ids.dtype} {list(ids.shape)}")
    token = _selected.set(ids.long())
    try:
        yield
    finally:
        _selected.reset(token)


def sample_ids(adapters: int, device: torch.device, batch: int | None = None, base: bool = True) -> torch.Tensor:
    """The selected adapter id of each sample, on ``device``; checked against ``batch`` (when given) and the
    range −1 … adapters − 1 (0 … when there is no ``base`` to fall back on)."""
    ids = _selected.get()
    if ids is None:
        raise RuntimeError("a bank needs adapter ids: run the model inside lowrank.selected_adapters(ids)")
    if batch is not None and batch != len(ids):
        raise ValueError(f"{len(ids)} adapter ids were selected for a batch of {batch} samples")
    low = -1 if base else 0
    if len(ids) and not low <= int(ids.min()) <= int(ids.max()) < adapters:
        raise ValueError(f"adapter ids must be in {low} … {adapters - 1} here, got {ids.tolist()}")
    return ids.to(device)


def common_id(ids: torch.Tensor) -> int | None:
    """The id that every sample selected, when the ids are on the CPU (read there without waiting on any device)
    and all equal; None otherwise (and for no samples)."""
    if ids.device.type != "cpu" or not len(ids):
        return None
    low, high = ids.aminmax()
    return int(low) if low == high else None


class LoRABank(nn.Module):
    """n LoRA adapters of one frozen ``nn.Linear`` (a fused qkv one when ``projections`` is given), chosen
    per sample by ``selected_adapters``. ``adapters``: per adapter (A [P·r_i, K], B [P·w, r_i], scale) in a
    LoRALinear's / LoRAQKVLinear's layout."""

    def __init__(
        self,
        linear: nn.Linear,
        adapters: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
        projections: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if not adapters:
            raise ValueError("a LoRA bank needs at least one adapter")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.weight.requires_grad_(False)
        self.projections = None if projections is None else tuple(p for p in PROJECTIONS if p in projections)
        self.slots = (0,) if projections is None else qkv_slots(projections)
        adapted = 1 if projections is None else len(self.projections)
        width = self.out_features // len(self.slots)
        self.ranks = tuple(lora_b.shape[1] for _, lora_b, _ in adapters)
        self.scales = tuple(float(scale) for _, _, scale in adapters)
        rank, like = max(self.ranks), {"dtype": self.weight.dtype, "device": self.weight.device}
        lora_a = torch.zeros(len(adapters), adapted * rank, self.in_features, **like)
        lora_b = torch.zeros(len(adapters), adapted * width, rank, **like)
        for i, (a, b, _) in enumerate(adapters):
            r = b.shape[1]
            if a.shape != (adapted * r, self.in_features) or b.shape != (adapted * width, r):
                raise ValueError(
                    f"adapter {i}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit a layer of "
                    f"{adapted} adapted projection(s) of width {width} over {self.in_features} inputs"
                )
            for p in range(adapted):
                lora_a[i, p * rank : p * rank + r] = a[p * r : (p + 1) * r]
            lora_b[i, :, :r] = b
        self.lora_a, self.lora_b = nn.Parameter(lora_a), nn.Parameter(lora_b)
        # s_i on the layer's device for the bank op, kept as the bits of fp32 values in an int32 buffer so that
        # model.to(dtype) cannot round them; not in the state dict (``scales`` is the source)
        bits = torch.tensor(self.scales, dtype=torch.float32, device=self.weight.device).view(torch.int32)
        self.register_buffer("scale_bits", bits, persistent=False)

    @property
    def adapters(self) -> int:
        return len(self.ranks)

    def row_ids(self, x: torch.Tensor) -> torch.Tensor:
        """The selected adapter id of each of x's rows (x [B, ..., K] with one selected id per sample)."""
        if x.dim() < 2:
            raise ValueError(f"a LoRA bank takes a batch of samples [B, ..., {self.in_features}], got {tuple(x.shape)}")
        ids = sample_ids(self.adapters, x.device, batch=x.shape[0])
        return ids.repeat_interleave(x.numel() // x.shape[-1] // max(len(ids), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = self.row_ids(x)
        only = common_id(_selected.get())
        if only == -1:
            return F.linear(x, self.weight, self.bias)
        if only is not None:  # one adapter for the whole batch: the fused op of a LoRA layer
            args = (self.lora_a[only], self.lora_b[only], self.scales[only], 0.0, False, None, self.slots)
            return apply_lora(x, self.weight, self.bias, *args)
        scales = self.scale_bits.view(torch.float32)
        return bank_lora(x, self.weight, self.bias, self.lora_a, self.lora_b, scales, ids, self.slots)

    def extra_repr(self) -> str:
        kind = "linear" if self.projections is None else f"projections={self.projections}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}, ranks={self.ranks}"


class LinearBank(nn.Module):
    """n whole Linear layers of one shape, chosen per sample like LoRABank (the heads and token maps of a bank
    of U2A models): y[b] = x[b] W_iᵀ + b_i for x [B, ..., K], i = ids[b] ≥ 0 (no base layer to fall back on)."""

    def __init__(self, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor] | None = None) -> None:
        """``weights``: W_i [N, K] of each layer; ``biases``: b_i [N], or None for layers without one."""
        super().__init__()
        self.weight = nn.Parameter(torch.stack([w.detach() for w in weights]))  # [n, N, K]
        self.bias = None if biases is None else nn.Parameter(torch.stack([b.detach() for b in biases]))  # [n, N]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = sample_ids(len(self.weight), x.device, batch=x.shape[0], base=False)
        out = torch.einsum("b...k,bnk->b...n", x, self.weight[ids])
        if self.bias is None:
            return out
        return out + self.bias[ids].view(len(x), *[1] * (x.dim() - 2), -1)


class TokenBank(nn.Module):
    """Learnable tokens per adapter, chosen per sample (U2A's Mask Tokens in a bank of U2A models): where a
    model reads ``mask_tokens[m]`` (1, 1, D) of a ParameterDict, ``bank[m]`` is (B, 1, D), each sample's
    adapter's token (ids ≥ 0)."""

    def __init__(self, tokens: dict[str, Sequence[torch.Tensor]]) -> None:
        super().__init__()
        self.tokens = nn.ParameterDict(
            {m: nn.Parameter(torch.cat([t.detach() for t in ts])) for m, ts in tokens.items()}
        )

    def __getitem__(self, modality: str) -> torch.Tensor:
        tokens = self.tokens[modality]  # [n, 1, D]
        return tokens[sample_ids(len(tokens), tokens.device, base=False)]


def banks(model: nn.Module) -> list[LoRABank]:
    return [module for module in model.modules() if isinstance(module, LoRABank)]


def add_adapter_bank(model: nn.Module, paths: Sequence[str | os.PathLike]) -> nn.Module:
    """Replace every Linear that the adapters saved at ``paths`` adapt by a LoRABank of them all, adapter i being
    ``paths[i]``: ``save_adapter`` folders or peft LoRA adapters (``import_peft``), mixed as needed; in place,
    returns ``model`` (base frozen, the banks trainable). See ``bank_adapters`` for what is refused."""
    loaders = [partial(load_any_adapter, path=Path(path)) for path in paths]
    return bank_adapters(model, loaders, [str(path) for path in paths])


def bank_adapters(
    model: nn.Module, loaders: Sequence[Callable[[nn.Module], object]], names: Sequence[str]
) -> nn.Module:
    """Replace every Linear that the adapters adapt by a LoRABank of them all; ``loaders[i](model)`` adds
    adapter i's LoRA to the bare ``model`` and loads its weights (``names[i]`` names it in errors). In place;
    returns ``model`` (base frozen, the banks trainable).

    The adapters must adapt the same layers (same targets) and train no biases (a bank shares the base's);
    their dropout is not applied. A loader's own errors (a file that does not fit the model) propagate; on
    any error the model is left as it was."""
    if lora_layers(model) or banks(model):
        raise ValueError(f"{type(model).__name__} already has LoRA layers or banks; a bank is built on the bare base")
    if not loaders:
        raise ValueError("a bank needs at least one adapter")
    trainable = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    layers: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
    projections: dict[str, tuple[str, ...] | None] = {}
    first: LoRAConfig | None = None
    try:
        for load, name in zip(loaders, names, strict=True):
            load(model)
            config = model.lora_config
            first = first or config
            if config.bias != "none":
                raise MismatchError(f"{name} trains biases (bias={config.bias!r}); a bank shares the base's biases")
            if config.targets != first.targets:
                raise MismatchError(
                    f"{name} adapts {config.targets} but {names[0]} adapts {first.targets}: "
                    "the adapters of a bank adapt the same layers"
                )
            for layer_name, layer in model.named_modules():
                if isinstance(layer, LoRALayer):
                    weights = (layer.lora_a.detach().clone(), layer.lora_b.detach().clone(), layer.scale)
                    layers.setdefault(layer_name, []).append(weights)
                    projections[layer_name] = getattr(layer, "projections", None)
            remove_lora(model)
    except BaseException:
        if lora_layers(model):
            remove_lora(model)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(trainable[name])
        raise
    for layer_name, adapters in layers.items():
        model.set_submodule(layer_name, LoRABank(model.get_submodule(layer_name), adapters, projections[layer_name]))
    return model
