#!/usr/bin/env bash
# Issue 20 on the eval users: the per-user fusions at each task's tuned k (learned per anchor; per anchor and layer;
# strength picked), MTA alone, on the users, sizes and bank of a finished powered run (benchmarks/run_lamp.sh RUN
# --history-sizes 2,4,8 --no-full-profile), then each compared answer by answer with that run's mta and MTA's parts.
# Eval users: run once per setting you report.
# Usage: benchmarks/fusion_eval.sh RUN [OUT_DIR]      (RUN: e.g. runs/bench20; OUT_DIR default runs/eval20)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=../shared/data/lamp
RUN=${1:?usage: benchmarks/fusion_eval.sh RUN [OUT_DIR]}
OUT=${2:-runs/eval20}
variant() {  # task data eval-fraction name adapt k
  local task=$1 data=$2 fraction=$3 name=$4 adapt=$5 k=$6 tag=${4%%-*}
  mta bench --task "$task" --data "$DATA/$data" --eval-fraction "$fraction" --seed 0 --out "$OUT/$name" \
    --history-sizes 2,4,8 --no-full-profile --methods mta --reuse-bank "$RUN/$tag/bank" --fusion-adapt "$adapt" --k "$k"
  python benchmarks/versus.py --ours "$OUT/$name:mta" --theirs "$RUN/$tag" --methods mta merge-only stack-only \
    --out "$OUT/$name/versus.json"
}
variant LaMP-4 news_headline.json 0.375 lamp4-learn-k4 learn 4
variant LaMP-2 movie_tagging.json 0.3333 lamp2-learn-k1 learn 1
variant LaMP-4 news_headline.json 0.375 lamp4-pick-k4 pick 4
variant LaMP-2 movie_tagging.json 0.3333 lamp2-pick-k1 pick 1
variant LaMP-4 news_headline.json 0.375 lamp4-layer-k4 learn-layer 4
variant LaMP-2 movie_tagging.json 0.3333 lamp2-layer-k1 learn-layer 1
