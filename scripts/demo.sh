#!/usr/bin/env bash
# The main job on the embedded default: build a tiny Gemma 4 and a synthetic pets set, train,
# evaluate and publish a LoRA adapter, then serve it with vLLM and start the Gradio page.
# Both servers keep running in the background; their logs are in artifacts/logs/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
PB=.venv/bin/petbreed
API_PORT=${API_PORT:-8080} UI_PORT=${UI_PORT:-7860}
mkdir -p artifacts/logs
[ -f artifacts/tiny-gemma4/config.json ] || $PB make-tiny-model artifacts/tiny-gemma4
[ -f artifacts/data/synthetic/annotations/list.txt ] || $PB make-synthetic-data artifacts/data/synthetic --breeds 6
$PB train --data artifacts/data/synthetic --base-model artifacts/tiny-gemma4 --output "artifacts/runs/pets-$(date +%s)" \
  --registry artifacts/registry --name pets
echo "reports: artifacts/registry/pets/*/eval/ (report.json, confusion.png, learning_curve.png)"

nohup $PB serve --host 127.0.0.1 --port "$API_PORT" > artifacts/logs/serve.log 2>&1 &
echo "starting the prediction API (vLLM, about a minute)..."
for _ in $(seq 300); do
  curl -sf "http://127.0.0.1:$API_PORT/readyz" >/dev/null && break
  sleep 1
done
curl -sf "http://127.0.0.1:$API_PORT/readyz" >/dev/null || { echo "API did not start; see artifacts/logs/serve.log"; exit 1; }
nohup $PB ui --api-url "http://127.0.0.1:$API_PORT" --port "$UI_PORT" > artifacts/logs/ui.log 2>&1 &
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$UI_PORT/" >/dev/null && break; sleep 1; done
echo "prediction API: http://127.0.0.1:$API_PORT/docs"
echo "petbreed UI:    http://127.0.0.1:$UI_PORT/"
