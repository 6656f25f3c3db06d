"""The LoRA bank op (kernels/bank_matmul.py) on both backends (Triton under the interpreter, torch) against a
per-row reference loop in fp64: output and the gradients of x, A, B and b; one adapter is the LoRA op; −1
rows are the base; permuted or interleaved rows give the same rows; unused adapters and rank padding get
zero gradients; the segment metadata; the custom ops (opcheck) and torch.compile without a graph break."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from lora_checks import DEVICE, assert_close_scaled

from kernels.backend import BACKENDS, use_backend
from kernels.bank_matmul import bank_backward_op, bank_forward_op, bank_lora, segments_of
from kernels.lora_linear import lora_linear
from kernels.lora_qkv import lora_qkv, qkv_slots
from kernels.reference import lora_linear_ref, lora_qkv_ref

DTYPES = (torch.float32, torch.bfloat16)
LAYOUTS = {"linear": None, "qkv (k, v)": ("k", "v"), "qkv (q, k, v)": ("q", "k", "v")}


def make_bank(ranks, projections, in_features, width, bias, dtype, seed=0):
    """(W, b, A [n, P·R, K], B [n, P·w, R], scales [n], slots): adapter i of rank ranks[i] zero-padded to R = max."""
    torch.manual_seed(seed)
    like = {"dtype": dtype, "device": DEVICE}
    adapted, segments = (1, 1) if projections is None else (len(projections), 3)
    out_features, rank = segments * width, max(ranks)
    weight = torch.randn(out_features, in_features, **like) / max(1, in_features) ** 0.5
    bias_ = torch.randn(out_features, **like).requires_grad_() if bias else None
    lora_a = torch.zeros(len(ranks), adapted * rank, in_features, **like)
    lora_b = torch.zeros(len(ranks), adapted * width, rank, **like)
    for i, r in enumerate(ranks):
        for p in range(adapted):
            lora_a[i, p * rank : p * rank + r] = torch.randn(r, in_features, **like) / max(1, in_features) ** 0.5
        lora_b[i, :, :r] = torch.randn(adapted * width, r, **like) / r**0.5
    scales = torch.tensor([2.0 / r for r in ranks], device=DEVICE)
    slots = (0,) if projections is None else qkv_slots(projections)
    return weight, bias_, lora_a.requires_grad_(), lora_b.requires_grad_(), scales, slots


def per_row_reference(x, weight, bias, lora_a, lora_b, scales, ids, projections):
    """Each row through its own adapter's reference (the base alone for −1), in fp64, one row at a time."""
    rows = []
    for row, i in zip(x.reshape(-1, x.shape[-1]), ids.tolist(), strict=True):
        if i < 0:
            rows.append(F.linear(row, weight, bias))
        elif projections is None:
            rows.append(lora_linear_ref(row, weight, bias, lora_a[i], lora_b[i], scales[i].item()))
        else:
            rows.append(lora_qkv_ref(row, weight, bias, lora_a[i], lora_b[i], scales[i].item(), projections))
    return torch.stack(rows).view(*x.shape[:-1], -1)


def run_both(x, weight, bias, lora_a, lora_b, scales, ids, slots, projections, backend):
    """(op's output, its grads, reference output, reference grads) for the same random output gradient; grads of
    (x, A, B, b), the last None without a bias."""
    leaves = [t for t in (x, lora_a, lora_b, bias) if t is not None]
    for t in leaves:
        t.grad = None
    with use_backend(backend):
        out = bank_lora(x, weight, bias, lora_a, lora_b, scales, ids, slots)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    upcast = [None if t is None else t.detach().double().requires_grad_() for t in (x, lora_a, lora_b, bias)]
    expected = per_row_reference(upcast[0], weight.double(), upcast[3], upcast[1], upcast[2], scales, ids, projections)
    expected.backward(grad_out.double())
    grads = [None if t is None else t.grad for t in (x, lora_a, lora_b, bias)]
    return out, grads, expected, [None if t is None else t.grad for t in upcast]


@st.composite
def bank_problems(draw):
    """1 to 4 adapters of mixed ranks 1 … 9, a plain linear or a fused qkv with 1 to 3 adapted projections, odd
    K and w (none a multiple of a block), 1 to 70 rows (up to three 32-row blocks of one adapter) as a 2-D or
    (contiguous or transposed) 3-D x, ids in −1 … n − 1 in any order and mix."""
    adapters = draw(st.integers(1, 4))
    rows = draw(st.integers(1, 70))
    return {
        "ranks": draw(st.lists(st.integers(1, 9), min_size=adapters, max_size=adapters)),
        "projections": draw(st.sampled_from([None, ("q",), ("q", "v"), ("q", "k", "v")])),
        "in_features": draw(st.integers(1, 40)),
        "width": draw(st.integers(1, 20)),
        "layout": draw(st.sampled_from(["2-D", "3-D", "3-D transposed"])),
        "ids": draw(st.lists(st.integers(-1, adapters - 1), min_size=rows, max_size=rows)),
        "bias": draw(st.booleans()),
    }


def make_x(rows: int, in_features: int, layout: str, dtype: torch.dtype) -> torch.Tensor:
    """x of ``rows`` rows of K features: [rows, K], [1, rows, K], or that as a transposed (strided) view."""
    like = {"dtype": dtype, "device": DEVICE}
    if layout == "2-D":
        return torch.randn(rows, in_features, **like).requires_grad_()
    if layout == "3-D":
        return torch.randn(1, rows, in_features, **like).requires_grad_()
    return torch.randn(1, in_features, rows, **like).transpose(1, 2).detach().requires_grad_()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=min(8, settings().max_examples))  # few: each is a forward and backward (4 on a GPU)
@given(problem=bank_problems())
def test_bank_op_matches_a_per_row_loop(backend, dtype, problem):
    """Output and every gradient; the unused adapters, and each adapter's rank padding, get exactly zero."""
    ranks, projections = problem["ranks"], problem["projections"]
    weight, bias, lora_a, lora_b, scales, slots = make_bank(
        ranks, projections, problem["in_features"], problem["width"], problem["bias"], dtype
    )
    x = make_x(len(problem["ids"]), problem["in_features"], problem["layout"], dtype)
    ids = torch.tensor(problem["ids"], device=DEVICE)
    out, grads, expected, expected_grads = run_both(
        x, weight, bias, lora_a, lora_b, scales, ids, slots, projections, backend
    )
    assert_close_scaled(out, expected, dtype, "output")
    for name, got, want in zip(("x", "A", "B", "bias"), grads, expected_grads, strict=True):
        if want is not None:
            assert_close_scaled(got, want, dtype, f"grad of {name}")
    grad_a, grad_b = grads[1], grads[2]
    for i in set(range(len(ranks))) - set(problem["ids"]):
        assert not grad_a[i].any() and not grad_b[i].any(), f"adapter {i} has no rows but got a gradient"
    rank, adapted = max(ranks), lora_a.shape[1] // max(ranks)
    for i, r in enumerate(ranks):
        assert not grad_b[i, :, r:].any(), f"adapter {i}'s padded columns of B got a gradient"
        for p in range(adapted):
            assert not grad_a[i, p * rank + r : (p + 1) * rank].any(), f"adapter {i}'s padded rows of A got one"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("projections", [None, ("q", "v")], ids=["linear", "qkv (q, v)"])
def test_one_adapter_is_the_lora_op(backend, projections):
    """n = 1 with every row on it: the output and gradients of kernels/lora_linear.py's op (lora_linear, lora_qkv)."""
    weight, bias, lora_a, lora_b, scales, slots = make_bank([5], projections, 19, 13, True, torch.float32)
    x = torch.randn(3, 17, 19, device=DEVICE, requires_grad=True)  # 51 rows: two row blocks
    grad_out = torch.randn(3, 17, weight.shape[0], device=DEVICE)
    ids, results = torch.zeros(51, dtype=torch.long, device=DEVICE), []
    with use_backend(backend):
        for through_bank in (True, False):
            leaves = (x, bias, lora_a, lora_b)
            for t in leaves:
                t.grad = None
            if through_bank:
                out = bank_lora(x, weight, bias, lora_a, lora_b, scales, ids, slots)
            elif projections is None:
                out = lora_linear(x, weight, bias, lora_a[0], lora_b[0], scales[0].item())
            else:
                out = lora_qkv(x, weight, bias, lora_a[0], lora_b[0], scales[0].item(), projections)
            out.backward(grad_out)
            results.append((out.detach(), *(t.grad.clone() for t in leaves)))
    for name, got, want in zip(("output", "x", "bias", "A", "B"), *results, strict=True):
        assert_close_scaled(got, want, torch.float32, f"{name}: bank vs LoRA op")


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_padded_rank_is_its_adapter_alone(backend):
    """Ranks 1, 4 and 7 in one bank (padded to 7), rows interleaved: each adapter's rows and gradients are
    lora_linear's on those rows with that adapter's own unpadded A_i [r_i, K], B_i [N, r_i]."""
    ranks = [1, 4, 7]
    weight, _, lora_a, lora_b, scales, _ = make_bank(ranks, None, 17, 11, False, torch.float32)
    x = torch.randn(40, 17, device=DEVICE, requires_grad=True)
    ids = torch.arange(40, device=DEVICE) % 3
    grad_out = torch.randn(40, 11, device=DEVICE)
    with use_backend(backend):
        out = bank_lora(x, weight, None, lora_a, lora_b, scales, ids, (0,))
        out.backward(grad_out)
        for i, r in enumerate(ranks):
            rows = ids == i
            own = [t.detach().clone().requires_grad_() for t in (x[rows], lora_a[i, :r], lora_b[i, :, :r])]
            alone = lora_linear(own[0], weight, None, own[1], own[2], scales[i].item())
            alone.backward(grad_out[rows])
            assert_close_scaled(out[rows], alone, torch.float32, f"adapter {i}'s rows")
            assert_close_scaled(x.grad[rows], own[0].grad, torch.float32, f"grad of adapter {i}'s rows of x")
            assert_close_scaled(lora_a.grad[i, :r], own[1].grad, torch.float32, f"grad of A_{i}")
            assert_close_scaled(lora_b.grad[i, :, :r], own[2].grad, torch.float32, f"grad of B_{i}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_base_rows_are_exactly_the_base(backend):
    """−1 rows of a mixed batch: the base output and dX = G W, bit for bit; a batch of only −1 rows: the base
    layer, and no adapter gets a gradient."""
    weight, bias, lora_a, lora_b, scales, slots = make_bank([3, 6], ("q", "k", "v"), 12, 9, True, torch.float32)
    x = torch.randn(30, 12, device=DEVICE, requires_grad=True)
    base_only = torch.full((30,), -1, device=DEVICE)
    for ids in (torch.tensor([-1, 0, 1] * 10, device=DEVICE), base_only):
        lora_a.grad = lora_b.grad = x.grad = None
        with use_backend(backend):
            out = bank_lora(x, weight, bias, lora_a, lora_b, scales, ids, slots)
        grad_out = torch.randn_like(out)
        out.backward(grad_out)
        base = ids < 0
        assert torch.equal(out[base], F.linear(x, weight, bias)[base])
        assert torch.equal(x.grad[base], (grad_out @ weight)[base])
    assert not lora_a.grad.any() and not lora_b.grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("projections", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_interleaved_rows_equal_the_same_rows_grouped(backend, projections):
    """Rows grouped by adapter, then the same rows interleaved (and once more in another random order): each
    row's output and dX follow it, and dA, dB (the same sums in another order) agree."""
    weight, bias, lora_a, lora_b, scales, slots = make_bank([2, 5, 3], projections, 21, 10, True, torch.float32)
    grouped = torch.tensor([0] * 9 + [1] * 70 + [2] * 4 + [-1] * 7, device=DEVICE)  # skewed: 70 rows are 3 blocks
    x = torch.randn(len(grouped), 21, device=DEVICE)
    grad_out = torch.randn(len(grouped), weight.shape[0], device=DEVICE)
    interleaved = torch.argsort(torch.arange(len(grouped)) % 5, stable=True)  # mixes every adapter's rows
    results = []
    for order in (torch.arange(len(grouped)), interleaved, torch.randperm(len(grouped))):
        order = order.to(DEVICE)
        leaf = x[order].requires_grad_()
        lora_a.grad = lora_b.grad = None
        with use_backend(backend):
            out = bank_lora(leaf, weight, bias, lora_a, lora_b, scales, grouped[order], slots)
        out.backward(grad_out[order])
        inverse = torch.argsort(order)
        results.append((out.detach()[inverse], leaf.grad[inverse], lora_a.grad.clone(), lora_b.grad.clone()))
    for other in results[1:]:
        for name, got, want in zip(("output", "grad of x", "grad of A", "grad of B"), other, results[0], strict=True):
            assert_close_scaled(got, want, torch.float32, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_rows_and_bad_arguments(backend):
    """An empty batch gives empty outputs and zero adapter gradients; mismatched ids or scales raise."""
    weight, bias, lora_a, lora_b, scales, slots = make_bank([2, 3], None, 8, 5, True, torch.float32)
    x = torch.randn(0, 8, device=DEVICE, requires_grad=True)
    with use_backend(backend):
        out = bank_lora(x, weight, bias, lora_a, lora_b, scales, torch.zeros(0, dtype=torch.long, device=DEVICE), slots)
        out.sum().backward()
    assert out.shape == (0, 5) and not lora_a.grad.any() and not lora_b.grad.any()
    x = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="ids must be int64 \\[4\\]"):
        bank_lora(x, weight, bias, lora_a, lora_b, scales, torch.zeros(3, dtype=torch.long, device=DEVICE), slots)
    with pytest.raises(ValueError, match="scales \\[n\\]"):
        bank_lora(x, weight, bias, lora_a, lora_b, scales[:1], torch.zeros(4, dtype=torch.long, device=DEVICE), slots)


def test_segments_are_a_stable_grouping_built_on_the_device():
    """order lists adapter 0's rows, then 1's, … (each in row order), then the −1 rows; counts and starts."""
    ids = torch.tensor([2, -1, 0, 2, 2, -1, 0, 3], device=DEVICE)
    seg = segments_of(ids, 5)
    assert seg.order.tolist() == [2, 6, 0, 3, 4, 7, 1, 5]
    assert seg.counts.tolist() == [2, 0, 3, 1, 0]
    assert seg.starts.tolist() == [0, 2, 2, 5, 6]
    assert all(t.device == ids.device for t in seg)


SLOTS = {"linear": [0], "qkv (q, v)": [0, -1, 1]}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("slots", SLOTS.values(), ids=SLOTS.keys())
def test_opcheck(backend, slots):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of both ops."""
    projections = None if slots == [0] else ("q", "v")
    weight, bias, lora_a, lora_b, scales, _ = make_bank([2, 3], projections, 8, 5, True, torch.float32)
    x = torch.randn(2, 6, 8, device=DEVICE, requires_grad=True)
    seg = segments_of(torch.tensor([1, -1, 0, 1, 1, 0] * 2, device=DEVICE), 2)
    args = (x, weight, bias, lora_a, lora_b, scales, *seg, slots, backend)
    torch.library.opcheck(bank_forward_op, args)
    out, shrunk = bank_forward_op(*args)
    grad = torch.randn_like(out)
    detached = (x.detach(), weight, lora_a.detach(), lora_b.detach(), shrunk.detach(), scales, *seg, slots)
    torch.library.opcheck(bank_backward_op, (grad, *detached, [True, True, True], backend))
    torch.library.opcheck(bank_backward_op, (grad, *detached, [False, True, False], backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiles_with_no_graph_break(backend):
    """torch.compile(fullgraph=True) of the op with the segment metadata traced, not run on the host: a host
    read (.item(), .tolist(), a data-dependent shape) would break the graph and fail. Matches eager."""
    weight, bias, lora_a, lora_b, scales, slots = make_bank([2, 4], ("q", "v"), 10, 6, True, torch.float32)
    x = torch.randn(2, 9, 10, device=DEVICE, requires_grad=True)
    ids = torch.tensor([0, 1, -1] * 6, device=DEVICE)
    compiled = torch.compile(bank_lora, fullgraph=True, backend="aot_eager")
    results = []
    with use_backend(backend):
        for op in (bank_lora, compiled):
            x.grad = lora_a.grad = lora_b.grad = None
            out = op(x, weight, bias, lora_a, lora_b, scales, ids, slots)
            out.square().sum().backward()
            results.append((out.detach(), x.grad, lora_a.grad, lora_b.grad))
    for name, got, want in zip(("output", "grad of x", "grad of A", "grad of B"), *results, strict=True):
        assert_close_scaled(got, want, torch.float32, f"compiled {name}")


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA's sync debug mode: the GPU run of the tests")
def test_triton_path_never_syncs_with_the_host():
    """Forward and backward with device ids under torch.cuda.set_sync_debug_mode("error"), after a warm-up."""
    weight, bias, lora_a, lora_b, scales, slots = make_bank([4, 8, 2], ("q", "k", "v"), 64, 32, True, torch.bfloat16)
    x = torch.randn(4, 50, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    ids = torch.randint(-1, 3, (200,), device=DEVICE)
    with use_backend("triton"):
        for debug_mode in ("default", "error"):
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode(debug_mode)
            try:
                bank_lora(x, weight, bias, lora_a, lora_b, scales, ids, slots).sum().backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    assert lora_a.grad.isfinite().all()  # reached without a sync error
