#!/usr/bin/env bash
# The decisive run (issue 23): steer, random and prompt (context distillation) on the bundled SmolLM2
# and classic 132, the compare preset (3 rounds, every model scored zero-shot and k-shot), seeds paired
# across arms and run seed by seed, the random null at K = 19. Resumable: rerun the same command after
# a kill; a run stopped early leaves the arms paired on the seeds it finished.
#   bash scripts/decisive.sh [run|report] [OUT] [SEEDS] [VIGNETTES]
# `report` runs nothing: it writes compare.md and the seed plan (plan.md) from the seeds finished so
# far, and copies them with the configs into docs/results/decisive/.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
out=${2:-runs/decisive}
seeds=${3:-$(seq -s, 0 19)}
vignettes=${4:-../shared/tinymfv/vignettes_classic_other_violate.jsonl}
args=(personas/anti_authority.yaml -o "$out" --config compare --arms steer,random,prompt --seeds "$seeds"
  --vignettes "$vignettes")
case "$mode" in
  run) .venv/bin/steerheal compare "${args[@]}" ;;
  report)
    .venv/bin/steerheal compare "${args[@]}" --report-only
    .venv/bin/steerheal compare "${args[@]}" --plan
    dest=docs/results/decisive
    mkdir -p "$dest"
    cp "$out"/compare.md "$out"/compare.json "$out"/compare.png "$out"/plan.md "$out"/plan.json "$out"/null.json "$dest"/
    for arm in steer random prompt; do
      sed "s/(trajectory.png)/(trajectory_$arm.png)/; s/(profile.png)/(profile_$arm.png)/" "$out/$arm/report.md" \
        > "$dest/report_$arm.md"
      cp "$out/$arm/trajectory.png" "$dest/trajectory_$arm.png"
      cp "$out/$arm/profile.png" "$dest/profile_$arm.png"
      cp "$out/$arm/seed_0/config.yaml" "$dest/config_$arm.yaml"  # every resolved key, the commit, the inputs
    done
    ;;
  *) echo "usage: bash scripts/decisive.sh [run|report] [OUT] [SEEDS] [VIGNETTES]" >&2; exit 2 ;;
esac
