#!/usr/bin/env bash
# The roles of a grid spread over hosts (README, Scale-out). Run each in the host's clone of the repository:
#   bash scripts/cluster.sh server        # Prefect server, pool + queues, GPU-slot limit, crash automation, deployments
#   bash scripts/cluster.sh tracking      # MLflow tracking server (SQLite + artefacts it serves itself)
#   bash scripts/cluster.sh gpu-worker    # a GPU host: a worker on the `gpu` queue, DOMLORA_UNITS_PER_HOST units at once
#   bash scripts/cluster.sh grid-worker   # the report host: a worker on the `grid` queue (the grid flow + the report)
#   bash scripts/cluster.sh stop [ROLE..] # stop what this checkout started (by PID; roles: worker-gpu worker-grid
#                                         # tracking server)
# Settings (environment): PREFECT_API_URL=http://SERVER:4200/api (workers), DOMLORA_BIND (server, tracking:
# 0.0.0.0 to serve other hosts; default 127.0.0.1), PREFECT_PORT, MLFLOW_PORT, DOMLORA_TRACKING_DIR,
# DOMLORA_UNITS_PER_HOST (default 1), DOMLORA_CRASH_AFTER_S (default 300), PREFECT_FLOWS_HEARTBEAT_FREQUENCY
# (default 60), DOMLORA_GPU_SLOTS (default 2; a spread grid's units take no slot: the GPU hosts' worker limits
# bound it).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export PATH="$PWD/.venv/bin:$PATH" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export DOMLORA_ROOT="$PWD"
export PREFECT_HOME="${PREFECT_HOME:-$PWD/.prefect}"
export PREFECT_FLOWS_HEARTBEAT_FREQUENCY="${PREFECT_FLOWS_HEARTBEAT_FREQUENCY:-60}"
BIND=${DOMLORA_BIND:-127.0.0.1}
PORT=${PREFECT_PORT:-4200}
mkdir -p .prefect

started() { [ -f ".prefect/$1.pid" ] && kill -0 "$(cat ".prefect/$1.pid")" 2>/dev/null; }
wait_for() {  # URL what
  for _ in $(seq 90); do curl -fs "$1" >/dev/null 2>&1 && return 0; sleep 1; done
  echo "$2 did not come up at $1; see .prefect/$2.log" >&2; exit 1
}

case "${1:-}" in
server)
  export PREFECT_API_URL="http://127.0.0.1:$PORT/api"
  if ! curl -fs "$PREFECT_API_URL/health" >/dev/null 2>&1; then
    nohup prefect server start --host "$BIND" --port "$PORT" > .prefect/server.log 2>&1 &
    echo $! > .prefect/server.pid
  fi
  wait_for "$PREFECT_API_URL/health" server
  python -m flows.cluster_setup --crash-after "${DOMLORA_CRASH_AFTER_S:-300}" --gpu-slots "${DOMLORA_GPU_SLOTS:-2}"
  prefect --no-prompt deploy --all >/dev/null
  echo "Prefect server: http://$(hostname):$PORT  (workers: export PREFECT_API_URL=http://$(hostname):$PORT/api)"
  ;;
tracking)
  dir=${DOMLORA_TRACKING_DIR:-$PWD/.mlflow-server}
  mkdir -p "$dir"
  mport=${MLFLOW_PORT:-5000}
  if ! started tracking; then
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false nohup mlflow server --host "$BIND" --port "$mport" \
      --backend-store-uri "sqlite:///$dir/mlflow.db" --artifacts-destination "$dir/artifacts" --serve-artifacts \
      --workers 2 > .prefect/tracking.log 2>&1 &
    echo $! > .prefect/tracking.pid
  fi
  wait_for "http://127.0.0.1:$mport/health" tracking
  echo "MLflow: export MLFLOW_TRACKING_URI=http://$(hostname):$mport   (on the grid's worker)"
  ;;
gpu-worker|grid-worker)
  : "${PREFECT_API_URL:?set PREFECT_API_URL=http://SERVER:$PORT/api}"
  role=${1%-worker}
  if started "worker-$role"; then echo "a $role worker of this checkout runs already"; exit 0; fi
  .venv/bin/dvc remote default >/dev/null 2>&1 || { echo "no default DVC remote in $PWD: dvc remote add -d store URL" >&2; exit 2; }
  limit=()
  [ "$role" = gpu ] && limit=(--limit "${DOMLORA_UNITS_PER_HOST:-1}")
  nohup prefect worker start --pool domlora-pool --work-queue "$role" --name "$role-$(hostname)-$(basename "$PWD")" \
    "${limit[@]}" > ".prefect/worker-$role.log" 2>&1 &
  echo $! > ".prefect/worker-$role.pid"
  echo "$role worker started in $PWD (log .prefect/worker-$role.log), commit $(git rev-parse --short HEAD)"
  ;;
stop)
  shift
  for f in ${@:-worker-gpu worker-grid tracking server}; do
    if [ -f ".prefect/$f.pid" ]; then
      pid=$(cat ".prefect/$f.pid")
      kill "$pid" 2>/dev/null || true; sleep 1; kill "$pid" 2>/dev/null || true  # workers take SIGTERM as SIGINT
      rm -f ".prefect/$f.pid"
    fi
  done
  ;;
*)
  sed -n '2,14p' "$0"; exit 2 ;;
esac
