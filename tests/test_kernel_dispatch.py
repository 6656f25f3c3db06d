"""How the Triton kernels are launched and chosen: launches per op, the autotuner only on a key's first
call, autotune keys, and the measured dispatch table (read with a fake table on the CPU)."""

from __future__ import annotations

import collections
import json

import pytest
import torch
import triton
from lora_checks import DEVICE

from kernels import backend as dispatch
from kernels import lowrank_matmul as lm
from kernels.backend import Problem, problem_of, select_backend, use_backend
from kernels.lora_linear import lora_linear
from kernels.lora_qkv import lora_qkv


@pytest.fixture
def launches(monkeypatch) -> collections.Counter:
    """Kernel name → launches through lm._launch while the test runs."""
    counts: collections.Counter = collections.Counter()
    launch = lm._launch

    def counting(kernel, grid, **args):
        counts[kernel.base_fn.__name__.strip("_").removesuffix("_kernel")] += 1
        launch(kernel, grid, **args)

    monkeypatch.setattr(lm, "_launch", counting)
    return counts


def tensors(slots: int, adapters: int, rank: int = 4, tokens: int = 9, dim: int = 8):
    torch.manual_seed(0)
    x = torch.randn(tokens, dim, device=DEVICE, requires_grad=True)
    weight = torch.randn(slots * dim, dim, device=DEVICE)
    lora_a = torch.randn(adapters * rank, dim, device=DEVICE, requires_grad=True)
    lora_b = torch.randn(adapters * dim, rank, device=DEVICE, requires_grad=True)
    return x, weight, None, lora_a, lora_b


@pytest.mark.parametrize("op", ["linear", "qkv"])
def test_launches_per_op(op, launches):
    """Forward: the shrink and the fused GEMM. Backward: dS and dB of every adapter in one pass over G, dX,
    dA: 3 launches for q, k, v as for one linear (before: 3 + 1 + 1 + 3 = 8, then 4 with pieces)."""
    args = tensors(3, 3) if op == "qkv" else tensors(1, 1)
    with use_backend("triton"):
        out = lora_qkv(*args, 1.0) if op == "qkv" else lora_linear(*args, 1.0)
        assert launches == {"fused_matmul": 1, "skinny_matmul": 1}
        launches.clear()
        out.sum().backward()
    assert launches == {"expand_backward": 1, "fused_matmul": 1, "skinny_matmul": 1}


def test_autotuner_runs_only_on_a_keys_first_call(monkeypatch):
    calls = collections.Counter()
    run = triton.runtime.Autotuner.run

    def counting(self, *args, **kwargs):
        calls[self.base_fn.__name__] += 1
        return run(self, *args, **kwargs)

    monkeypatch.setattr(triton.runtime.Autotuner, "run", counting)
    monkeypatch.setattr(lm, "_chosen_configs", {})
    x, weight, bias, lora_a, lora_b = tensors(1, 1)
    with use_backend("triton"), torch.no_grad():
        first = lora_linear(x, weight, bias, lora_a, lora_b, 1.0)
        assert calls == {"_skinny_matmul_kernel": 1, "_fused_matmul_kernel": 1}
        again = lora_linear(x, weight, bias, lora_a, lora_b, 1.0)
        assert calls == {"_skinny_matmul_kernel": 1, "_fused_matmul_kernel": 1}  # cached configs, same results
        lora_linear(x.t().contiguous().t(), weight, bias, lora_a, lora_b, 1.0)  # column-major x: a new key
    assert torch.equal(first, again)
    assert calls == {"_skinny_matmul_kernel": 2, "_fused_matmul_kernel": 2}


def test_autotune_keys_cover_layout_precision_dropout_and_bias():
    """Operand dtypes join every key by the autotuner itself; the rest must be named."""
    for name in ("LAYOUT", "PRECISION", "HAS_DROPOUT"):
        assert name in lm._skinny_matmul_kernel.keys and name in lm._fused_matmul_kernel.keys
    assert "HAS_BIAS" in lm._fused_matmul_kernel.keys
    x = torch.zeros(4, 6)
    assert lm.layout(x, x.t()) == 0b01 and lm.layout(x.t(), x) == 0b10


def test_problem_octave():
    assert problem_of(torch.bfloat16, 4096, 768, 512, 16, 0.1) == Problem("bfloat16", 768, 512, 16, 12, True)
    assert problem_of(torch.float32, 4097, 768, 512, 16, 0.0).m_octave == 13
    assert problem_of(torch.float32, 1, 768, 512, 16, 0.0).m_octave == 0


def test_dispatch_table_chooses_per_problem(tmp_path, monkeypatch):
    """A table for this (fake) GPU: its torch entries win, problems it does not list and a table written
    for another GPU get Triton, torch with dropout is ignored, and use_backend still overrides."""
    fast_torch = Problem("bfloat16", 768, 768, 16, 12, False)
    entries = [
        {**fast_torch._asdict(), "backend": "torch"},
        {**fast_torch._replace(out_features=3072)._asdict(), "backend": "triton"},
        {**fast_torch._replace(dropout=True)._asdict(), "backend": "torch"},
    ]
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"device": "Fake GPU", "entries": entries}))
    monkeypatch.setenv(dispatch.DISPATCH_ENV, str(path))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    dispatch.dispatch_table.cache_clear()
    cuda = torch.device("cuda")
    with use_backend(None):
        assert select_backend(cuda, fast_torch) == "torch"
        assert select_backend(cuda, fast_torch._replace(out_features=3072)) == "triton"
        assert select_backend(cuda, fast_torch._replace(dropout=True)) == "triton"
        assert select_backend(cuda, fast_torch._replace(m_octave=11)) == "triton"
        assert select_backend(cuda) == "triton"
        with use_backend("triton"):
            assert select_backend(cuda, fast_torch) == "triton"
    assert dispatch.measured_backend("Other GPU", fast_torch) == "triton"
    dispatch.dispatch_table.cache_clear()
