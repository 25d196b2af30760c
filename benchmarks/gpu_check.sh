#!/usr/bin/env bash
# `make gpu-check`: the one GPU check, on one H100/H200, in under 9 minutes (the step limits add
# up to 535 s).
#
# 1. builds pllava_fast._C with its CUDA sources (the machine's CUDA torch, no downloads);
# 2. runs the cuda-marked tests;
# 3. runs every benchmark with --device cuda at reduced repeats; each writes
#    benchmarks/results/<name>-<GPU name>.json, copied to $OUT when the device tool sets it.
# Each step has its own time limit, so one slow step cannot take the others' time; the exit code
# is the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/pllava-fast-inductor}
failed=0
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "== [$(date +%T)] $name (limit ${limit}s)"
  if ! timeout "$limit" "$@"; then echo "!! $name failed or timed out"; failed=$((failed + 1)); fi
}

step build 100 env MAX_JOBS=16 "$PY" -m pip install -q --no-build-isolation --no-deps -e .
step extension 15 "$PY" -c "import pllava_fast._C as c; assert getattr(c, 'with_cuda', False), 'no CUDA sources built'; print('CUDA extension ok')"
step cuda-tests 80 "$PY" -m pytest -q -x -m cuda tests -p no:cacheprovider
step pooling 25 "$PY" -m benchmarks.bench_pooling --device cuda --repeats 10
step preprocess 25 "$PY" -m benchmarks.bench_preprocess --device cuda --repeats 10 --dtype bfloat16
step kv-cache 40 "$PY" -m benchmarks.bench_kv_cache --device cuda --repeats 10 --contexts 2400 8192 --batches 1 8
step llm-decode 100 "$PY" -m benchmarks.bench_llm_decode --device cuda --shape 7b --batches 1 --repeats 3 --kinds model-dtype int4
step e2e 70 "$PY" -m benchmarks.e2e --device cuda --shape 7b --repeats 2 --max-new-tokens 32
# needs torchao on the machine (carry its wheel: see README, GPU check)
step weights 80 "$PY" -m benchmarks.bench_weights --device cuda --shape 7b --variants bf16 int4 --repeats 2

if [ -n "${OUT:-}" ]; then
  cp benchmarks/results/*-NVIDIA*.json "$OUT"/ 2>/dev/null || true
fi
echo "== gpu-check done: $failed failed step(s)"
exit "$failed"
