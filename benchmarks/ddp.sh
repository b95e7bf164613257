#!/usr/bin/env bash
# DDP scaling on a 2-GPU machine (issue 11): 1 vs 2 GPUs, seeds 0 and 1, at the headline global batch, then
# 1 vs 2 GPUs at the default batch of 64 (samples/s only). Needs .cache/ddp/pack.npz (python -m benchmarks.ddp
# pack, here). Writes $OUT/ddp.json (the report), $OUT/ddp_details.json (every run) and $OUT/log.txt.
set -euo pipefail
OUT=${OUT:-reports/runs/ddp}
PY=${PY:-python3}
PACK=${PACK:-.cache/ddp/pack.npz}
BATCH=${BATCH:-1024}  # the headline of reports/ddp.json
EPOCHS=${EPOCHS:-6}
SEEDS=${SEEDS:-0 1}
SMALL=${SMALL:-1}  # 0: skip the batch-64 pair
SAMPLING=${SAMPLING:-vectorized}  # sequential: the default --sampling of training.train
# NVLink multicast stays off (the lent machines' rule; see the device notes).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpus.csv"
$PY -c 'import torch, numpy; print("torch", torch.__version__, "numpy", numpy.__version__, "gpus", torch.cuda.device_count())' \
  | tee "$OUT/versions.txt"
runs=()
train() {  # seed gpus batch epochs
  local dir=/tmp/ddp/s$1-g$2-b$3
  $PY -m torch.distributed.run --standalone --nproc-per-node "$2" -m benchmarks.ddp train --pack "$PACK" \
    --out "$dir" --seed "$1" --batch_size "$3" --epochs "$4" --device cuda --sampling "$SAMPLING" 2>&1 | tee -a "$OUT/log.txt"
  runs+=("$dir")
}
for seed in $SEEDS; do
  for gpus in 1 2; do train "$seed" "$gpus" "$BATCH" "$EPOCHS"; done
done
$PY -m benchmarks.ddp report "${runs[@]}" --batch_size "$BATCH" --out "$OUT"  # again below, with batch 64
if [ "$SMALL" = 1 ]; then
  for gpus in 1 2; do train 0 "$gpus" 64 2; done
  $PY -m benchmarks.ddp report "${runs[@]}" --batch_size "$BATCH" --out "$OUT"
fi
