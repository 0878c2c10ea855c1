#!/usr/bin/env bash
# The main job on the embedded default profile.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m stages.prepare_data 2>/dev/null || true
domlora probe --model embedded --data data/code/probe.jsonl --out probes/embedded/code
domlora select --probe probes/embedded/code/page.json --strategy dom --out placements/embedded/code/dom.json
