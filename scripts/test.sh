#!/usr/bin/env bash
# Set up everything the tests need, then run them. The GCS emulator and the vLLM engine are
# started by the test fixtures; the browser tests need Debian's Chromium and its driver.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v chromedriver >/dev/null; then
  apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null
fi
export HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
.venv/bin/ruff check .
.venv/bin/mypy adapter_contract finetune serve ui petbreed_cli.py tests bench
.venv/bin/pytest -q "$@"
