"""A LoRA bank: n adapters over one frozen linear, each row of X through its own adapter (docs/design.md §3).

Shapes: X [M, K] (leading dims flattened into M), frozen W [N, K], bias b [N]; adapters stacked as
A [n, R, K] and B [n, P·w, r] with R = P·r (P adapted projections of width w, kernels/lora_qkv.py's slots;
P = 1, w = N for a plain linear), scales s [n]; row ids [M], i = id(m) ∈ 0 … n − 1, or −1: the base alone.
B_i's spread [N, R] puts projection j's block B_{i,j} in its segment's rows and slot j's r columns
(``spread_b`` of kernels/lora_linear.py), so that

Forward                                         Backward, G = dY [M, N]
    S[m] = X[m] A_iᵀ                  [M, R]        dS[m] = s_i · G[m] B_i,spread       [M, R]
    Y[m] = X[m] Wᵀ + b                              dX[m] = G[m] W + dS[m] A_i          [M, K]
           + s_i · S[m] B_i,spreadᵀ   [M, N]        dA_i  = Σ_{m ∈ i} dS[m]ᵀ X[m]        [R, K]
                                                    dB_i  = s_i · Σ_{m ∈ i} G[m]ᵀ S[m]   its B_{i,j} blocks

and a row of id −1 gets S = 0, Y = X Wᵀ + b, dX = G W; an adapter with no rows gets dA = dB = 0 exactly.
W is frozen; b gets db = Σ_m G[m] if it requires grad. Saved for backward: X, W, A, B, S, s and the segments.

Segments (``segments_of``): a stable sort of the rows by id (−1 last), each adapter's count and start in that
order, all three built on the ids' device. Nothing is read on the host, so the op can run in a CUDA graph
(not yet run on a GPU: tests/test_bank_kernels.py checks it under CUDA's sync debug mode there) and
torch.compile traces it. Ids outside −1 … n − 1 are not checked here, as that would read them; they land
with the −1 rows. The base GEMM X Wᵀ + b (and G W) is torch's, once for all rows.

Triton path (gather-matmul, "SGMV"): one kernel, ``_bank_matmul_kernel``, serves the shrink S = X A_iᵀ, the
expand Y += s_i S B_iᵀ (one launch per adapted projection, on its columns), dS and dX's LoRA part; a second,
``_bank_reduce_kernel``, sums each adapter's rows for dA and dB. The grid comes from host-known shapes only,
(⌈M / BLOCK_M⌉ row blocks, n adapters, column blocks): sized for any adapter holding all M rows, because
sizing it from the counts would read them on the host. Each program reads its adapter's start and count and
returns at once when its row block is past the count: of the n·⌈M / BLOCK_M⌉ row programs at most
⌈M / BLOCK_M⌉ + n do any work, whatever the split (in a skewed batch, one adapter with most rows, nearly all
of the other adapters' programs exit at once). Rows are read through the sort order and written back at their
own positions; each row belongs to one adapter, so no two programs write one element (no atomics). The
reduction's programs, one per output tile and adapter, walk their adapter's rows in a fixed order (so a
skewed batch leaves that adapter's few programs most of the work; not split, as nothing was measured).
Accumulation is fp32 (S and dS are kept in fp32), stores in the output's dtype. Row offsets are int64
(``tile_offsets``), and the row blocks are the grid's first axis (up to 2³¹ − 1 programs; the others allow
65,535: n ≤ 65,535), so M is bounded by memory only.

Torch path (CPU, or forced): the rows gathered in sort order, then every product as one grouped GEMM over
the adapters' runs (``F.grouped_mm`` with the run ends as offsets; an all-zero last group gives the base rows
exact zeros) and a scatter-add back; no Python loop over adapters, no host sync on the CPU (on CUDA,
grouped_mm's fallback for other than bf16 reads the offsets on the host). S is kept in X's dtype, sort order.

The op is the custom ops ``lowrank::bank_forward`` / ``lowrank::bank_backward`` (registered autograd, fake
shapes for torch.compile); the backend the forward ran is recorded and the backward runs it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.backend import Backend, select_backend
from kernels.lora_linear import adapter_slices, autocast_inputs, check_lora_inputs, spread_b
from kernels.lowrank_matmul import dot_precision, interpreting, load_tile, rank_block, store_tile

# Rows per program. A program's rows all belong to one adapter, so a run of c rows takes ⌈c / BLOCK_M⌉ programs
# and wastes under BLOCK_M rows of the last one: 32 keeps that small for the short runs of many adapters and is
# still a tensor-core tile (tl.dot needs ≥ 16). The column and reduction blocks are rank_block of their
# dimension (16 … 64), so a rank-wide side is one block and K or N goes 64 at a time. Fixed, not tuned on a GPU.
BLOCK_M = 32
NUM_WARPS = 4


class Segments(NamedTuple):
    """Rows grouped by adapter, on the ids' device: adapter i's rows are ``order[starts[i] : starts[i] + counts[i]]``
    (in their original order: the sort is stable); the rows of id −1 come after every adapter's."""

    order: torch.Tensor  # [M] int64: row indices, sorted by adapter
    counts: torch.Tensor  # [n] int64: rows of each adapter
    starts: torch.Tensor  # [n] int64: where each adapter's run begins in ``order`` (the exclusive cumsum of counts)


def segments_of(ids: torch.Tensor, adapters: int) -> Segments:
    """The Segments of row ids [M] (int64, −1: base only) for ``adapters`` adapters, built on the device.

    A stable sort with −1 mapped past the last adapter, then a searchsorted for the first row of each id:
    no value is read on the host (bincount would be: on CUDA it reads the largest id to size its output).
    """
    key = torch.where(ids < 0, adapters, ids)
    sorted_key, order = torch.sort(key, stable=True)
    bounds = torch.searchsorted(sorted_key, torch.arange(adapters + 1, device=ids.device))  # first row of each id
    return Segments(order, bounds.diff(), bounds[:-1])


@triton.jit
def _dot_operands(a, b):
    """a and b in one dtype for tl.dot: an fp32 operand (S or dS, kept unrounded) is cast to the other's dtype."""
    if a.dtype == tl.float32:
        a = a.to(b.dtype)
    else:
        b = b.to(a.dtype)
    return a, b


@triton.jit
def _bank_matmul_kernel(
    p_ptr, q_ptr, out_ptr, scale_ptr, order_ptr, starts_ptr, counts_ptr,
    INNER, COLS,
    stride_pm, stride_pk, stride_qa, stride_qk, stride_qc, stride_om, stride_oc,
    HAS_SCALE: tl.constexpr, ACCUMULATE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out[m, c] = s_i · Σ_k P[m, k] Q_i[k, c] (+ out[m, c] if ACCUMULATE) for the rows m of adapter i.

    Program (b, i, c-block): the rows order[starts[i] + b·BLOCK_M + t], t < counts[i] − b·BLOCK_M, gathered
    from P and stored (or added) at the same rows of out; it returns at once if b·BLOCK_M ≥ counts[i].
    Q_i begins at q_ptr + i · stride_qa. s_i = scale_ptr[i] if HAS_SCALE, else 1.
    """
    block, adapter, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    count = tl.load(counts_ptr + adapter)
    if block * BLOCK_M >= count:  # past this adapter's rows: most programs end here
        return
    local = block * BLOCK_M + tl.arange(0, BLOCK_M)
    in_run = local < count
    rows = tl.load(order_ptr + tl.load(starts_ptr + adapter) + local, mask=in_run, other=0)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    q_ptr += adapter.to(tl.int64) * stride_qa
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, INNER, BLOCK_K):
        inner = k0 + tl.arange(0, BLOCK_K)
        p = load_tile(p_ptr, rows, inner, stride_pm, stride_pk, in_run, inner < INNER, UPCAST)
        q = load_tile(q_ptr, inner, cols, stride_qk, stride_qc, inner < INNER, cols < COLS, UPCAST)
        p, q = _dot_operands(p, q)
        acc = tl.dot(p, q, acc, input_precision=PRECISION)
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + adapter)
    if ACCUMULATE:
        acc += load_tile(out_ptr, rows, cols, stride_om, stride_oc, in_run, cols < COLS, True)
    store_tile(out_ptr, acc, rows, cols, stride_om, stride_oc, in_run, cols < COLS)


@triton.jit
def _bank_reduce_kernel(
    p_ptr, q_ptr, out_ptr, scale_ptr, order_ptr, starts_ptr, counts_ptr,
    ROWS, COLS,
    stride_pm, stride_pr, stride_qm, stride_qc, stride_oa, stride_or, stride_oc,
    HAS_SCALE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """out_i[r, c] = s_i · Σ_{m of adapter i} P[m, r] Q[m, c]: each adapter's rows summed, out_i at i · stride_oa.

    Program (r-block, i, c-block) walks adapter i's run BLOCK_M rows at a time (gathered through the order),
    in one fixed order: deterministic, and an adapter without rows stores zeros.
    """
    pid_r, adapter, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    count = tl.load(counts_ptr + adapter)
    start = tl.load(starts_ptr + adapter)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for m0 in range(0, count, BLOCK_M):
        local = m0 + tl.arange(0, BLOCK_M)
        in_run = local < count
        rows = tl.load(order_ptr + start + local, mask=in_run, other=0)
        p = load_tile(p_ptr, rows, offs_r, stride_pm, stride_pr, in_run, offs_r < ROWS, UPCAST)
        q = load_tile(q_ptr, rows, offs_c, stride_qm, stride_qc, in_run, offs_c < COLS, UPCAST)
        p, q = _dot_operands(p, q)
        acc = tl.dot(tl.trans(p), q, acc, input_precision=PRECISION)
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + adapter)
    out_ptr += adapter.to(tl.int64) * stride_oa
    store_tile(out_ptr, acc, offs_r, offs_c, stride_or, stride_oc, offs_r < ROWS, offs_c < COLS)


def _gather_matmul(
    p: torch.Tensor, q: torch.Tensor, out: torch.Tensor, seg: Segments, scales: torch.Tensor | None, accumulate: bool
) -> torch.Tensor:
    """out[m] = s_i · P[m] Q_i (+ out[m] if ``accumulate``) for adapter i's rows: P [M, I], Q [n, I, C], out [M, C]."""
    (rows, inner), (adapters, _, cols) = p.shape, q.shape
    if rows == 0 or cols == 0:
        return out
    block_c = rank_block(cols)
    _bank_matmul_kernel[(triton.cdiv(rows, BLOCK_M), adapters, triton.cdiv(cols, block_c))](
        p, q, out, scales if scales is not None else out, seg.order, seg.starts, seg.counts,
        inner, cols,
        p.stride(0), p.stride(1), q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1),
        HAS_SCALE=scales is not None, ACCUMULATE=accumulate, UPCAST=interpreting(), PRECISION=dot_precision(),
        BLOCK_M=BLOCK_M, BLOCK_C=block_c, BLOCK_K=rank_block(inner), num_warps=NUM_WARPS,
    )  # fmt: skip
    return out


def bank_shrink(
    p: torch.Tensor, lora_a: torch.Tensor, seg: Segments, out: torch.Tensor, scales: torch.Tensor | None = None
) -> torch.Tensor:
    """out[m] ← s_i · P[m] A_iᵀ for the rows m of each adapter i (other rows untouched), on Triton.

    P [M, K], A [n, R, K], out [M, R], all possibly strided views; s_i = 1 without ``scales`` [n] (fp32).
    """
    return _gather_matmul(p, lora_a.transpose(1, 2), out, seg, scales, accumulate=False)


def bank_expand(
    p: torch.Tensor, lora_b: torch.Tensor, seg: Segments, out: torch.Tensor, scales: torch.Tensor | None = None
) -> torch.Tensor:
    """out[m] += s_i · P[m] B_iᵀ for the rows m of each adapter i, on Triton: P [M, r], B [n, N, r], out [M, N]."""
    return _gather_matmul(p, lora_b.transpose(1, 2), out, seg, scales, accumulate=True)


def bank_reduce(
    p: torch.Tensor, q: torch.Tensor, seg: Segments, out: torch.Tensor, scales: torch.Tensor | None = None
) -> torch.Tensor:
    """out[i] ← s_i · Σ_{m of adapter i} P[m]ᵀ Q[m] for every adapter (0 for one without rows), on Triton.

    P [M, R], Q [M, C], out [n, R, C].
    """
    (_, width), (adapters, _, cols) = p.shape, out.shape
    block_r, block_c = rank_block(width), rank_block(cols)
    _bank_reduce_kernel[(triton.cdiv(width, block_r), adapters, triton.cdiv(cols, block_c))](
        p, q, out, scales if scales is not None else out, seg.order, seg.starts, seg.counts,
        width, cols,
        p.stride(0), p.stride(1), q.stride(0), q.stride(1), out.stride(0), out.stride(1), out.stride(2),
        HAS_SCALE=scales is not None, UPCAST=interpreting(), PRECISION=dot_precision(),
        BLOCK_M=BLOCK_M, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=NUM_WARPS,
    )  # fmt: skip
    return out


def _forward_triton(x2d, weight, bias, lora_a, lora_b, scales, seg, slots):
    pieces = adapter_slices(slots, lora_b.shape[2], weight.shape[0])
    out = F.linear(x2d, weight, bias)  # X Wᵀ + b, every row
    # S = X A_iᵀ in fp32 (the accumulator, unrounded; 0 on the base rows)
    shrunk = x2d.new_zeros(x2d.shape[0], lora_a.shape[1], dtype=torch.float32)
    bank_shrink(x2d, lora_a, seg, shrunk)
    for piece in pieces:  # Y_g[m] += s_i · S_j[m] B_{i,j}ᵀ, on each adapted projection's columns
        bank_expand(shrunk[:, piece.s_cols], lora_b[:, piece.b_rows], seg, out[:, piece.out_cols], scales)
    return out, shrunk


def _backward_triton(grad, x2d, weight, lora_a, lora_b, shrunk, scales, seg, slots, needs):
    need_x, need_a, need_b = needs
    pieces = adapter_slices(slots, lora_b.shape[2], weight.shape[0])
    grad_x = grad_a = grad_b = None
    if need_x or need_a:
        grad_shrunk = grad.new_zeros(grad.shape[0], lora_a.shape[1], dtype=torch.float32)
        for piece in pieces:  # dS_j[m] = s_i · G_g[m] B_{i,j}
            b_piece = lora_b[:, piece.b_rows].transpose(1, 2)  # B_{i,j}ᵀ as the "A" of a shrink
            bank_shrink(grad[:, piece.out_cols], b_piece, seg, grad_shrunk[:, piece.s_cols], scales)
    if need_x:
        grad_x = grad @ weight  # dX = G W ...
        bank_expand(grad_shrunk, lora_a.transpose(1, 2), seg, grad_x)  # ... + dS[m] A_i on each adapter's rows
    if need_a:  # dA_i = Σ_{m ∈ i} dS[m]ᵀ X[m]
        grad_a = bank_reduce(grad_shrunk, x2d, seg, torch.empty_like(lora_a))
    if need_b:
        grad_b = torch.empty_like(lora_b)
        for piece in pieces:  # dB_{i,j} = s_i · Σ_{m ∈ i} G_g[m]ᵀ S_j[m]
            bank_reduce(grad[:, piece.out_cols], shrunk[:, piece.s_cols], seg, grad_b[:, piece.b_rows], scales)
    return grad_x, grad_a, grad_b


def _grouped_layout(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy of it in the layout F.grouped_mm takes: its last two dims row- or column-major with the
    other stride, the batch stride and the offset multiples of 16 bytes. Copies (rows padded to 16 bytes) only
    odd shapes: K, N and R multiples of 4 (fp32) or 8 (bf16) pass as they are."""
    align = 16 // t.element_size()
    row, col = t.stride(-2), t.stride(-1)
    row_major = col == 1 and row >= max(1, t.shape[-1]) and row % align == 0
    col_major = row == 1 and col >= max(1, t.shape[-2]) and col % align == 0
    if (row_major or col_major) and t.storage_offset() % align == 0 and all(s % align == 0 for s in t.stride()[:-2]):
        return t
    padded = t.new_empty(*t.shape[:-1], math.ceil(t.shape[-1] / align) * align)[..., : t.shape[-1]]
    return padded.copy_(t)


def _grouped(mat_a: torch.Tensor, mat_b: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """F.grouped_mm over the adapters' runs (``ends``: where each run ends); rows or columns past the last are
    left unset (2-D × 3-D) or ignored (2-D × 2-D)."""
    if not hasattr(F, "grouped_mm"):
        raise RuntimeError(
            f"a LoRA bank's torch path needs torch.nn.functional.grouped_mm (torch ≥ 2.10), not in torch "
            f"{torch.__version__}: upgrade torch, or run the Triton path (CUDA)"
        )
    return F.grouped_mm(_grouped_layout(mat_a), _grouped_layout(mat_b), offs=ends)


def _base_group(t: torch.Tensor) -> torch.Tensor:
    """``t`` [n, …] with an all-zero group n appended: grouped_mm then writes exact zeros on the base rows (sorted
    last) instead of leaving them unset, and no mask pass over the [M, N] or [M, K] result is needed."""
    return F.pad(t, (0, 0, 0, 0, 0, 1))


def _scaled_spread(lora_b: torch.Tensor, scales: torch.Tensor, slots: tuple[int, ...], out_features: int):
    """s_i · B_i,spread of every adapter and the base's zero group, [n + 1, N, R]: spread_b of one B of rank n·r
    whose column i·r + t is adapter i's column t, its [N, P·n·r] result regrouped by adapter."""
    adapters, _, rank = lora_b.shape
    side_by_side = lora_b.permute(1, 0, 2).reshape(-1, adapters * rank)  # [P·w, n·r]
    spread = spread_b(side_by_side, adapter_slices(slots, adapters * rank, out_features), out_features)
    per_adapter = spread.view(out_features, -1, adapters, rank).permute(2, 0, 1, 3).reshape(adapters, out_features, -1)
    return _base_group((per_adapter * scales[:, None, None]).to(lora_b.dtype))  # s_i · B rounded once


class _Runs(NamedTuple):
    """The adapters' runs of sorted rows, as grouped_mm's int32 offsets (where each run ends)."""

    ends: torch.Tensor  # [n]: adapter runs only (rows past the last are the base's)
    with_base: torch.Tensor  # [n + 1]: and the base rows as the last group, to M
    base: torch.Tensor  # [M, 1] bool: the base rows of the sorted order


def _runs(seg: Segments, rows: int) -> _Runs:
    ends = (seg.starts + seg.counts).to(torch.int32)
    base = (torch.arange(rows, device=ends.device) >= ends[-1])[:, None]
    return _Runs(ends, F.pad(ends, (0, 1), value=rows), base)


def _forward_torch(x2d, weight, bias, lora_a, lora_b, scales, seg, slots):
    runs = _runs(seg, x2d.shape[0])
    out = F.linear(x2d, weight, bias)  # X Wᵀ + b, every row
    sorted_x = x2d.index_select(0, seg.order)
    # S = X A_iᵀ in sort order; grouped_mm leaves the base rows unset: 0 there
    shrunk = _grouped(sorted_x, lora_a.transpose(1, 2), runs.ends).masked_fill_(runs.base, 0)
    spread = _scaled_spread(lora_b, scales, slots, weight.shape[0])
    expanded = _grouped(shrunk, spread.transpose(1, 2), runs.with_base)  # s_i · S B_i,spreadᵀ, sorted
    return out.index_add_(0, seg.order, expanded), shrunk.contiguous()  # grouped_mm pads odd rows to 16 bytes


def _backward_torch(grad, x2d, weight, lora_a, lora_b, shrunk, scales, seg, slots, needs):
    need_x, need_a, need_b = needs
    runs = _runs(seg, x2d.shape[0])
    sorted_grad = grad.index_select(0, seg.order)
    grad_x = grad_a = grad_b = None
    if need_x or need_a:  # dS = s_i · G B_i,spread, sorted; 0 on the base rows
        grad_shrunk = _grouped(sorted_grad, _scaled_spread(lora_b, scales, slots, weight.shape[0]), runs.with_base)
    if need_x:
        grad_x = grad @ weight  # dX = G W ...
        lora_part = _grouped(grad_shrunk, _base_group(lora_a), runs.with_base)
        grad_x.index_add_(0, seg.order, lora_part)  # ... + dS A_i
    if need_a:  # dA_i = Σ_{m ∈ i} dS[m]ᵀ X[m]
        grad_a = _grouped(grad_shrunk.t(), x2d.index_select(0, seg.order), runs.ends).contiguous()
    if need_b:  # s_i · Σ_{m ∈ i} G[m]ᵀ S[m]  [n, N, R]; its B_{i,j} blocks are dB_i
        grad_spread = (_grouped(sorted_grad.t(), shrunk, runs.ends) * scales[:, None, None]).to(lora_b.dtype)
        pieces = adapter_slices(slots, lora_b.shape[2], weight.shape[0])
        grad_b = torch.cat([grad_spread[:, piece.out_cols, piece.s_cols] for piece in pieces], dim=1)
    return grad_x, grad_a, grad_b


def bank_forward(x, weight, bias, lora_a, lora_b, scales, seg: Segments, slots: tuple[int, ...], backend: Backend):
    """(Y [..., N], S [M, R]) on ``backend``: S in fp32, row order on Triton; in X's dtype, sort order on torch."""
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.shape[0] == 0:
        out, shrunk = F.linear(x2d, weight, bias), x2d.new_zeros(0, lora_a.shape[1])
    else:
        run = _forward_triton if backend == "triton" else _forward_torch
        out, shrunk = run(x2d, weight, bias, lora_a, lora_b, scales, seg, slots)
    return out.view(*x.shape[:-1], weight.shape[0]), shrunk


def bank_backward(grad_out, x, weight, lora_a, lora_b, shrunk, scales, seg: Segments, slots, needs, backend: Backend):
    """(dX [x's shape], dA, dB), each None unless ``needs`` (x, A, B) asks for it, on ``backend`` (the forward's)."""
    x2d, grad = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
    if x2d.shape[0] == 0:
        grads = (grad @ weight, torch.zeros_like(lora_a), torch.zeros_like(lora_b))
        grad_x, grad_a, grad_b = (g if need else None for g, need in zip(grads, needs, strict=True))
    else:
        run = _backward_triton if backend == "triton" else _backward_torch
        grad_x, grad_a, grad_b = run(grad, x2d, weight, lora_a, lora_b, shrunk, scales, seg, slots, needs)
    return (None if grad_x is None else grad_x.view(x.shape)), grad_a, grad_b


# The op as custom ops, eagerly and under torch.compile alike: torch.compile sees two opaque nodes with known
# output shapes (the register_fake functions) instead of Triton launches. An empty tensor stands for "not
# computed" (an op cannot return None).
@torch.library.custom_op("lowrank::bank_forward", mutates_args=())
def bank_forward_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor,
    order: torch.Tensor,
    counts: torch.Tensor,
    starts: torch.Tensor,
    slots: Sequence[int],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Y, S) of bank_forward."""
    seg = Segments(order, counts, starts)
    return bank_forward(x, weight, bias, lora_a, lora_b, scales, seg, tuple(slots), backend)


@bank_forward_op.register_fake
def _(x, weight, bias, lora_a, lora_b, scales, order, counts, starts, slots, backend):
    shrunk_dtype = torch.float32 if backend == "triton" else x.dtype
    rows = math.prod(x.shape[:-1])
    return x.new_empty(*x.shape[:-1], weight.shape[0]), x.new_empty(rows, lora_a.shape[1], dtype=shrunk_dtype)


@torch.library.custom_op("lowrank::bank_backward", mutates_args=())
def bank_backward_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    shrunk: torch.Tensor,
    scales: torch.Tensor,
    order: torch.Tensor,
    counts: torch.Tensor,
    starts: torch.Tensor,
    slots: Sequence[int],
    needs: Sequence[bool],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dX, dA, dB) of bank_backward; each is empty when not asked for."""
    seg = Segments(order, counts, starts)
    grads = bank_backward(grad_out, x, weight, lora_a, lora_b, shrunk, scales, seg, tuple(slots), tuple(needs), backend)
    return tuple(x.new_empty(0) if grad is None else grad for grad in grads)


@bank_backward_op.register_fake
def _(grad_out, x, weight, lora_a, lora_b, shrunk, scales, order, counts, starts, slots, needs, backend):
    likes = (x, lora_a, lora_b)
    return tuple(like.new_empty(like.shape if need else (0,)) for like, need in zip(likes, needs, strict=True))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, _, lora_a, lora_b, scales, order, counts, starts, slots, backend = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1], scales, order, counts, starts)
    ctx.slots, ctx.backend = tuple(slots), backend


def _op_backward(ctx, grad_out, _grad_shrunk):
    """Gradients of (x, weight, bias, lora_a, lora_b, scales, order, counts, starts, slots, backend)."""
    x, weight, lora_a, lora_b, shrunk, scales, order, counts, starts = ctx.saved_tensors
    needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4])
    grads = bank_backward_op(
        grad_out, x, weight, lora_a, lora_b, shrunk, scales, order, counts, starts, ctx.slots, needs, ctx.backend
    )
    grad_x, grad_a, grad_b = (grad if need else None for grad, need in zip(grads, needs, strict=True))
    # db = Σ_m G[m, :]
    grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
    return grad_x, None, grad_bias, grad_a, grad_b, None, None, None, None, None, None


bank_forward_op.register_autograd(_op_backward, setup_context=_setup_context)


def bank_lora(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor,
    ids: torch.Tensor,
    slots: tuple[int, ...] = (0,),
) -> torch.Tensor:
    """Y [..., N] = X Wᵀ + b + s_i · S[m] B_i,spreadᵀ for X [..., K], row m through adapter i = ids[m] (−1: none).

    A [n, R, K], B [n, P·w, r], ``scales`` [n] on x's device (fp32: kept there, no host copy per call), ``ids``
    [M] int64 on x's device (M: x's rows; not range-checked, which would read them on the host), ``slots``
    those of kernels/lora_qkv.py ((0,) for a plain linear). Under torch.autocast the floating inputs are cast
    like F.linear's. Raises ValueError on mismatched shapes, dtypes or devices and if W requires grad.
    """
    x, weight, bias, lora_a, lora_b = autocast_inputs(x, weight, bias, lora_a, lora_b)
    if lora_a.dim() != 3 or lora_b.dim() != 3 or not lora_a.shape[0] == lora_b.shape[0] == scales.numel():
        raise ValueError(
            f"a bank takes lora_a [n, R, K], lora_b [n, P·w, r] and scales [n]; got {tuple(lora_a.shape)}, "
            f"{tuple(lora_b.shape)} and {tuple(scales.shape)}"
        )
    check_lora_inputs(x, weight, bias, lora_a[0], lora_b[0], slots)
    rows = math.prod(x.shape[:-1])
    if ids.shape != (rows,) or ids.dtype != torch.int64 or ids.device != x.device or scales.device != x.device:
        raise ValueError(
            f"ids must be int64 [{rows}] (one per row of x) and ids, scales on {x.device}; got ids {ids.dtype} "
            f"{list(ids.shape)} on {ids.device}, scales on {scales.device}"
        )
    if torch.is_grad_enabled() and weight.requires_grad:
        raise ValueError("LoRA treats the base weight as frozen: set weight.requires_grad = False")
    seg = segments_of(ids, lora_a.shape[0])
    # the bank has no unfused reference of its own (its tests compare with a per-sample loop): "reference" runs torch
    backend = "torch" if (chosen := select_backend(x.device)) == "reference" else chosen
    with torch.autocast(x.device.type, enabled=False):
        args = (x, weight, bias, lora_a, lora_b, scales.float(), *seg, list(slots), backend)
        return bank_forward_op(*args)[0]
