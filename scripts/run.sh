#!/usr/bin/env bash
# The embedded stack on one machine: migrate, seed the demo tenant, then web + Celery
# worker + beat until Ctrl-C. Configure production services through the environment
# (see README.md); with nothing set everything lives under var/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
PORT="${PORT:-8000}"
HOST="${HOST:-127.0.0.1}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
export MLFLOW_DISABLE_TELEMETRY=true RAY_USAGE_STATS_ENABLED=0
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-http://$HOST:$MLFLOW_PORT}"
export MLFLOW_UI_URL="${MLFLOW_UI_URL:-$MLFLOW_TRACKING_URI}"
export PROMETHEUS_MULTIPROC_DIR="${PROMETHEUS_MULTIPROC_DIR:-$PWD/var/prometheus}"
mkdir -p var/log "$PROMETHEUS_MULTIPROC_DIR"
rm -f "$PROMETHEUS_MULTIPROC_DIR"/*.db   # samples from an earlier run are stale

$PY manage.py migrate --noinput
$PY manage.py seed_demo

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

# MLflow tracking server + UI: SQLite store and artifacts under var/.
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false .venv/bin/mlflow server --host "$HOST" \
    --port "$MLFLOW_PORT" --workers 1 --backend-store-uri "sqlite:///$PWD/var/mlflow.sqlite3" \
    --artifacts-destination "$PWD/var/mlartifacts" >var/log/mlflow.log 2>&1 &
pids+=($!)

.venv/bin/celery -A workbench worker -Q default,gpu --concurrency 2 -n "worker@%h" \
    >var/log/worker.log 2>&1 &
pids+=($!)
.venv/bin/celery -A workbench beat >var/log/beat.log 2>&1 &
pids+=($!)
$PY manage.py runserver "$HOST:$PORT" --noreload >var/log/web.log 2>&1 &
pids+=($!)

for _ in $(seq 1 60); do
    curl -fsS "http://$HOST:$PORT/healthz" >/dev/null 2>&1 && break
    sleep 0.5
done
cat <<MSG

  Workbench is running at http://$HOST:$PORT/
    log in as scientist, reviewer or admin — password: workbench-demo
    API docs:  http://$HOST:$PORT/api/v1/docs/
    MLflow:    $MLFLOW_UI_URL
    API token: .venv/bin/python manage.py create_token scientist --tenant demo
    logs:      var/log/{web,worker,beat,mlflow}.log
  Ctrl-C stops everything.

MSG
wait -n "${pids[@]}"
