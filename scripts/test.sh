#!/usr/bin/env bash
# Run the default test suite (slow tests are skipped; add MLLMDR_SLOW=1 to include them).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
MARK=(-m "not slow")
[ "${MLLMDR_SLOW:-0}" = "1" ] && MARK=(-m "slow or not slow")   # overrides pyproject's addopts -m
.venv/bin/python -m pytest -q --durations=12 "${MARK[@]}" tests "$@"
