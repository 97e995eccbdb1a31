#!/usr/bin/env bash
# Where serving time goes: py-spy samples every process of the GPU benchmark (MODE engine: the
# in-process front-end and its engine core; http: also the `petbreed serve` it starts, and its
# engine core) for DURATION seconds from the start of its second concurrency level (pass
# --levels 8,256; WINDOWS below), while nvidia-smi logs GPU utilisation. Called by device.sh's
# serve-spy step. SPY_FLAGS=--native: C/C++ frames too (py-spy then pauses the processes for each
# sample, so they run slower; rather than the default --nonblocking).
#   MODE=http bash bench/gpu/profile_serve.sh MODEL OUT [bench_serve_gpu.py flags...]
set -uo pipefail
MODEL=$1 OUT=$2; shift 2
DURATION=${DURATION:-40}
SPY=$(ls /root/extra/py_spy-*.data/scripts/py-spy 2>/dev/null || command -v py-spy)
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -lms 500 > "$OUT/gpu_util.csv" &
SMI=$!
python3 bench/bench_serve_gpu.py "${MODE:-engine}" --model "$MODEL" --no-reference "$@" --json "$OUT/serve_spy.json" \
  > "$OUT/serve_spy.stdout" &
BENCH=$!
# A result line means a level has ended and the next has begun. That level first makes its images,
# before its clock starts: SPY_DELAY seconds keep that out of the profile (the 768 images of
# c=256 at --scale 1 took about 5.5 s of the 2026-12-02 profile). WINDOWS=N records the starts of
# levels 2..N+1 (e.g. --levels 8,1,256 --min-requests 350 WINDOWS=2: one window at c=1, one at 256).
for w in $(seq "${WINDOWS:-1}"); do
  until [ "$(grep -c '"concurrency"' "$OUT/serve_spy.stdout" 2>/dev/null)" -ge "$w" ] || ! kill -0 "$BENCH" 2>/dev/null; do
    sleep 1
  done
  sleep "${SPY_DELAY:-0}"
  "$SPY" record --pid "$BENCH" --subprocesses --threads ${SPY_FLAGS:---nonblocking} --rate ${SPY_RATE:-100} --duration "$DURATION" \
    --format raw -o "$OUT/serve_$w.spy"
  python3 bench/gpu/spy_top.py "$OUT/serve_$w.spy" > "$OUT/serve_spy_top_$w.txt" && xz -T0 "$OUT/serve_$w.spy"
done
wait "$BENCH"; kill "$SMI"
