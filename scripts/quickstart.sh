#!/usr/bin/env bash
# Train the quickstart recipe end to end on the built-in synthetic scenes (creates .venv if needed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/segcompress fit --config recipes/quickstart.yaml "$@"
