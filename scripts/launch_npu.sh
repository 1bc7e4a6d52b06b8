#!/usr/bin/env bash
# Launch training on Ascend NPUs (hccl). UNVERIFIED: no Ascend hardware was available to
# test this; the environment follows MindSpeed-MM's HunyuanVideo scripts.
#   scripts/launch_npu.sh hunyuan-video-t2v --features /data/feats --out /ckpt/run --compile.backend torchair
#     [--compile.options experimental_config.frozen_parameter=True ...]  (torchair.CompilerConfig, KEY=VALUE)
# Needs torch_npu matching your torch and CANN (`source /usr/local/Ascend/ascend-toolkit/set_env.sh`).
set -euo pipefail
NPROC=${NPROC:-8}
export TASK_QUEUE_ENABLE=${TASK_QUEUE_ENABLE:-1}
export COMBINED_ENABLE=${COMBINED_ENABLE:-1}
export CPU_AFFINITY_CONF=${CPU_AFFINITY_CONF:-1}
export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1200}
export PYTORCH_NPU_ALLOC_CONF=${PYTORCH_NPU_ALLOC_CONF:-expandable_segments:True}
exec torchrun --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" --nproc-per-node "$NPROC" \
  --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
  "$(dirname "$0")/train.py" "$@" --device npu --attention npu
