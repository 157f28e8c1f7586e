#!/usr/bin/env bash
# Measures listing on a big node: one page of 100 keys out of 1,000,000, alone and under a
# concurrent write load, and what the listing does to the writes' latency.
#
#   scripts/bench-list.sh                          # the binaries of this tree (release build)
#   KV_NODE=/path/to/old/kv-node scripts/bench-list.sh   # another kv-node, e.g. an older commit
#
# Starts one kv-node (REPLICATION_FACTOR=1, fresh temporary data folder, free port), preloads
# BENCH_KEYS keys of BENCH_VALUE_SIZE bytes (`bench-0` ..), then runs three phases of
# BENCH_DURATION each, all with kv-bench:
#   list-alone     one connection asking listing pages back to back (`--mix list=1`): each page
#                  is `GET /v1?prefix=bench-&after=bench-<random key>&limit=100`
#   write-alone    open-loop writes at BENCH_WRITE_RATE per second over 2 x BENCH_KEYS keys (so
#                  about half of them create a key), latency counted from each request's
#                  scheduled time
#   list+write     both at once: listing p50/p99 under the write load, and the write p99 while
#                  listing flat out (on 2 cores a fast listing also takes CPU from the writes)
#   paced          writes as above while listing pages arrive at BENCH_LIST_RATE per second on 4
#                  connections, the same rate for every build: the write p99 while listing
# then stops the node (SIGTERM: clean shutdown with a final checkpoint of the whole map) and
# starts it again on the same data (recovery from that snapshot), and prints one table (also
# written to $BENCH_OUT/table.md) with the node's resident memory after the preload and both
# times. Everything it started is stopped on exit, by PID.
#
# Environment:
#   KV_NODE           kv-node binary (default: $CARGO_TARGET_DIR/release/kv-node)
#   KV_BENCH          kv-bench binary (default: $CARGO_TARGET_DIR/release/kv-bench)
#   BENCH_NO_BUILD=1  do not run `cargo build --release` first
#   BENCH_LABEL       name of this build in the table (default: the git commit)
#   BENCH_KEYS        keys preloaded (1000000)         BENCH_VALUE_SIZE  bytes per value (100)
#   BENCH_DURATION    measured time per phase (20s)    BENCH_WARMUP      unrecorded warm-up (2s)
#   BENCH_WRITE_RATE  writes per second (1000)         BENCH_WRITE_CONNS write connections (16)
#   BENCH_LIST_LIMIT  keys per page (100)              BENCH_WAL_SYNC    WAL_SYNC of the node (interval)
#   BENCH_LIST_RATE   listing pages per second of the paced phase (1)
#   BENCH_OUT         folder for JSON results and logs (default: a new temp folder, kept)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BIN_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/release"
KV_NODE="${KV_NODE:-$BIN_DIR/kv-node}"
KV_BENCH="${KV_BENCH:-$BIN_DIR/kv-bench}"
KEYS="${BENCH_KEYS:-1000000}"
VALUE_SIZE="${BENCH_VALUE_SIZE:-100}"
DURATION="${BENCH_DURATION:-20s}"
WARMUP="${BENCH_WARMUP:-2s}"
WRITE_RATE="${BENCH_WRITE_RATE:-1000}"
WRITE_CONNS="${BENCH_WRITE_CONNS:-16}"
LIST_LIMIT="${BENCH_LIST_LIMIT:-100}"
LIST_RATE="${BENCH_LIST_RATE:-1}"
WAL_SYNC="${BENCH_WAL_SYNC:-interval}"
OUT="${BENCH_OUT:-$(mktemp -d -t kv-bench-list.XXXXXX)}"
LABEL="${BENCH_LABEL:-$(git rev-parse --short HEAD 2>/dev/null || echo this-tree)}"
HEALTH_WAIT_SECS=60   # how long the node may take to answer /health
STOP_WAIT_SECS=30     # how long the node may take to exit after SIGTERM (final checkpoint)
STARTED_PIDS=()
DATA_DIRS=()

die() { echo "bench-list.sh: $*" >&2; exit 1; }
info() { echo "bench-list.sh: $*" >&2; }

# Stops every process this script started, by PID: SIGTERM, then SIGKILL after a deadline.
cleanup() {
    local pid deadline
    for pid in "${STARTED_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    deadline=$((SECONDS + STOP_WAIT_SECS))
    for pid in "${STARTED_PIDS[@]}"; do
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if ((${#DATA_DIRS[@]})); then rm -rf "${DATA_DIRS[@]}"; fi
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_node: starts kv-node on $DATA and waits for /health; sets NODE_PID.
start_node() {
    env NODE_NAME=node1 PORT="$PORT" CURRENT_NODE_URL="$URL" CLUSTER_NODES="$URL" \
        REPLICATION_FACTOR=1 DATA_DIR="$DATA" WAL_SYNC="$WAL_SYNC" RUST_LOG="${RUST_LOG:-warn}" \
        "$KV_NODE" >>"$OUT/logs/node.log" 2>&1 &
    NODE_PID=$!
    STARTED_PIDS+=("$NODE_PID")
    local deadline=$((SECONDS + HEALTH_WAIT_SECS))
    until curl -fsS --max-time 1 "$URL/health" >/dev/null 2>&1; do
        kill -0 "$NODE_PID" 2>/dev/null || die "kv-node exited (log: $OUT/logs/node.log)"
        ((SECONDS < deadline)) || die "kv-node did not answer $URL/health within ${HEALTH_WAIT_SECS}s"
        sleep 0.05
    done
}

mkdir -p "$OUT/logs"
if [[ "${BENCH_NO_BUILD:-}" != 1 ]]; then
    info "building release binaries"
    cargo build --release -q -p kv-node -p kv-bench
fi
[[ -x "$KV_NODE" ]] || die "no kv-node binary at $KV_NODE"
[[ -x "$KV_BENCH" ]] || die "no kv-bench binary at $KV_BENCH"

PORT="$(free_port)"
URL="http://127.0.0.1:$PORT"
DATA="$(mktemp -d -t kv-bench-list-data.XXXXXX)"
DATA_DIRS+=("$DATA")
start_node
info "kv-node $KV_NODE up at $URL; results in $OUT"

info "preloading $KEYS keys"
"$KV_BENCH" run --url "$URL" --conns 32 --keys "$KEYS" --value-size "$VALUE_SIZE" --mix write=1 \
    --preload --requests 1 --warmup 0s --quiet >/dev/null 2>"$OUT/logs/preload.log" ||
    die "preload failed (log: $OUT/logs/preload.log)"
grep -q "(0 failed)" "$OUT/logs/preload.log" || die "preload: $(tail -n 1 "$OUT/logs/preload.log")"
RSS_KIB="$(awk '/^VmRSS:/ {print $2}' "/proc/$NODE_PID/status")"

# list NAME CONNS [ARGS...]: listing pages, closed loop unless ARGS give a --rate.
list() {
    local name="$1" conns="$2"
    shift 2
    "$KV_BENCH" run --url "$URL" --conns "$conns" --keys "$KEYS" --mix list=1 --list-limit "$LIST_LIMIT" \
        --duration "$DURATION" --warmup "$WARMUP" --timeout 60s --quiet --label "$name" \
        --json "$OUT/$name.json" "$@" >>"$OUT/runs.txt" 2>"$OUT/logs/$name.log"
}

# write NAME: open-loop writes at WRITE_RATE per second.
write() {
    "$KV_BENCH" run --url "$URL" --conns "$WRITE_CONNS" --keys "$((KEYS * 2))" \
        --value-size "$VALUE_SIZE" --mix write=1 --rate "$WRITE_RATE" --duration "$DURATION" \
        --warmup "$WARMUP" --timeout 60s --quiet --label "$1" --json "$OUT/$1.json" \
        >>"$OUT/runs.txt" 2>"$OUT/logs/$1.log"
}

LOAD_BEFORE="$(cut -d' ' -f1 /proc/loadavg)"
info "phase list-alone"
list list-alone 1
info "phase write-alone"
write write-alone
info "phase list+write"
write write-while-listing &
WRITER=$!
list list-under-writes 1
wait "$WRITER"
info "phase paced: writes while listing $LIST_RATE page(s) per second"
write write-while-paced &
WRITER=$!
list list-paced 4 --rate "$LIST_RATE"
wait "$WRITER"

LOAD_AFTER="$(cut -d' ' -f1 /proc/loadavg)"

# Clean shutdown (final checkpoint of the whole map), then a restart (recovery from it).
info "restart: shutdown with a final checkpoint, then recovery"
t0=$(date +%s.%N)
kill -TERM "$NODE_PID"
while kill -0 "$NODE_PID" 2>/dev/null; do sleep 0.05; done
t1=$(date +%s.%N)
start_node
t2=$(date +%s.%N)
SHUTDOWN_SECS=$(python3 -c "print(f'{$t1 - $t0:.2f}')")
START_SECS=$(python3 -c "print(f'{$t2 - $t1:.2f}')")

python3 - "$OUT" "$LABEL" "$KEYS" "$LIST_LIMIT" "$WRITE_RATE" "$RSS_KIB" "$SHUTDOWN_SECS" "$START_SECS" "$LIST_RATE" "$LOAD_BEFORE / $LOAD_AFTER" <<'EOF' | tee "$OUT/table.md"
import json, sys
out, label, keys, limit, rate, rss, shutdown, start, list_rate, load = sys.argv[1:]
def op(name, which):
    with open(f"{out}/{name}.json") as f:
        report = json.load(f)
    o = next(o for o in report["ops"] if o["op"] == which)
    return o
def ms(us):
    return f"{us / 1000:.2f}"
la, lw, lp = op("list-alone", "list"), op("list-under-writes", "list"), op("list-paced", "list")
wa, ww, wp = op("write-alone", "write"), op("write-while-listing", "write"), op("write-while-paced", "write")
print(f"| build | list p50 / p99 alone (ms) | list p50 / p99 under writes (ms) | pages/s under writes "
      f"| write p99 alone (ms) | write p99 while listing flat out (ms) "
      f"| write p99 while listing {list_rate}/s (ms) | list p99 at {list_rate}/s (ms) | errors "
      f"| RSS after preload (MiB) | shutdown incl. checkpoint (s) | restart to /health (s) |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
errors = sum(o["errors"] for o in (la, lw, lp, wa, ww, wp))
print(f"| {label} | {ms(la['latency_us']['p50'])} / {ms(la['latency_us']['p99'])} "
      f"| {ms(lw['latency_us']['p50'])} / {ms(lw['latency_us']['p99'])} | {lw['throughput']:.1f} "
      f"| {ms(wa['latency_us']['p99'])} | {ms(ww['latency_us']['p99'])} "
      f"| {ms(wp['latency_us']['p99'])} | {ms(lp['latency_us']['p99'])} | {errors} "
      f"| {int(rss) / 1024:.0f} | {shutdown} | {start} |")
print(f"\n{keys} keys, pages of {limit}, writes at {rate}/s open loop; machine load average "
      f"(1 min) before / after the phases: {load}; kv-bench JSON in {out}")
EOF
