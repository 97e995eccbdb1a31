#!/usr/bin/env bash
# Create .venv with the exact, locked dependency tree (requirements/lock.txt) and petbreed itself.
# --isolated: ignore machine-wide pip settings, so torch/torchvision come from PyPI as locked.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install --isolated -q --no-deps -r requirements/lock.txt
.venv/bin/pip install --isolated -q --no-deps -e .
