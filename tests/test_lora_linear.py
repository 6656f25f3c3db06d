"""lora_linear (fused Triton kernels under the interpreter, and the torch path) against the reference."""

from __future__ import annotations

import threading

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given
from hypothesis import strategies as st
from lora_checks import DEVICE, assert_close_scaled, check_against_reference, mask_of

from kernels.backend import BACKENDS, select_backend, use_backend
from kernels.lora_linear import draw_seed, folds_adapters, lora_linear
from kernels.lora_qkv import lora_qkv
from kernels.lowrank_matmul import MAX_RANK_BLOCK, rank_block, tile_offsets
from kernels.merge import merge_weight
from kernels.reference import lora_linear_ref, lora_qkv_ref, merge_ref

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@st.composite
def lora_problems(draw):
    """Odd shapes (1 and non-multiples of the 32-wide interpreter tiles), r in 1…64, 2-D or 3-D x,
    contiguous or transposed x, with/without bias, with/without dropout."""
    rows, in_features, out_features = (draw(st.integers(1, 70)) for _ in range(3))
    rank = draw(st.integers(1, 64))
    batch = draw(st.sampled_from([None, 2]))
    return {
        "shape": (rows, in_features) if batch is None else (batch, rows, in_features),
        "out_features": out_features,
        "rank": rank,
        "transposed_x": draw(st.booleans()),
        "bias": draw(st.booleans()),
        "dropout_p": draw(st.sampled_from([0.0, 0.25])),
        "seed": draw(st.integers(0, 2**31 - 2)),
    }


def make_tensors(problem: dict, dtype: torch.dtype, device: torch.device = DEVICE):
    torch.manual_seed(problem["seed"] % 1000)
    *lead, in_features = problem["shape"]
    out_features, rank = problem["out_features"], problem["rank"]
    like = {"dtype": dtype, "device": device}
    if problem["transposed_x"]:  # a non-contiguous view with the same logical shape
        x = torch.randn(*lead[:-1], in_features, lead[-1], **like).transpose(-1, -2)
    else:
        x = torch.randn(*lead, in_features, **like)
    weight = torch.randn(out_features, in_features, **like) / in_features**0.5
    bias = torch.randn(out_features, **like) if problem["bias"] else None
    lora_a = torch.randn(rank, in_features, **like) / in_features**0.5
    lora_b = torch.randn(out_features, rank, **like) / rank**0.5
    return x.requires_grad_(), weight, bias, lora_a.requires_grad_(), lora_b.requires_grad_()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(problem=lora_problems())
def test_forward_and_gradients_match_reference(backend, dtype, problem):
    x, weight, bias, lora_a, lora_b = make_tensors(problem, dtype)
    p, seed, scale = problem["dropout_p"], problem["seed"], 1.5
    rows, in_features = x.reshape(-1, x.shape[-1]).shape
    with use_backend(backend):
        mask = mask_of(rows, in_features, p, seed, backend).view(x.shape) if p else None

        def op(*tensors):
            return lora_linear(*tensors, scale, dropout_p=p, training=True, seed=seed)

        def reference(*tensors):
            return lora_linear_ref(*tensors, scale, dropout_p=p, dropout_mask=mask)

        check_against_reference(op, reference, x, weight, bias, lora_a, lora_b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_trainable_bias_gets_its_gradient(backend):
    problem = {"shape": (9, 13), "out_features": 11, "rank": 3, "transposed_x": False, "bias": True}
    x, weight, bias, lora_a, lora_b = make_tensors(problem | {"seed": 1}, torch.float32)
    bias.requires_grad_()
    with use_backend(backend):
        check_against_reference(
            lambda *t: lora_linear(*t, 0.5), lambda *t: lora_linear_ref(*t, 0.5), x, weight, bias, lora_a, lora_b
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_mask_is_seeded_and_keeps_one_minus_p(backend):
    first, again, other = (mask_of(200, 300, 0.3, seed, backend) for seed in (7, 7, 8))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert set(first.unique().tolist()) == {0.0, 1.0}
    assert abs(first.mean().item() - 0.7) < 0.01  # 60k Bernoulli draws: std 0.0019


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_is_off_in_eval_and_varies_in_training(backend):
    x, weight, bias, lora_a, lora_b = make_tensors(
        {"shape": (8, 16), "out_features": 12, "rank": 4, "transposed_x": False, "bias": True, "seed": 3},
        torch.float32,
    )
    with use_backend(backend), torch.no_grad():
        evaluated = lora_linear(x, weight, bias, lora_a, lora_b, 2.0, dropout_p=0.5, training=False)
        plain = lora_linear_ref(x, weight, bias, lora_a, lora_b, 2.0)
        first = lora_linear(x, weight, bias, lora_a, lora_b, 2.0, dropout_p=0.5, training=True)
        second = lora_linear(x, weight, bias, lora_a, lora_b, 2.0, dropout_p=0.5, training=True)
    torch.testing.assert_close(evaluated, plain)
    assert not torch.allclose(first, second)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_b_is_the_base_layer(backend):
    x, weight, bias, lora_a, lora_b = make_tensors(
        {"shape": (5, 33), "out_features": 17, "rank": 2, "transposed_x": False, "bias": True, "seed": 4},
        torch.float32,
    )
    with use_backend(backend), torch.no_grad():
        out = lora_linear(x, weight, bias, lora_a, torch.zeros_like(lora_b), 1.0)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, weight, bias), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_saves_no_mask(backend):
    """Saved for backward: X, W, A, B, S and the seed only; the M × K dropout mask is regenerated."""
    rows, in_features, out_features, rank = 64, 48, 40, 4
    x, weight, bias, lora_a, lora_b = make_tensors(
        {"shape": (rows, in_features), "out_features": out_features, "rank": rank, "transposed_x": False,
         "bias": True, "seed": 5},
        torch.float32,
    )  # fmt: skip
    saved: list[int] = []
    with (
        use_backend(backend),
        torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t),
    ):
        lora_linear(x, weight, bias, lora_a, lora_b, 1.0, dropout_p=0.5, training=True)
    seed = 1  # the one-element seed tensor
    adapter = rank * in_features + out_features * rank
    expected = rows * in_features + out_features * in_features + adapter + rows * rank + seed
    assert sum(saved) == expected


@pytest.mark.parametrize(("rows", "in_features", "dropout_p"), [(48, 12, 0.0), (12, 48, 0.0), (48, 12, 0.5)])
def test_torch_path_folds_the_adapter_only_where_it_is_exact_and_cheaper(rows, in_features, dropout_p):
    """Y = X (W + s·BA)ᵀ + b when K < M and dX = G (W + s·BA) when N < M (fp32, no dropout), else
    the rank-r update added after; all equal the reference, in training and in inference (no_grad:
    no autograd node)."""
    x, weight, bias, lora_a, lora_b = make_tensors(
        {"shape": (rows, in_features), "out_features": 20, "rank": 3, "transposed_x": False, "bias": True, "seed": 6},
        torch.float32,
    )
    assert folds_adapters(rows, in_features, x.dtype, dropout_p) == (in_features < rows and dropout_p == 0)
    assert folds_adapters(rows, 20, x.dtype, dropout_p) == (rows > 20 and dropout_p == 0)  # backward: N < M
    assert not folds_adapters(rows, in_features, torch.float16, dropout_p)
    mask = mask_of(rows, in_features, dropout_p, 7, "torch") if dropout_p else None

    def op(*tensors):
        return lora_linear(*tensors, 1.5, dropout_p=dropout_p, training=True, seed=7)

    def reference(*tensors):
        return lora_linear_ref(*tensors, 1.5, dropout_p=dropout_p, dropout_mask=mask)

    with use_backend("torch"):
        check_against_reference(op, reference, x, weight, bias, lora_a, lora_b)
        with torch.no_grad():
            inferred = op(x, weight, bias, lora_a, lora_b)
            assert inferred.grad_fn is None
            assert_close_scaled(inferred, reference(x, weight, bias, lora_a, lora_b), torch.float32, "output")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x, weight, bias, lora_a, lora_b = make_tensors(
        {"shape": (0, 8), "out_features": 6, "rank": 2, "transposed_x": False, "bias": True, "seed": 6},
        torch.float32,
    )
    with use_backend(backend):
        out = lora_linear(x, weight, bias, lora_a, lora_b, 1.0)
        out.sum().backward()
    assert out.shape == (0, 6)
    assert torch.equal(lora_a.grad, torch.zeros_like(lora_a)) and torch.equal(lora_b.grad, torch.zeros_like(lora_b))


def _valid():
    """Valid CPU inputs: argument checks run before any kernel, on any device."""
    return make_tensors(
        {"shape": (4, 8), "out_features": 6, "rank": 2, "transposed_x": False, "bias": True, "seed": 0},
        torch.float32,
        torch.device("cpu"),
    )


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: {**t, "x": torch.randn(4, 7)}, r"x must have shape \[\.\.\., 8\]"),
        (lambda t: {**t, "lora_a": torch.randn(2, 9)}, r"lora_a must have shape"),
        (lambda t: {**t, "lora_b": torch.randn(6, 3)}, r"lora_b must have shape \[6, 2\]"),
        (lambda t: {**t, "bias": torch.randn(5)}, r"bias must have shape \[6\]"),
        (lambda t: {**t, "weight": torch.randn(6, 8, 1)}, r"must be 2-D"),
        (lambda t: {**t, "lora_b": t["lora_b"].double()}, r"lora_b has dtype torch.float64 but x has torch.float32"),
        (lambda t: {**t, "weight": t["weight"].to("meta")}, r"weight is on meta but x is on cpu"),
        (lambda t: {**t, "weight": t["weight"].clone().requires_grad_()}, r"frozen"),
    ],
)
def test_bad_input_names_the_problem(mutate, message):
    x, weight, bias, lora_a, lora_b = _valid()
    args = mutate({"x": x, "weight": weight, "bias": bias, "lora_a": lora_a, "lora_b": lora_b})
    with pytest.raises(ValueError, match=message):
        lora_linear(**args, scale=1.0)


@pytest.mark.parametrize("dropout_p", [-0.1, 1.0])
def test_bad_dropout_probability(dropout_p):
    with pytest.raises(ValueError, match="dropout_p must be in"):
        lora_linear(*_valid(), scale=1.0, dropout_p=dropout_p, training=True)


def test_fp32_ieee_launches_get_fma_tiles_and_others_tensor_core_tiles():
    from kernels import lowrank_matmul as lm

    configs = lm._tile_configs(lm._GPU_TILES + lm._FMA_TILES)
    fp32, bf16 = torch.zeros(1), torch.zeros(1, dtype=torch.bfloat16)

    def tiles(p_ptr: torch.Tensor, precision: str) -> set[tuple[int, int]]:
        kept = lm.prune_fused_configs(configs, {"p_ptr": p_ptr}, PRECISION=precision)
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in kept}

    assert tiles(fp32, "ieee") == {(m, n) for m, n, *_ in lm._FMA_TILES}
    assert tiles(fp32, "tf32") == tiles(bf16, "ieee") == {(m, n) for m, n, *_ in lm._GPU_TILES}


def test_autotune_switch_keeps_one_tile_per_dot_kind(monkeypatch):
    from kernels import lowrank_matmul as lm

    assert lm._swept(lm._GPU_TILES) == lm._GPU_TILES
    monkeypatch.setenv("LOWRANK_AUTOTUNE", "0")
    assert lm._swept(lm._GPU_TILES) == lm._GPU_TILES[:1]
    assert lm._swept(lm._FMA_TILES) == lm._FMA_TILES[:1]


@pytest.mark.parametrize("where", ["after the block", "on another thread"])
def test_backward_runs_the_backend_its_forward_ran(where):
    """Forward forced onto the torch path, backward where the default rule picks Triton (outside the
    use_backend block, or on a fresh thread, whose context has no forced backend): dX and dA must still
    use the torch path's dropout mask."""
    problem = {"shape": (9, 14), "out_features": 10, "rank": 3, "transposed_x": False, "bias": False, "seed": 11}
    x, weight, bias, lora_a, lora_b = make_tensors(problem, torch.float32)
    grad_out = torch.randn(9, 10, device=DEVICE)
    with use_backend(None):
        with use_backend("torch"):
            out = lora_linear(x, weight, bias, lora_a, lora_b, 1.5, dropout_p=0.5, training=True, seed=11)
        assert select_backend(DEVICE) == "triton"  # what the backward would pick afresh
        if where == "after the block":
            out.backward(grad_out)
        else:
            thread = threading.Thread(target=out.backward, args=(grad_out,))
            thread.start()
            thread.join()
    mask = mask_of(9, 14, 0.5, 11, "torch")
    upcast = [t.detach().clone().requires_grad_() for t in (x, lora_a, lora_b)]
    expected = lora_linear_ref(upcast[0], weight, bias, upcast[1], upcast[2], 1.5, dropout_p=0.5, dropout_mask=mask)
    expected.backward(grad_out)
    for name, tensor, reference in zip(("x", "lora_a", "lora_b"), (x, lora_a, lora_b), upcast, strict=True):
        assert_close_scaled(tensor.grad, reference.grad, torch.float32, f"grad of {name}")


@pytest.mark.parametrize(("rank", "dropout_p"), [(128, 0.0), (128, 0.3)])
def test_ranks_wider_than_the_rank_block_loop_over_chunks(rank, dropout_p):
    """r = 128 is two 64-wide rank chunks (the block is capped); output and gradients still match."""
    assert rank_block(rank) == MAX_RANK_BLOCK
    problem = {"shape": (6, 19), "out_features": 13, "rank": rank, "transposed_x": False, "bias": True, "seed": 12}
    x, weight, bias, lora_a, lora_b = make_tensors(problem, torch.float32)
    mask = mask_of(6, 19, dropout_p, 12, "triton") if dropout_p else None
    with use_backend("triton"):
        check_against_reference(
            lambda *t: lora_linear(*t, 0.5, dropout_p=dropout_p, training=True, seed=12),
            lambda *t: lora_linear_ref(*t, 0.5, dropout_p=dropout_p, dropout_mask=mask),
            x, weight, bias, lora_a, lora_b,
        )  # fmt: skip
        merged = merge_weight(weight, lora_a.detach(), lora_b.detach(), 0.5)
    assert_close_scaled(merged, merge_ref(weight, lora_a.detach(), lora_b.detach(), 0.5), torch.float32, "merged")


@triton.jit
def _offsets_kernel(out_ptr, first_row, stride_row, BLOCK: tl.constexpr):
    rows, cols = first_row + tl.arange(0, BLOCK), tl.arange(0, BLOCK)
    tl.store(out_ptr + tile_offsets(cols, cols, BLOCK, 1), tile_offsets(rows, cols, stride_row, 1))


def test_element_offsets_are_int64_past_two_to_the_31():
    """Row 2²⁰ of a K = 2048 matrix starts at element 2³¹: an int32 offset would wrap negative.
    Every kernel addresses its tiles through tile_offsets (the full-size shape runs in bench/gpu.sh)."""
    first_row, stride, block = 2**20, 2048, 16
    out = torch.empty(block, block, dtype=torch.int64, device=DEVICE)
    _offsets_kernel[(1,)](out, first_row, stride, BLOCK=block)
    rows, cols = torch.arange(block, device=DEVICE) + first_row, torch.arange(block, device=DEVICE)
    assert torch.equal(out, rows[:, None] * stride + cols[None, :])
    assert out.min() >= 2**31


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_seed_is_a_device_tensor_repeatable_under_manual_seed(backend):
    seed = draw_seed(DEVICE)
    assert seed.device == DEVICE and seed.dtype == torch.int64 and seed.shape == (1,)
    x, weight, bias, lora_a, lora_b = make_tensors(
        {"shape": (8, 16), "out_features": 12, "rank": 4, "transposed_x": False, "bias": True, "seed": 3},
        torch.float32,
    )
    outputs = []
    with use_backend(backend), torch.no_grad():
        for _ in range(2):
            torch.manual_seed(5)
            outputs.append(lora_linear(x, weight, bias, lora_a, lora_b, 2.0, dropout_p=0.5, training=True))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


def test_reference_backend_runs_the_unfused_algebra():
    """The unmerged side of train.py's merge check: kernels/reference.py bit for bit, not the torch path,
    which here (fp32, no dropout, K < M) folds W + s · B A exactly as merging does."""
    x, weight, bias, lora_a, lora_b = make_tensors(
        {"shape": (48, 12), "out_features": 21, "rank": 3, "transposed_x": False, "bias": True, "seed": 13},
        torch.float32,
    )
    assert folds_adapters(48, 12, torch.float32, 0.0)
    with use_backend("reference"), torch.no_grad():
        out = lora_linear(x, weight, bias, lora_a, lora_b, 1.5)
        qkv = lora_qkv(x, weight, bias, lora_a, lora_b[:7], 1.5, ("k",))
    assert torch.equal(out, lora_linear_ref(x, weight, bias, lora_a, lora_b, 1.5))
    assert torch.equal(qkv, lora_qkv_ref(x, weight, bias, lora_a, lora_b[:7], 1.5, ("k",)))
