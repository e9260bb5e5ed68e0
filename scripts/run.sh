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
HUB_PORT="${HUB_PORT:-8001}"
export MLFLOW_DISABLE_TELEMETRY=true RAY_USAGE_STATS_ENABLED=0
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-http://$HOST:$MLFLOW_PORT}"
export MLFLOW_UI_URL="${MLFLOW_UI_URL:-$MLFLOW_TRACKING_URI}"
export PROMETHEUS_MULTIPROC_DIR="${PROMETHEUS_MULTIPROC_DIR:-$PWD/var/prometheus}"
mkdir -p var/log "$PROMETHEUS_MULTIPROC_DIR"

# JupyterHub: its service token, cookie secret and OAuth client secret are made once, on
# this machine, under var/jupyterhub/ (never in the repo); web, worker and hub read them.
mkdir -p var/jupyterhub
for secret in api_token cookie_secret oauth_client_secret; do
    [ -s "var/jupyterhub/$secret" ] || (umask 077; $PY -c 'import secrets; print(secrets.token_hex(32))' >"var/jupyterhub/$secret")
done
export JUPYTERHUB_URL="${JUPYTERHUB_URL:-http://$HOST:$HUB_PORT}"
export JUPYTERHUB_API_TOKEN_FILE="${JUPYTERHUB_API_TOKEN_FILE:-$PWD/var/jupyterhub/api_token}"
export JUPYTERHUB_COOKIE_SECRET_FILE="${JUPYTERHUB_COOKIE_SECRET_FILE:-$PWD/var/jupyterhub/cookie_secret}"
export JUPYTERHUB_OAUTH_CLIENT_SECRET_FILE="${JUPYTERHUB_OAUTH_CLIENT_SECRET_FILE:-$PWD/var/jupyterhub/oauth_client_secret}"
export WORKBENCH_URL="${WORKBENCH_URL:-http://$HOST:$PORT}"
rm -f "$PROMETHEUS_MULTIPROC_DIR"/*.db   # samples from an earlier run are stale

$PY manage.py migrate --noinput
$PY manage.py seed_demo

# The serving fleet's embedded Ray (no RAY_ADDRESS): started now, in the background, under
# var/ray, rather than by the first deployment; every process finds it there.
if [ -z "${RAY_ADDRESS:-}" ]; then
    $PY -c 'from pathlib import Path; from worker.serving.local_ray import ensure_head
ensure_head(Path("var/ray"), num_cpus=2)' >var/log/ray-start.log 2>&1 &
fi
stop_ray() {
    [ -n "${RAY_ADDRESS:-}" ] && return 0
    $PY -c 'import json, pathlib; from worker.serving import local_ray
state = pathlib.Path("var/ray") / local_ray.STATE_FILE
if state.exists(): local_ray.stop_head(json.loads(state.read_text())["pid"])' || true
}

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; stop_ray; }
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
# JupyterHub on loopback, signing users in through the workbench; servers are local
# processes listening on loopback too.
$PY manage.py jupyterhub --hub-port "${HUB_API_PORT:-8081}" --proxy-api-port "${HUB_PROXY_API_PORT:-8002}" \
    >var/log/jupyterhub.log 2>&1 &
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
    Notebooks: http://$HOST:$PORT/t/demo/notebooks/ (JupyterHub at $JUPYTERHUB_URL)
    Fleet:     http://$HOST:$PORT/fleet/ (Ray Serve; an approved promotion deploys there)
    API token: .venv/bin/python manage.py create_token scientist --tenant demo
    logs:      var/log/{web,worker,beat,mlflow,jupyterhub}.log, var/ray/ray-head.log
  Ctrl-C stops everything.

MSG
wait -n "${pids[@]}"
