#!/usr/bin/env bash
# Issue 9's overload benchmark with the load generator apart from the server: on the GPU machine's 16 CPUs (its
# GPU unused), tritonserver and its stubs pinned to 2 CPUs (the size of the CI machine) and the 64 client threads in
# ${CLIENT_PROCESSES:-16} processes on the other 14, as clients on other machines would be (with 4 processes, each
# process's GIL was the bottleneck: ~20 ms of client CPU per 5 MB request). On the 2-core machine itself the clients'
# packing and sending of 5 MB requests takes as much CPU as the server's work (~20 ms of client CPU a request), so
# what the clients see there measures the shared CPU as much as the server's overload handling.
#
# After the wheels were staged (../shared/device/README.md; the onnxruntime-gpu wheel is left out here, so the
# steps run on the machine's own CPU onnxruntime, as on a CPU server):
#   bash benchmarks/overload_device.sh [benchmarks.reliability flags]   # $OUT/run<N>/reliability*.json, $OUT/log
# RUNS="1 2" (run names), CLIENT_PROCESSES (16), SECONDS_PER_RUN (60), RUN_TIMEOUT_S (SECONDS_PER_RUN + 180).
# It needs what ../shared/device/stage-wheels leaves in .stage/ (git-ignored) and /tmp/stage on the machine.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ ! -f /tmp/stage/.installed-cpu ]; then
  sum=$(grep -o '[0-9a-f]\{64\}' .stage/install.sh | head -1)
  echo "$sum  /tmp/stage/bundle.tar" | sha256sum -c - || { echo "bundle incomplete: resend the parts in order"; exit 1; }
  (cd /tmp/stage && tar xf bundle.tar) || exit 1
  find /tmp/stage/wheels -name '*.whl' ! -name 'onnxruntime_gpu-*' -print0 \
    | xargs -0 env -u PYTHONPATH python3 -m pip install -q --no-index --no-deps --no-compile || exit 1
  touch /tmp/stage/.installed-cpu
fi
triton=$(python3 -c 'import importlib.util as u; print(u.find_spec("pytriton").submodule_search_locations[0])')/tritonserver
chmod +x "$triton"/bin/tritonserver "$triton"/python_backend_stubs/*/triton_python_backend_stub 2>/dev/null
py=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
cp -n "$triton/python_backend_stubs/$py/triton_python_backend_stub" "$triton"/backends/python/ 2>/dev/null || true
export PYTHONPATH="$PWD:$PWD/client" PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=""
out="${OUT:-reports/overload_device}"
mkdir -p "$out"
lscpu | grep -E 'Model name|^CPU\(s\)|Thread|Core' > "$out/lscpu.txt"
python3 -c 'import onnxruntime as o, numpy as n, os; print("onnxruntime", o.__version__, o.get_available_providers(), "numpy", n.__version__, "cpus", os.cpu_count())' | tee "$out/log"
for run in ${RUNS:-1 2}; do
  timeout "${RUN_TIMEOUT_S:-$(( ${SECONDS_PER_RUN:-60} + 180 ))}" python3 -m benchmarks.reliability --sections overload \
    --overload-seconds "${SECONDS_PER_RUN:-60}" --server-cpus 0,1 --client-cpus 2-15 --client-processes "${CLIENT_PROCESSES:-16}" \
    --out "$out/run$run/reliability.json" "$@" 2>&1 | grep -v '^[IWE][0-9]' | tee -a "$out/log"
done
