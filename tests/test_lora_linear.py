"""lora_linear (fused Triton kernels under the interpreter, and the torch path) against the reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from lora_checks import DEVICE, assert_close_scaled, check_against_reference

from kernels.backend import BACKENDS, use_backend
from kernels.lora_linear import folds_adapters, lora_linear, regenerate_mask
from kernels.reference import lora_linear_ref

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
        mask = regenerate_mask(rows, in_features, p, seed, x.device).view(x.shape) if p else None

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
    with use_backend(backend):
        first = regenerate_mask(200, 300, 0.3, seed=7, device=DEVICE)
        again = regenerate_mask(200, 300, 0.3, seed=7, device=DEVICE)
        other = regenerate_mask(200, 300, 0.3, seed=8, device=DEVICE)
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
    """Saved for backward: X, W, A, B and S only; the M × K dropout mask is regenerated."""
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
    expected = rows * in_features + out_features * in_features + rank * in_features + out_features * rank + rows * rank
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
    mask = regenerate_mask(rows, in_features, dropout_p, 7, x.device) if dropout_p else None

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
