#!/usr/bin/env bash
# The placement comparison, resumable across interruptions and fresh clones: DVC's cache (and with it the
# run-cache of every finished stage) lives outside the work tree, so `dvc repro` in a new clone restores what
# finished instead of recomputing it, and a run stopped half-way loses only the stage it was in.
#
#   bash scripts/placement.sh                  # the `placement` profile (docs/placement.md: <= 6 h on 2 cores)
#   bash scripts/placement.sh placement_ci     # its wiring in minutes
#   bash scripts/placement.sh placement_all -j 2   # every tier; extra arguments go to `dvc repro`
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
dvc repro "$@"
echo "placement: dvc repro of profile $profile took $(( $(date +%s) - t0 )) s (cache: $cache)"
