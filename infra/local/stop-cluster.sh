#!/usr/bin/env bash
# Stops the local cluster that start-cluster.sh recorded in $RAYFORMERS_CLUSTER_DIR/pids/, by pid only
# (never `ray stop`, which would kill every Ray process on the machine): worker nodes first, then the
# head, then the S3 emulator. Each recorded process gets SIGTERM (`ray start --block` then stops its
# raylet, GCS, dashboard and Ray workers itself); what is still alive after STOP_TIMEOUT seconds gets
# SIGKILL, and so does any descendant of a recorded process that outlives it. Logs stay in logs/.
#
# Usage: stop-cluster.sh [--state-dir DIR]
# Environment, [default]: RAYFORMERS_CLUSTER_DIR [/tmp/rayformers-cluster], STOP_TIMEOUT [30]
# Exits 0 when every recorded process and its descendants are gone, 1 otherwise.
set -uo pipefail

STATE_DIR="${RAYFORMERS_CLUSTER_DIR:-/tmp/rayformers-cluster}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --state-dir) STATE_DIR="$2"; shift 2 ;;
        -h|--help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "stop-cluster.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
STOP_TIMEOUT="${STOP_TIMEOUT:-30}"
PID_DIR="$STATE_DIR/pids"
DESCENDANT_GRACE=5
STOP_FAILED=0

log() { echo "stop-cluster: $*" >&2; }

# A zombie counts as gone: it holds no resources and only waits for its parent to reap it.
is_alive() {
    local state
    state="$(ps -o stat= -p "$1" 2>/dev/null)" || return 1
    [[ -n "$state" && "$state" != Z* ]]
}

# Guards against a recycled pid: only signal what start-cluster.sh launched.
is_cluster_process() {
    case "$(ps -o args= -p "$1" 2>/dev/null)" in
        *moto.server*|*"ray start"*) return 0 ;;
        *) return 1 ;;
    esac
}

descendants_of() {  # PID...: the live descendants of these processes, by walking parent links
    ps -eo pid=,ppid= | awk -v roots="$*" '
        BEGIN { n = split(roots, r, " "); for (i = 1; i <= n; i++) { root[r[i]] = 1; family[r[i]] = 1 } }
        { parent[$1] = $2 }
        END {
            do {
                grew = 0
                for (p in parent) if ((parent[p] in family) && !(p in family)) { family[p] = 1; grew = 1 }
            } while (grew)
            for (p in family) if (!(p in root)) print p
        }'
}

wait_until_gone() {  # TIMEOUT PID...: 0 when all are gone in time
    local deadline=$((SECONDS + $1)) pid; shift
    while (( SECONDS <= deadline )); do
        local alive=0
        for pid in "$@"; do is_alive "$pid" && alive=1; done
        (( alive == 0 )) && return 0
        sleep 0.2
    done
    return 1
}

stop_processes() {  # LABEL PID_FILE...
    local label="$1"; shift
    local pids=() pid_file pid
    for pid_file in "$@"; do
        pid="$(cat "$pid_file")"
        if is_alive "$pid" && is_cluster_process "$pid"; then pids+=("$pid"); fi
    done
    (( ${#pids[@]} > 0 )) || return 0
    local family
    family="$(descendants_of "${pids[@]}")"
    log "stopping $label (pid ${pids[*]})"
    kill -TERM "${pids[@]}" 2>/dev/null
    if ! wait_until_gone "$STOP_TIMEOUT" "${pids[@]}"; then
        log "$label still alive after ${STOP_TIMEOUT}s; sending SIGKILL"
        kill -KILL "${pids[@]}" 2>/dev/null
        wait_until_gone 5 "${pids[@]}" || STOP_FAILED=1
    fi
    if [[ -n "$family" ]] && ! wait_until_gone "$DESCENDANT_GRACE" $family; then
        local left=()
        for pid in $family; do is_alive "$pid" && left+=("$pid"); done
        log "killing ${#left[@]} leftover process(es) of $label: ${left[*]}"
        kill -KILL "${left[@]}" 2>/dev/null
        wait_until_gone 5 "${left[@]}" || STOP_FAILED=1
    fi
}

if ! compgen -G "$PID_DIR/*.pid" > /dev/null; then
    log "no cluster recorded in $STATE_DIR"
    exit 0
fi

shopt -s nullglob
stop_processes "worker nodes" "$PID_DIR"/worker-*.pid
stop_processes "head node" "$PID_DIR"/head.pid
stop_processes "S3 emulator" "$PID_DIR"/s3.pid

if (( STOP_FAILED )); then
    log "some processes survived SIGKILL; pid files kept in $PID_DIR"
    exit 1
fi
rm -f "$PID_DIR"/*.pid "$STATE_DIR/env.sh" "$STATE_DIR/cluster.json"
log "stopped; logs remain in $STATE_DIR/logs"
