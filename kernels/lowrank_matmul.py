"""The two Triton GEMMs every LoRA op is built from, with their launchers.

* ``skinny_matmul``: out[I, r] = scale · (P ⊙ D / (1 - p))[I, J] · Q[J, r], rank-wide output,
  optional dropout mask D regenerated on the fly from a seed (never stored).
  Serves S = Xd Aᵀ, dS = s · G B, dA = dSᵀ Xd (computed as dAᵀ = Xdᵀ dS) and dB = s · Gᵀ S.
  Several equal "pieces" (the q, k, v adapters of dS_j = s · G_g B_j and dB_j = s · G_gᵀ S_j)
  run in one launch, one grid column per piece.
* ``fused_matmul``: out[M, N] = P[M, K] · Q[K, N] + b[N] + scale · (L[M, r] · R[r, N]) ⊙ D / (1 - p),
  the base GEMM with the low-rank "expand" added to the same fp32 accumulator in the epilogue:
  one pass over the output instead of three. Serves Y (forward) and dX (backward). The
  output may be split into segments (q, k, v) that each read only their own slice of L, R.

Operands are passed as (possibly strided) 2-D views, so transposes cost nothing. Every
element offset is computed in int64 (``tile_offsets``): M·K passes 2³¹ at K = 2048 and
M ≥ 1,048,576 rows. The rank dimension is tiled in chunks of at most ``MAX_RANK_BLOCK``.
Autotuning is keyed on the fixed sizes (N, K, r), the operand dtypes (the autotuner adds
them), the dot precision, the memory layout, dropout and bias, and on the varying M rounded
up to a power of two, so a new batch size retunes at most once per octave; ``LOWRANK_AUTOTUNE=0``
turns the sweep off (one config per dot kind). After the first call for a key, launches skip
the autotuner and run the jitted kernel with the chosen config (``_launch``).
The dropout mask of element (m, k) of X is ``keep_mask(seed, m · K + k, p)``, with the seed
read from a one-element device tensor (a CUDA graph replays its drawing, so each replay
gets a new mask); every kernel that needs it regenerates it from the same (seed, offset),
so forward and backward agree without an M × K mask in memory.
"""

from __future__ import annotations

import os

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
# Programs along M that share a band of Q tiles in L2 ("grouped ordering").
GROUP_M = 8
# Output segments with their own adapter in one fused GEMM: q, k, v of a fused projection.
MAX_SEGMENTS = 3


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
    key=["ROWS_BUCKET", "INNER_BUCKET", "RANK", "PIECES", "LAYOUT", "PRECISION", "HAS_DROPOUT"],
)
@triton.jit
def _skinny_matmul_kernel(
    p_ptr, q_ptr, out_ptr, seed_ptr,
    ROWS, INNER, RANK, ROWS_BUCKET, INNER_BUCKET, PIECES, LAYOUT,
    stride_pi, stride_pj, stride_qj, stride_qr, stride_oi, stride_or,
    mask_stride_i, mask_stride_j,
    piece_step_p, piece_step_q, piece_step_o, SEGMENT_0, SEGMENT_1, SEGMENT_2, SLOT_0, SLOT_1, SLOT_2,
    scale, dropout_p,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):  # fmt: skip
    """out[i, r] = scale · Σ_j (P[i, j] · D[i, j] / (1 - p)) · Q[j, r]; D's offset is i·msi + j·msj.

    Grid (row blocks, rank chunks, pieces): one program owns BLOCK_I output rows × BLOCK_R rank
    columns and loops over J. Piece t (g = SEGMENT_t, j = SLOT_t) reads P from element
    g · piece_step_p on, Q from j · piece_step_q on, and writes out from j · piece_step_o on
    (pieces run without dropout). Q tiles are cast to P's dtype so that tl.dot sees one dtype
    (fp32 accumulation).
    """
    piece = tl.program_id(2)
    segment = tl.where(piece == 0, SEGMENT_0, tl.where(piece == 1, SEGMENT_1, SEGMENT_2)).to(tl.int64)
    slot = tl.where(piece == 0, SLOT_0, tl.where(piece == 1, SLOT_1, SLOT_2)).to(tl.int64)
    p_ptr += segment * piece_step_p
    q_ptr += slot * piece_step_q
    out_ptr += slot * piece_step_o
    offs_i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_I, BLOCK_R), dtype=tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    for j0 in range(0, INNER, BLOCK_J):
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
    configs=_fused_configs(),
    key=["M_BUCKET", "N", "K", "RANK", "LAYOUT", "PRECISION", "HAS_BIAS", "HAS_DROPOUT"],
    prune_configs_by={"early_config_prune": prune_fused_configs},
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


def skinny_matmul(
    p: torch.Tensor,
    q: torch.Tensor,
    out: torch.Tensor,
    scale: float = 1.0,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    mask_strides: tuple[int, int] = (0, 0),
    pieces: tuple[tuple[int, int], ...] = ((0, 0),),
    piece_steps: tuple[int, int, int] = (0, 0, 0),
) -> torch.Tensor:
    """out[I, r] ← scale · (P ⊙ D / (1 - p)) Q for P [I, J], Q [J, r]; D at offset i·ms[0] + j·ms[1].

    ``pieces`` (segment g, slot j) each compute that product on P shifted by g · piece_steps[0]
    elements, Q by j · piece_steps[1] and out by j · piece_steps[2], all in one launch (no dropout
    with several pieces). ``seed``: one-element int64 tensor on P's device (needed when p > 0).
    """
    (rows, inner), rank = p.shape, q.shape[1]
    if not 1 <= len(pieces) <= MAX_SEGMENTS or (dropout_p > 0 and len(pieces) > 1):
        raise ValueError(f"skinny_matmul takes 1 to {MAX_SEGMENTS} pieces, and one with dropout; got {len(pieces)}")
    if rows == 0:
        return out
    if inner == 0:
        return out.zero_()
    segments, slots = zip(*pieces, *((0, 0),) * (MAX_SEGMENTS - len(pieces)), strict=True)
    block_r = rank_block(rank)
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_I"]), triton.cdiv(rank, block_r), len(pieces))  # noqa: E731
    _launch(
        _skinny_matmul_kernel, grid,
        p_ptr=p, q_ptr=q, out_ptr=out, seed_ptr=seed if seed is not None else out,
        ROWS=rows, INNER=inner, RANK=rank, ROWS_BUCKET=triton.next_power_of_2(rows),
        INNER_BUCKET=triton.next_power_of_2(inner), PIECES=len(pieces), LAYOUT=layout(p, q, out),
        stride_pi=p.stride(0), stride_pj=p.stride(1), stride_qj=q.stride(0), stride_qr=q.stride(1),
        stride_oi=out.stride(0), stride_or=out.stride(1),
        mask_stride_i=mask_strides[0], mask_stride_j=mask_strides[1],
        piece_step_p=piece_steps[0], piece_step_q=piece_steps[1], piece_step_o=piece_steps[2],
        SEGMENT_0=segments[0], SEGMENT_1=segments[1], SEGMENT_2=segments[2],
        SLOT_0=slots[0], SLOT_1=slots[1], SLOT_2=slots[2],
        scale=scale, dropout_p=dropout_p,
        HAS_DROPOUT=dropout_p > 0, UPCAST=interpreting(), PRECISION=dot_precision(), BLOCK_R=block_r,
    )  # fmt: skip
    return out


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
