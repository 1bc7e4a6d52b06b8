#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (device tool): benchmarks at full width,
# then the CPU test subset on that machine's torch (2.11) for version compatibility.
# Results go to $OUT (bench logs, JSON, test log). Wheels the image lacks travel in .whl/.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-16}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" | tee -a "$OUT/gpu.txt"
FULL="--hidden 3072 --heads 24 --double 2 --single 4 --frames 9 --height 68 --width 120 --text-len 256 --text-dim 4096 --dtype bf16 --device cuda --repeats 5"
timeout 150 python3 scripts/bench.py dit $FULL --json "$OUT/dit_eager.json" 2>&1 | tee "$OUT/bench_eager.log" | grep -v Warning
timeout 240 python3 scripts/bench.py dit $FULL --compile inductor --json "$OUT/dit_compile.json" 2>&1 | tee "$OUT/bench_compile.log" | grep -v Warning
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_params.py tests/test_dit_parity.py tests/test_ckpt.py \
  tests/test_graphs.py tests/test_parallel_layouts.py -k "not inductor" 2>&1 | tee "$OUT/tests.log" | tail -5
