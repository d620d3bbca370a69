#!/usr/bin/env bash
# The decisive run's pilot (issue 23): steer, random and prompt (context distillation), 3 seeds each,
# on the bundled SmolLM2 and classic 132, in the compare preset. Its per-seed spread sizes the seed
# plan. Resumable: rerun the same command after a kill.
#   bash scripts/pilot_decisive.sh [OUT] [VIGNETTES]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/pilot_bf16}
vignettes=${2:-../shared/tinymfv/vignettes_classic_other_violate.jsonl}
.venv/bin/steerheal compare personas/anti_authority.yaml -o "$out" --config compare \
  --arms steer,random,prompt --seeds 0,1,2 --null-k 0 --vignettes "$vignettes"
