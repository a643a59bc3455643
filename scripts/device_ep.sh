#!/usr/bin/env bash
# Runs on a machine of 2+ GPUs in one call: environment facts, the NCCL tests of tests/distributed, then
# examples/ep_torchrun.py for deepseek-v3 and qwen3-30b-a3b with both dispatches (and tensor parallelism for
# qwen3), one rank per GPU. Everything lands under $OUT (gpu.txt, nccl_tests.txt, ep-<preset>-<layout>.json/.txt).
# Usage: bash scripts/device_ep.sh [tokens per rank, default 1,64,1024,8192]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
# NVLink multicast stays off: a program using it can take a shared host's GPUs out of service.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-out}
TOKENS=${1:-1,64,1024,8192}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
nvidia-smi topo -m | tee -a "$OUT/gpu.txt"
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
if [ "$GPUS" -lt 2 ]; then echo "device_ep.sh: needs 2 or more GPUs, found $GPUS" >&2; exit 2; fi
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 -m pytest -q -m gpu -p no:cacheprovider tests/distributed > "$OUT/nccl_tests.txt" 2>&1
  tail -5 "$OUT/nccl_tests.txt"
fi
run() {  # preset, layout name, extra arguments
  torchrun --nproc-per-node "$GPUS" examples/ep_torchrun.py --preset "$1" --tokens "$TOKENS" \
    --json "$OUT/ep-$1-$2.json" "${@:3}" > "$OUT/ep-$1-$2.txt" 2> "$OUT/ep-$1-$2.err"
  grep -v "^W\|Warning\|return func\|warn" "$OUT/ep-$1-$2.txt"
}
for preset in deepseek-v3 qwen3-30b-a3b; do
  run "$preset" a2a --dispatch all_to_all
  run "$preset" agrs --dispatch allgather_reducescatter
done
run qwen3-30b-a3b tp --tp "$GPUS"
