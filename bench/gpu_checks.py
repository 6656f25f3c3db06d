"""The Python stages of bench/gpu.sh, one JSON line per result (printed and flushed as it comes).

    python -m bench.gpu_checks probe        compile every kernel config: seconds, registers, spills
    python -m bench.gpu_checks correctness  fixed shapes × bf16/fp16/fp32 × dropout against the reference
    python -m bench.gpu_checks overflow     M·K ≥ 2³¹ (M = 2²⁰ + 64, K = 2048): the last rows are right
    python -m bench.gpu_checks graphs       dropout under CUDA graph replay: each replay draws a new mask

Each runs on ``--device`` (default cuda); correctness also runs on the CPU interpreter (tests/test_bench.py).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from lora_checks import TOLERANCE  # the kernel tests' one tolerance table

from kernels import lowrank_matmul as lm
from kernels.backend import use_backend
from kernels.lora_linear import lora_linear, regenerate_mask
from kernels.lora_qkv import lora_qkv
from kernels.reference import lora_linear_ref, lora_qkv_ref

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# (M, K, N or D, r, q/k/v?): the shape, odd sizes (no dimension a multiple of a tile), q, k, v at r = 64
SHAPES = ((4096, 768, 768, 16, False), (333, 517, 771, 13, False), (1576, 768, 768, 64, True))


def report(**fields) -> None:
    print(json.dumps(fields, default=str), flush=True)


def scaled_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max(1, max |expected|): what TOLERANCE bounds."""
    expected = expected.float()
    return ((actual.float() - expected).abs().max() / expected.abs().max().clamp_min(1.0)).item()


def check_case(shape, dtype: torch.dtype, dropout_p: float, device: torch.device) -> dict:
    """Output and gradients of x, A, B (Triton) against the fp32 reference on the same rounded inputs."""
    rows, in_features, width, rank, qkv = shape
    torch.manual_seed(0)
    like = {"device": device, "dtype": dtype}
    adapters, out_features = (3, 3 * width) if qkv else (1, width)
    x = torch.randn(rows, in_features, **like, requires_grad=True)
    weight = torch.randn(out_features, in_features, **like) / in_features**0.5
    bias = torch.randn(out_features, **like)
    lora_a = (torch.randn(adapters * rank, in_features, **like) / in_features**0.5).requires_grad_()
    lora_b = (torch.randn(adapters * width, rank, **like) / rank**0.5).requires_grad_()
    seed = torch.tensor([7], device=device)
    with use_backend("triton"):
        args = (x, weight, bias, lora_a, lora_b, 0.5)
        out = (
            lora_qkv(*args, dropout_p=dropout_p, training=True, seed=seed)
            if qkv
            else lora_linear(*args, dropout_p=dropout_p, training=True, seed=seed)
        )
        mask = regenerate_mask(rows, in_features, dropout_p, seed, "triton") if dropout_p else None
    grad = torch.randn_like(out)
    out.backward(grad)
    leaves = [t.detach().float().requires_grad_() for t in (x, lora_a, lora_b)]
    ref_args = (leaves[0], weight.float(), bias.float(), leaves[1], leaves[2], 0.5)
    if qkv:
        expected = lora_qkv_ref(*ref_args, ("q", "k", "v"), dropout_p, mask)
    else:
        expected = lora_linear_ref(*ref_args, dropout_p, mask)
    expected.backward(grad.float())
    errors = {"output": scaled_error(out, expected)}
    errors |= {
        f"grad_{n}": scaled_error(t.grad, r.grad) for n, t, r in zip("xab", (x, lora_a, lora_b), leaves, strict=True)
    }
    return {"errors": errors, "passed": all(e <= TOLERANCE[dtype] for e in errors.values())}


def correctness(device: torch.device, shapes=SHAPES, dtypes=DTYPES) -> bool:
    passed = True
    for shape in shapes:
        for dtype in dtypes:
            for dropout_p in (0.0, 0.1):
                start = time.perf_counter()
                try:
                    result = check_case(shape, dtype, dropout_p, device)
                except Exception as error:  # one failing case must not hide the others
                    result = {"passed": False, "error": f"{type(error).__name__}: {error}"[:500]}
                passed &= result["passed"]
                dtype_name = str(dtype).removeprefix("torch.")
                seconds = round(time.perf_counter() - start, 2)
                report(stage="correctness", shape=shape, dtype=dtype_name, dropout=dropout_p, s=seconds, **result)
    return passed


def overflow(device: torch.device) -> bool:
    """Rows past element 2³¹ of X and of dX (K = 2048, bf16, 4.3 GB each): Y and dX of the last 64 rows
    against the reference on those rows; dA and dB against the torch path (same algebra, cuBLAS)."""
    rows, in_features, out_features, rank = 2**20 + 64, 2048, 64, 16
    torch.manual_seed(0)
    like = {"device": device, "dtype": torch.bfloat16}
    x = torch.randn(rows, in_features, **like).requires_grad_()
    weight = torch.randn(out_features, in_features, **like) / in_features**0.5
    lora_a = (torch.randn(rank, in_features, **like) / in_features**0.5).requires_grad_()
    lora_b = (torch.randn(out_features, rank, **like) / rank**0.5).requires_grad_()
    grad = torch.randn(rows, out_features, **like)
    results = {}
    for backend in ("triton", "torch"):
        with use_backend(backend):
            out = lora_linear(x, weight, None, lora_a, lora_b, 0.5)
            grads = torch.autograd.grad(out, (x, lora_a, lora_b), grad)
        results[backend] = (out[-64:].detach(), grads[0][-64:], grads[1], grads[2])
        del out, grads
    tail = [t.detach()[-64:].float().requires_grad_() if i == 0 else t.detach().float() for i, t in enumerate((x,))]
    expected = lora_linear_ref(tail[0], weight.float(), None, lora_a.detach().float(), lora_b.detach().float(), 0.5)
    (expected_dx,) = torch.autograd.grad(expected, tail[0], grad[-64:].float())
    (y, dx, da, db), (_, _, torch_da, torch_db) = results["triton"], results["torch"]
    errors = {
        "output_tail": scaled_error(y, expected),
        "grad_x_tail": scaled_error(dx, expected_dx),
        "grad_a_vs_torch": scaled_error(da, torch_da),
        "grad_b_vs_torch": scaled_error(db, torch_db),
    }
    passed = all(e <= TOLERANCE[torch.bfloat16] for e in errors.values())
    report(stage="overflow", M=rows, K=in_features, elements=rows * in_features, errors=errors, passed=passed)
    return passed


def graphs(device: torch.device) -> bool:
    """Capture a training-mode forward with dropout in a CUDA graph; two replays must draw different masks
    (the seed is drawn on the device inside the graph), and each must be finite."""
    torch.manual_seed(0)
    like = {"device": device, "dtype": torch.bfloat16}
    x = torch.randn(512, 256, **like)
    weight, lora_a, lora_b = (torch.randn(*s, **like) / 16 for s in ((256, 256), (16, 256), (256, 16)))
    step = lambda: lora_linear(x, weight, None, lora_a, lora_b, 2.0, dropout_p=0.5, training=True)  # noqa: E731
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), use_backend("triton"):
        step()  # compile and autotune outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
    torch.cuda.synchronize()
    replays = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        replays.append(out.clone())
    differ = not torch.equal(*replays)
    passed = differ and all(r.isfinite().all() for r in replays)
    report(stage="graphs", replays_differ=differ, passed=passed)
    return passed


def probe(device: torch.device) -> bool:
    """Compile every config of the three GEMMs (bf16 and fp32 operands, with and without dropout where the
    kernel takes it): seconds, registers and spills per config, from a real launch of that config at a
    small shape. The spill pruning is off here, so that every config is seen."""
    ok = True
    for dtype in (torch.bfloat16, torch.float32):
        like = {"device": device, "dtype": dtype}
        p, q, out = torch.randn(256, 256, **like), torch.randn(256, 256, **like), torch.empty(256, 256, **like)
        low, high = torch.randn(256, 48, device=device), torch.randn(48, 256, **like)
        shrunk, high_t = torch.empty(256, 48, device=device), high.t()
        grad_b = torch.empty(256, 48, **like)
        seed = torch.tensor([1], device=device)
        cases = {  # name: (kernel, launch(**dropout), the dropout arguments it takes)
            "fused": (
                lm._fused_matmul_kernel,
                functools.partial(lm.fused_matmul, p, q, None, low, high, 1.0, out, seed=seed),
                ({"dropout_p": 0.0}, {"dropout_p": 0.1}),
            ),
            "skinny": (
                lm._skinny_matmul_kernel,
                functools.partial(lm.skinny_matmul, p, high_t, shrunk, seed=seed),
                ({"dropout_p": 0.0}, {"dropout_p": 0.1}),
            ),
            "expand_backward": (
                lm._expand_backward_kernel,
                functools.partial(lm.expand_backward, p, high_t, low, 1.0, shrunk, grad_b),
                ({},),
            ),
        }
        for name, (kernel, launch, dropouts) in cases.items():
            for config in kernel.configs:
                for dropout in dropouts:
                    start = time.perf_counter()
                    kernel.configs, saved = [config], kernel.configs
                    lm._chosen_configs.clear()
                    kernel.cache.clear()
                    try:
                        launch(**dropout)
                        torch.cuda.synchronize()
                        compiled = _compiled_for(kernel.fn)
                        fields = {"regs": compiled.n_regs, "spills": compiled.n_spills} if compiled else {}
                    except Exception as error:
                        fields = {"error": f"{type(error).__name__}: {error}"[:300]}
                    finally:
                        kernel.configs = saved
                    ok &= "error" not in fields and fields.get("spills", 0) == 0
                    report(
                        stage="probe", kernel=name, dtype=str(dtype).removeprefix("torch."), **dropout,
                        config=str(config), s=round(time.perf_counter() - start, 2), **fields,
                    )  # fmt: skip
    return ok


def _compiled_for(fn):
    """The kernel ``fn`` compiled last (the probe's launch of one fresh config), or None."""
    compiled = [kernel for cache in fn.device_caches.values() for kernel in cache[0].values()]
    if not compiled:
        return None
    compiled[-1]._init_handles()
    return compiled[-1]


STAGES = {"probe": probe, "correctness": correctness, "overflow": overflow, "graphs": graphs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_checks", description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    return 0 if STAGES[args.stage](torch.device(args.device)) else 1


if __name__ == "__main__":
    sys.exit(main())
