#!/usr/bin/env bash
# The decisive run (issue 23): steer, random and prompt (context distillation) on the bundled SmolLM2
# and classic 132, the compare preset (3 rounds, every model scored zero-shot and k-shot), seeds paired
# across arms and run seed by seed, the random null at K = 19. Resumable: rerun the same command after a
# kill; a run stopped early leaves the arms paired on the seeds it finished, and
#   .venv/bin/steerheal compare ... --report-only   reports them.
#   bash scripts/decisive.sh [OUT] [SEEDS] [VIGNETTES]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/decisive}
seeds=${2:-$(seq -s, 0 19)}
vignettes=${3:-../shared/tinymfv/vignettes_classic_other_violate.jsonl}
.venv/bin/steerheal compare personas/anti_authority.yaml -o "$out" --config compare \
  --arms steer,random,prompt --seeds "$seeds" --vignettes "$vignettes"
