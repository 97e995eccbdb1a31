#!/usr/bin/env bash
# Runs petbreed's GPU benchmarks on the lent H200 (no network). From the repo root on the device:
#   LIMIT=560 bash bench/gpu/device.sh setup model data train
#   LIMIT=560 bash bench/gpu/device.sh setup tiny serve-smoke model serve-engine serve-http
#   LIMIT=400 bash bench/gpu/device.sh setup model serve-spy        (profile of serving at saturation)
# Needs .carry/pkg/{site,tf514}.tar.xz (vLLM 0.24 + transformers 5.14.1, built by
# ../shared/gpu/build_pack.sh) and .carry/wheels/*.whl (pure-Python deps the device lacks, and
# py-spy's manylinux wheel for serve-spy).
# Results and logs go to $OUT; each step is skipped when fewer seconds are left than it needs.
# Inductor's cache (the compiled vision tower: minutes of every engine start) can travel between
# calls: the `cache-out` step packs it into $OUT/inductor.tar.xz (2.1 MB for the E4B tower); copy
# that to .carry/ and the next call's `setup` unpacks it (engine init 84-100 s instead of 188 s).
# Inductor keys it by the GPU's name: a cache written on an H100 does not serve an H200.
# A call carries at most 64 MiB: carry [".carry/pkg", ".carry/wheels", ".carry/inductor.tar.xz"]
# with py-spy's wheel moved out of .carry/wheels unless the call runs serve-spy. With
# --torch-compile vLLM's own cache joins it: 253 MB on disk packed to 3.5 MB with a 64 MiB window, but
# with fast prefill's compile too (1.6 GB) that window gave 11.2 MB and the 256 MiB window below 5.4 MB
# (47 s on one thread). Beside .carry/pkg that leaves little, so engine calls leave .carry/wheels (the
# CLI's, which they do not import) behind. vLLM keys its cache by VLLM_* variables too
# (VLLM_CONFIGURE_LOGGING included): change none between the calls that share it.
set -uo pipefail
T0=$(date +%s); LIMIT=${LIMIT:-560}; OUT=${OUT:-/tmp/out}; REPO=$(pwd)
export PYTHONPATH=/root/tf:/root/site:/root/extra:$REPO PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
       TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false
# vLLM's own compile cache (torch_compile: the compiled language model) travels with inductor's.
export TORCHINDUCTOR_CACHE_DIR=/root/inductor VLLM_CACHE_ROOT=/root/inductor/vllm
MODEL=/root/models/e4b DATA=/root/data/pets448
# e.g. SERVE_FLAGS="--graphs --scale 0.5 --top-k all,5", ANATOMY=20 (serve-engine: one classification's parts)
SERVE_FLAGS=${SERVE_FLAGS:-}
mkdir -p "$OUT" /root/models /root/data /root/extra
left() { echo $(( LIMIT - $(date +%s) + T0 )); }

step() {  # step NAME NEED_SECONDS command...
  local name=$1 need=$2; shift 2
  if [ "$(left)" -lt "$need" ]; then echo "### SKIP $name ($(left)s left)"; return 0; fi
  echo "### $name start t=$(( $(date +%s) - T0 ))s"
  timeout $(( $(left) - 5 )) bash -c "$*" > "$OUT/$name.log" 2>&1; local rc=$?
  # A time-out ends the step's shell, but an engine it started can outlive it and hold the GPU's
  # memory, so that the next step's engine runs out of it (2026-12-06).
  if [ $rc -eq 124 ]; then pkill -9 -f '^([^ ]*/)?python3 (bench/|-m serve\.cli)|^VLLM::'; sleep 5; fi
  echo "### $name rc=$rc t=$(( $(date +%s) - T0 ))s"
  grep -E '^\{|^ *"|Error|error|Traceback' "$OUT/$name.log" | grep -v Warning | tail -n 40 | cut -c1-300
  return $rc
}

for s in "$@"; do
  case $s in
    setup) step setup 30 "for f in site:site tf514:tf; do mkdir -p /root/\${f#*:}; \
             [ -f /root/\${f#*:}/.done ] || { tar -C /root/\${f#*:} -xJf .carry/pkg/\${f%%:*}.tar.xz && touch /root/\${f#*:}/.done; }; done; \
             for w in .carry/wheels/*.whl; do [ -f \$w ] && python3 -m zipfile -e \$w /root/extra; done; \
             chmod +x /root/extra/*.data/scripts/* 2>/dev/null; \
             mkdir -p /root/inductor; [ -f .carry/inductor.tar.xz ] && tar -C /root/inductor -xJf .carry/inductor.tar.xz; \
             nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; \
             grep -m1 'model name' /proc/cpuinfo; nproc; \
             python3 -c 'import torch, transformers, peft, accelerate, vllm; print(torch.__version__, transformers.__version__, peft.__version__, accelerate.__version__, vllm.__version__)'" || exit 1 ;;
    model) [ -f $MODEL/config.json ] || step model 120 "python3 -c 'from pathlib import Path; \
             from finetune.tiny_model import TinyModelConfig, make_tiny_model; \
             make_tiny_model(Path(\"$MODEL\"), TinyModelConfig(shape=\"e4b\", device=\"cuda\"))'" || exit 1 ;;
    data)  step data 60 "python3 -c 'from pathlib import Path; \
             from finetune.synthetic import SyntheticConfig, make_synthetic_data; \
             make_synthetic_data(Path(\"$DATA\"), SyntheticConfig(breeds=37, train_per_breed=12, test_per_breed=1, size=448))'" || exit 1 ;;
    tiny)  [ -f /root/models/tiny/config.json ] || step tiny 30 "python3 -c 'from pathlib import Path; \
             from finetune.tiny_model import TinyModelConfig, make_tiny_model; \
             make_tiny_model(Path(\"/root/models/tiny\"), TinyModelConfig())'" || exit 1 ;;
    serve-smoke) step serve-smoke 120 "timeout 240 python3 bench/bench_serve_gpu.py engine --model /root/models/tiny \
             --levels 1,8 --scale 0.3 --image-size 96 --json $OUT/serve_smoke.json" || exit 1 ;;
    vision-tower) step vision-tower 60 "python3 bench/bench_vision_tower.py --config $MODEL/config.json \
             --images ${TOWER_IMAGES:-1,8,32} ${TOWER_FLAGS:-}" ;;
    tune-lora) step tune-lora 90 "python3 bench/tune_lora_kernels.py --config $MODEL/config.json --rank ${RANK:-16} \
             --budget-s ${TUNE_S:-240} --out $OUT/lora --json $OUT/tune_lora.json" ;;
    image-copy) step image-copy 60 "python3 bench/bench_image_copy.py --json $OUT/image_copy.json" ;;
    images) step images 60 "python3 bench/bench_images.py --repeats 5 --json $OUT/images.json" ;;
    serve-engine) step serve-engine ${NEED:-240} "python3 bench/bench_serve_gpu.py engine --model $MODEL $SERVE_FLAGS \
             --soft-tokens ${SOFT:-280,140,70} --anatomy ${ANATOMY:-0} --json $OUT/serve_engine.json" ;;
    serve-http) step serve-http 180 "python3 bench/bench_serve_gpu.py http --model $MODEL $SERVE_FLAGS \
             --soft-tokens ${SOFT:-280} --json $OUT/serve_http.json" ;;
    serve-spy) step serve-spy 240 "bash bench/gpu/profile_serve.sh $MODEL $OUT --graphs --levels 8,256 --scale 1 \
             --soft-tokens 280 $SERVE_FLAGS" ;;
    train) step train 200 "python3 bench/bench_train.py --model $MODEL --data $DATA --batch ${BATCH:-16} \
             --steps ${STEPS:-6} --warmup ${WARMUP:-2} --workers 8 --extra-batches=${EXTRA:-} ${TRAIN_FLAGS:-} --json $OUT/train.json" ;;
    cache-out) step cache-out 60 "tar -C /root/inductor -cf - . | xz -T0 --lzma2=preset=3,dict=256MiB > $OUT/inductor.tar.xz; ls -la $OUT/inductor.tar.xz" ;;
    *) echo "unknown step $s"; exit 2 ;;
  esac
done
echo "### done t=$(( $(date +%s) - T0 ))s"
