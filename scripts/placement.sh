#!/usr/bin/env bash
# The placement comparison, resumable across interruptions and fresh clones: DVC's cache (and with it the
# run-cache of every finished stage) lives outside the work tree, so `dvc repro` in a new clone restores what
# finished instead of recomputing it, and a run stopped half-way loses only the stage it was in.
#
#   bash scripts/placement.sh                  # the `placement` profile (docs/placement.md: <= 6 h on 2 cores;
#                                              # its report is kept in reports/placement/)
#   bash scripts/placement.sh placement_ci     # its wiring in minutes
#   bash scripts/placement.sh placement_all    # every tier; extra arguments go to `dvc repro` (e.g. a target)
#
# DOMLORA_DVC_CACHE overrides the cache folder (default ~/.cache/domlora/dvc-cache); it is written to
# .dvc/config.local, which git ignores, so the repository's own config is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-placement}
shift || true
cache=${DOMLORA_DVC_CACHE:-$HOME/.cache/domlora/dvc-cache}
mkdir -p "$cache"
source scripts/env.sh
export PATH="$PWD/.venv/bin:$PATH"
dvc cache dir --local "$cache"
python -m domlora profile use "$profile"
t0=$(date +%s)
# --keep-going: a stage that fails (a tier whose rate is still at its grid's edge, say) stops only what depends
# on it; the rest of the grid goes on, and the exit status still says that something failed
dvc repro --keep-going "$@"
echo "placement: dvc repro of profile $profile took $(( $(date +%s) - t0 )) s (cache: $cache)"
# a long run's report is kept beside the others (reports/<profile>/, committed; reports/placement.md is rewritten
# by whichever profile ran last)
case "$profile" in
  placement|placement_smol|placement_gemma_module|placement_gemma_kappa|placement_all)
    mkdir -p "reports/$profile/figures"
    # one folder deeper: its links to docs/ gain a ../
    sed 's#(\.\./docs/#(../../docs/#g' reports/placement.md > "reports/$profile/placement.md"
    for f in reports/figures/placement_*.png; do [ ! -e "$f" ] || cp "$f" "reports/$profile/figures/"; done
    echo "placement: report kept in reports/$profile/" ;;
esac
