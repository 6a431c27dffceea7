#!/usr/bin/env bash
# The main job on the embedded default: a coordinating center and 3 synthetic hospital sites on
# 127.0.0.1 (TLS + node authentication), SmolLM2-135M as the base, both training stages federated
# over adapters only, a pooled evaluation, then each site scores one held-out participant locally.
# Knobs (environment): PARTICIPANTS (all sites together, default 24), STAGE1_ROUNDS (default 3), STAGE2_ROUNDS (default 6;
# 1 + 2 under DP=1 / DP=patient, which the demo policies' budgets cover; 1 + 2 without DP took ~13 min in sessions 15 and 18, before local batch 1, and learns little),
# LOCAL_EPOCHS (each site's epochs per round, default 1; more rounds and epochs learn more: README "Does federating help?"),
# BATCH_SIZE (each site's local batch, FedAvg's B, default 1: more local steps per round, README "Does federating help?"),
# MAX_CONTEXT_TOKENS (dialogue tokens kept per PHQ item, default 256 as in the benchmark; fewer train faster),
# RATIONALES=1 to ask the embedded teacher for rationales first (slower), DP=1 to run with
# site-level differential privacy (z=1.0, C=1.0, delta=1e-5: policies/demo-dp.json), DP=patient for
# patient-level DP-SGD (item steps, z=1.8, C=1.0: epsilon 7.96 per patient after its default 1 + 2 rounds
# of 1 local epoch; policies/demo-dp-patient.json; more rounds or epochs are refused by the budget),
# SECAGG=1 for secure aggregation with the sum-only ffa-lora aggregation (policies/demo-secagg.json;
# not with DP: each knob brings its own policy file), DEMO_OUT (the folder the demo writes, default demo-out; it is
# deleted and rewritten at each run, so an existing non-empty folder is refused unless an earlier demo made it,
# as its file .mllmdr-demo-output shows; OUT, which many shells set, is not read: session 46).
set -euo pipefail
# the knobs first, before any setup: DP=true or SECAGG=yes ran the short DP schedule with no policy, or
# ignored SECAGG (session 44)
case "${DP:-0}" in 0|1|patient) ;; *) echo "demo.sh: DP=${DP} is not one of 0, 1, patient" >&2; exit 2 ;; esac
case "${SECAGG:-0}" in 0|1) ;; *) echo "demo.sh: SECAGG=${SECAGG} is not 0 or 1" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
if [ "${DP:-0}" != 0 ] && [ "${SECAGG:-0}" = 1 ]; then
  echo "demo.sh: DP=${DP} and SECAGG=1 cannot be combined (each brings its own policy file: policies/demo-dp*.json," \
       "policies/demo-secagg.json); run one of them" >&2
  exit 2
fi
DEMO_OUT=${DEMO_OUT:-demo-out}
MARKER=.mllmdr-demo-output   # written into every folder this demo makes: only such a folder is ever deleted
PARTICIPANTS=${PARTICIPANTS:-24}
FULL_ROUNDS=(3 6)   # stage 1, stage 2 without DP: what reaches the demo's target (README, bench.federation)
DP_ROUNDS=(1 2)     # under DP=1 / DP=patient: what the demo policies' epsilon budgets cover (tested)
if [ "${DP:-0}" = 0 ]; then ROUNDS=("${FULL_ROUNDS[@]}"); else ROUNDS=("${DP_ROUNDS[@]}"); fi
STAGE1_ROUNDS=${STAGE1_ROUNDS:-${ROUNDS[0]}}
STAGE2_ROUNDS=${STAGE2_ROUNDS:-${ROUNDS[1]}}
LOCAL_EPOCHS=${LOCAL_EPOCHS:-1}
BATCH_SIZE=${BATCH_SIZE:-1}
MAX_CONTEXT_TOKENS=${MAX_CONTEXT_TOKENS:-256}
# the numbers before any work (session 46: a bad one was found at step 4, minutes in; too few participants only
# after the whole run, as a bare traceback). Each site needs 3 participants for a test one (mllm_dr/synth.py
# _splits: 20% test from 3 on); the 3 sites get PARTICIPANTS/3 each, rounded down for the smallest.
MIN_PARTICIPANTS=9
need_int() {   # NAME VALUE MIN: a whole number from MIN to 999999 (no sign, no leading zero), else one line, exit 2
  if ! [[ $2 =~ ^(0|[1-9][0-9]{0,5})$ ]] || [ "$2" -lt "$3" ]; then
    echo "demo.sh: $1=$2: must be a whole number from $3 to 999999${4:+ ($4)}" >&2
    exit 2
  fi
}
need_int PARTICIPANTS "$PARTICIPANTS" $MIN_PARTICIPANTS "3 per site, so that each of the 3 sites has a test participant to score"
need_int STAGE1_ROUNDS "$STAGE1_ROUNDS" 0
need_int STAGE2_ROUNDS "$STAGE2_ROUNDS" 0
need_int LOCAL_EPOCHS "$LOCAL_EPOCHS" 1
need_int BATCH_SIZE "$BATCH_SIZE" 1
need_int MAX_CONTEXT_TOKENS "$MAX_CONTEXT_TOKENS" 33 "the workspace keeps more than 32 dialogue tokens per item"
if [ $((STAGE1_ROUNDS + STAGE2_ROUNDS)) = 0 ]; then
  echo "demo.sh: STAGE1_ROUNDS=0 and STAGE2_ROUNDS=0: the run needs at least one round" >&2
  exit 2
fi
# DEMO_OUT is deleted and rewritten: never a folder this demo did not make (session 46: OUT, a common name, came
# from the caller's shell and its folder was deleted)
if [ -n "${OUT:-}" ] && [ "$OUT" != "$DEMO_OUT" ]; then
  echo "demo.sh: note: OUT=$OUT is not read; the demo writes to DEMO_OUT=$DEMO_OUT" >&2
fi
if [ -L "$DEMO_OUT" ] || { [ -e "$DEMO_OUT" ] && [ ! -d "$DEMO_OUT" ]; }; then
  echo "demo.sh: DEMO_OUT=$DEMO_OUT is not a folder (a file or a link); name a new folder" >&2
  exit 2
fi
earlier_demo() {   # a demo's output from before the marker (session 46): only what the demo writes, nothing else
  local f
  for f in "$1"/* "$1"/.[!.]*; do
    [ -e "$f" ] || continue
    case "${f##*/}" in
      synth|center|ws-site[123]|site[123].request.json|site[123].bundle.json|site[123].check.json) ;;
      *) return 1 ;;
    esac
  done
}
if [ -d "$DEMO_OUT" ] && [ ! -f "$DEMO_OUT/$MARKER" ] && [ -n "$(ls -A "$DEMO_OUT")" ] && ! earlier_demo "$DEMO_OUT"; then
  echo "demo.sh: DEMO_OUT=$DEMO_OUT is not empty and was not made by this demo (no $MARKER in it): not deleting it;" \
       "name a new folder (DEMO_OUT=...)" >&2
  exit 2
fi
export OMP_NUM_THREADS=1            # 3 sites share 2 cores: one thread each is fastest
export MLLMDR_CACHE=${MLLMDR_CACHE:-$HOME/.cache/mllm-dr}
S=.venv/bin/mllmdr-site
C=.venv/bin/mllmdr-center
SITES=(site1 site2 site3)
START=$(date +%s)

cleanup() {
  for s in "${SITES[@]}"; do [ -d "$DEMO_OUT/ws-$s" ] && $S stop --workspace "$DEMO_OUT/ws-$s" >/dev/null 2>&1 || true; done
  [ -d "$DEMO_OUT/center" ] && $C stop --dir "$DEMO_OUT/center" >/dev/null 2>&1 || true
}
trap cleanup EXIT

rm -rf "$DEMO_OUT"
mkdir -p "$DEMO_OUT"
echo "made by scripts/demo.sh; the next demo run deletes this folder" > "$DEMO_OUT/$MARKER"
echo "== 1/5 synthetic corpus: $PARTICIPANTS participants over 3 sites (E-DAIC layout)"
$S data synth "$DEMO_OUT/synth" --format edaic --participants "$PARTICIPANTS" --sites 3 --seed 0

echo "== 2/5 each site: workspace, features (opensmile + OpenFace CSVs)$([ "${RATIONALES:-0}" = 1 ] && echo ', rationales')"
for s in "${SITES[@]}"; do
  $S init --workspace "$DEMO_OUT/ws-$s" --site-id "$s" --max-context-tokens "$MAX_CONTEXT_TOKENS"
  $S extract --workspace "$DEMO_OUT/ws-$s" --corpus "$DEMO_OUT/synth/$s"
  if [ "${RATIONALES:-0}" = 1 ]; then $S rationales --workspace "$DEMO_OUT/ws-$s"; fi
done

echo "== 3/5 center: CA, TLS certificate, signing key; sites enroll with P-384 node keys"
$C init --dir "$DEMO_OUT/center" --port 19092
PORT=19101
for s in "${SITES[@]}"; do
  $S enroll --workspace "$DEMO_OUT/ws-$s" --out "$DEMO_OUT/$s.request.json"
  $C approve "$DEMO_OUT/$s.request.json" --dir "$DEMO_OUT/center" --out "$DEMO_OUT/$s.bundle.json"
  $S enroll --workspace "$DEMO_OUT/ws-$s" --accept "$DEMO_OUT/$s.bundle.json" --supernode-port $PORT
  PORT=$((PORT + 1))
done

echo "== 4/5 SuperLink + 3 SuperNodes; federated run (stage 1: $STAGE1_ROUNDS round(s), stage 2: $STAGE2_ROUNDS; $LOCAL_EPOCHS local epoch(s) each, local batch $BATCH_SIZE)"
$C serve --dir "$DEMO_OUT/center" --detach
for s in "${SITES[@]}"; do $S train --workspace "$DEMO_OUT/ws-$s" --federated --detach; done
POLICY=()
# under DP the frame moments of feature-norms=federated are refused (no DP mechanism covers them); under
# patient-level DP so are a site's own norms (a function of every patient): each participant by their own
[ "${DP:-0}" = 1 ] && POLICY=(--policy policies/demo-dp.json --set feature-norms=site)
[ "${DP:-0}" = patient ] && POLICY=(--policy policies/demo-dp-patient.json --set feature-norms=participant)
[ "${SECAGG:-0}" = 1 ] && POLICY=(--policy policies/demo-secagg.json --aggregation ffa-lora)
$C run --dir "$DEMO_OUT/center" --name demo --base-model smollm2 --min-sites 3 "${POLICY[@]}" --round-validation \
  --stage1-rounds "$STAGE1_ROUNDS" --stage2-rounds "$STAGE2_ROUNDS" --local-epochs "$LOCAL_EPOCHS" --eval-max-new-tokens 48 \
  --set batch-size="$BATCH_SIZE" --timeout 7200   # ~35 min here; a machine half as fast must not be cut off at the default hour

echo "== 5/5 each site scores one held-out participant with the federated adapters (signature checked)"
for s in "${SITES[@]}"; do
  $S data check "$DEMO_OUT/synth/$s" --json > "$DEMO_OUT/$s.check.json"
  ID=$(.venv/bin/python -c '
import json, sys
ids = [p["id"] for p in json.load(open(sys.argv[1]))["participants"] if p["split"] == "test"]
if not ids:
    sys.exit("demo.sh: %s has no test participant to score (PARTICIPANTS=%s; %s or more give each site one)"
             % tuple(sys.argv[2:]))
print(ids[0])' "$DEMO_OUT/$s.check.json" "$s" "$PARTICIPANTS" "$MIN_PARTICIPANTS")
  $S score "$ID" --workspace "$DEMO_OUT/ws-$s" --max-new-tokens 48
  echo "   $s local report (per-participant rows stay on site): $DEMO_OUT/ws-$s/reports/federated-demo-test.md"
done
echo "== summary (synthetic corpus: NOT clinical data)"
$C status --dir "$DEMO_OUT/center"
$C status --dir "$DEMO_OUT/center" --json | .venv/bin/python -c '
import json, sys
from bench.federation import site_mean_baseline
s = json.load(sys.stdin); ev = s["evaluation"]
print("uplink per site: stage 1 %.2f MB, stage 2 %.2f MB (base %.0f MB)" % (
    s["bytes_up_per_stage"]["stage1"] / 1e6, s["bytes_up_per_stage"]["stage2"] / 1e6, (s["base_bytes"] or 0) / 1e6))
eps = [v for r in s["rounds"] for v in r["epsilon_total"].values()]
print("DP epsilon per site after the run: %s" % (("%.2f" % max(eps)) if eps else "off"))
ccc, item = ev["ccc"], ev["item_mae"]
if "maa_ccc" in ev:
    print("MAA head alone on the same participants: CCC %.2f, item MAE %.2f" % (ev["maa_ccc"], ev["maa_item_mae"]))
ok = ccc >= 0.6 and item <= 0.8
print("target pooled CCC >= 0.6 and item MAE <= 0.8: %s (CCC %.2f, item MAE %.2f, n %d)%s" % (
    "met" if ok else "NOT met", ccc, item, ev["n"],
    "" if ok else "; short by CCC %.2f / item MAE %.2f: more participants or rounds (PARTICIPANTS, STAGE2_ROUNDS)"
    % (max(0.0, 0.6 - ccc), max(0.0, item - 0.8))))
# the baseline a model must beat, bench.federation.site_mean_baseline (its one definition): each test participant
# predicted as their site mean training (train + dev) total (the demo holds every site labels here; a federation
# could not pool them)
base = site_mean_baseline(["%s/synth/%s" % (sys.argv[1], site) for site in sys.argv[2:]])
print("n %d test participants: a point estimate on a synthetic corpus (NOT clinical data), no interval; "
      "site-mean baseline (each predicted as their site\x27s mean train + dev total): %s" % (
          ev["n"], ("CCC %.2f, n %d (model CCC %.2f)" % (base["ccc"], base["n"], ccc)) if base["n"] else "n/a"))' \
  "$DEMO_OUT" "${SITES[@]}"
echo "learning curves: $DEMO_OUT/center/runs/demo/curves.png; sites keep their own reports (per-participant rows)"
echo "demo finished in $(( $(date +%s) - START )) s"
