#!/usr/bin/env bash
# Bring up a Prefect server on loopback, a process work pool + worker, the `full-grid`
# deployment and the GPU-slot concurrency limit. Stop everything with: bash scripts/prefect_up.sh stop
# Then run:  .venv/bin/prefect deployment run domlora/full-grid
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export PATH="$PWD/.venv/bin:$PATH"
export DOMLORA_ROOT="$PWD"
PORT=${PREFECT_PORT:-4200}
export PREFECT_API_URL="http://127.0.0.1:$PORT/api"
export PREFECT_HOME="$PWD/.prefect"
SLOTS=${DOMLORA_GPU_SLOTS:-2}
mkdir -p .prefect
if [ "${1:-}" = stop ]; then
  for f in .prefect/worker.pid .prefect/server.pid; do
    [ -f "$f" ] && { kill "$(cat "$f")" 2>/dev/null; sleep 1; kill "$(cat "$f")" 2>/dev/null || true; rm -f "$f"; }
  done
  exit 0
fi
if ! curl -fs "$PREFECT_API_URL/health" >/dev/null 2>&1; then
  nohup prefect server start --host 127.0.0.1 --port "$PORT" > .prefect/server.log 2>&1 &
  echo $! > .prefect/server.pid
  for _ in $(seq 60); do curl -fs "$PREFECT_API_URL/health" >/dev/null 2>&1 && break; sleep 1; done
fi
curl -fs "$PREFECT_API_URL/health" >/dev/null || { echo "prefect server did not start; see .prefect/server.log"; exit 1; }
prefect work-pool inspect domlora-pool >/dev/null 2>&1 || prefect work-pool create domlora-pool --type process >/dev/null
prefect gcl inspect domlora-gpu >/dev/null 2>&1 || prefect gcl create domlora-gpu --limit "$SLOTS" >/dev/null
prefect --no-prompt deploy --all >/dev/null
if [ ! -f .prefect/worker.pid ] || ! kill -0 "$(cat .prefect/worker.pid)" 2>/dev/null; then
  nohup prefect worker start --pool domlora-pool > .prefect/worker.log 2>&1 &
  echo $! > .prefect/worker.pid
fi
echo "Prefect UI: http://127.0.0.1:$PORT   (export PREFECT_API_URL=$PREFECT_API_URL)"
echo "run the grid: PREFECT_API_URL=$PREFECT_API_URL .venv/bin/prefect deployment run domlora/full-grid"
