#!/usr/bin/env bash
# The main job: the whole pipeline of the active profile (embedded by default) through DVC.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export PATH="$PWD/.venv/bin:$PATH"
[ -d .dvc ] || dvc init -q
python -m domlora grid
dvc repro "$@"
dvc metrics show
echo "report: reports/README.md   tables: reports/tables.md   plots: dvc plots show"
