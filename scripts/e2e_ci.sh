#!/usr/bin/env bash
# End to end through the real DVC on the `ci` profile (embedded model, a few steps, a few eval
# examples), in a scratch copy of this checkout: checks every stage's outputs, that a second
# `dvc repro` reruns nothing, and that `dvc plots show` renders offline. Then the `placement_ci` profile through
# scripts/placement.sh (tiers, per-method rates, page_budget / page_rank, the tier report), and in a second,
# fresh clone that the same cache restores every finished stage without recomputing one.
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone -q "$src" "$work/repo"
cd "$work/repo"
ln -s "$src/.venv" .venv
source scripts/env.sh
export PATH="$PWD/.venv/bin:$PATH"
python -m domlora profile use ci
t0=$(date +%s)
dvc repro
echo "e2e: dvc repro of the ci profile took $(( $(date +%s) - t0 )) s"
for f in probes/smol/arith/page.json probes/smol/humaneval/page.json placements/smol/arith/domlora.json \
         runs/smol-arith-domlora-0/adapter/adapter_config.json runs/smol-arith-lora-0/train_metrics.json \
         runs/smol-arith-domlora-0/eval.json runs/smol-arith-base/scores.json reports/README.md reports/tables.md; do
  [ -s "$f" ] || { echo "e2e: missing $f"; exit 1; }
done
python - <<'PY'
import json
pl = json.load(open("placements/smol/arith/domlora.json"))
assert pl["modules"] == [json.load(open("probes/smol/arith/page.json"))["dominant"]], pl
for cell in ("smol-arith-lora-0", "smol-arith-domlora-0"):
    tm = json.load(open(f"runs/{cell}/train_metrics.json"))
    assert tm["status"] == "success", tm.get("error")
    ev = json.load(open(f"runs/{cell}/eval.json"))
    assert all(t["status"] == "success" for t in ev["tasks"].values()), ev["tasks"]
print("e2e: outputs check out")
PY
t0=$(date +%s)
out=$(dvc repro)
echo "$out" | grep -q "Running stage" && { echo "e2e: second dvc repro reran stages:"; echo "$out"; exit 1; }
echo "e2e: second dvc repro reran nothing ($(( $(date +%s) - t0 )) s)"
dvc metrics show | head -20
dvc plots show -o "$work/plots" >/dev/null
grep -q "vegaEmbed" "$work/plots/index.html" && ! grep -q "cdn.jsdelivr" "$work/plots/index.html"
echo "e2e: dvc plots show renders offline"

# the placement comparison's wiring, with DVC's cache outside the work tree
export DOMLORA_DVC_CACHE="$work/dvc-cache"
t0=$(date +%s)
bash scripts/placement.sh placement_ci
echo "e2e: placement_ci took $(( $(date +%s) - t0 )) s"
python - <<'PY'
import json
md = open("reports/placement.md").read()
for tier in ("module", "quarter", "broad"):
    assert f"### Tier `{tier}`" in md, tier
assert "### Verdict per tier" in md and "Δ EM vs best" in md
pr = json.load(open("placements/smol/arith/page_rank.json"))
assert set(pr["rank_pattern"]) == set(pr["modules"]) and pr["tier"]["reference"] == "lora_r2", pr.get("tier")
rnd = json.load(open("placements/smol/arith/random.json"))
assert set(rnd["modules_by_seed"]) == {"0", "1"} and rnd["rank_pattern"], rnd
tune = json.load(open("placements/smol/arith/tuning/quarter.json"))
assert set(tune["lr_per_method"]) == {"lora_r2", "page_budget", "page_rank"}, tune
cfg = json.load(open("runs/smol-arith-page_rank-0/adapter/adapter_config.json"))
assert cfg["rank_pattern"] == pr["rank_pattern"], cfg["rank_pattern"]
print("e2e: placement_ci outputs check out")
PY
git clone -q "$src" "$work/fresh"
cd "$work/fresh"
ln -s "$src/.venv" .venv
out=$(bash scripts/placement.sh placement_ci)
# the report (a `persist` output, which keeps DVC's run-cache off for its stage) is written again; nothing else
echo "$out" | grep "Running stage" | grep -v "Running stage 'report'" && { echo "e2e: a fresh clone recomputed stages"; exit 1; }
[ -s placements/smol/arith/tuning/quarter.json ] && [ -s runs/smol-arith-page_rank-0/adapter/adapter_config.json ]
echo "e2e: a fresh clone restored placement_ci from the cache without recomputing"
