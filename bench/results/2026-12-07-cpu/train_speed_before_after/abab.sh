#!/bin/bash
# Session 45: before (8ee2382) / after (HEAD) training throughput, same machine, one session, ABAB.
set -u
O=/work/s45/abab; mkdir -p $O
old() { (cd /work/wt/old && timeout 1200 .venv/bin/python -m bench.old_speed --batches 4 --batch-size $1 --threads $2 --out /work/s45/old_ws_$1 > $O/old_b$1_t$2_$3.json 2> $O/old_b$1_t$2_$3.err); echo "old b$1 t$2 run$3 rc $? $(date +%T)"; }
new() { (cd /work/main && timeout 1200 .venv/bin/python -m bench.train_speed --workspace /work/s45/speed/ws --batch-size $1 --threads $2 --batches 4 --out /work/s45/speed_run_$1 > $O/new_b$1_t$2_$3.json 2> $O/new_b$1_t$2_$3.err); echo "new b$1 t$2 run$3 rc $? $(date +%T)"; }
old 4 2 1; new 4 2 1; new 4 2 2; old 4 2 2; old 4 2 3; new 4 2 3

echo done
