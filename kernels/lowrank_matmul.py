"""The three Triton GEMMs every LoRA op is built from, with their launchers.

* ``skinny_matmul``: out[I, r] = scale · (P ⊙ D / (1 - p))[I, J] · Q[J, r], rank-wide output,
  optional dropout mask D regenerated on the fly from a seed (never stored).
  Serves S = Xd Aᵀ and dA = dSᵀ Xd (computed as dAᵀ = Xdᵀ dS). A long reduction (dA's J = M) is
  split into ranges of J whose fp32 partials are summed afterwards in a fixed order.
* ``expand_backward``: dS = s · G B [M, r] and dB = s · Gᵀ S [N, r] in one pass over G: each program
  reads its rows of G once, tile by tile, for both products; dB's reduction over M is split into
  row ranges (fp32 partials, fixed-order sum). Up to three "pieces" (the q, k, v adapters,
  dS_j = s · G_g B_j and dB_j = s · G_gᵀ S_j) run in one launch, one grid column per piece.
* ``fused_matmul``: out[M, N] = P[M, K] · Q[K, N] + b[N] + scale · (L[M, r] · R[r, N]) ⊙ D / (1 - p),
  the base GEMM with the low-rank "expand" added to the same fp32 accumulator in the epilogue:
  one pass over the output instead of three. Serves Y (forward) and dX (backward). The
  output may be split into segments (q, k, v) that each read only their own slice of L, R.

Operands are passed as (possibly strided) 2-D views, so transposes cost nothing. Every
element offset is computed in int64 (``tile_offsets``): M·K passes 2³¹ at K = 2048 and
M ≥ 1,048,576 rows. The rank dimension is tiled in chunks of at most ``MAX_RANK_BLOCK``.
Split reductions are deterministic: no atomics, the split count is a function of the shape and
the device only (``split_count``), and torch.sum adds the partials in one fixed order.
Autotuning is keyed on the fixed sizes (N, K, r), the operand dtypes (the autotuner adds
them), the dot precision, the memory layout, dropout and bias, and on the varying M rounded
up to a power of two, so a new batch size retunes at most once per octave; ``LOWRANK_AUTOTUNE=0``
turns the sweep off (one config per dot kind). A config whose compiled kernel spills registers
is never run (``spill_free``). After the first call for a key, launches skip the autotuner and run
the jitted kernel with the chosen config (``_launch``).
The dropout mask of element (m, k) of X is ``keep_mask(seed, m · K + k, p)``, with the seed
read from a one-element device tensor (a CUDA graph replays its drawing, so each replay
gets a new mask); every kernel that needs it regenerates it from the same (seed, offset),
so forward and backward agree without an M × K mask in memory.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from kernels.backend import interpreting

# Smallest rank block: tl.dot needs every dimension ≥ 16 on NVIDIA GPUs; the rank is
# zero-padded (masked loads) up to the next power of two ≥ this.
MIN_RANK_BLOCK = 16
# Widest rank block: wider ranks loop over chunks of this width. Unbounded, q, k, v at r = 64
# (n·r = 192) made a 256-wide block: dX's epilogue then held a 128 × 256 fp32 update beside the
# 128 × 256 accumulator (register spills), and the only tile left with autotune off ran out of
# shared memory. 64 keeps the epilogue's operand tiles (BLOCK_M × 64, 64 × BLOCK_N) and the
# skinny kernel's BLOCK_I × 64 accumulator no larger than the main loop's.
MAX_RANK_BLOCK = 64
# Tiles swept on GPU (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): Hopper wants BLOCK_K = 64 and
# large 8-warp tiles (Triton's H100 matmul tutorial settings); 64 × 128 keeps small problems
# busy on 132 SMs. A config that does not fit shared memory (fp32 at 128 × 256) is skipped by
# the autotuner. Under the CPU interpreter autotuning cannot time anything: one small config.
_GPU_TILES = [(128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 32, 8, 3), (64, 128, 64, 4, 4)]
_INTERPRETER_TILE = (32, 32, 32, 4, 1)
# fp32 operands with PRECISION "ieee" bypass the tensor cores: tl.dot becomes FMA loops, for which
# 128 × 256 accumulators are far too big. On the H200 a single fp32 test ran > 200 s with them
# (cause not yet profiled). Such launches are pruned to these small FMA tiles; not yet run on a GPU.
_FMA_TILES = [(64, 64, 32, 4, 2), (32, 64, 32, 4, 2)]
# Rows per program of the skinny GEMM; its output is only r wide, so tiles are tall.
_GPU_SKINNY = [(64, 64, 4, 3), (128, 32, 4, 3), (32, 128, 4, 3)]
_INTERPRETER_SKINNY = (32, 32, 4, 1)
# Tiles of expand_backward (BLOCK_M, BLOCK_N, warps, stages): a BLOCK_M × BLOCK_N tile of G feeds a
# BLOCK_M × r accumulator (dS) and a BLOCK_N × r partial (dB), so tiles are smaller than the fused GEMM's.
_GPU_EXPAND_BACKWARD = [(64, 64, 4, 3), (128, 64, 8, 3), (64, 128, 4, 3)]
_INTERPRETER_EXPAND_BACKWARD = (32, 32, 4, 1)
# Programs along M that share a band of Q tiles in L2 ("grouped ordering").
GROUP_M = 8
# Output segments with their own adapter in one fused GEMM: q, k, v of a fused projection.
MAX_SEGMENTS = 3
# Split reductions over M (split_count): about this many programs per SM in all, and ranges of at least
# MIN_SPLIT_ROWS rows, so that the fp32 partials (splits × output) stay small next to the operand read.
# Not yet tuned on a GPU. Under the interpreter a small target, so that the tests' M of a few hundred
# rows runs more than one range.
SPLIT_PROGRAMS_PER_SM = 2
MIN_SPLIT_ROWS = 128
_INTERPRETER_SPLIT = (4, 32)  # (programs in all, minimum rows per range)


def rank_block(rank: int) -> int:
    """The power-of-two block of a rank-``rank`` dimension: ≥ MIN_RANK_BLOCK, ≤ MAX_RANK_BLOCK (then chunked)."""
    return min(MAX_RANK_BLOCK, max(MIN_RANK_BLOCK, triton.next_power_of_2(rank)))


def dot_precision() -> str:
    """fp32 tl.dot precision that matches torch's matmul setting: 'tf32' only when torch allows it."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def layout(*tensors: torch.Tensor) -> int:
    """Autotune key of the operands' memory layout: bit t set when tensor t is row-major (unit column stride)."""
    return sum(1 << t for t, tensor in enumerate(tensors) if tensor.stride(1) == 1)


def _tile_configs(tiles: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for m, n, k, w, s in tiles
    ]


def autotuning() -> bool:
    """False when ``LOWRANK_AUTOTUNE=0``: each kernel then has one config per dot kind (the first of each
    list), so a new shape compiles once instead of sweeping tiles (the GPU test run, quick experiments)."""
    return os.environ.get("LOWRANK_AUTOTUNE", "1") != "0"


def _swept(tiles: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    return tiles if autotuning() else tiles[:1]


def _fused_configs() -> list[triton.Config]:
    return _tile_configs([_INTERPRETER_TILE] if interpreting() else _swept(_GPU_TILES) + _swept(_FMA_TILES))


def _is_fma_tile(config: triton.Config) -> bool:
    return (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]) in {(m, n) for m, n, *_ in _FMA_TILES}


def prune_fused_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Autotuner pre-filter: FMA tiles for fp32 "ieee" dots, tensor-core tiles otherwise (all if none match)."""
    args = named_args | kwargs
    fma = args.get("PRECISION") == "ieee" and args["p_ptr"].dtype == torch.float32
    kept = [config for config in configs if _is_fma_tile(config) == fma]
    return kept or configs


def _skinny_configs() -> list[triton.Config]:
    tiles = [_INTERPRETER_SKINNY] if interpreting() else _swept(_GPU_SKINNY)
    return [triton.Config({"BLOCK_I": i, "BLOCK_J": j}, num_warps=w, num_stages=s) for i, j, w, s in tiles]


def _expand_backward_configs() -> list[triton.Config]:
    tiles = [_INTERPRETER_EXPAND_BACKWARD] if interpreting() else _swept(_GPU_EXPAND_BACKWARD)
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]


def spill_free(configs: list[triton.Config], spills: Callable[[triton.Config], int]) -> list[triton.Config]:
    """The configs whose compiled kernel spills no registers (``spills(config)``: the count); if every one
    spills, the one that spills least, with a warning. A spilling kernel reads and writes local memory
    in its inner loop, which no tile size makes up for."""
    counts = {config: spills(config) for config in configs}
    kept = [config for config in configs if counts[config] == 0]
    if kept:
        return kept
    least = min(configs, key=counts.__getitem__)
    warnings.warn(f"every Triton config spills registers; running the least ({counts[least]}): {least}", stacklevel=3)
    return [least]


def spill_pruner(kernel_name: str, prefilter: Callable[..., list[triton.Config]] | None = None):
    """An autotuner ``early_config_prune`` for the kernel named ``kernel_name`` in this module: ``prefilter``'s
    configs (all if None), less those that spill (each compiled once, for the arguments at hand; the
    autotuner's timing runs reuse the compilation). The interpreter compiles nothing and never spills."""

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        configs = prefilter(configs, named_args, **kwargs) if prefilter else configs
        if interpreting():
            return configs
        jit_fn = globals()[kernel_name].fn
        args = named_args | kwargs

        def spills(config: triton.Config) -> int:
            compiled = jit_fn.warmup(**args, **config.all_kwargs(), grid=(1,))
            compiled._init_handles()  # loads the binary: n_spills is known from here on
            return compiled.n_spills

        return spill_free(configs, spills)

    return prune


@functools.cache
def _split_target(device: torch.device) -> tuple[int, int]:
    if interpreting():
        return _INTERPRETER_SPLIT
    return SPLIT_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count, MIN_SPLIT_ROWS


def split_count(rows: int, programs: int, device: torch.device) -> int:
    """Into how many ranges a reduction over ``rows`` rows is split, when ``programs`` programs run per range:
    enough for the device's program target, none shorter than the minimum. A function of the shape and the
    device only, so a given problem always sums its partials the same way (deterministic)."""
    target, min_rows = _split_target(device)
    return max(1, min(triton.cdiv(target, programs), rows // min_rows))


@triton.jit
def keep_mask(seed, offsets, p):
    """Dropout keep mask: True with probability 1 - p, a pure function of (seed, offset)."""
    return tl.rand(seed, offsets) >= p


@triton.jit
def tile_offsets(rows, cols, stride_row, stride_col):
    """offsets[i, j] = rows[i] · stride_row + cols[j] · stride_col, in int64 (an int32 product wraps at 2³¹).

    rows (BLOCK_ROWS,), cols (BLOCK_COLS,) → (BLOCK_ROWS, BLOCK_COLS).
    """
    return rows.to(tl.int64)[:, None] * stride_row + cols.to(tl.int64)[None, :] * stride_col


@triton.jit
def load_tile(ptr, rows, cols, stride_row, stride_col, row_mask, col_mask, UPCAST: tl.constexpr):
    """tile[i, j] = ptr[rows[i] · stride_row + cols[j] · stride_col] where row_mask[i] & col_mask[j], else 0.

    rows, row_mask (BLOCK_ROWS,), cols, col_mask (BLOCK_COLS,) → (BLOCK_ROWS, BLOCK_COLS), in fp32 when
    UPCAST, else in ptr's dtype.
    """
    mask = row_mask[:, None] & col_mask[None, :]
    tile = tl.load(ptr + tile_offsets(rows, cols, stride_row, stride_col), mask=mask, other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def store_tile(ptr, tile, rows, cols, stride_row, stride_col, row_mask, col_mask):
    """ptr[rows[i] · stride_row + cols[j] · stride_col] = tile[i, j] (cast to ptr's dtype) where both masks hold."""
    mask = row_mask[:, None] & col_mask[None, :]
    tl.store(ptr + tile_offsets(rows, cols, stride_row, stride_col), tile.to(ptr.dtype.element_ty), mask=mask)


@triton.autotune(
    configs=_skinny_configs(),
    key=["ROWS_BUCKET", "INNER_BUCKET", "RANK", "LAYOUT", "PRECISION", "HAS_DROPOUT"],
    prune_configs_by={"early_config_prune": spill_pruner("_skinny_matmul_kernel")},
)
@triton.jit
def _skinny_matmul_kernel(
    p_ptr, q_ptr, out_ptr, seed_ptr,
    ROWS, INNER, RANK, ROWS_BUCKET, INNER_BUCKET, LAYOUT,
    stride_pi, stride_pj, stride_qj, stride_qr, stride_oi, stride_or, split_step_o,
    mask_stride_i, mask_stride_j,
    scale, dropout_p,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):  # fmt: skip
    """out_t[i, r] = scale · Σ_{j in range t} (P[i, j] · D[i, j] / (1 - p)) · Q[j, r]; D's offset is i·msi + j·msj.

    Grid (row blocks, rank chunks, splits): one program owns BLOCK_I output rows × BLOCK_R rank
    columns of split t and loops over J's range t: the t-th run of ⌈(J / BLOCK_J) / splits⌉ tiles
    (possibly empty: then it writes zeros). Split t writes out from t · split_step_o on (one split:
    the output itself). Q tiles are cast to P's dtype so that tl.dot sees one dtype (fp32 accumulation).
    """
    split = tl.program_id(2)
    out_ptr += split.to(tl.int64) * split_step_o
    tiles_per_split = tl.cdiv(tl.cdiv(INNER, BLOCK_J), tl.num_programs(2))
    j_start = split * tiles_per_split * BLOCK_J
    j_end = tl.minimum(j_start + tiles_per_split * BLOCK_J, INNER)
    offs_i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_I, BLOCK_R), dtype=tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    for j0 in range(j_start, j_end, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        p = load_tile(p_ptr, offs_i, offs_j, stride_pi, stride_pj, offs_i < ROWS, offs_j < INNER, UPCAST)
        if HAS_DROPOUT:
            offsets = tile_offsets(offs_i, offs_j, mask_stride_i, mask_stride_j)
            p = tl.where(keep_mask(seed, offsets, dropout_p), p, 0.0)
        q = load_tile(q_ptr, offs_j, offs_r, stride_qj, stride_qr, offs_j < INNER, offs_r < RANK, UPCAST)
        acc = tl.dot(p, q.to(p.dtype), acc, input_precision=PRECISION)
    if HAS_DROPOUT:
        scale = scale / (1.0 - dropout_p)
    store_tile(out_ptr, acc * scale, offs_i, offs_r, stride_oi, stride_or, offs_i < ROWS, offs_r < RANK)


@triton.autotune(
    configs=_expand_backward_configs(),
    key=["M_BUCKET", "WIDTH", "RANK", "PIECES", "LAYOUT", "PRECISION", "NEED_DS", "NEED_DB"],
    prune_configs_by={"early_config_prune": spill_pruner("_expand_backward_kernel")},
)
@triton.jit
def _expand_backward_kernel(
    g_ptr, b_ptr, s_ptr, ds_ptr, db_ptr,
    M, WIDTH, RANK, M_BUCKET, PIECES, LAYOUT,
    stride_gm, stride_gn, stride_bn, stride_br, stride_sm, stride_sr, stride_dsm, stride_dsr,
    stride_dbn, stride_dbr, split_step_db,
    piece_step_g, piece_step_b, piece_step_s, piece_step_ds, piece_step_db,
    SEGMENT_0, SEGMENT_1, SEGMENT_2, SLOT_0, SLOT_1, SLOT_2,
    scale,
    NEED_DS: tl.constexpr, NEED_DB: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dS[m, r] = scale · Σ_n G[m, n] B[n, r] and dB_t[n, r] = scale · Σ_{m in range t} G[m, n] S[m, r].

    Grid (row ranges, rank chunks, pieces): the program of range t walks its run of
    ⌈(M / BLOCK_M) / ranges⌉ row blocks; for each block it reads G's BLOCK_M × WIDTH rows once,
    BLOCK_N columns at a time, and feeds every tile to both dots: dS's BLOCK_M × BLOCK_R accumulator
    (stored when the block's row is done) and the BLOCK_N × BLOCK_R partial of dB_t, added to
    what this program stored there for its earlier blocks (no other program touches range t's
    partial; dB_t starts at zero). Piece p (g = SEGMENT_p, j = SLOT_p) reads G from g · piece_step_g
    on, B from j · piece_step_b, S from j · piece_step_s, and writes dS from j · piece_step_ds and
    dB from j · piece_step_db (+ t · split_step_db) on. B and S tiles are cast to G's dtype for the dots.
    """
    piece = tl.program_id(2)
    segment = tl.where(piece == 0, SEGMENT_0, tl.where(piece == 1, SEGMENT_1, SEGMENT_2)).to(tl.int64)
    slot = tl.where(piece == 0, SLOT_0, tl.where(piece == 1, SLOT_1, SLOT_2)).to(tl.int64)
    split = tl.program_id(0)
    g_ptr += segment * piece_step_g
    b_ptr += slot * piece_step_b
    s_ptr += slot * piece_step_s
    ds_ptr += slot * piece_step_ds
    db_ptr += slot * piece_step_db + split.to(tl.int64) * split_step_db
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    blocks_per_split = tl.cdiv(tl.cdiv(M, BLOCK_M), tl.num_programs(0))
    first_block = split * blocks_per_split
    last_block = tl.minimum(first_block + blocks_per_split, tl.cdiv(M, BLOCK_M))
    for block in range(first_block, last_block):
        offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
        if NEED_DB:
            s = load_tile(s_ptr, offs_m, offs_r, stride_sm, stride_sr, offs_m < M, offs_r < RANK, UPCAST)
        if NEED_DS:
            acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for n0 in range(0, WIDTH, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            g = load_tile(g_ptr, offs_m, offs_n, stride_gm, stride_gn, offs_m < M, offs_n < WIDTH, UPCAST)
            if NEED_DS:
                b = load_tile(b_ptr, offs_n, offs_r, stride_bn, stride_br, offs_n < WIDTH, offs_r < RANK, UPCAST)
                acc = tl.dot(g, b.to(g.dtype), acc, input_precision=PRECISION)
            if NEED_DB:
                partial = load_tile(db_ptr, offs_n, offs_r, stride_dbn, stride_dbr, offs_n < WIDTH, offs_r < RANK, True)
                partial += scale * tl.dot(tl.trans(g), s.to(g.dtype), input_precision=PRECISION)
                store_tile(db_ptr, partial, offs_n, offs_r, stride_dbn, stride_dbr, offs_n < WIDTH, offs_r < RANK)
        if NEED_DS:
            store_tile(ds_ptr, acc * scale, offs_m, offs_r, stride_dsm, stride_dsr, offs_m < M, offs_r < RANK)
        if NEED_DB:
            tl.debug_barrier()  # the next block's loads of the dB partial see every thread's stores


@triton.autotune(
    configs=_fused_configs(),
    key=["M_BUCKET", "N", "K", "RANK", "LAYOUT", "PRECISION", "HAS_BIAS", "HAS_DROPOUT"],
    prune_configs_by={"early_config_prune": spill_pruner("_fused_matmul_kernel", prune_fused_configs)},
)
@triton.jit
def _fused_matmul_kernel(
    p_ptr, q_ptr, bias_ptr, l_ptr, r_ptr, out_ptr, seed_ptr,
    M, N, K, RANK, M_BUCKET, LAYOUT, SEGMENT, SLOT_0, SLOT_1, SLOT_2,
    stride_pm, stride_pk, stride_qk, stride_qn, stride_lm, stride_lr, stride_rr, stride_rn,
    stride_om, stride_on,
    scale, dropout_p,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out[m, n] = Σ_k P[m, k] Q[k, n] + b[n] + scale · U[m, n] · D[m, n] / (1 - p).

    The output columns form segments of width SEGMENT (g = n // SEGMENT, at most 3: q, k, v).
    Segment g with adapter slot j = SLOT_g ≥ 0 gets U[m, n] = Σ_t L[m, j·r + t] R[t, n + (j − g)·SEGMENT],
    i.e. its own r columns of L and its own columns of R; a segment with SLOT_g = -1 gets
    no update and costs nothing. A plain LoRA linear is one segment (SEGMENT = N, slot 0).

    Main loop: the base GEMM into an fp32 accumulator. Epilogue: each segment's rank-r
    expand (L is tiny, M × n·r), in rank chunks of BLOCK_R. Without dropout it goes into the
    same accumulator, with scale applied to the fp32 L tile; with dropout into a second one,
    masked by D (offset m·N + n) and scaled. Then the bias; one store.
    """
    # Grouped ordering: GROUP consecutive programs walk down M over the same N band (L2 reuse).
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group_size = GROUP * num_n
    first_m = (pid // group_size) * GROUP
    rows_in_group = min(num_m - first_m, GROUP)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        p = load_tile(p_ptr, offs_m, offs_k, stride_pm, stride_pk, offs_m < M, offs_k < K, UPCAST)
        q = load_tile(q_ptr, offs_k, offs_n, stride_qk, stride_qn, offs_k < K, offs_n < N, UPCAST)
        acc = tl.dot(p, q, acc, input_precision=PRECISION)

    # Epilogue, naive form: out += scale * ((L_j @ R_j) * D / (1 - p)) for each segment in this tile
    if HAS_DROPOUT:
        update = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    first_segment = (pid_n * BLOCK_N) // SEGMENT
    last_segment = (min(pid_n * BLOCK_N + BLOCK_N, N) - 1) // SEGMENT
    for segment in range(first_segment, last_segment + 1):
        slot = tl.where(segment == 0, SLOT_0, tl.where(segment == 1, SLOT_1, SLOT_2))
        if slot >= 0:
            in_segment = (offs_n // SEGMENT == segment) & (offs_n < N)
            r_cols = offs_n + (slot - segment) * SEGMENT
            for r0 in range(0, RANK, BLOCK_R):
                ranks = r0 + tl.arange(0, BLOCK_R)
                l_cols = slot * RANK + ranks
                low = load_tile(l_ptr, offs_m, l_cols, stride_lm, stride_lr, offs_m < M, ranks < RANK, True)
                high = load_tile(r_ptr, ranks, r_cols, stride_rr, stride_rn, ranks < RANK, in_segment, UPCAST)
                if HAS_DROPOUT:
                    update = tl.dot(low.to(high.dtype), high, update, input_precision=PRECISION)
                else:
                    acc = tl.dot((low * scale).to(high.dtype), high, acc, input_precision=PRECISION)
    if HAS_DROPOUT:
        keep = keep_mask(tl.load(seed_ptr), tile_offsets(offs_m, offs_n, N, 1), dropout_p)
        acc += tl.where(keep, update, 0.0) * (scale / (1.0 - dropout_p))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    store_tile(out_ptr, acc, offs_m, offs_n, stride_om, stride_on, offs_m < M, offs_n < N)


# The config the autotuner chose, per (kernel, tuning key, operand dtypes): see _launch.
_chosen_configs: dict[tuple, triton.Config] = {}


def _launch(kernel: triton.runtime.Autotuner, grid, **args) -> None:
    """kernel[grid](**args), through the autotuner only the first time its key is seen; later calls
    launch the jitted kernel directly with the cached config (the autotuner's own per-call work —
    binding every argument into dicts, the pre-hook — is skipped)."""
    dtypes = tuple(str(value.dtype) for value in args.values() if isinstance(value, torch.Tensor))
    key = (kernel, *(args[name] for name in kernel.keys), *dtypes)
    config = _chosen_configs.get(key)
    if config is None:
        kernel[grid](**args)
        _chosen_configs[key] = kernel.best_config
    else:
        kernel.fn[grid](**args, **config.all_kwargs())


# Rows per program that split_count assumes of the skinny and expand-backward tiles (the autotuner may
# choose others; the split count must not depend on that choice).
_NOMINAL_BLOCK = 64


def _pieces_args(pieces: tuple[tuple[int, int], ...]) -> dict[str, int]:
    """SEGMENT_t / SLOT_t kernel arguments of up to MAX_SEGMENTS (segment, slot) pieces, padded."""
    segments, slots = zip(*pieces, *((0, 0),) * (MAX_SEGMENTS - len(pieces)), strict=True)
    return {f"SEGMENT_{t}": segments[t] for t in range(MAX_SEGMENTS)} | {
        f"SLOT_{t}": slots[t] for t in range(MAX_SEGMENTS)
    }


def _summed(partials: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out ← Σ_t partials[t] (fixed order), unless the kernel wrote ``out`` itself (``partials`` is ``out``)."""
    if partials is not out:
        out.copy_(partials.sum(0))
    return out


def skinny_matmul(
    p: torch.Tensor,
    q: torch.Tensor,
    out: torch.Tensor,
    scale: float = 1.0,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    mask_strides: tuple[int, int] = (0, 0),
    splits: int | None = None,
) -> torch.Tensor:
    """out[I, r] ← scale · (P ⊙ D / (1 - p)) Q for P [I, J], Q [J, r]; D at offset i·ms[0] + j·ms[1].

    The reduction over J runs in ``splits`` ranges (default: ``split_count``) whose fp32 partials
    [splits, I, r] are then summed in a fixed order. ``seed``: one-element int64 tensor on P's device
    (needed when p > 0).
    """
    (rows, inner), rank = p.shape, q.shape[1]
    if rows == 0:
        return out
    if inner == 0:
        return out.zero_()
    block_r = rank_block(rank)
    if splits is None:
        splits = split_count(inner, triton.cdiv(rows, _NOMINAL_BLOCK) * triton.cdiv(rank, block_r), p.device)
    target = out if splits == 1 else torch.empty(splits, rows, rank, device=p.device, dtype=torch.float32)
    tile = out if splits == 1 else target[0]
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_I"]), triton.cdiv(rank, block_r), splits)  # noqa: E731
    _launch(
        _skinny_matmul_kernel, grid,
        p_ptr=p, q_ptr=q, out_ptr=target, seed_ptr=seed if seed is not None else out,
        ROWS=rows, INNER=inner, RANK=rank, ROWS_BUCKET=triton.next_power_of_2(rows),
        INNER_BUCKET=triton.next_power_of_2(inner), LAYOUT=layout(p, q, tile),
        stride_pi=p.stride(0), stride_pj=p.stride(1), stride_qj=q.stride(0), stride_qr=q.stride(1),
        stride_oi=tile.stride(0), stride_or=tile.stride(1), split_step_o=0 if splits == 1 else target.stride(0),
        mask_stride_i=mask_strides[0], mask_stride_j=mask_strides[1],
        scale=scale, dropout_p=dropout_p,
        HAS_DROPOUT=dropout_p > 0, UPCAST=interpreting(), PRECISION=dot_precision(), BLOCK_R=block_r,
    )  # fmt: skip
    return _summed(target, out)


def expand_backward(
    grad: torch.Tensor,
    lora_b: torch.Tensor,
    shrunk: torch.Tensor | None,
    scale: float,
    grad_shrunk: torch.Tensor | None,
    grad_b: torch.Tensor | None,
    pieces: tuple[tuple[int, int], ...] = ((0, 0),),
    splits: int | None = None,
) -> None:
    """grad_shrunk ← dS and grad_b ← dB (either may be None: not computed), reading G once for both.

    G [M, n_g·w] (n_g output segments of width w), B [n·w, r], S [M, n·r]; piece (g, j) of ``pieces``
    (at most MAX_SEGMENTS) gives dS_j = s · G_g B_j → grad_shrunk[:, j·r : (j+1)·r] and
    dB_j = s · G_gᵀ S_j → grad_b[j·w : (j+1)·w], where G_g = G[:, g·w : (g+1)·w]. dB's reduction over
    M runs in ``splits`` row ranges (default: ``split_count``) whose fp32 partials are summed in a fixed
    order; dS alone runs one range per row block.
    """
    if not 1 <= len(pieces) <= MAX_SEGMENTS:
        raise ValueError(f"expand_backward takes 1 to {MAX_SEGMENTS} pieces, got {len(pieces)}")
    need_ds, need_db = grad_shrunk is not None, grad_b is not None
    (rows, _), (adapted_width, rank) = grad.shape, lora_b.shape
    width = adapted_width // len(pieces)
    if need_db and rows == 0:
        grad_b.zero_()
    if rows == 0 or not (need_ds or need_db):
        return
    block_r = rank_block(rank)
    if splits is None:
        splits = split_count(rows, triton.cdiv(rank, block_r) * len(pieces), grad.device) if need_db else None
    if need_db:  # fp32 partials [splits, n·w, r] from zero; a single fp32 range accumulates in dB itself
        direct = splits == 1 and grad_b.dtype == torch.float32 and grad_b.is_contiguous()
        partials = grad_b.zero_() if direct else grad_b.new_zeros(splits, *grad_b.shape, dtype=torch.float32)
        db = partials if direct else partials[0]
    ds, db, s = (grad_shrunk if need_ds else grad), (db if need_db else grad), (shrunk if need_db else grad)

    def grid(meta):  # dB: the fixed ranges; dS alone: one range per row block
        return (splits if need_db else triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(rank, block_r), len(pieces))

    _launch(
        _expand_backward_kernel, grid,
        g_ptr=grad, b_ptr=lora_b, s_ptr=s, ds_ptr=ds, db_ptr=db,  # unused outputs: any pointer
        M=rows, WIDTH=width, RANK=rank, M_BUCKET=triton.next_power_of_2(rows), PIECES=len(pieces),
        LAYOUT=layout(grad, lora_b, s, ds, db),
        stride_gm=grad.stride(0), stride_gn=grad.stride(1), stride_bn=lora_b.stride(0), stride_br=lora_b.stride(1),
        stride_sm=s.stride(0), stride_sr=s.stride(1), stride_dsm=ds.stride(0), stride_dsr=ds.stride(1),
        stride_dbn=db.stride(0), stride_dbr=db.stride(1),
        split_step_db=partials.stride(0) if need_db and not direct else 0,
        piece_step_g=width * grad.stride(1), piece_step_b=width * lora_b.stride(0), piece_step_s=rank * s.stride(1),
        piece_step_ds=rank * ds.stride(1), piece_step_db=width * db.stride(0),
        **_pieces_args(pieces), scale=scale,
        NEED_DS=need_ds, NEED_DB=need_db, UPCAST=interpreting(), PRECISION=dot_precision(), BLOCK_R=block_r,
    )  # fmt: skip
    if need_db:
        _summed(partials, grad_b)


def fused_matmul(
    p: torch.Tensor,
    q: torch.Tensor,
    bias: torch.Tensor | None,
    low: torch.Tensor,
    high: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    slots: tuple[int, ...] = (0,),
) -> torch.Tensor:
    """out[M, N] ← P Q + b + scale · U ⊙ D / (1 - p) for P [M, K], Q [K, N].

    ``slots[g]`` is the adapter slot of output segment g (N is split into len(slots) equal
    segments; -1: no adapter); slot j uses L [M, n·r] columns j·r … j·r + r - 1 and
    R [r, n·w] columns j·w … j·w + w - 1 (w = N / len(slots)). Default: one segment, U = L R.
    ``seed``: one-element int64 tensor on P's device (needed when p > 0).
    """
    (rows, inner), cols = p.shape, q.shape[1]
    if not 1 <= len(slots) <= MAX_SEGMENTS or cols % len(slots):
        raise ValueError(f"cannot split {cols} output columns into {len(slots)} segments (at most {MAX_SEGMENTS})")
    if rows == 0 or cols == 0:
        return out
    rank = low.shape[1] // max(1, sum(slot >= 0 for slot in slots))
    slot_args = (*slots, *(-1,) * (MAX_SEGMENTS - len(slots)))
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(cols, meta["BLOCK_N"]),)  # noqa: E731
    _launch(
        _fused_matmul_kernel, grid,
        p_ptr=p, q_ptr=q, bias_ptr=bias if bias is not None else out, l_ptr=low, r_ptr=high, out_ptr=out,
        seed_ptr=seed if seed is not None else out,
        M=rows, N=cols, K=inner, RANK=rank, M_BUCKET=triton.next_power_of_2(rows), LAYOUT=layout(p, q, low, high, out),
        SEGMENT=cols // len(slots), SLOT_0=slot_args[0], SLOT_1=slot_args[1], SLOT_2=slot_args[2],
        stride_pm=p.stride(0), stride_pk=p.stride(1), stride_qk=q.stride(0), stride_qn=q.stride(1),
        stride_lm=low.stride(0), stride_lr=low.stride(1), stride_rr=high.stride(0), stride_rn=high.stride(1),
        stride_om=out.stride(0), stride_on=out.stride(1),
        scale=scale, dropout_p=dropout_p,
        HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0, UPCAST=interpreting(),
        PRECISION=dot_precision(), BLOCK_R=rank_block(rank), GROUP=GROUP_M,
    )  # fmt: skip
    return out


@triton.jit
def _dropout_mask_kernel(out_ptr, seed_ptr, numel, dropout_p, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = keep_mask(tl.load(seed_ptr), offsets, dropout_p)
    tl.store(out_ptr + offsets, keep.to(out_ptr.dtype.element_ty), mask=offsets < numel)


def dropout_mask(rows: int, cols: int, dropout_p: float, seed: torch.Tensor) -> torch.Tensor:
    """The {0, 1} float mask D [rows, cols] that the kernels regenerate from ``seed`` (a one-element int64
    tensor; the mask is on its device), for the torch-side uses of D and for tests."""
    out = torch.empty(rows, cols, device=seed.device)
    block = 1024
    _dropout_mask_kernel[(triton.cdiv(out.numel(), block),)](out, seed, out.numel(), dropout_p, BLOCK=block)
    return out
