#!/usr/bin/env bash
# The paper profile rehearsed offline (params.yaml `rehearsal`: the paper grid on tiny stand-ins of its
# models and data, the same methods, tables, lm-eval tasks, launcher and DeepSpeed config), in a scratch
# clone of this checkout, through the real DVC:
#   bash scripts/rehearsal.sh            every cell of the paper grid, the report (kept in this checkout's
#                                        reports/rehearsal/, stand-in banner and all), then the Prefect
#                                        deployment on the same profile, which must find everything done
#   bash scripts/rehearsal.sh --slice    one cell per method family on one dataset (CI), then the report
# Set REHEARSAL_DIR to keep the clone (default: a temporary folder, removed at the end); run again with the
# same REHEARSAL_DIR and it resumes, at this checkout's commit, where it stopped (stages already done stay done).
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
mode=${1:-full}
work=${REHEARSAL_DIR:-$(mktemp -d)}
[ -n "${REHEARSAL_DIR:-}" ] || trap 'rm -rf "$work"' EXIT
if [ -n "${REHEARSAL_DIR:-}" ] && [ -d "$work/repo/.git" ]; then
  # resume: bring the kept clone to this checkout's commit and keep what DVC computed (its lock and outputs)
  cd "$work/repo"
  [ ! -f dvc.lock ] || cp dvc.lock "$work/dvc.lock.keep"
  git fetch -q "$src" HEAD
  git reset -q --hard FETCH_HEAD
  [ ! -f "$work/dvc.lock.keep" ] || mv "$work/dvc.lock.keep" dvc.lock
  echo "rehearsal: resuming in $work/repo at $(git rev-parse --short HEAD)"
else
  rm -rf "$work/repo"
  git clone -q "$src" "$work/repo"
  cd "$work/repo"
  ln -s "$src/.venv" .venv
fi
source scripts/env.sh
export PATH="$PWD/.venv/bin:$PATH"
python -m domlora profile use rehearsal >/dev/null
t0=$(date +%s)
if [ "$mode" = "--slice" ]; then
  # one cell of each method family (LoRA, DomLoRA, PLoP, IST, every variant at Dom, an ablation, full
  # parameters), on LLaMA and Magicoder (the ablations are LLaMA-only), each trained on two gloo
  # processes (ZeRO-2, or DDP for IST and AdaLoRA) and evaluated on lm-eval's HumanEval(+) stand-ins
  methods="lora domlora plop ist dora_dom loraplus_dom adalora_dom gralora_dom norm_dom down_last full_dom"
  targets=""
  for m in $methods; do targets="$targets evaluate@llama31_8b-magicoder-$m-0"; done
  dvc repro $targets evaluate_base@llama31_8b-magicoder
  dvc repro --single-item report
  cells=$(for m in $methods; do echo "llama31_8b-magicoder-$m-0"; done)
else
  dvc repro
  cells=$(python -c "import yaml; print('\n'.join(yaml.safe_load(open('grid.yaml'))['cells']))")
fi
echo "rehearsal: dvc repro took $(( $(date +%s) - t0 )) s"
python - $cells <<'PY'
import json, sys
from pathlib import Path
bad = []
for cell in sys.argv[1:]:
    tm = json.loads(Path(f"runs/{cell}/train_metrics.json").read_text())
    ev = json.loads(Path(f"runs/{cell}/eval.json").read_text())
    if tm["status"] != "success":
        bad.append(f"{cell}: training {tm['status']}: {tm.get('error')}")
    failed = {t: r.get("error") or r.get("reason") for t, r in ev["tasks"].items() if r.get("status") != "success"}
    if failed:
        bad.append(f"{cell}: evaluation {failed}")
    if not all(r.get("stand_in") for r in ev["tasks"].values()):
        bad.append(f"{cell}: a task ran without its stand-in data")
assert not bad, "\n".join(bad)
tables = Path("reports/tables.md").read_text()
assert "STAND-IN" in tables, "the report does not say the numbers come from stand-in data"
print(f"rehearsal: {len(sys.argv) - 1} cells trained and evaluated; report written")
PY
if [ "$mode" != "--slice" ]; then
  grep -q "### Figure 2" reports/tables.md
  for t in 1 2 3 4 5 10 11 12; do grep -q "### Table $t:" reports/tables.md || { echo "rehearsal: Table $t missing"; exit 1; }; done
  # keep the report where a reader finds it: what a GPU run of the paper grid will produce, table by table
  # (every number from random stand-ins, as its banner says)
  grep -q "STAND-IN DATA" reports/README.md || { echo "rehearsal: the report lacks its stand-in banner"; exit 1; }
  keep="$src/reports/rehearsal"
  rm -rf "$keep.tmp" && mkdir -p "$keep.tmp"
  cp -r reports/README.md reports/tables.md reports/results.csv reports/metrics.json "$keep.tmp"/
  [ ! -d reports/figures ] || cp -r reports/figures "$keep.tmp"/
  rm -rf "$keep" && mv "$keep.tmp" "$keep"
  echo "rehearsal: report kept in $keep"
  # the Prefect deployment on the same profile: everything is already in DVC
  export PREFECT_PORT=${PREFECT_PORT:-4210}
  bash scripts/prefect_up.sh >/dev/null
  trap 'bash scripts/prefect_up.sh stop; [ -n "${REHEARSAL_DIR:-}" ] || rm -rf "$work"' EXIT
  export PREFECT_API_URL="http://127.0.0.1:$PREFECT_PORT/api"
  t1=$(date +%s)
  prefect deployment run domlora/full-grid -p profile=rehearsal --watch
  echo "rehearsal: the deployment finished in $(( $(date +%s) - t1 )) s"
  # a stage the flow computes leaves its log under .domlora_logs/: none may be there
  if [ -d .domlora_logs ] && [ -n "$(ls .domlora_logs)" ]; then
    echo "rehearsal: the deployment recomputed: $(ls .domlora_logs)"; exit 1
  fi
  echo "rehearsal: the deployment found every stage up to date"
  out=$(dvc status)
  echo "$out" | grep -q "up to date" || { echo "rehearsal: dvc status after the deployment: $out"; exit 1; }
fi
