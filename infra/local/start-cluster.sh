#!/usr/bin/env bash
# Starts a real multi-node Ray cluster on this machine plus an S3 emulator, for local runs and e2e tests:
#   - a head node    `ray start --head --block ...` (dashboard + Jobs API on 127.0.0.1:$DASHBOARD_PORT)
#   - N worker nodes `ray start --address HEAD_IP:$RAY_PORT --block ...`, each its own raylet
#   - moto's S3 server on 127.0.0.1:$S3_PORT, with the bucket $S3_BUCKET created
# Every process runs in the background with its pid in $RAYFORMERS_CLUSTER_DIR/pids/; stop them all
# with infra/local/stop-cluster.sh. Waits until every node is alive and the Jobs API answers, then
# prints `export` lines on stdout (progress goes to stderr), so this works:
#     eval "$(infra/local/start-cluster.sh --workers 2)"
#
# Usage: start-cluster.sh [--workers N] [--cpus-per-node N] [--state-dir DIR]
# Environment, [default]:
#   PYTHON                  interpreter of the venv holding ray and moto [<repo>/.venv/bin/python];
#                           `ray` is taken from the same bin directory
#   RAYFORMERS_CLUSTER_DIR  state dir: pids/, logs/, ray/ (Ray's temp dir), env.sh, cluster.json
#                           [/tmp/rayformers-cluster]; keep it short, Ray puts unix sockets under it;
#                           worker node N has a temp dir of its own, ray-wN/
#   RAYFORMERS_WORKERS      worker nodes [1]
#   CPUS_PER_NODE           logical CPUs each node advertises, head included [2]
#   RAY_PORT                GCS port of the head [6379]
#   DASHBOARD_PORT          dashboard / Jobs API port, bound to 127.0.0.1 [8265]
#   S3_PORT                 S3 emulator port, bound to 127.0.0.1 [9000]
#   S3_BUCKET               bucket created in the emulator [rayformers]
#   OBJECT_STORE_BYTES      object store size of each node [2147483648]
#   WORKER_RESOURCES        custom resources (JSON) of each worker node [{"worker_node": 1}]
#   READY_TIMEOUT           seconds to wait for the cluster to be ready [120]
#   RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S  node drain time on SIGTERM [0: stop at once]
#
# Authentication: Ray token auth stays on. Every node and every client runs with RAY_AUTH_MODE=token
# and reads the token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token; when none of
# them exists, `ray get-auth-token --generate` writes ~/.ray/auth_token first.
# The cluster's processes see the emulator through AWS_ENDPOINT_URL and dummy credentials, so jobs
# read and write s3:// URIs there.
set -Eeuo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$REPO_ROOT/infra/local"

WORKERS="${RAYFORMERS_WORKERS:-1}"
CPUS_PER_NODE="${CPUS_PER_NODE:-2}"
STATE_DIR="${RAYFORMERS_CLUSTER_DIR:-/tmp/rayformers-cluster}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --workers) WORKERS="$2"; shift 2 ;;
        --cpus-per-node) CPUS_PER_NODE="$2"; shift 2 ;;
        --state-dir) STATE_DIR="$2"; shift 2 ;;
        -h|--help) sed -n '2,/^set -E/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "start-cluster.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

PYTHON="${PYTHON:-$REPO_ROOT/.venv/bin/python}"
[[ -x "$PYTHON" ]] || { echo "start-cluster.sh: no python at $PYTHON (set PYTHON to the venv's interpreter)" >&2; exit 1; }
VENV_BIN="$(cd "$(dirname "$PYTHON")" && pwd)"  # absolute: it goes on the PATH of every Ray process
PYTHON="$VENV_BIN/$(basename "$PYTHON")"
RAY="$VENV_BIN/ray"
RAY_PORT="${RAY_PORT:-6379}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
S3_PORT="${S3_PORT:-9000}"
S3_BUCKET="${S3_BUCKET:-rayformers}"
OBJECT_STORE_BYTES="${OBJECT_STORE_BYTES:-2147483648}"
DEFAULT_WORKER_RESOURCES='{"worker_node": 1}'
WORKER_RESOURCES="${WORKER_RESOURCES:-$DEFAULT_WORKER_RESOURCES}"
READY_TIMEOUT="${READY_TIMEOUT:-120}"

PID_DIR="$STATE_DIR/pids"
LOG_DIR="$STATE_DIR/logs"
RAY_TEMP_DIR="$STATE_DIR/ray"
DASHBOARD_URL="http://127.0.0.1:$DASHBOARD_PORT"
S3_ENDPOINT="http://127.0.0.1:$S3_PORT"

log() { echo "start-cluster: $*" >&2; }
die() { log "$*"; exit 1; }

[[ -x "$RAY" ]] || die "no ray executable next to $PYTHON"
[[ "$WORKERS" =~ ^[0-9]+$ ]] || die "--workers must be a number, got '$WORKERS'"
# Ray's unix sockets live under <temp dir>/session_<date>_<pid>/sockets/; paths over 107 bytes fail.
(( ${#RAY_TEMP_DIR} + 2 + ${#WORKERS} <= 48 )) || die "state dir '$STATE_DIR' is too long for Ray's socket paths; use a shorter RAYFORMERS_CLUSTER_DIR"

# Refuse to start over a running cluster; forget the state of a dead one.
if compgen -G "$PID_DIR/*.pid" > /dev/null; then
    for pid_file in "$PID_DIR"/*.pid; do
        if kill -0 "$(cat "$pid_file")" 2>/dev/null; then
            die "a cluster recorded in $STATE_DIR is still running; stop it with infra/local/stop-cluster.sh"
        fi
    done
    rm -f "$PID_DIR"/*.pid
fi
mkdir -p "$PID_DIR" "$LOG_DIR" "$RAY_TEMP_DIR"
rm -f "$STATE_DIR/env.sh" "$STATE_DIR/cluster.json"

free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }
require_free_port() {  # NAME PORT; SO_REUSEADDR as servers use it: TIME_WAIT leftovers do not count
    "$PYTHON" -c '
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", int(sys.argv[1])))' "$2" 2>/dev/null \
        || die "port $2 for $1 is in use; choose another one with $1=..."
}
require_free_port RAY_PORT "$RAY_PORT"
require_free_port DASHBOARD_PORT "$DASHBOARD_PORT"
require_free_port S3_PORT "$S3_PORT"

# Any failure from here on stops what was already started.
on_failure() {
    log "failed; logs are in $LOG_DIR:"
    tail -n 15 "$LOG_DIR"/*.log >&2 2>/dev/null || true
    RAYFORMERS_CLUSTER_DIR="$STATE_DIR" "$HERE/stop-cluster.sh" >&2 || true
}
trap on_failure ERR
trap 'trap - ERR; on_failure; exit 130' INT TERM

# Environment of every process of the cluster (and so of every Ray job and worker).
export RAY_AUTH_MODE=token
export PATH="$VENV_BIN:$PATH"            # `python` / `rayformers` in job entrypoints resolve to the venv
export AWS_ENDPOINT_URL="$S3_ENDPOINT" AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing
export AWS_DEFAULT_REGION=us-east-1
unset AWS_SESSION_TOKEN AWS_PROFILE RAY_ADDRESS
# On SIGTERM Ray 2.60 first drains the node for up to this long (made for Serve during Kubernetes pod
# replacement); a local cluster stops at once instead of idling out the 30 s default.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}"
if [[ -z "${RAY_AUTH_TOKEN:-}" && -z "${RAY_AUTH_TOKEN_PATH:-}" && ! -s "$HOME/.ray/auth_token" ]]; then
    log "no Ray auth token yet; generating $HOME/.ray/auth_token"
    "$RAY" get-auth-token --generate > /dev/null
fi

# start_background NAME COMMAND...: run COMMAND in the background with output in logs/NAME.log and its
# pid in pids/NAME.pid; in its own session where setsid exists (Linux), so the caller's Ctrl-C and
# hang-up do not reach it. setsid does not fork here (a background job of a non-interactive shell is
# no process-group leader), so $! is the process itself.
start_background() {
    local name="$1"; shift
    if command -v setsid > /dev/null; then
        setsid "$@" > "$LOG_DIR/$name.log" 2>&1 < /dev/null &
    else
        "$@" > "$LOG_DIR/$name.log" 2>&1 < /dev/null &
    fi
    echo $! > "$PID_DIR/$name.pid"
}

log "S3 emulator on $S3_ENDPOINT"
start_background s3 "$PYTHON" -m moto.server -H 127.0.0.1 -p "$S3_PORT"

log "Ray head: GCS port $RAY_PORT, dashboard $DASHBOARD_URL, $CPUS_PER_NODE CPUs"
# Worker processes get OS-assigned ports (--min/max-worker-port 0) and the other per-node ports are
# picked free, so several nodes (and several clusters) coexist on one machine.
start_background head "$RAY" start --head --block \
    --port "$RAY_PORT" \
    --num-cpus "$CPUS_PER_NODE" \
    --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" \
    --dashboard-agent-listen-port "$(free_port)" \
    --ray-client-server-port "$(free_port)" \
    --min-worker-port 0 --max-worker-port 0 \
    --object-store-memory "$OBJECT_STORE_BYTES" \
    --temp-dir "$RAY_TEMP_DIR" \
    --disable-usage-stats

"$PYTHON" "$HERE/readiness.py" s3 --endpoint "$S3_ENDPOINT" --bucket "$S3_BUCKET" --timeout "$READY_TIMEOUT"
# The GCS listens on every interface but the head advertises the machine's interface IP: workers
# join through the address the head reports, as they would on separate machines.
HEAD_IP="$("$PYTHON" "$HERE/readiness.py" ray --gcs "127.0.0.1:$RAY_PORT" --nodes 1 --timeout "$READY_TIMEOUT")"
GCS_ADDRESS="$HEAD_IP:$RAY_PORT"

for ((i = 1; i <= WORKERS; i++)); do
    log "Ray worker node $i joins $GCS_ADDRESS"
    # Each worker node gets a temp dir of its own, as on a machine of its own. Sharing the head's (Ray's
    # default) shares runtime_resources/: a node setting up a job's working_dir removes and unpacks it
    # again at the same path (overwrite=True in ray/_private/runtime_env/working_dir.py), under the driver
    # of a submitted job that stands in the head's copy (os.getcwd / chdir failed: FileNotFoundError).
    start_background "worker-$i" "$RAY" start --address "$GCS_ADDRESS" --block \
        --num-cpus "$CPUS_PER_NODE" \
        --resources "$WORKER_RESOURCES" \
        --dashboard-agent-listen-port "$(free_port)" \
        --min-worker-port 0 --max-worker-port 0 \
        --object-store-memory "$OBJECT_STORE_BYTES" \
        --temp-dir "$STATE_DIR/ray-w$i" \
        --disable-usage-stats
done

"$PYTHON" "$HERE/readiness.py" ray --gcs "$GCS_ADDRESS" --nodes $((WORKERS + 1)) \
    --dashboard "$DASHBOARD_URL" --timeout "$READY_TIMEOUT" > /dev/null
trap - ERR INT TERM

pid_of() { cat "$PID_DIR/$1.pid"; }
worker_pids=""
for ((i = 1; i <= WORKERS; i++)); do worker_pids+="${worker_pids:+, }$(pid_of "worker-$i")"; done
cat > "$STATE_DIR/cluster.json" <<EOF
{
  "gcs_address": "$GCS_ADDRESS",
  "dashboard_url": "$DASHBOARD_URL",
  "s3_endpoint": "$S3_ENDPOINT",
  "s3_bucket": "$S3_BUCKET",
  "nodes": $((WORKERS + 1)),
  "pids": {"head": $(pid_of head), "workers": [$worker_pids], "s3": $(pid_of s3)}
}
EOF

{
    echo "# rayformers local cluster ($STATE_DIR): $((WORKERS + 1)) Ray nodes, S3 bucket s3://$S3_BUCKET"
    echo "# GCS address for ray.init(): $GCS_ADDRESS   stop: infra/local/stop-cluster.sh"
    echo "export RAY_ADDRESS=$DASHBOARD_URL"
    echo "export RAY_AUTH_MODE=token"
    if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then echo "export RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"; fi
    echo "export AWS_ENDPOINT_URL=$S3_ENDPOINT"
    echo "export AWS_ACCESS_KEY_ID=testing"
    echo "export AWS_SECRET_ACCESS_KEY=testing"
    echo "export AWS_DEFAULT_REGION=us-east-1"
} > "$STATE_DIR/env.sh"
log "ready"
cat "$STATE_DIR/env.sh"
