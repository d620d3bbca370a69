#!/usr/bin/env bash
# One seed of the compare preset (steer arm, 3 rounds, classic 132) in bf16 and then in fp32, into
# OUT/bf16 and OUT/fp32, then bench_dtype.py's side-by-side: every number, answer and the round
# steps' time. Resumable: rerun the same command after a kill and each finished step is kept.
#   bash scripts/dtype_check.sh [OUT] [VIGNETTES]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/dtype}
vignettes=${2:-../shared/tinymfv/vignettes_classic_other_violate.jsonl}
mkdir -p "$out"
for dt in bf16 fp32; do
  /usr/bin/time -v -o "$out/$dt.time" .venv/bin/steerheal compare personas/anti_authority.yaml -o "$out/$dt" \
    --config compare --arms steer --seeds 0 --null-k 0 --dtype "$dt" --vignettes "$vignettes"
done
.venv/bin/python benchmarks/bench_dtype.py runs "$out/bf16/steer/seed_0" "$out/fp32/steer/seed_0"
