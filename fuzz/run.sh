#!/usr/bin/env bash
# Runs kv's fuzz targets on the stable toolchain (RUSTC_BOOTSTRAP unlocks the flags cargo fuzz
# needs; no ASan runtime is needed with --sanitizer none), each for FUZZ_SECS seconds (600),
# JOBS at a time (1), and prints each target's final libFuzzer stats line.
# Usage: fuzz/run.sh [target...]   (default: every target)
set -euo pipefail
cd "$(dirname "$0")"
secs="${FUZZ_SECS:-600}"
jobs="${JOBS:-1}"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(record_decode frame_read peer_batch consistency_parse wal_open snapshot_open view_decode)
fi
mkdir -p logs
# FUZZ_NO_BUILD=1 reuses the last build (handy while the tree is being edited).
[ -n "${FUZZ_NO_BUILD:-}" ] || RUSTC_BOOTSTRAP=1 cargo fuzz build --sanitizer none
bin_dir="target/x86_64-unknown-linux-gnu/release"
run_one() {
  local t="$1"
  mkdir -p "corpus/$t"
  # -rss_limit_mb: a decoder that allocates wildly is a bug too.
  mkdir -p "artifacts/$t"
  nice -n 10 "$bin_dir/$t" "corpus/$t" "seeds/$t" -artifact_prefix="artifacts/$t/" \
    -max_total_time="$secs" -rss_limit_mb=1024 -print_final_stats=1 >"logs/$t.log" 2>&1 \
    && echo "$t: ok" || echo "$t: FAILED (see fuzz/logs/$t.log)"
  grep -E "^#[0-9]+.*DONE|stat::number_of_executed_units|stat::new_units_added|cov:" "logs/$t.log" | tail -3
}
running=0
for t in "${targets[@]}"; do
  run_one "$t" &
  running=$((running + 1))
  if [ "$running" -ge "$jobs" ]; then wait -n; running=$((running - 1)); fi
done
wait
