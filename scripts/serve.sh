#!/usr/bin/env bash
# Set up (first run only) and run the whole EBCA Serve stack on this machine, in the foreground:
# a private Redis, the API (uvicorn) and one Celery worker, on the built-in model and the local file
# store. No Docker, no GPU, no internet beyond the package index. Ctrl-C stops everything it started.
#
#   scripts/serve.sh [--host 127.0.0.1] [--port 8000] [--redis-port N] [--var DIR] [--model DIR] [--no-setup]
#
# Same options as environment variables: EBCA_STACK_HOST, EBCA_STACK_PORT, EBCA_STACK_REDIS_PORT,
# EBCA_STACK_VAR, EBCA_STACK_READY_TIMEOUT (seconds, default 180), EBCA_STACK_STOP_TIMEOUT (default 15).
# Every EBCA_* service setting (see .env.example) is passed through to the API and the worker, except
# EBCA_REDIS_URL, which always points at the private Redis started here.
#
# API keys are required (EBCA_AUTH=required, the default): the first run makes an admin key for this
# machine, keeps it in VAR/api_key (its digest in VAR/api_keys.json) and prints it with the sample
# command; later runs reuse it. Set EBCA_API_KEYS_FILE to use a keys file of your own instead.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"

HOST="${EBCA_STACK_HOST:-127.0.0.1}"
PORT="${EBCA_STACK_PORT:-8000}"
REDIS_PORT="${EBCA_STACK_REDIS_PORT:-}"
VAR="${EBCA_STACK_VAR:-var}"
READY_TIMEOUT="${EBCA_STACK_READY_TIMEOUT:-180}"
STOP_TIMEOUT="${EBCA_STACK_STOP_TIMEOUT:-15}"
MODEL="${EBCA_DEFAULT_MODEL:-}"
SETUP=1

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "serve: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --host) HOST="${2:?--host needs a value}"; shift 2 ;;
    --port) PORT="${2:?--port needs a value}"; shift 2 ;;
    --redis-port) REDIS_PORT="${2:?--redis-port needs a value}"; shift 2 ;;
    --var) VAR="${2:?--var needs a value}"; shift 2 ;;
    --model) MODEL="${2:?--model needs a value}"; shift 2 ;;
    --no-setup) SETUP=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
  esac
done
case "$PORT" in ''|*[!0-9]*) die "--port must be a number, got '$PORT'" ;; esac
case "$REDIS_PORT" in *[!0-9]*) die "--redis-port must be a number, got '$REDIS_PORT'" ;; esac

# -- 1. system packages and the virtualenv (scripts/setup.sh is a no-op when both are in place) ---------
if [ "$SETUP" = 1 ]; then
  scripts/setup.sh --runtime
elif [ ! -x .venv/bin/python ]; then
  die ".venv is missing: run without --no-setup (or scripts/setup.sh) first"
fi
PY="$ROOT/.venv/bin/python"
command -v redis-server >/dev/null 2>&1 \
  || die "redis-server is not installed: run without --no-setup (or scripts/setup.sh) first"

port_free() { "$PY" -c 'import socket,sys
s=socket.socket()
try: s.bind((sys.argv[1], int(sys.argv[2])))
except OSError: sys.exit(1)' "$1" "$2"; }
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

port_free "$HOST" "$PORT" || die "port $PORT on $HOST is in use (another stack running?); choose one with --port"
if [ -z "$REDIS_PORT" ]; then REDIS_PORT="$(free_port)"; fi
port_free 127.0.0.1 "$REDIS_PORT" || die "Redis port $REDIS_PORT is in use; choose one with --redis-port"

mkdir -p "$VAR/redis" "$VAR/logs"
VAR="$(cd "$VAR" && pwd)"
LOGS="$VAR/logs"

# -- 3. service settings ------------------------------------------------------------------------------
export EBCA_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
export EBCA_STORAGE_URL="${EBCA_STORAGE_URL:-$VAR/storage}"
export EBCA_DEVICE="${EBCA_DEVICE:-cpu}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
if [ -n "$MODEL" ]; then
  export EBCA_DEFAULT_MODEL="$MODEL"
fi
MODEL_SHOWN="${EBCA_DEFAULT_MODEL:-models/shapes}"
# An API key for this machine: made once (python -m api.keys), the key itself readable by its owner only.
API_KEY="${EBCA_API_KEY:-}"
if [ "${EBCA_AUTH:-required}" != "off" ] && [ -z "${EBCA_API_KEYS_FILE:-}" ]; then
  export EBCA_API_KEYS_FILE="$VAR/api_keys.json"
  if [ ! -s "$VAR/api_key" ] || [ ! -s "$EBCA_API_KEYS_FILE" ]; then
    (umask 077 && "$PY" -m api.keys create local --admin --file "$EBCA_API_KEYS_FILE" --quiet > "$VAR/api_key.new") \
      || die "could not make an API key (see above)"
    mv -f "$VAR/api_key.new" "$VAR/api_key"
    echo "serve: made an API key for this machine (admin), kept in $VAR/api_key"
  fi
  API_KEY="$(cat "$VAR/api_key")"
fi
KEY_ARG=""
if [ "${EBCA_AUTH:-required}" != "off" ]; then KEY_ARG=" --api-key ${API_KEY:-<your key>}"; fi

if [ -z "${EBCA_DEFAULT_MODEL:-}" ] && [ ! -f models/shapes/model_index.json ]; then
  echo "serve: warning: the built-in model models/shapes is not in this checkout yet; jobs will fail" >&2
  echo "serve:          with model_not_found. Point --model (or EBCA_DEFAULT_MODEL) at a diffusers model." >&2
fi

# -- 4. start everything, each in its own session so that stopping one stops all its children ----------
PIDS=()
NAMES=()
PIDFILE="$VAR/stack.pids"
: > "$PIDFILE"

start() {  # start NAME LOGFILE COMMAND...
  local name="$1" log="$2"; shift 2
  # One log per run (the previous one kept as .1), so what this run waits for is from this run.
  [ -f "$log" ] && mv -f "$log" "$log.1"
  setsid "$@" >"$log" 2>&1 < /dev/null &
  PIDS+=("$!")
  NAMES+=("$name")
  echo "$name $!" >> "$PIDFILE"
}

alive() { kill -0 "$1" 2>/dev/null; }

STOPPING=0
NAP=""
say() { echo "$@" 2>/dev/null || true; }
stop_all() {
  [ "$STOPPING" = 1 ] && return
  STOPPING=1
  # Nothing may interrupt the cleanup: not a second Ctrl-C, not a closed terminal or pipe (SIGHUP,
  # SIGPIPE on the next message), or the services would outlive the script.
  trap '' INT TERM HUP PIPE
  say
  say "serve: stopping"
  # Reverse order: worker first (it may be mid-job), then the API, Redis last.
  local i pid deadline
  for ((i=${#PIDS[@]}-1; i>=0; i--)); do
    pid="${PIDS[$i]}"
    kill -TERM -- "-$pid" 2>/dev/null || true
    deadline=$((SECONDS + STOP_TIMEOUT))
    while alive "$pid" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
    # Whatever is left of that session (a stuck job, a forked pool process) is killed.
    kill -KILL -- "-$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  [ -n "$NAP" ] && kill "$NAP" 2>/dev/null || true
  rm -f "$PIDFILE"
  say "serve: stopped (logs in $LOGS)"
}
on_signal() { stop_all; exit 130; }
trap on_signal INT TERM HUP
trap stop_all EXIT
# bash cannot trap a signal that was ignored when it started (a job started with `&` from another
# script ignores SIGINT): say how to stop the stack then.
sigign="$(awk '/^SigIgn:/ {print $2}' "/proc/$$/status" 2>/dev/null || echo 0)"
if [ $(( 0x${sigign:-0} & 2 )) -ne 0 ]; then
  say "serve: note: Ctrl-C (SIGINT) is ignored in this shell; stop the stack with: kill $$" >&2
fi

fail() {
  local name="$1" log="$2"
  echo "serve: $name exited unexpectedly; last lines of $log:" >&2
  tail -n 25 "$log" >&2 || true
  exit 1
}

start redis "$LOGS/redis.log" redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$VAR/redis" \
  --appendonly yes --save "" --daemonize no --protected-mode yes
for _ in $(seq 50); do
  "$PY" -c 'import redis,sys; redis.Redis.from_url(sys.argv[1], socket_timeout=0.5).ping()' \
    "$EBCA_REDIS_URL" 2>/dev/null && break
  alive "${PIDS[0]}" || fail redis "$LOGS/redis.log"
  sleep 0.2
done

start api "$LOGS/api.log" "$ROOT/.venv/bin/uvicorn" api.main:app --host "$HOST" --port "$PORT" --log-level info
start worker "$LOGS/worker.log" "$ROOT/.venv/bin/celery" -A worker.celery_app worker --loglevel INFO \
  --concurrency 1 --hostname "stack-worker@%h"

URL="http://$HOST:$PORT"
echo "serve: waiting for $URL/readyz (Redis on port $REDIS_PORT, model $MODEL_SHOWN, logs in $LOGS)"
deadline=$((SECONDS + READY_TIMEOUT))
# Ready means /readyz answers 200 *and* this run's worker said so: Redis keeps its data between runs,
# and a heartbeat the previous run's worker left (it lives a few seconds) would satisfy /readyz alone.
until grep -q "stack-worker@.* ready\." "$LOGS/worker.log" 2>/dev/null \
  && "$PY" -c 'import httpx,sys; sys.exit(httpx.get(sys.argv[1], timeout=2).status_code != 200)' \
  "$URL/readyz" 2>/dev/null; do
  for i in "${!PIDS[@]}"; do
    alive "${PIDS[$i]}" || fail "${NAMES[$i]}" "$LOGS/${NAMES[$i]}.log"
  done
  [ "$SECONDS" -lt "$deadline" ] || { echo "serve: not ready after ${READY_TIMEOUT}s; see $LOGS" >&2; exit 1; }
  sleep 0.5
done

# The key rides in the address's fragment: the browser keeps it (local storage) and never sends a
# fragment to the server, so it stays out of access logs and Referer headers.
PAGE_KEY="${API_KEY:+#key=$API_KEY}"
cat <<EOF
serve: EBCA Serve is ready at $URL
serve: open the web page: $URL/$PAGE_KEY  (API docs: $URL/docs)
serve: API key: ${API_KEY:-none (EBCA_AUTH=off)}
serve: try it from another terminal:
  .venv/bin/ebca --url $URL$KEY_ARG generate "a red circle and a blue square" --gamma-attn 0.01 --gamma-norm 0.02 --weight circle=2 -o out/
serve: press Ctrl-C to stop the stack
EOF

# Stay in the foreground; if any part dies, report it and take the rest down.
while true; do
  for i in "${!PIDS[@]}"; do
    alive "${PIDS[$i]}" || fail "${NAMES[$i]}" "$LOGS/${NAMES[$i]}.log"
  done
  sleep 1 &
  NAP=$!
  wait "$NAP" || true
  NAP=""
done
