#!/usr/bin/env bash
# The GPU check behind bench/README.md's GPU tables, in at most 8 minutes on one GPU.
# Usage: bench/gpu.sh OUT_DIR [COMMIT]
#
# Every stage has its own time limit (cut to what is left of BUDGET_S), appends one JSON line to
# OUT/stages.jsonl when it ends, and streams its own results to OUT/<stage>.log; OUT/summary.json is
# written on exit even if a stage timed out or the script was interrupted. The Triton cache lives in
# build/triton-cache (ignored by git, kept between runs on the same machine), so a second run does
# not recompile.
set -uo pipefail
out=${1:?usage: bench/gpu.sh OUT_DIR [COMMIT]}
export BENCH_COMMIT=${2:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/build/triton-cache}
py=$(command -v python3 || command -v python)
budget=${BUDGET_S:-480}
start=$(date +%s)
mkdir -p "$out" "$TRITON_CACHE_DIR"
: > "$out/stages.jsonl"

summary() {
    $py - "$out" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
stages = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines() if line.strip()]
checks = {}
for name in ("probe", "correctness", "overflow", "graphs"):
    log = out / f"{name}.log"
    rows = [json.loads(l) for l in log.read_text().splitlines() if l.startswith("{")] if log.exists() else []
    checks[name] = {"results": len(rows), "failed": sum(not r.get("passed", "error" not in r) for r in rows)}
summary = {"stages": stages, "checks": checks, "all_passed": all(s["rc"] == 0 for s in stages)}
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
print(json.dumps(summary))
PY
}
trap summary EXIT

# stage NAME LIMIT_S COMMAND...: run with a limit (SIGINT first: pytest still prints its summary), log, record.
stage() {
    local name=$1 limit=$2 began rc left
    shift 2
    left=$((budget - ($(date +%s) - start)))
    if ((left < 5)); then
        echo "{\"stage\": \"$name\", \"rc\": 124, \"s\": 0, \"skipped\": \"budget spent\"}" >> "$out/stages.jsonl"
        return
    fi
    ((limit > left)) && limit=$left
    began=$(date +%s)
    timeout -s INT -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
    rc=$?
    echo "{\"stage\": \"$name\", \"rc\": $rc, \"s\": $(($(date +%s) - began)), \"limit_s\": $limit}" >> "$out/stages.jsonl"
    tail -3 "$out/$name.log"
}

stage environment 20 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv &&
    $py -c 'import torch, triton; print(\"torch\", torch.__version__, \"triton\", triton.__version__, torch.cuda.get_device_name())'"
stage probe 60 $py -m bench.gpu_checks probe
stage correctness 50 $py -m bench.gpu_checks correctness
stage overflow 30 $py -m bench.gpu_checks overflow
stage graphs 15 $py -m bench.gpu_checks graphs
# Every kernel test, on the compiled kernels, one tile per dot kind (each hypothesis shape is a new key).
stage tests 170 env LOWRANK_AUTOTUNE=0 LOWRANK_TEST_DEVICE=cuda $py -m pytest tests/test_lora_linear.py \
    tests/test_lora_qkv.py tests/test_split_reductions.py tests/test_custom_ops.py tests/test_kernel_dispatch.py \
    tests/test_bank_kernels.py \
    -q -rfE -p no:cacheprovider \
    --durations=5 --junitxml="$out/tests-cuda.xml"
grid=(--dtype bfloat16 --dims 768 1024 --tokens 4096 --ranks 16 --out "$out")
stage kernels_eager 45 $py -m bench kernels "${grid[@]}"
stage kernels_graphs 45 $py -m bench kernels --cuda-graph "${grid[@]}"
stage train_quick 45 $py -m bench train --quick --dtype bfloat16 --out "$out"
