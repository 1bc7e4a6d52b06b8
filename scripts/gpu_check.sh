#!/usr/bin/env bash
# The prepared script for a lent GPU machine (device tool). Sections run in the order given:
#   bash scripts/gpu_check.sh dit tests      # full-width DiT bench; CPU tests on that machine's torch
#   bash scripts/gpu_check.sh vae train      # VAE/text GPU tests + VAE fp16 bench; training-step MFU
#   bash scripts/gpu_check.sh new            # GPU tests not run yet (offload memory, CUDA-graph sampling),
#                                            # sampling-step bench at full width
#   bash scripts/gpu_check.sh recompute      # train step with selective recompute and with offload
#   MODES=offload bash scripts/gpu_check.sh offload recompute   # the offload GPU test and bench only
#   bash scripts/gpu_check.sh pipeline       # end-to-end T2V vs diffusers' pipeline (fp32, real VAE, 18k tokens)
#   bash scripts/gpu_check.sh swap           # block swap GPU tests: sampling and LoRA training (overlap, peak, bits)
# Results go to $OUT. Wheels the image lacks (diffusers, tyro, ...) travel in .whl/.
# DRY=1 runs every command on this CPU with tiny shapes (catches broken commands before a
# GPU session; the GPU tests skip themselves there). BUDGET=seconds (default 560) ends the
# whole script in time: each command gets min(its cap, what is left), none starts with < 30 s,
# so one device call can list sections in priority order and still return every result.
set -uo pipefail
END=$(( $(date +%s) + ${BUDGET:-560} ))
cap() {  # cap SECONDS CMD...: run CMD under timeout min(SECONDS, time left); skip when < 30 s left
  local left=$(( END - $(date +%s) )) t=$1; shift
  [ "$left" -lt "$t" ] && t=$left
  if [ "$t" -lt 30 ]; then echo "skipped (budget spent): $*" | tee -a "$OUT/skipped.txt"; return 124; fi
  timeout "$t" "$@"
}
PY=python3
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-16}
if [ "${DRY:-0}" = 1 ]; then
  export PYTHONPATH=$PWD; PY=.venv/bin/python  # this checkout's venv (make test creates it)
  FULL="--hidden 64 --heads 2 --double 1 --single 1 --text-len 8 --text-dim 32 --dtype fp32 --device cpu"
  DIT_SHAPE="--frames 2 --height 8 --width 8"; TRAIN_SHAPE=$DIT_SHAPE; VAE="--preset tiny --device cpu --dtype fp32"
  COMPILE=aot_eager
  PIPE="--hidden 32 --heads 2 --double 1 --single 1 --text-width 32 --frames 5 --height 32 --width 32 --steps 2 --device cpu"
else
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
  else
    export PYTHONPATH=$PWD
  fi
  FULL="--hidden 3072 --heads 24 --double 2 --single 4 --text-len 256 --text-dim 4096 --dtype bf16 --device cuda"
  DIT_SHAPE="--frames 9 --height 68 --width 120"  # 544x960, 33 frames: 18,360 video tokens
  TRAIN_SHAPE="--frames 9 --height 90 --width 160"  # 720p, 33 frames: 32,400 video tokens
  VAE="--preset hunyuan-video --device cuda --dtype fp16"
  COMPILE=inductor
  PIPE="--hidden 3072 --heads 24 --double 2 --single 4 --text-width 256 --vae hunyuan-video --frames 33 --height 544 --width 960 --steps 4 --device cuda"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
fi
$PY -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" | tee -a "$OUT/gpu.txt"
for section in "$@"; do
  case $section in
    dit)
      cap 150 $PY scripts/bench.py dit $FULL $DIT_SHAPE --repeats 5 \
        --json "$OUT/dit_eager.json" 2>&1 | tee "$OUT/bench_eager.log" | grep -v Warning
      cap 240 $PY scripts/bench.py dit $FULL $DIT_SHAPE --repeats 5 \
        --compile $COMPILE --json "$OUT/dit_compile.json" 2>&1 | tee "$OUT/bench_compile.log" | grep -v Warning ;;
    tests)
      cap 150 $PY -m pytest -q -x -p no:cacheprovider tests/test_params.py tests/test_dit_parity.py \
        tests/test_ckpt.py tests/test_graphs.py tests/test_parallel_layouts.py -k "not inductor" 2>&1 \
        | tee "$OUT/tests.log" | tail -5 ;;
    vae)
      cap 120 $PY -m pytest -q -p no:cacheprovider tests/test_vae_gpu.py tests/test_text.py -k "gpu or device" \
        2>&1 | tee "$OUT/vae_text_gpu.log" | tail -5
      cap 150 $PY scripts/bench.py vae --frames 17 --height 256 --width 256 \
        $VAE --repeats 3 --json "$OUT/vae.json" 2>&1 | tee "$OUT/vae.log" | grep -v Warning ;;
    train)  # >= 30k video tokens (9 x 90 x 160 latent = 720p, 33 frames), full recompute, compiled
      cap 300 $PY scripts/bench.py train $FULL $TRAIN_SHAPE --repeats 3 \
        --compile $COMPILE --json "$OUT/train.json" 2>&1 | tee "$OUT/train.log" | grep -v Warning ;;
    new)
      cap 200 $PY -m pytest -q -s -p no:cacheprovider tests/test_recompute_gpu.py tests/test_sample_gpu.py \
        2>&1 | tee "$OUT/new_gpu_tests.log" | tail -8
      cap 200 $PY scripts/bench.py sample $FULL $DIT_SHAPE --repeats 5 \
        --compile $COMPILE --json "$OUT/sample.json" 2>&1 | tee "$OUT/sample.log" | grep -v Warning
      [ -f "$OUT/sample.json" ] || cap 150 $PY scripts/bench.py sample $FULL $DIT_SHAPE --repeats 5 --cuda-graph False \
        --compile $COMPILE --json "$OUT/sample.json" 2>&1 | tee "$OUT/sample_nograph.log" | grep -v Warning
      ;;
    offload)  # the GPU test of the attention-output offload alone
      cap 120 $PY -m pytest -q -s -p no:cacheprovider tests/test_recompute_gpu.py 2>&1 | tee "$OUT/offload_test.log" | tail -8 ;;
    recompute)  # the recommended training mode, and its offload variant (MODES="selective offload")
      for mode in ${MODES:-selective offload}; do
        cap 240 $PY scripts/bench.py train $FULL $TRAIN_SHAPE --repeats 3 --recompute-mode $mode \
          --compile $COMPILE --json "$OUT/train_$mode.json" 2>&1 | tee "$OUT/train_$mode.log" | grep -v Warning
      done ;;
    swap)  # block swap on CUDA: copies under compute, peak down by the swapped bytes, same bits (sample + train)
      cap 200 $PY -m pytest -q -s -p no:cacheprovider tests/test_swap_gpu.py 2>&1 | tee "$OUT/swap_gpu.log" | tail -8 ;;
    pipeline)  # end-to-end sampling, ours vs HunyuanVideoPipeline: seconds per stage, peak memory, video error
      cap 240 $PY scripts/bench.py pipeline $PIPE --repeats 3 --json "$OUT/pipeline.json" 2>&1 \
        | tee "$OUT/pipeline.log" | grep -v Warning ;;
  esac
done
# The device tool returns at most 8 files: pack them into one.
(cd "$OUT" && ls && tar czf results.tgz --remove-files $(ls | grep -v '^results.tgz$'))
