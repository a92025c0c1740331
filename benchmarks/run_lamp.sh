#!/usr/bin/env bash
# The LaMP benchmark of issue 3 on both shared tasks: LaMP-2 (48 users: 32 bank / 16 eval) and
# LaMP-4 (64 users: 40 bank / 24 eval), seeded splits written into each run folder. The eval users are
# never tuning users: benchmarks/tune.py draws those from the bank users of this same split. Both tasks
# fit in 60 minutes on 2 CPU cores.
# Extra arguments go to both runs, e.g. `--limit-users 2` for a smoke run.
# Usage: benchmarks/run_lamp.sh [OUT_DIR] [mta bench options...]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=../shared/data/lamp
OUT=${1:-runs/bench}
shift || true
mta bench --task LaMP-2 --data "$DATA/movie_tagging.json" --eval-fraction 0.3333 --seed 0 --out "$OUT/lamp2" "$@"
mta bench --task LaMP-4 --data "$DATA/news_headline.json" --eval-fraction 0.375 --seed 0 --out "$OUT/lamp4" "$@"
