"""The GEMMs whose reduction over M is split (fp32 partials, fixed-order sum): dS and dB in one pass over G
(``expand_backward``), and the skinny GEMM with its J split (dA), against torch, deterministic;
the split count, and the pruning of configs that spill registers."""

from __future__ import annotations

import pytest
import torch
import triton
from hypothesis import given
from hypothesis import strategies as st
from lora_checks import DEVICE, assert_close_scaled, mask_of

from kernels import lowrank_matmul as lm

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@st.composite
def expand_problems(draw):
    """Odd M (1 … 150: up to 5 interpreter row blocks), widths and ranks; 1 to 3 pieces on distinct
    segments in any slot order; explicit split counts, more than the row blocks included (empty ranges)."""
    segments = draw(st.integers(1, 3))
    adapted = draw(st.lists(st.integers(0, segments - 1), min_size=1, max_size=segments, unique=True))
    slots = draw(st.permutations(range(len(adapted))))
    return {
        "rows": draw(st.integers(1, 150)),
        "width": draw(st.integers(1, 40)),
        "rank": draw(st.integers(1, 20)),
        "segments": segments,
        "pieces": tuple(zip(adapted, slots, strict=True)),
        "splits": draw(st.sampled_from([None, 1, 2, 3, 7])),
        "needs": draw(st.sampled_from([(True, True), (True, False), (False, True)])),
        "transposed_grad": draw(st.booleans()),
    }


def expand_backward_ref(grad, lora_b, shrunk, scale, pieces, width, rank):
    """dS [M, n·r] and dB [n·w, r] piece by piece, in fp32."""
    grad, lora_b, shrunk = grad.float(), lora_b.float(), shrunk.float()
    grad_shrunk, grad_b = shrunk.new_zeros(shrunk.shape), lora_b.new_zeros(lora_b.shape)
    for g, j in pieces:
        segment = grad[:, g * width : (g + 1) * width]
        adapter, columns = slice(j * width, (j + 1) * width), slice(j * rank, (j + 1) * rank)
        grad_shrunk[:, columns] = scale * segment @ lora_b[adapter]
        grad_b[adapter] = scale * segment.t() @ shrunk[:, columns]
    return grad_shrunk, grad_b


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(problem=expand_problems())
def test_expand_backward_matches_torch(dtype, problem):
    torch.manual_seed(0)
    rows, width, rank, pieces = problem["rows"], problem["width"], problem["rank"], problem["pieces"]
    like = {"device": DEVICE, "dtype": dtype}
    shape = (rows, problem["segments"] * width)
    grad = torch.randn(*reversed(shape), **like).t() if problem["transposed_grad"] else torch.randn(*shape, **like)
    lora_b = torch.randn(len(pieces) * width, rank, **like)
    shrunk = torch.randn(rows, len(pieces) * rank, device=DEVICE)  # S is kept in fp32
    need_ds, need_db = problem["needs"]
    grad_shrunk = torch.full_like(shrunk, float("nan")) if need_ds else None
    grad_b = torch.full_like(lora_b, float("nan")) if need_db else None
    lm.expand_backward(grad, lora_b, shrunk, 0.5, grad_shrunk, grad_b, pieces, problem["splits"])

    expected_ds, expected_db = expand_backward_ref(grad, lora_b, shrunk, 0.5, pieces, width, rank)
    if need_ds:
        assert_close_scaled(grad_shrunk, expected_ds, dtype, "dS")
    if need_db:
        assert_close_scaled(grad_b, expected_db, dtype, "dB")


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("splits", [None, 1, 2, 5, 40])
def test_skinny_matmul_split_over_j_matches_torch(splits, dropout_p):
    """dAᵀ = Xdᵀ dS as the backward runs it: J = M = 97 rows (4 interpreter tiles), 40 ranges leave
    most of them empty; the mask is read through the swapped strides of the transposed X."""
    torch.manual_seed(0)
    rows, features, rank = 97, 21, 6
    x, grad_shrunk = torch.randn(rows, features, device=DEVICE), torch.randn(rows, rank, device=DEVICE)
    seed = torch.tensor([123], device=DEVICE)
    out = torch.empty(rank, features, device=DEVICE)
    lm.skinny_matmul(
        x.t(), grad_shrunk, out.t(), dropout_p=dropout_p, seed=seed, mask_strides=(1, features), splits=splits
    )
    kept = mask_of(rows, features, dropout_p, 123, "triton") if dropout_p else torch.ones_like(x)
    expected = ((x * kept / (1 - dropout_p)).t() @ grad_shrunk).t()
    assert_close_scaled(out, expected, torch.float32, "dA")


def test_split_reductions_are_deterministic():
    """No atomics: the same call gives the same bits (the split count depends on the shape alone)."""
    torch.manual_seed(0)
    grad, lora_b = torch.randn(150, 30, device=DEVICE), torch.randn(30, 8, device=DEVICE)
    shrunk = torch.randn(150, 8, device=DEVICE)
    results = []
    for _ in range(2):
        grad_shrunk, grad_b = torch.empty_like(shrunk), torch.empty_like(lora_b)
        lm.expand_backward(grad, lora_b, shrunk, 1.0, grad_shrunk, grad_b)
        grad_a_t = lm.skinny_matmul(grad.t(), grad_shrunk, torch.empty(30, 8, device=DEVICE))
        results.append((grad_shrunk, grad_b, grad_a_t))
    for first, second in zip(*results, strict=True):
        assert torch.equal(first, second)


def test_split_count_fills_the_target_without_short_ranges(monkeypatch):
    monkeypatch.setattr(lm, "_split_target", lambda device: (264, 128))
    assert lm.split_count(4096, 3, DEVICE) == 32  # 88 ranges would fill the target; 32 of 128 rows is the limit
    assert lm.split_count(1 << 20, 3, DEVICE) == 88  # enough rows: the target
    assert lm.split_count(100, 3, DEVICE) == 1  # fewer rows than one range
    assert lm.split_count(4096, 1000, DEVICE) == 1  # enough programs without splitting


def test_configs_that_spill_are_pruned():
    configs = [triton.Config({"BLOCK_M": m}) for m in (32, 64, 128)]
    spills = {32: 0, 64: 0, 128: 12}
    kept = lm.spill_free(configs, lambda config: spills[config.kwargs["BLOCK_M"]])
    assert [config.kwargs["BLOCK_M"] for config in kept] == [32, 64]


def test_when_every_config_spills_the_least_runs_with_a_warning():
    configs = [triton.Config({"BLOCK_M": m}) for m in (64, 128)]
    with pytest.warns(UserWarning, match="spills registers"):
        kept = lm.spill_free(configs, lambda config: config.kwargs["BLOCK_M"] // 16)
    assert [config.kwargs["BLOCK_M"] for config in kept] == [64]


def test_spill_pruner_compiles_each_config_for_the_call_at_hand(monkeypatch):
    """On a GPU the pruner compiles every config with the call's arguments and drops the spilling ones
    (faked here: the interpreter compiles nothing)."""
    compiled_with = []

    class Compiled:
        def __init__(self, spills: int) -> None:
            self.n_spills = -1
            self._spills = spills

        def _init_handles(self) -> None:
            self.n_spills = self._spills

    class FakeJit:
        def warmup(self, grid, **args):
            compiled_with.append(args)
            return Compiled(spills=args["BLOCK_M"] // 128)

    monkeypatch.setattr(lm, "interpreting", lambda: False)
    monkeypatch.setattr(lm, "_fake_kernel", type("Tuner", (), {"fn": FakeJit()})(), raising=False)
    prune = lm.spill_pruner("_fake_kernel")
    configs = [triton.Config({"BLOCK_M": m}, num_warps=4) for m in (64, 128)]
    kept = prune(configs, {"p_ptr": "P"}, M=7)
    assert [config.kwargs["BLOCK_M"] for config in kept] == [64]
    assert [(args["p_ptr"], args["M"], args["BLOCK_M"], args["num_warps"]) for args in compiled_with] == [
        ("P", 7, 64, 4),
        ("P", 7, 128, 4),
    ]
