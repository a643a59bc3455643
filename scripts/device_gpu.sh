#!/usr/bin/env bash
# Runs on the GPU machine in one call: environment facts, the GPU-marked tests, then `moekit bench`.
# Everything lands under $OUT (gpu.txt, gpu_tests.txt, bench.json, bench.md, bench.txt).
# Usage: bash scripts/device_gpu.sh [bench args...]   (default: --preset all)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
OUT=${OUT:-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
# The GPU image has no network: pytest comes from wheels carried in .device/wheels when it is missing.
python3 -c "import pytest" 2>/dev/null || pip install --quiet --no-index --find-links .device/wheels pytest
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 -m pytest -q -m gpu -p no:cacheprovider tests > "$OUT/gpu_tests.txt" 2>&1
  tail -25 "$OUT/gpu_tests.txt"
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  args=("$@")
  [ ${#args[@]} -eq 0 ] && args=(--preset all)
  python3 -m moekit.cli bench "${args[@]}" --json "$OUT/bench.json" --markdown "$OUT/bench.md" 2> "$OUT/bench.err" \
    | tee "$OUT/bench.txt"
  tail -5 "$OUT/bench.err"
fi
