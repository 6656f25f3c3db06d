"""LoRA linear layer, forward and hand-derived backward, fused (docs/design.md §3).

Shapes: X [M, K] (any leading dims are flattened into M), frozen W [N, K], bias b [N],
A [r, K], B [N, r], s = alpha / r; dropout p on the LoRA branch only, mask D [M, K].

Forward                                   Backward, G = dY [M, N]
    Xd = D ⊙ X / (1 - p)                      dS = s · G B                      [M, r]
    S  = Xd Aᵀ               [M, r]           dX = G W + (dS A) ⊙ D / (1 - p)   [M, K]
    Y  = X Wᵀ + b + s · S Bᵀ [M, N]           dA = dSᵀ Xd                       [r, K]
                                              dB = s · Gᵀ S                     [N, r]
W is frozen: it gets no gradient. b gets db = Σ_m G[m, :] only if it requires grad.
Saved for backward: X, W, A, B (references, not copies), S (M × r) and the one-element
seed tensor; D is regenerated from the seed, never stored. The backend the forward ran
is recorded with them, and the backward runs that one (not a fresh choice, which could
differ outside a ``use_backend`` block or on autograd's worker thread).

Triton path: S and dA are rank-wide "skinny" GEMMs, dS and dB one pass over G that feeds both; Y
and dX are one GEMM each with the rank-r expand in the epilogue (kernels/lowrank_matmul.py). Torch path (CPU):
the same algebra in whole-tensor GEMMs, with W + s·B A folded first where that is cheaper
(``folds_adapters``) and the adapters of q, k, v spread over one B (``spread_b``).

Eagerly the op is LoRAFunction; under torch.compile it is the custom ops ``lowrank::lora_forward``
(returning Y and S) and ``lowrank::lora_backward``, with the same forward and backward.
Both also serve kernels/lora_qkv.py: there the output is split into equal
segments (q, k, v), each with its own adapter slot (its r columns of S, its rows of B)
or none; a plain LoRA linear is the one-segment case.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kernels.backend import Backend, problem_of, select_backend
from kernels.lowrank_matmul import dropout_mask, expand_backward, fused_matmul, skinny_matmul
from kernels.reference import lora_linear_ref, lora_qkv_ref


def check_lora_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    slots: tuple[int, ...] = (0,),
) -> None:
    """Raise a ValueError naming the first shape, dtype or device that does not fit the spec.

    With n adapted segments of width w = N / len(slots): A [n·r, K], B [n·w, r].
    """
    if weight.dim() != 2 or lora_a.dim() != 2 or lora_b.dim() != 2:
        raise ValueError(
            f"weight, lora_a, lora_b must be 2-D; got {weight.dim()}-D, {lora_a.dim()}-D, {lora_b.dim()}-D"
        )
    (out_features, in_features), adapted = weight.shape, sum(j >= 0 for j in slots)
    if out_features % len(slots):
        raise ValueError(f"weight's {out_features} output rows do not split into {len(slots)} equal segments")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(
            f"x must have shape [..., {in_features}] to match weight {tuple(weight.shape)}, got {tuple(x.shape)}"
        )
    if lora_a.shape[0] % adapted or lora_a.shape[1] != in_features:
        raise ValueError(f"lora_a must have shape [{adapted}·r, {in_features}], got {tuple(lora_a.shape)}")
    expected_b = (adapted * out_features // len(slots), lora_a.shape[0] // adapted)
    if lora_b.shape != expected_b:
        raise ValueError(f"lora_b must have shape {list(expected_b)} (adapted outputs, r), got {tuple(lora_b.shape)}")
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"bias must have shape [{out_features}], got {tuple(bias.shape)}")
    named = {"weight": weight, "lora_a": lora_a, "lora_b": lora_b} | ({"bias": bias} if bias is not None else {})
    for name, tensor in named.items():
        if tensor.dtype != x.dtype:
            raise ValueError(f"{name} has dtype {tensor.dtype} but x has {x.dtype}; cast them to one dtype")
        if tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}; move them to one device")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported dtype {x.dtype}; expected float32, float16 or bfloat16")


def draw_seed(device: torch.device) -> torch.Tensor:
    """A dropout seed in [0, 2³¹ - 1) as a one-element int64 tensor, drawn on ``device`` by torch's generator
    for it (torch.manual_seed seeds them all). The host never reads it on the Triton path, so a CUDA
    graph replays the draw (a new mask per replay) and torch.compile traces it."""
    return torch.randint(0, 2**31 - 1, (1,), device=device)


def regenerate_mask(rows: int, cols: int, dropout_p: float, seed: torch.Tensor, backend: Backend) -> torch.Tensor:
    """D [rows, cols] in {0, 1} (on ``seed``'s device) as ``backend`` regenerates it from ``seed``.

    The torch path seeds a torch.Generator, which reads the seed on the host (.item()).
    """
    if backend == "triton":
        return dropout_mask(rows, cols, dropout_p, seed)
    generator = torch.Generator(device=seed.device).manual_seed(int(seed.item()))
    return (torch.rand(rows, cols, generator=generator, device=seed.device) >= dropout_p).float()


def _dropped(x2d: torch.Tensor, dropout_p: float, seed: torch.Tensor | None) -> torch.Tensor:
    """Xd = D ⊙ X / (1 - p) on the torch path (a temporary; D is regenerated, not stored)."""
    if dropout_p == 0:
        return x2d
    mask = regenerate_mask(*x2d.shape, dropout_p, seed, "torch")
    return x2d * mask.to(x2d.dtype) / (1.0 - dropout_p)


class AdapterSlice(NamedTuple):
    """Where one adapter lives: its output columns of Y, its columns of S, its rows of B."""

    out_cols: slice
    s_cols: slice
    b_rows: slice


def adapter_slices(slots: tuple[int, ...], rank: int, out_features: int) -> list[AdapterSlice]:
    """One AdapterSlice per adapted output segment; ``slots[g]`` is segment g's slot or -1."""
    width = out_features // len(slots)
    return [
        AdapterSlice(
            slice(g * width, (g + 1) * width), slice(j * rank, (j + 1) * rank), slice(j * width, (j + 1) * width)
        )
        for g, j in enumerate(slots)
        if j >= 0
    ]


def folds_adapters(rows: int, weight_dim: int, dtype: torch.dtype, dropout_p: float) -> bool:
    """Whether the torch path folds W' = W + s · B_j A_j into one GEMM with ``rows`` rows.

    Forward Y = X W'ᵀ + b (``weight_dim`` K) and backward dX = G W' (``weight_dim`` N; = G W + dS A).
    Folding costs r·N·K multiply-adds and one write of an N × K temporary; adding the
    rank-r product to the result instead costs r·M·(N or K) and one more pass over it, so
    folding wins when ``weight_dim`` < M. It needs X itself on the LoRA branch (no dropout)
    and fp32: in fp16/bf16, rounding W' would swallow an update s · B A below W's last bit.
    """
    return dropout_p == 0 and dtype == torch.float32 and weight_dim < rows


# Widest spread B (n·r columns) for dS and dB: up to it those products are bound by reading G, and
# one whole read beats n strided ones (fused q, v at r = 8: 1.50× → 1.36× the floor in fwd+bwd);
# wider, the zero blocks' work (n times the FLOPs) costs more (q, k, v at r = 64: 1.63× → 1.92×).
SPREAD_COLUMNS = 32


def spread_b(lora_b: torch.Tensor, pieces: list[AdapterSlice], out_features: int) -> torch.Tensor:
    """B laid out over the whole output, [N, n·r]: B_j in its segment's rows and its slot's r columns,
    zero elsewhere (B itself for a plain LoRA linear). Then every adapter's product is one GEMM:
    Σ_j S_j B_jᵀ per segment = S B_spreadᵀ, dS = s · G B_spread, and the B_j blocks of s · Gᵀ S are dB."""
    if len(pieces) == 1 and pieces[0].out_cols == slice(0, out_features):
        return lora_b
    spread = lora_b.new_zeros(out_features, len(pieces) * lora_b.shape[1])
    for piece in pieces:
        spread[piece.out_cols, piece.s_cols] = lora_b[piece.b_rows]
    return spread


def _forward_torch(x2d, weight, bias, lora_a, lora_b, scale, dropout_p, seed, pieces, keep_shrunk):
    fold = folds_adapters(x2d.shape[0], x2d.shape[1], x2d.dtype, dropout_p)
    shrunk = _dropped(x2d, dropout_p, seed) @ lora_a.t() if keep_shrunk or not fold else None  # S = Xd Aᵀ [M, n·r]
    spread = spread_b(lora_b, pieces, weight.shape[0])
    if fold:  # Y = X (W + s · B A)ᵀ + b
        return F.linear(x2d, torch.addmm(weight, spread, lora_a, alpha=scale), bias), shrunk
    out = torch.addmm(bias, x2d, weight.t()) if bias is not None else x2d @ weight.t()
    return out.addmm_(shrunk, spread.t(), alpha=scale), shrunk  # Y = X Wᵀ + b + s · S Bᵀ


def _forward_triton(x2d, weight, bias, lora_a, lora_b, scale, dropout_p, seed, slots):
    rows, in_features = x2d.shape
    # S = Xd @ Aᵀ, stored in fp32 (the accumulator, unrounded). The dots that read it (the expand
    # here, dB later) cast each tile to the other operand's dtype, as tensor cores take one dtype:
    # on the GPU they see S rounded once to X's dtype, as naive eager torch does.
    shrunk = torch.empty(rows, lora_a.shape[0], device=x2d.device, dtype=torch.float32)
    skinny_matmul(x2d, lora_a.t(), shrunk, dropout_p=dropout_p, seed=seed, mask_strides=(in_features, 1))
    out = torch.empty(rows, weight.shape[0], device=x2d.device, dtype=x2d.dtype)
    # out = X @ Wᵀ + b + scale * S_j @ B_jᵀ on each adapted segment, one kernel
    fused_matmul(x2d, weight.t(), bias, shrunk, lora_b.t(), scale, out, slots=slots)
    return out, shrunk


def _backward_torch(grad, x2d, weight, lora_a, lora_b, shrunk, scale, dropout_p, seed, pieces, needs):
    need_x, need_a, need_b = needs
    grad_x = grad_a = grad_b = None
    spread = spread_b(lora_b, pieces, weight.shape[0])
    per_adapter = spread is not lora_b and spread.shape[1] > SPREAD_COLUMNS
    fold = need_x and folds_adapters(grad.shape[0], grad.shape[1], grad.dtype, dropout_p)
    need_shrunk_grad = need_a or (need_x and not fold)  # a folded dX needs no dS
    if need_shrunk_grad and per_adapter:
        grad_shrunk = x2d.new_empty(x2d.shape[0], lora_a.shape[0])
        for piece in pieces:  # dS_j = s · G_g B_j
            grad_shrunk[:, piece.s_cols].addmm_(grad[:, piece.out_cols], lora_b[piece.b_rows], beta=0, alpha=scale)
    elif need_shrunk_grad:  # dS = s · G B  [M, n·r]; s applied to the fp32 accumulator (fp16)
        grad_shrunk = grad.new_empty(grad.shape[0], spread.shape[1]).addmm_(grad, spread, beta=0, alpha=scale)
    if fold:
        grad_x = grad @ torch.addmm(weight, spread, lora_a, alpha=scale)  # dX = G (W + s · B A) = G W + dS A
    elif need_x:
        grad_x = grad @ weight  # dX = G W ...
        if dropout_p == 0:
            grad_x.addmm_(grad_shrunk, lora_a)  # ... + dS A
        else:
            mask = regenerate_mask(*x2d.shape, dropout_p, seed, "torch").to(grad_x.dtype)
            grad_x.addcmul_(grad_shrunk @ lora_a, mask, value=1.0 / (1.0 - dropout_p))  # ... + (dS A) ⊙ D / (1 - p)
    if need_a:
        # dA = dSᵀ Xd, computed as (Xdᵀ dS)ᵀ: BLAS runs this orientation about twice as fast on the CPU
        grad_a = (_dropped(x2d, dropout_p, seed).t() @ grad_shrunk).t().contiguous()
    if need_b and per_adapter:
        grad_b = torch.empty_like(lora_b)
        for piece in pieces:  # dB_j = s · G_gᵀ S_j
            grad_b[piece.b_rows].addmm_(grad[:, piece.out_cols].t(), shrunk[:, piece.s_cols], beta=0, alpha=scale)
    elif need_b:
        # s · Gᵀ S  [N, n·r]; its B_j blocks are dB_j
        spread_grad = grad.new_empty(spread.shape).addmm_(grad.t(), shrunk, beta=0, alpha=scale)
        grad_b = spread_grad if spread is lora_b else torch.cat([spread_grad[p.out_cols, p.s_cols] for p in pieces])
    return grad_x, grad_a, grad_b


def _backward_triton(grad, x2d, weight, lora_a, lora_b, shrunk, scale, dropout_p, seed, slots, needs):
    need_x, need_a, need_b = needs
    in_features = x2d.shape[1]
    # (segment, slot) of every adapter: one launch computes all their dS_j and dB_j
    pieces = tuple((g, j) for g, j in enumerate(slots) if j >= 0)
    grad_x = grad_a = None
    grad_shrunk = x2d.new_empty(x2d.shape[0], lora_a.shape[0], dtype=torch.float32) if need_x or need_a else None
    grad_b = torch.empty_like(lora_b) if need_b else None
    # dS_j = s · G_g B_j (fp32 [M, n·r]) and dB_j = s · G_gᵀ S_j, in one pass over G
    expand_backward(grad, lora_b, shrunk, scale, grad_shrunk, grad_b, pieces)
    if need_x:
        grad_x = torch.empty_like(x2d)
        # dX = G @ W + (dS @ A) * D / (1 - p)   (Σ_j dS_j A_j = dS A: one segment)
        fused_matmul(grad, weight, None, grad_shrunk, lora_a, 1.0, grad_x, dropout_p=dropout_p, seed=seed)
    if need_a:
        # dAᵀ = Xdᵀ @ dS, written through a transposed view of dA [n·r, K]; the reduction over M is split
        grad_a = torch.empty_like(lora_a)
        skinny_matmul(x2d.t(), grad_shrunk, grad_a.t(), dropout_p=dropout_p, seed=seed, mask_strides=(1, in_features))
    return grad_x, grad_a, grad_b


def _forward_reference(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, slots):
    """kernels/reference.py's Y, on the torch path's dropout mask."""
    rows, cols = x.numel() // x.shape[-1], x.shape[-1]
    mask = regenerate_mask(rows, cols, dropout_p, seed, "torch").view(x.shape) if dropout_p else None
    if tuple(slots) == (0,):
        return lora_linear_ref(x, weight, bias, lora_a, lora_b, scale, dropout_p, mask)
    projections = tuple(name for name, slot in zip("qkv", slots, strict=True) if slot >= 0)
    return lora_qkv_ref(x, weight, bias, lora_a, lora_b, scale, projections, dropout_p, mask)


def lora_forward(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, slots, keep_shrunk, backend):
    """(Y [..., N], S [M, n·r] or None) on ``backend``; S is kept if ``keep_shrunk`` (for dB)."""
    x2d = x.reshape(-1, x.shape[-1])
    if backend == "reference":
        return _forward_reference(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, slots), None
    if backend == "triton":
        out, shrunk = _forward_triton(x2d, weight, bias, lora_a, lora_b, scale, dropout_p, seed, slots)
    else:
        pieces = adapter_slices(slots, lora_b.shape[1], weight.shape[0])
        out, shrunk = _forward_torch(x2d, weight, bias, lora_a, lora_b, scale, dropout_p, seed, pieces, keep_shrunk)
    return out.view(*x.shape[:-1], weight.shape[0]), shrunk if keep_shrunk else None


def lora_backward(grad_out, x, weight, lora_a, lora_b, shrunk, scale, dropout_p, seed, slots, needs, backend):
    """(dX [x's shape], dA, dB), each None unless ``needs`` (x, A, B) asks for it, on ``backend`` (the forward's)."""
    x2d, grad = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
    if backend == "triton":
        grads = _backward_triton(grad, x2d, weight, lora_a, lora_b, shrunk, scale, dropout_p, seed, slots, needs)
    else:
        pieces = adapter_slices(slots, lora_b.shape[1], weight.shape[0])
        grads = _backward_torch(grad, x2d, weight, lora_a, lora_b, shrunk, scale, dropout_p, seed, pieces, needs)
    grad_x, grad_a, grad_b = grads
    return (None if grad_x is None else grad_x.view(x.shape)), grad_a, grad_b


def _save_for_backward(ctx, x, weight, lora_a, lora_b, shrunk, scale, dropout_p, seed, slots, backend) -> None:
    ctx.save_for_backward(x, weight, lora_a, lora_b, shrunk, seed)
    ctx.scale, ctx.dropout_p, ctx.slots, ctx.backend = scale, dropout_p, tuple(slots), backend


def _gradients(ctx, grad_out, backward) -> tuple:
    """The gradients of the forward's arguments (x, weight, bias, lora_a, lora_b, scale, dropout_p, seed,
    slots, keep_shrunk, backend), computed by ``backward`` (lora_backward's signature) on the saved backend."""
    x, weight, lora_a, lora_b, shrunk, seed = ctx.saved_tensors
    needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4])
    grad_x, grad_a, grad_b = backward(
        grad_out, x, weight, lora_a, lora_b, shrunk, ctx.scale, ctx.dropout_p, seed, ctx.slots, needs, ctx.backend
    )
    # db = Σ_m G[m, :]
    grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
    return grad_x, None, grad_bias, grad_a, grad_b, None, None, None, None, None, None


class LoRAFunction(torch.autograd.Function):
    """Y = X Wᵀ + b + s · S_j B_jᵀ on each adapted output segment, with the backward of the module docstring
    (eager mode; torch.compile traces the same computation as the custom ops below)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, slots, keep_shrunk, backend):
        out, shrunk = lora_forward(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, slots, keep_shrunk, backend)
        _save_for_backward(ctx, x, weight, lora_a, lora_b, shrunk, scale, dropout_p, seed, slots, backend)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return _gradients(ctx, grad_out, lora_backward)


# The same forward and backward as custom ops, so that torch.compile sees two opaque nodes with
# known output shapes (the register_fake functions) instead of tracing into Triton launches and
# the seed. An empty tensor stands for "not computed" (an op cannot return None).
@torch.library.custom_op("lowrank::lora_forward", mutates_args=())
def lora_forward_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    slots: Sequence[int],
    keep_shrunk: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Y, S) of lora_forward; S is [0, n·r] when not kept."""
    out, shrunk = lora_forward(
        x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, tuple(slots), keep_shrunk, backend
    )
    return out, shrunk if shrunk is not None else x.new_empty(0, lora_a.shape[0])


@lora_forward_op.register_fake
def _(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, slots, keep_shrunk, backend):
    rows = x.numel() // x.shape[-1] if keep_shrunk else 0
    shrunk_dtype = torch.float32 if backend == "triton" else x.dtype
    return x.new_empty(*x.shape[:-1], weight.shape[0]), x.new_empty(rows, lora_a.shape[0], dtype=shrunk_dtype)


@torch.library.custom_op("lowrank::lora_backward", mutates_args=())
def lora_backward_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    shrunk: torch.Tensor | None,
    scale: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    slots: Sequence[int],
    needs: Sequence[bool],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dX, dA, dB) of lora_backward; each is empty when not asked for."""
    grads = lora_backward(
        grad_out, x, weight, lora_a, lora_b, shrunk, scale, dropout_p, seed, tuple(slots), tuple(needs), backend
    )
    return tuple(x.new_empty(0) if grad is None else grad for grad in grads)


@lora_backward_op.register_fake
def _(grad_out, x, weight, lora_a, lora_b, shrunk, scale, dropout_p, seed, slots, needs, backend):
    likes = (x, lora_a, lora_b)
    return tuple(like.new_empty(like.shape if need else (0,)) for like, need in zip(likes, needs, strict=True))


def _backward_through_op(grad_out, x, weight, lora_a, lora_b, shrunk, scale, dropout_p, seed, slots, needs, backend):
    grads = lora_backward_op(grad_out, x, weight, lora_a, lora_b, shrunk, scale, dropout_p, seed, slots, needs, backend)
    return tuple(grad if need else None for grad, need in zip(grads, needs, strict=True))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, _, lora_a, lora_b, scale, dropout_p, seed, slots, keep_shrunk, backend = inputs
    shrunk = output[1] if keep_shrunk else None
    _save_for_backward(ctx, x, weight, lora_a, lora_b, shrunk, scale, dropout_p, seed, slots, backend)


def _op_backward(ctx, grad_out, _grad_shrunk):
    return _gradients(ctx, grad_out, _backward_through_op)


lora_forward_op.register_autograd(_op_backward, setup_context=_setup_context)


def autocast_inputs(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Under torch.autocast, each floating tensor cast to the autocast dtype (as F.linear would); else as is.

    The casts are differentiable, so fp32 master A and B receive fp32 gradients; the kernels then see
    one dtype and run with autocast off."""
    device_type = next(t for t in tensors if t is not None).device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def apply_lora(x, weight, bias, lora_a, lora_b, scale, dropout_p, training, seed, slots) -> torch.Tensor:
    """Validate the arguments, pick the backend, draw a dropout seed if needed, and run the op (in the autocast
    dtype under torch.autocast): LoRAFunction eagerly, the custom ops under torch.compile."""
    x, weight, bias, lora_a, lora_b = autocast_inputs(x, weight, bias, lora_a, lora_b)
    check_lora_inputs(x, weight, bias, lora_a, lora_b, slots)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if torch.is_grad_enabled() and weight.requires_grad:
        raise ValueError("LoRA treats the base weight as frozen: set weight.requires_grad = False")
    dropout_p = dropout_p if training else 0.0
    if dropout_p == 0:
        seed = None
    elif seed is None:
        seed = draw_seed(x.device)
    elif not isinstance(seed, torch.Tensor):
        seed = torch.tensor([seed], dtype=torch.int64, device=x.device)
    rows = x.numel() // x.shape[-1]
    # the dispatch table is measured on CUDA only: elsewhere the rule needs no problem
    problem = problem_of(x.dtype, rows, *weight.shape, lora_a.shape[0], dropout_p) if x.is_cuda else None
    backend = select_backend(x.device, problem)
    args = (x, weight, bias, lora_a, lora_b, float(scale), dropout_p, seed, slots)
    with torch.autocast(x.device.type, enabled=False):
        if backend == "reference":  # plain differentiable torch ops: autograd derives the backward
            return _forward_reference(*args)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, bias, lora_a, lora_b)):
            keep_shrunk = lora_b.requires_grad  # dB is S's only consumer in the backward
            if torch.compiler.is_compiling():
                return lora_forward_op(*args, keep_shrunk, backend)[0]
            return LoRAFunction.apply(*args, keep_shrunk, backend)
        if torch.compiler.is_compiling():  # inference: no autograd node, no S kept
            return lora_forward_op(*args, False, backend)[0]
        return lora_forward(*args, False, backend)[0]


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    training: bool = False,
    seed: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Y [..., N] = X Wᵀ + b + s · (Xd Aᵀ) Bᵀ for X [..., K]; dropout only when ``training``.

    ``seed`` (an int, or a one-element int64 tensor on x's device) fixes the dropout mask (default: drawn on
    x's device by torch's generator, see draw_seed).
    Raises ValueError on mismatched shapes/dtypes/devices and if W requires grad (it is frozen).
    """
    return apply_lora(x, weight, bias, lora_a, lora_b, scale, dropout_p, training, seed, slots=(0,))
