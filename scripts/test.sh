#!/usr/bin/env bash
# Lint and run the whole test suite on CPU (creates .venv if needed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 CUDA_VISIBLE_DEVICES=""
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
