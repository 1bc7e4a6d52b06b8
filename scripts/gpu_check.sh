#!/usr/bin/env bash
# The prepared script for a lent GPU machine (device tool). Sections run in the order given:
#   bash scripts/gpu_check.sh dit tests      # full-width DiT bench; CPU tests on that machine's torch
#   bash scripts/gpu_check.sh vae train      # VAE/text GPU tests + VAE fp16 bench; training-step MFU
#   bash scripts/gpu_check.sh new            # GPU tests not run yet: offload memory, CUDA-graph sampling;
#                                            # sampling-step and offload benches at full width
# Results go to $OUT. Wheels the image lacks (diffusers, tyro, ...) travel in .whl/.
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
FULL="--hidden 3072 --heads 24 --double 2 --single 4 --text-len 256 --text-dim 4096 --dtype bf16 --device cuda"
for section in "$@"; do
  case $section in
    dit)
      timeout 150 python3 scripts/bench.py dit $FULL --frames 9 --height 68 --width 120 --repeats 5 \
        --json "$OUT/dit_eager.json" 2>&1 | tee "$OUT/bench_eager.log" | grep -v Warning
      timeout 240 python3 scripts/bench.py dit $FULL --frames 9 --height 68 --width 120 --repeats 5 \
        --compile inductor --json "$OUT/dit_compile.json" 2>&1 | tee "$OUT/bench_compile.log" | grep -v Warning ;;
    tests)
      timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_params.py tests/test_dit_parity.py \
        tests/test_ckpt.py tests/test_graphs.py tests/test_parallel_layouts.py -k "not inductor" 2>&1 \
        | tee "$OUT/tests.log" | tail -5 ;;
    vae)
      timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_vae_gpu.py tests/test_text.py -k "gpu or device" \
        2>&1 | tee "$OUT/vae_text_gpu.log" | tail -5
      timeout 150 python3 scripts/bench.py vae --preset hunyuan-video --frames 17 --height 256 --width 256 \
        --device cuda --dtype fp16 --repeats 3 --json "$OUT/vae.json" 2>&1 | tee "$OUT/vae.log" | grep -v Warning ;;
    train)  # >= 30k video tokens (9 x 90 x 160 latent = 720p, 33 frames), full recompute, compiled
      timeout 300 python3 scripts/bench.py train $FULL --frames 9 --height 90 --width 160 --repeats 3 \
        --compile inductor --json "$OUT/train.json" 2>&1 | tee "$OUT/train.log" | grep -v Warning ;;
    new)
      timeout 200 python3 -m pytest -q -s -p no:cacheprovider tests/test_recompute_gpu.py tests/test_sample_gpu.py \
        2>&1 | tee "$OUT/new_gpu_tests.log" | tail -8
      timeout 200 python3 scripts/bench.py sample $FULL --frames 9 --height 68 --width 120 --repeats 5 \
        --compile inductor --json "$OUT/sample.json" 2>&1 | tee "$OUT/sample.log" | grep -v Warning
      timeout 200 python3 scripts/bench.py train $FULL --frames 9 --height 90 --width 160 --repeats 3 \
        --recompute-mode offload --compile inductor --json "$OUT/train_offload.json" 2>&1 | tee "$OUT/train_offload.log" | grep -v Warning ;;
  esac
done
