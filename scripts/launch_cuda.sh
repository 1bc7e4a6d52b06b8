#!/usr/bin/env bash
# Launch training on NVIDIA GPUs (one node; set NNODES/NODE_RANK/MASTER_ADDR for more).
#   scripts/launch_cuda.sh hunyuan-video-t2v --features /data/feats --out /ckpt/run --parallel.cp 2
# Install a CUDA build of torch (2.11 - 2.13) first; `pip install -e .` does not pin one.
set -euo pipefail
NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
exec torchrun --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" --nproc-per-node "$NPROC" \
  --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
  "$(dirname "$0")/train.py" "$@" --device cuda
