#!/usr/bin/env bash
# Where serving time goes at saturation: py-spy samples every process of the in-process engine
# benchmark (front-end, engine core) for DURATION seconds from the start of its second
# concurrency level (pass --levels 8,256), while nvidia-smi logs GPU utilisation. Called by
# device.sh's serve-spy step.
#   bash bench/gpu/profile_serve.sh MODEL OUT [bench_serve_gpu.py engine flags...]
set -uo pipefail
MODEL=$1 OUT=$2; shift 2
DURATION=${DURATION:-40}
SPY=$(ls /root/extra/py_spy-*.data/scripts/py-spy 2>/dev/null || command -v py-spy)
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -lms 500 > "$OUT/gpu_util.csv" &
SMI=$!
python3 bench/bench_serve_gpu.py engine --model "$MODEL" --no-reference "$@" --json "$OUT/serve_spy.json" \
  > "$OUT/serve_spy.stdout" &
BENCH=$!
# The first level's result line means the engine is up and the second level has begun. It first
# makes its images, before its clock starts: SPY_DELAY seconds keep that out of the profile (the
# 768 images of c=256 at --scale 1 took about 5.5 s of the 2026-12-02 profile; 11 ms an image on
# the 2-core development machine).
until grep -q '"concurrency"' "$OUT/serve_spy.stdout" 2>/dev/null || ! kill -0 "$BENCH" 2>/dev/null; do sleep 1; done
sleep "${SPY_DELAY:-0}"
"$SPY" record --pid "$BENCH" --subprocesses --threads --nonblocking --rate 100 --duration "$DURATION" \
  --format raw -o "$OUT/serve.spy"
wait "$BENCH"; kill "$SMI"
python3 bench/gpu/spy_top.py "$OUT/serve.spy" > "$OUT/serve_spy_top.txt"
