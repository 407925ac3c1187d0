#!/usr/bin/env bash
# Issue 4 on the lent GPU in one call (after `. bench/device_env.sh`, from the repository root):
# the int4 bench (config sweep, kernel bandwidth, decode table), then the quant kernels' GPU
# tests and GPU parity of quantized checkpoints against transformers with the configs the sweep
# chose. Logs go to $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
start=$(date +%s)
stamp() { echo "== $1 (t=$(( $(date +%s) - start ))s)"; }
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.max.sm --format=csv \
  > "$OUT/gpu.txt" 2>&1
stamp "bench"
timeout "${BENCH_S:-190}" python bench/bench_quant.py --save-configs "$OUT/quant_configs.json" \
  ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
# the tests below run with the configs the sweep chose (the shipped defaults come from them)
[ -s "$OUT/quant_configs.json" ] && export TEXTGEN_QUANT_CONFIGS="$OUT/quant_configs.json"
stamp "kernel tests"
timeout "${KERNEL_TESTS_S:-80}" python -m pytest -q -m gpu --maxfail=5 \
  tests/kernels/test_quant_matmul.py 2>&1 | tee "$OUT/kernel_tests.log" | tail -25
stamp "gpu parity"
timeout "${PARITY_S:-110}" python -m pytest -q tests/gpu/test_quant_parity.py 2>&1 \
  | tee "$OUT/parity.log" | tail -25
stamp "done"
