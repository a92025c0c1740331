#!/usr/bin/env bash
# Issue 20 on the eval users: the per-user fusions (fixed, strength picked, learned per anchor, per anchor and layer)
# at k = 1, 2, 4, MTA alone, on the users, sizes and bank of a finished powered run (benchmarks/run_lamp.sh RUN
# --history-sizes 2,4,8 --no-full-profile), each compared answer by answer with that run's mta and MTA's parts. The
# powered run's own setting (fixed at the task's tuned k) is not run again. A variant with a versus.json in OUT_DIR is
# skipped (an interrupted one is read back by mta bench). Eval users: run once per setting you report.
# Usage: benchmarks/fusion_eval.sh RUN [OUT_DIR] [THEIRS]
#   RUN: the run whose bank is reused (RUN/lamp2/bank, RUN/lamp4/bank), e.g. runs/bench20; OUT_DIR default runs/eval20;
#   THEIRS: the run whose answers are compared, default RUN; a published copy works (benchmarks/results/powered).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=../shared/data/lamp
RUN=${1:?usage: benchmarks/fusion_eval.sh RUN [OUT_DIR] [THEIRS]}
OUT=${2:-runs/eval20}
THEIRS=${3:-$RUN}
variant() {  # task data eval-fraction tag adapt k
  local task=$1 data=$2 fraction=$3 tag=$4 adapt=$5 k=$6 name=$4-${5/learn-layer/layer}-k$6
  [ -f "$OUT/$name/versus.json" ] && return
  mta bench --task "$task" --data "$DATA/$data" --eval-fraction "$fraction" --seed 0 --out "$OUT/$name" \
    --history-sizes 2,4,8 --no-full-profile --methods mta --reuse-bank "$RUN/$tag/bank" --fusion-adapt "$adapt" --k "$k"
  python benchmarks/versus.py --ours "$OUT/$name:mta" --theirs "$THEIRS/$tag" --methods mta merge-only stack-only \
    --out "$OUT/$name/versus.json"
}
for adapt in fixed pick learn learn-layer; do
  for k in 1 2 4; do
    [ "$adapt/$k" = fixed/4 ] || variant LaMP-4 news_headline.json 0.375 lamp4 "$adapt" "$k"
    [ "$adapt/$k" = fixed/1 ] || variant LaMP-2 movie_tagging.json 0.3333 lamp2 "$adapt" "$k"
  done
done
