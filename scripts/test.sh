#!/usr/bin/env bash
# Lint and run the whole test suite on CPU (creates .venv if needed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 CUDA_VISIBLE_DEVICES=""
.venv/bin/ruff check .
# Two workers (pytest-xdist), one core each: CI's two cores spend less time idle in Python and subprocesses.
# worksteal: conftest hands out the slow tests first, and an idle worker takes queued tests from the busy one.
exec .venv/bin/python -m pytest -q -n "${SEGCOMPRESS_TEST_WORKERS:-2}" --dist worksteal "$@"
