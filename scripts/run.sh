#!/usr/bin/env bash
# The embedded stack on one machine: migrate, seed the demo tenant, start the local Ray
# head, then run MLflow, the Celery worker and beat, web, JupyterHub and the fleet
# controller under supervisord until Ctrl-C (or SIGTERM). supervisord restarts a process
# that died (with backoff) and logs it, instead of the whole stack stopping.
#
# State lives under WORKBENCH_VAR_DIR (default var/) and every port comes from the
# environment, so two stacks run side by side:
#   WORKBENCH_VAR_DIR=/tmp/wb2 PORT=8100 MLFLOW_PORT=5100 HUB_PORT=8101 HUB_API_PORT=8181 \
#       HUB_PROXY_API_PORT=8102 make run
# Configure production services through the environment (see README.md).
#
# Every server of this stack listens on 127.0.0.1 only, whatever HOST says: it runs with a
# development secret key, no TLS, an MLflow and a Ray without sign-in. (compose.yaml is
# the stack for more than one machine.)
#
#   scripts/run.sh --print-config    prints the supervisord configuration and starts nothing
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=$ROOT/.venv/bin
PY=$BIN/python

export WORKBENCH_VAR_DIR
WORKBENCH_VAR_DIR=$(realpath -m "${WORKBENCH_VAR_DIR:-$ROOT/var}")
VAR=$WORKBENCH_VAR_DIR
HOST=127.0.0.1
PORT="${PORT:-8000}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
HUB_PORT="${HUB_PORT:-8001}"
HUB_API_PORT="${HUB_API_PORT:-8081}"
HUB_PROXY_API_PORT="${HUB_PROXY_API_PORT:-8002}"
# Every process of this run carries this id, so the stop finds exactly them (scripts/stack.py).
export WORKBENCH_STACK_ID
WORKBENCH_STACK_ID=$($PY -c 'import secrets; print(secrets.token_hex(8))')
export MLFLOW_DISABLE_TELEMETRY=true RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-http://$HOST:$MLFLOW_PORT}"
export MLFLOW_UI_URL="${MLFLOW_UI_URL:-$MLFLOW_TRACKING_URI}"
export PROMETHEUS_MULTIPROC_DIR="${PROMETHEUS_MULTIPROC_DIR:-$VAR/prometheus}"
export SERVING_LOCAL_DIR="${SERVING_LOCAL_DIR:-$VAR/ray}"
LOG=$VAR/log
SOCK=$VAR/supervisor/supervisor.sock
# A Unix socket path must fit in 107 bytes.
[ ${#SOCK} -le 100 ] || SOCK=/tmp/wb-supervisor-$(printf %s "$VAR" | sha256sum | cut -c1-12).sock
CONF=$VAR/supervisor/supervisord.conf
program() {  # name, priority, command...; the options every program shares
    local name=$1 priority=$2 as_group=${STOP_AS_GROUP:-true} \
        start_secs=${START_SECS:-10} stop_secs=${STOP_SECS:-10}; shift 2
    cat <<INI

[program:$name]
command=$*
priority=$priority
autorestart=true
; Up this long counts as started; a quicker exit is a failed start, retried after 1 s,
; 2 s, 3 s ... and given up (FATAL, logged) after startretries. Nothing else stops.
startsecs=$start_secs
startretries=20
stopsignal=TERM
; then SIGKILL, to the whole process group
stopwaitsecs=$stop_secs
stopasgroup=$as_group
killasgroup=true
redirect_stderr=true
stdout_logfile=$LOG/$name.log
stdout_logfile_maxbytes=20MB
stdout_logfile_backups=2
INI
}
# One group, so a stop signals every program at once (supervisord stops groups one after
# another). Every server here is given $HOST (loopback) explicitly.
supervisord_conf() {
    cat <<INI
; Made by scripts/run.sh at each start; changes here are overwritten.
; supervisorctl -c $CONF status
[supervisord]
nodaemon=true
directory=$ROOT
logfile=$LOG/supervisord.log
logfile_maxbytes=10MB
logfile_backups=2
pidfile=$VAR/supervisor/supervisord.pid
childlogdir=$LOG

[unix_http_server]
file=$SOCK
chmod=0700

[supervisorctl]
serverurl=unix://$SOCK

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[group:workbench]
programs=mlflow,worker,beat,web,jupyterhub,fleet-controller
INI
    # MLflow tracking server + UI: SQLite store and artifacts under the state dir.
    program mlflow 100 "$BIN/mlflow" server --host "$HOST" --port "$MLFLOW_PORT" --workers 1 \
        --backend-store-uri "sqlite:///$VAR/mlflow.sqlite3" --artifacts-destination "$VAR/mlartifacts"
    echo 'environment=MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"'
    # Only the worker's main process gets SIGTERM, and stops its pool itself: a signal to
    # the whole group also kills the pool children mid-handshake, and the main process
    # was seen blocked for ever in billiard's pool finalizer (Pool._help_stuff_finish).
    # If it hangs anyway, the group SIGKILL after stopwaitsecs ends it: 20 s, as its warm
    # shutdown (lets a running task finish) took 5 s idle and 9 s on a busy machine.
    STOP_AS_GROUP=false STOP_SECS=20 program worker 200 "$BIN/celery" -A workbench worker -Q default,gpu \
        --concurrency 2 -n "worker@%%h"
    program beat 200 "$BIN/celery" -A workbench beat
    program web 300 "$PY" manage.py runserver "$HOST:$PORT" --noreload
    # JupyterHub on loopback, signing users in through the workbench; servers are local
    # processes listening on loopback too. The hub stops them and its proxy on SIGTERM.
    program jupyterhub 300 "$PY" manage.py jupyterhub --hub-port "$HUB_API_PORT" \
        --proxy-api-port "$HUB_PROXY_API_PORT"
    # The only process that talks to the serving backend (and restarts the embedded Ray
    # head when it died). A command that fails only after Django's start-up (seconds on a
    # busy machine) must still count as a failed start, backed off and given up. Killing it
    # is safe (its lease expires; a blocking call to Ray was seen outlasting SIGTERM by 10 s).
    START_SECS=30 STOP_SECS=5 program fleet-controller 400 "$PY" manage.py fleet_controller
}

if [ "${1:-}" = "--print-config" ]; then
    supervisord_conf
    exit 0
fi
mkdir -p "$LOG" "$VAR/supervisor" "$PROMETHEUS_MULTIPROC_DIR"

$PY scripts/stack.py ports-free "$HOST" PORT="$PORT" MLFLOW_PORT="$MLFLOW_PORT" \
    HUB_PORT="$HUB_PORT" HUB_API_PORT="$HUB_API_PORT" HUB_PROXY_API_PORT="$HUB_PROXY_API_PORT"

# JupyterHub: its service token, cookie secret and OAuth client secret are made once, on
# this machine, under the state dir (never in the repo); web, worker and hub read them.
mkdir -p "$VAR/jupyterhub"
for secret in api_token cookie_secret oauth_client_secret; do
    [ -s "$VAR/jupyterhub/$secret" ] || (umask 077; $PY -c 'import secrets; print(secrets.token_hex(32))' >"$VAR/jupyterhub/$secret")
done
export JUPYTERHUB_URL="${JUPYTERHUB_URL:-http://$HOST:$HUB_PORT}"
export JUPYTERHUB_API_TOKEN_FILE="${JUPYTERHUB_API_TOKEN_FILE:-$VAR/jupyterhub/api_token}"
export JUPYTERHUB_COOKIE_SECRET_FILE="${JUPYTERHUB_COOKIE_SECRET_FILE:-$VAR/jupyterhub/cookie_secret}"
export JUPYTERHUB_OAUTH_CLIENT_SECRET_FILE="${JUPYTERHUB_OAUTH_CLIENT_SECRET_FILE:-$VAR/jupyterhub/oauth_client_secret}"
export WORKBENCH_URL="${WORKBENCH_URL:-http://$HOST:$PORT}"
rm -f "$PROMETHEUS_MULTIPROC_DIR"/*.db   # samples from an earlier run are stale

SUPERVISOR_PID=""
RAY_STARTER_PID=""
STOPPING=""
# The stop starts in the signal's handler, not when supervisord is done: the Ray head then
# stops while supervisord stops its programs.
on_signal() { STOPPING=1; cleanup; }
cleanup() {
    local status=$?
    # Once only; and a second Ctrl-C must not abandon the stop halfway (it is bounded:
    # supervisord's stopwaitsecs, the Ray head's grace).
    trap - EXIT
    trap '' INT TERM HUP
    [ -z "$SUPERVISOR_PID" ] || kill -TERM "$SUPERVISOR_PID" 2>/dev/null || true
    # The Ray starter, if still starting: its head is found by the stack id.
    [ -z "$RAY_STARTER_PID" ] || kill -TERM "$RAY_STARTER_PID" 2>/dev/null || true
    [ -z "$RAY_STARTER_PID" ] || wait "$RAY_STARTER_PID" 2>/dev/null || true
    # The Ray head stops while supervisord stops its programs (both take seconds) ...
    $PY scripts/stack.py stop-ray &
    local ray_stop=$!
    [ -z "$SUPERVISOR_PID" ] || wait "$SUPERVISOR_PID" 2>/dev/null || true
    wait "$ray_stop" || true
    # ... and once more after, with the sweep: a head the fleet controller started again
    # in the meantime, and anything a program left behind.
    $PY scripts/stack.py stop || true
    [ -z "$STOPPING" ] || { echo "Workbench stopped."; exit 0; }
    exit "$status"
}
trap on_signal INT TERM HUP
trap cleanup EXIT

# A background job of a non-interactive shell starts with SIGINT and SIGQUIT ignored, and
# every process below it would inherit that (a notebook kernel could not be interrupted):
# `trap -` gives them back their defaults before the exec.
background() { ( trap - INT QUIT; exec "$@" ) & }

# The serving fleet's embedded Ray (no RAY_ADDRESS): started now, in the background, under
# the state dir, rather than by the first deployment; every process finds it there. It
# runs in its own session (supervisord does not stop it): the stop above ends it by the pid
# it records in $SERVING_LOCAL_DIR/ray-head.json. The fleet controller starts it again if
# it dies.
if [ -z "${RAY_ADDRESS:-}" ]; then
    # First, while migrate runs: a head starting beside all the programs' imports was seen
    # timing out on a busy machine; and tried up to three times for the same reason.
    background $PY -c 'import os; from pathlib import Path; from worker.serving import local_ray
for attempt in (1, 2, 3):
    try:
        head = local_ray.ensure_head(Path(os.environ["SERVING_LOCAL_DIR"]), num_cpus=2)
    except RuntimeError as exc:
        print(f"attempt {attempt}: {exc}", flush=True)
    else:
        print(f"Ray head {head.address} (pid {head.pid})")
        break' >"$LOG/ray-start.log" 2>&1
    RAY_STARTER_PID=$!
fi

$PY manage.py migrate --noinput
$PY manage.py seed_demo

# supervisord's config is made here, from this environment, under the state dir; its
# processes inherit the environment exported above.
supervisord_conf >"$CONF"

background "$BIN/supervisord" -c "$CONF"
SUPERVISOR_PID=$!

healthy=""
for _ in $(seq 1 120); do
    [ -z "$STOPPING" ] || break
    curl -fsS "http://$HOST:$PORT/healthz" >/dev/null 2>&1 && { healthy=1; break; }
    kill -0 "$SUPERVISOR_PID" 2>/dev/null || break
    sleep 0.5
done
if [ -n "$healthy" ]; then
    cat <<MSG

  Workbench is running at http://$HOST:$PORT/
    log in as scientist, reviewer or admin — password: workbench-demo
    API docs:  http://$HOST:$PORT/api/v1/docs/
    MLflow:    $MLFLOW_UI_URL
    Notebooks: http://$HOST:$PORT/t/demo/notebooks/ (JupyterHub at $JUPYTERHUB_URL)
    Fleet:     http://$HOST:$PORT/fleet/ (Ray Serve; an approved promotion deploys there)
    API token: .venv/bin/python manage.py create_token scientist --tenant demo
    logs:      $LOG/{web,worker,beat,mlflow,jupyterhub,fleet-controller,supervisord}.log,
               $SERVING_LOCAL_DIR/ray-head.log
    processes: $BIN/supervisorctl -c $CONF status
  A process that dies is restarted (logged in supervisord.log). Ctrl-C stops everything.

MSG
elif [ -z "$STOPPING" ]; then
    echo "run.sh: web did not answer /healthz within 60 s; see $LOG/web.log" >&2
fi

# `wait` returns early when a trapped signal arrives: keep waiting until supervisord ends.
while kill -0 "$SUPERVISOR_PID" 2>/dev/null; do
    wait "$SUPERVISOR_PID" || true
done
# Ctrl-C reaches the whole process group: supervisord can take it and finish before this
# shell has run its trap (seen once in a full suite run on a loaded machine). supervisord
# logs a stop it was asked for: that is a stop, not a crash.
if [ -z "$STOPPING" ] && tail -n 40 "$LOG/supervisord.log" 2>/dev/null |
        grep -q "received SIG[A-Z]* indicating exit request"; then
    STOPPING=1
fi
[ -n "$STOPPING" ] || { echo "run.sh: supervisord exited; see $LOG/supervisord.log" >&2; exit 1; }
