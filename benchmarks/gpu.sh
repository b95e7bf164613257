#!/usr/bin/env bash
# The single command run on the GPU machine (after the wheels were staged, see ../shared/device/README.md):
#   source .stage/install.sh && bash benchmarks/gpu.sh        (carrying .stage/install.sh and runs/amc/checkpoint.pt)
# Publishes the checkpoint into a temp repository there (raw + candidate store + fused graphs), measures
# everything and writes gpu.json, gpu.md, the plots and the log under $OUT (reports/ when OUT is unset).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/client" PYTHONUNBUFFERED=1
export PATH="$(python3 -c 'import sys; print(sys.prefix)')/bin:$PATH"
out="${OUT:-reports}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv
which perf_analyzer tritonserver 2>/dev/null
timeout "${BENCH_TIMEOUT_S:-500}" python3 -m benchmarks.run --device cuda --sizes ${SIZES:-100} \
  --out "$out" --budget-s "${BUDGET_S:-430}" "$@" 2>&1 | grep -v '^[IW][0-9]' | tee "$out/bench.log"
ls -la "$out"
