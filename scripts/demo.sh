#!/usr/bin/env bash
# The main job on the embedded default: build a tiny Gemma 4 and a synthetic pets set, train,
# evaluate and publish a LoRA adapter, then serve it with vLLM and open the Gradio page.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
PB=.venv/bin/petbreed
[ -f artifacts/tiny-gemma4/config.json ] || $PB make-tiny-model artifacts/tiny-gemma4
[ -f artifacts/data/synthetic/annotations/list.txt ] || $PB make-synthetic-data artifacts/data/synthetic --breeds 6
$PB train --data artifacts/data/synthetic --base-model artifacts/tiny-gemma4 --output artifacts/runs/pets-$(date +%s) \
  --registry artifacts/registry --name pets
