#!/usr/bin/env bash
# The single command run on the GPU machine (after the wheels were staged, see ../shared/device/README.md):
#   source .stage/install.sh && bash benchmarks/gpu.sh        (carrying .stage/install.sh and runs/amc/checkpoint.pt)
# Publishes the checkpoint into a temp repository there (raw + candidate store + fused graphs), measures
# everything and writes gpu.json, gpu.md, the plots and the log under $OUT (reports/ when OUT is unset).
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh" reports
which perf_analyzer tritonserver 2>/dev/null
timeout "${BENCH_TIMEOUT_S:-500}" python3 -m benchmarks.run --device cuda --sizes ${SIZES:-100} \
  --out "$out" --budget-s "${BUDGET_S:-430}" "$@" 2>&1 | without_triton_log | tee "$out/bench.log"
ls -la "$out"
