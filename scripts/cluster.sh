#!/usr/bin/env bash
# Starts, stops and inspects a local kv cluster: N kv-node processes and one kv-lb.
#
#   scripts/cluster.sh up [--nodes N] [--base-port 8001] [--lb-port 9000] [--no-build] [--tls]
#   scripts/cluster.sh down
#   scripts/cluster.sh status
#   scripts/cluster.sh logs [node1|node2|...|lb]
#   scripts/cluster.sh add              # start one more node and join it (data moves to it)
#   scripts/cluster.sh remove NAME [--force]  # drain NAME (its keys get N copies elsewhere), then
#                                       # stop it; --force for a node that is down (its ranges
#                                       # are copied from the surviving replicas)
#   scripts/cluster.sh replace NAME     # start a new node (next port, new data dir) and move
#                                       # NAME's ranges to it (from the survivors if NAME is down)
#   scripts/cluster.sh abort            # abort the membership change in progress
#   scripts/cluster.sh start NAME       # start a stopped (or killed) node again, same data
#
# Runs from the repository root (or $KV_ROOT). Logs and pid files go to ./run/, node data to
# ./data/node$i. Every other variable in the environment (WAL_SYNC, RUST_LOG, AUTH_TOKEN,
# VNODES, REPLICATION_FACTOR, ...) reaches the processes unchanged; nodes get WORKER_THREADS =
# cores / nodes (at least 1) unless it is set. `up` gives the cluster a random
# CLUSTER_SECRET (or keeps the one in the environment), kept in run/cluster.env (mode 0600): nodes
# refuse /internal calls without it, and /admin calls take it as a bearer token. With --tls, a
# throwaway CA and certificate go to ./run/tls/ and every process serves (and calls its peers
# over) HTTPS.
set -euo pipefail

ROOT="${KV_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
cd "$ROOT"
RUN_DIR="$ROOT/run"
CLUSTER_ENV="$RUN_DIR/cluster.env"
# KV_BIN_DIR points at other binaries (the tests use their debug build with --no-build).
BIN_DIR="${KV_BIN_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/release}"
WAIT_SECS="${KV_WAIT_SECS:-30}"   # how long `up` waits for /health
STOP_SECS="${KV_STOP_SECS:-10}"   # how long `down` waits after SIGTERM before SIGKILL

die() { echo "cluster.sh: $*" >&2; exit 1; }
info() { echo "cluster.sh: $*"; }

usage() {
    sed -n '2,23p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

# True while process $1 runs (a zombie waiting to be reaped does not count).
is_alive() { kill -0 "$1" 2>/dev/null && [[ "$(ps -p "$1" -o stat= 2>/dev/null)" != Z* ]]; }

# True when something accepts TCP connections on 127.0.0.1:$1.
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

healthy() { kv_curl -fsS --max-time 1 "$(scheme)://127.0.0.1:$1/health" >/dev/null 2>&1; }

# TLS (`up --tls`, recorded as TLS=1 in cluster.env): https URLs, certificates in run/tls/,
# and curl trusting only run/tls/ca.pem.
TLS_DIR="$RUN_DIR/tls"
scheme() { if [[ "${TLS:-0}" == 1 ]]; then echo https; else echo http; fi; }
kv_curl() {
    if [[ "${TLS:-0}" == 1 ]]; then curl --cacert "$TLS_DIR/ca.pem" "$@"; else curl "$@"; fi
}
# The TLS variables of every process, as `env` arguments (none without --tls).
tls_vars() {
    [[ "${TLS:-0}" == 1 ]] || return 0
    printf '%s\n' "TLS_CERT_FILE=$TLS_DIR/node.pem" "TLS_KEY_FILE=$TLS_DIR/node-key.pem" \
        "TLS_CA_FILE=$TLS_DIR/ca.pem"
}
make_certs() {
    "$BIN_DIR/kv-node" tls-certs "$TLS_DIR" || die "cannot write TLS certificates to $TLS_DIR"
    info "TLS: throwaway CA and certificate in $TLS_DIR"
}

# Names of the processes of the recorded cluster: node1 .. nodeN (less removed ones), lb.
process_names() {
    local i
    for ((i = 1; i <= NODES; i++)); do
        [[ " ${REMOVED:-} " == *" node$i "* ]] || echo "node$i"
    done
    echo lb
}

port_of() {
    if [[ "$1" == lb ]]; then echo "$LB_PORT"; else echo $((BASE_PORT + ${1#node} - 1)); fi
}

load_cluster_env() {
    [[ -f "$CLUSTER_ENV" ]] || die "no cluster recorded in $CLUSTER_ENV (run: $0 up)"
    # shellcheck source=/dev/null
    source "$CLUSTER_ENV"
}

# Pid recorded for $1 if that process is still alive (and still ours), else nothing.
live_pid() {
    local file="$RUN_DIR/$1.pid" pid
    [[ -f "$file" ]] || return 0
    pid="$(<"$file")"
    if [[ "$pid" =~ ^[0-9]+$ ]] && is_alive "$pid" && ps -p "$pid" -o args= | grep -q 'kv-'; then
        echo "$pid"
    fi
}

refuse_if_running() {
    local file name pid
    for file in "$RUN_DIR"/*.pid; do
        [[ -e "$file" ]] || continue
        name="$(basename "$file" .pid)"
        pid="$(live_pid "$name")"
        [[ -z "$pid" ]] || die "$name (pid $pid) from a previous run is still alive; run: $0 down"
    done
}

# Starts "$@" in the background, detached from this shell's signals, logging to run/$name.log.
launch() {
    local name="$1"; shift
    set -m   # own process group: a Ctrl-C in this terminal does not reach the cluster
    nohup "$@" >>"$RUN_DIR/$name.log" 2>&1 </dev/null &
    echo $! >"$RUN_DIR/$name.pid"
    set +m
}

fail_with_log() {
    local name="$1" reason="$2"
    echo "cluster.sh: $name $reason; last lines of $RUN_DIR/$name.log:" >&2
    tail -n 20 "$RUN_DIR/$name.log" >&2 || true
    stop_all >&2
    exit 1
}

# Polls /health of $1 until it answers 200, its process dies, or WAIT_SECS pass.
wait_healthy() {
    local name="$1" port deadline pid
    port="$(port_of "$name")"
    pid="$(<"$RUN_DIR/$name.pid")"
    deadline=$((SECONDS + WAIT_SECS))
    until healthy "$port"; do
        is_alive "$pid" || fail_with_log "$name" "exited during start-up"
        ((SECONDS < deadline)) || fail_with_log "$name" "did not answer /health on port $port within ${WAIT_SECS}s"
        sleep 0.2
    done
}

parse_up_args() {
    NODES=3 BASE_PORT=8001 LB_PORT=9000 BUILD=1 TLS=0
    while (($#)); do
        case "$1" in
            --nodes) NODES="${2:-}"; shift 2 ;;
            --base-port) BASE_PORT="${2:-}"; shift 2 ;;
            --lb-port) LB_PORT="${2:-}"; shift 2 ;;
            --no-build) BUILD=0; shift ;;
            --tls) TLS=1; shift ;;
            *) die "unknown option '$1' for up (see: $0 help)" ;;
        esac
    done
    [[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "--nodes $NODES: expected a whole number >= 1"
    if ! [[ "$BASE_PORT" =~ ^[0-9]+$ ]] || ((BASE_PORT < 1 || BASE_PORT + NODES - 1 > 65535)); then
        die "--base-port $BASE_PORT: expected a port such that all $NODES node ports fit below 65536"
    fi
    if ! [[ "$LB_PORT" =~ ^[0-9]+$ ]] || ((LB_PORT < 1 || LB_PORT > 65535)); then
        die "--lb-port $LB_PORT: expected a port from 1 to 65535"
    fi
    ((LB_PORT < BASE_PORT || LB_PORT >= BASE_PORT + NODES)) ||
        die "--lb-port $LB_PORT collides with a node port ($BASE_PORT..$((BASE_PORT + NODES - 1)))"
}

cmd_up() {
    parse_up_args "$@"
    mkdir -p "$RUN_DIR"
    refuse_if_running
    local name
    for name in $(process_names); do
        ! port_in_use "$(port_of "$name")" || die "port $(port_of "$name") (for $name) is already in use"
    done
    if ((BUILD)); then
        info "building kv-node and kv-lb (release)"
        cargo build --release -p kv-node -p kv-lb
    fi
    [[ -x "$BIN_DIR/kv-node" && -x "$BIN_DIR/kv-lb" ]] || die "binaries not found in $BIN_DIR"
    if ((TLS)); then make_certs; fi
    REMOVED=""
    CLUSTER_SECRET="${CLUSTER_SECRET:-$(new_secret)}"
    rm -f "$RUN_DIR"/*.log
    save_cluster_env
    start_all
    print_banner
}

# 24 random bytes as hex: the cluster's secret.
new_secret() { od -An -N24 -tx1 /dev/urandom | tr -d ' \n'; }

save_cluster_env() {
    (
        umask 077
        printf 'NODES=%s\nBASE_PORT=%s\nLB_PORT=%s\nREMOVED="%s"\nCLUSTER_SECRET=%q\nTLS=%s\n' \
            "$NODES" "$BASE_PORT" "$LB_PORT" "${REMOVED:-}" "${CLUSTER_SECRET:-}" "${TLS:-0}" >"$CLUSTER_ENV"
    )
}

# Worker threads of each node when WORKER_THREADS is unset: the nodes share this machine, so
# each gets its share of the cores (at least 1); a worker per core in every process makes them
# wake each other's idle workers (docs/PERFORMANCE.md, "Worker threads").
node_workers() {
    local cores
    cores="$(nproc 2>/dev/null || echo 1)"
    echo $((cores / NODES > 0 ? cores / NODES : 1))
}

# Starts node $1 (a number) on its port; CLUSTER_NODES is $2.
launch_node() {
    local i="$1" cluster_nodes="$2" port=$((BASE_PORT + $1 - 1)) tls=()
    mapfile -t tls < <(tls_vars)
    launch "node$i" env NODE_NAME="node$i" PORT="$port" CLUSTER_SECRET="${CLUSTER_SECRET:-}" \
        WORKER_THREADS="${WORKER_THREADS:-$(node_workers)}" \
        CURRENT_NODE_URL="$(scheme)://127.0.0.1:$port" CLUSTER_NODES="$cluster_nodes" \
        REPLICATION_FACTOR="${REPLICATION_FACTOR:-3}" DATA_DIR="./data/node$i" \
        "${tls[@]}" "$BIN_DIR/kv-node"
}

start_all() {
    local i port urls=() tls=()
    for ((i = 1; i <= NODES; i++)); do urls+=("$(scheme)://127.0.0.1:$((BASE_PORT + i - 1))"); done
    local cluster_nodes
    cluster_nodes="$(IFS=,; echo "${urls[*]}")"
    for ((i = 1; i <= NODES; i++)); do launch_node "$i" "$cluster_nodes"; done
    for ((i = 1; i <= NODES; i++)); do wait_healthy "node$i"; done
    mapfile -t tls < <(tls_vars)
    launch lb env DATABASE_NODES="$cluster_nodes" LB_PORT="$LB_PORT" \
        REPLICATION_FACTOR="${REPLICATION_FACTOR:-3}" "${tls[@]}" "$BIN_DIR/kv-lb"
    wait_healthy lb
}

print_banner() {
    local i s curl="curl"
    s="$(scheme)"
    [[ "$TLS" != 1 ]] || curl="curl --cacert run/tls/ca.pem"
    info "cluster is up"
    for ((i = 1; i <= NODES; i++)); do
        echo "  node$i  $s://127.0.0.1:$((BASE_PORT + i - 1))  (log: run/node$i.log)"
    done
    echo "  lb     $s://127.0.0.1:$LB_PORT  (log: run/lb.log)"
    cat <<EOF

Try:
  $curl -X POST $s://localhost:$LB_PORT/v1/mykey -d '{"value": "hello"}'
  $curl $s://localhost:$LB_PORT/v1/mykey
  $curl -X DELETE $s://localhost:$LB_PORT/v1/mykey

Stop with: scripts/cluster.sh down
EOF
}

# SIGTERM to every recorded process (LB first), wait up to STOP_SECS, then SIGKILL.
stop_all() {
    local file name pid names=() pids=()
    for file in "$RUN_DIR"/lb.pid "$RUN_DIR"/node*.pid; do
        [[ -e "$file" ]] || continue
        name="$(basename "$file" .pid)"
        pid="$(live_pid "$name")"
        if [[ -n "$pid" ]]; then
            kill -TERM "$pid" 2>/dev/null || true
            names+=("$name") pids+=("$pid")
        fi
    done
    local deadline=$((SECONDS + STOP_SECS)) i alive
    while :; do
        alive=0
        for i in "${!pids[@]}"; do is_alive "${pids[$i]}" && alive=1; done
        ((alive && SECONDS < deadline)) || break
        sleep 0.2
    done
    for i in "${!pids[@]}"; do
        if is_alive "${pids[$i]}"; then
            info "${names[$i]} (pid ${pids[$i]}) ignored SIGTERM for ${STOP_SECS}s; sending SIGKILL"
            kill -KILL "${pids[$i]}" 2>/dev/null || true
        else
            info "stopped ${names[$i]} (pid ${pids[$i]})"
        fi
    done
    rm -f "$RUN_DIR"/*.pid
}

cmd_down() {
    [[ -d "$RUN_DIR" ]] || { info "nothing to stop"; return 0; }
    stop_all
}

cmd_status() {
    load_cluster_env
    local name pid port health keys
    printf '%-7s %-8s %-6s %-6s %-8s %s\n' NAME PID STATE PORT KEYS HEALTH
    for name in $(process_names); do
        port="$(port_of "$name")"
        pid="$(live_pid "$name")"
        health="$(kv_curl -sS --max-time 2 "$(scheme)://127.0.0.1:$port/health" 2>/dev/null || echo '-')"
        keys="$(kv_curl -sS --max-time 2 "$(scheme)://127.0.0.1:$port/" 2>/dev/null | grep -o '"keys":[0-9]*' | cut -d: -f2 || true)"
        printf '%-7s %-8s %-6s %-6s %-8s %s\n' "$name" "${pid:--}" "$([[ -n "$pid" ]] && echo alive || echo dead)" \
            "$port" "${keys:--}" "$health"
    done
}

# curl against the admin API of a live member, with the cluster secret as its bearer token.
admin() {
    local method="$1" path="$2" body="${3:-}" name auth=(-H "Authorization: Bearer ${CLUSTER_SECRET:-}")
    for name in $(process_names); do
        [[ "$name" != lb && "$name" != "${SKIP:-}" && -n "$(live_pid "$name")" ]] || continue
        kv_curl -sS --max-time 30 -X "$method" "${auth[@]}" "$(scheme)://127.0.0.1:$(port_of "$name")$path" \
            ${body:+-d "$body"}
        return
    done
    die "no live node to ask"
}

# POSTs a membership change ($1, JSON) to a live member; dies with the node's message when it
# is refused (a 4xx answer carries "error").
admin_change() {
    local answer
    answer="$(admin POST /admin/members "$1")" || die "no answer to the membership change"
    if [[ "$answer" == *'"error"'* ]]; then
        die "membership change refused: $answer"
    fi
}

# Polls /admin/members until no change is in progress, or WAIT_SECS * 4 pass.
wait_committed() {
    local deadline=$((SECONDS + WAIT_SECS * 4))
    until admin GET /admin/members | grep -q '"in_transition":false'; do
        ((SECONDS < deadline)) || die "the membership change did not finish in time; see: $0 logs"
        sleep 0.5
    done
}

cmd_add() {
    load_cluster_env
    local i=$((NODES + 1)) port url
    port=$((BASE_PORT + i - 1))
    ((port != LB_PORT)) || die "the next node port $port is the LB's"
    ! port_in_use "$port" || die "port $port (for node$i) is already in use"
    url="$(scheme)://127.0.0.1:$port"
    launch_node "$i" "$url"
    NODES="$i"
    save_cluster_env
    wait_healthy "node$i"
    info "node$i is up at $url; joining it"
    admin_change "{\"add\": [\"$url\"]}"
    wait_committed
    info "node$i joined; keys per node:"
    cmd_status
}

# Dies unless $1 names a node of this cluster that was not removed.
check_member_name() {
    local name="$1" what="$2"
    if ! [[ "$name" =~ ^node[0-9]+$ ]] || ((${name#node} > NODES)) || [[ " ${REMOVED:-} " == *" $name "* ]]; then
        die "$what: expected the name of a node of this cluster, like node2"
    fi
}

# Stops node $1 if it still runs (SIGTERM, then SIGKILL after STOP_SECS) and records it removed.
retire() {
    local name="$1" pid
    pid="$(live_pid "$name")"
    if [[ -n "$pid" ]]; then
        kill -TERM "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + STOP_SECS))
        while is_alive "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
        ! is_alive "$pid" || kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$RUN_DIR/$name.pid"
    REMOVED="${REMOVED:-} $name"
    save_cluster_env
}

cmd_remove() {
    load_cluster_env
    local name="${1:-}" force=false
    check_member_name "$name" remove
    [[ "${2:-}" != --force ]] || force=true
    [[ -z "${2:-}" || "$2" == --force ]] || die "remove: unknown option '$2' (expected --force)"
    if [[ -z "$(live_pid "$name")" ]]; then
        info "$name is not running: its ranges are copied from the surviving replicas"
    else
        info "draining $name (its keys get N copies on the others)"
    fi
    SKIP="$name" admin_change "{\"remove\": [\"$(scheme)://127.0.0.1:$(port_of "$name")\"], \"force\": $force}"
    SKIP="$name" wait_committed
    retire "$name"
    info "$name left the cluster; its data dir ./data/$name is no longer needed"
}

cmd_replace() {
    load_cluster_env
    local name="${1:-}" i=$((NODES + 1)) port old new
    check_member_name "$name" replace
    port=$((BASE_PORT + i - 1))
    ((port != LB_PORT)) || die "the next node port $port is the LB's"
    ! port_in_use "$port" || die "port $port (for node$i) is already in use"
    old="$(scheme)://127.0.0.1:$(port_of "$name")"
    new="$(scheme)://127.0.0.1:$port"
    launch_node "$i" "$new"
    NODES="$i"
    save_cluster_env
    wait_healthy "node$i"
    info "node$i is up at $new; moving $name's ranges to it"
    SKIP="$name" admin_change "{\"replace\": {\"$old\": \"$new\"}}"
    SKIP="$name" wait_committed
    retire "$name"
    info "node$i replaced $name; ./data/$name is no longer needed. Keys per node:"
    cmd_status
}

cmd_abort() {
    load_cluster_env
    admin_change '{"abort": true}'
    wait_committed
    info "the membership change was aborted; the cluster is back to the previous members"
}

cmd_start() {
    load_cluster_env
    local name="${1:-}" i urls=() cluster_nodes
    if ! [[ "$name" =~ ^node[0-9]+$ ]] || ((${name#node} > NODES)) || [[ " ${REMOVED:-} " == *" $name "* ]]; then
        die "start: expected the name of a node of this cluster, like node2"
    fi
    [[ -z "$(live_pid "$name")" ]] || die "$name is already running"
    # The seed list only matters at a node's first start; afterwards its stored view wins.
    for ((i = 1; i <= NODES; i++)); do urls+=("$(scheme)://127.0.0.1:$((BASE_PORT + i - 1))"); done
    cluster_nodes="$(IFS=,; echo "${urls[*]}")"
    launch_node "${name#node}" "$cluster_nodes"
    wait_healthy "$name"
    info "$name is up again"
}

cmd_logs() {
    [[ -d "$RUN_DIR" ]] || die "no logs in $RUN_DIR"
    if (($#)); then
        [[ -f "$RUN_DIR/$1.log" ]] || die "no log $RUN_DIR/$1.log"
        exec tail -n 50 -F "$RUN_DIR/$1.log"
    fi
    exec tail -n 20 -F "$RUN_DIR"/*.log
}

main() {
    local command="${1:-help}"
    (($#)) && shift
    case "$command" in
        up) cmd_up "$@" ;;
        down) cmd_down ;;
        status) cmd_status ;;
        logs) cmd_logs "$@" ;;
        add) cmd_add ;;
        remove) cmd_remove "$@" ;;
        replace) cmd_replace "$@" ;;
        abort) cmd_abort ;;
        start) cmd_start "$@" ;;
        help | -h | --help) usage ;;
        *) usage >&2; exit 2 ;;
    esac
}

main "$@"
