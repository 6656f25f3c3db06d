#!/usr/bin/env bash
# The GPU check behind bench/README.md's GPU tables: kernel tests on the compiled Triton
# kernels, a merge check, then the kernel benchmarks timed on CUDA graphs (the eager
# timings and the train benchmark: see bench/README.md). Usage: bench/gpu.sh OUT_DIR [COMMIT]
# Each stage has its own time limit, so one that hangs does not cost the others.
set -uo pipefail
out=${1:?usage: bench/gpu.sh OUT_DIR [COMMIT]}
export BENCH_COMMIT=${2:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export PYTHONUNBUFFERED=1
py=$(command -v python3 || command -v python)
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
$py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

# SIGINT at the limit: pytest stops where it is and still prints its summary. No tile sweep:
# every hypothesis shape is a new autotune key, and a sweep compiles each tile (seconds each).
LOWRANK_AUTOTUNE=0 LOWRANK_TEST_DEVICE=cuda timeout -s INT 190 $py -m pytest tests/test_lora_linear.py tests/test_lora_qkv.py \
    -v -rfE -p no:cacheprovider --durations=5 --junitxml="$out/tests-cuda.xml" > "$out/tests-cuda.log" 2>&1
grep -E "PASSED|FAILED|ERROR" "$out/tests-cuda.log" | sed 's/ *\[.*%\]//' | cut -c1-150 | tail -12
tail -15 "$out/tests-cuda.log"
LOWRANK_TEST_DEVICE=cuda timeout 30 $py -c "
import torch
from kernels.merge import merge_weight
from kernels.reference import merge_ref
for dtype in (torch.float32, torch.bfloat16):
    w, a, b = (torch.randn(*s, device='cuda', dtype=dtype) for s in ((771, 517), (13, 517), (771, 13)))
    got, want = merge_weight(w, a, b, 0.5), merge_ref(w, a, b, 0.5)
    ulp = torch.finfo(dtype).eps * want.float().abs().clamp_min(torch.finfo(dtype).tiny)
    print('merge_weight on cuda', dtype, 'within 1 ulp:', bool(((got.float() - want.float()).abs() <= ulp).all()))
"
timeout 110 $py -m bench kernels --cuda-graph --dtype bfloat16 --dims 768 1024 --tokens 4096 --ranks 16 --out "$out" \
    | tail -4
timeout 50 $py -m bench kernels --cuda-graph --dtype float32 --dims 768 --tokens 4096 --ranks 16 --out "$out" | tail -4
