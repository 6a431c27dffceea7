#!/usr/bin/env bash
# The main job on the embedded default: a synthetic 3-site corpus, site 1 trained locally with
# SmolLM2-135M, held-out participants scored and evaluated. (Becomes the federated demo with issue 4.)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
OUT=${OUT:-demo-out}
S=.venv/bin/mllmdr-site
rm -rf "$OUT"
$S data synth "$OUT/synth" --format edaic --participants 30 --sites 3 --seed 0
$S data check "$OUT/synth/site1"
$S init --workspace "$OUT/ws-site1" --site-id site1
$S extract --workspace "$OUT/ws-site1" --corpus "$OUT/synth/site1"
$S rationales --workspace "$OUT/ws-site1"
$S train --workspace "$OUT/ws-site1" --local --base-model smollm2 --stage1-epochs 1 --stage2-epochs 2
TEST_ID=$($S data check "$OUT/synth/site1" --json | .venv/bin/python -c 'import json,sys; print(next(p["id"] for p in json.load(sys.stdin)["participants"] if p["split"]=="test"))')
$S score "$TEST_ID" --workspace "$OUT/ws-site1"
$S evaluate --workspace "$OUT/ws-site1" --split test
