#!/usr/bin/env bash
# Long chaos runs: the fault scenarios of tests/chaos.rs, each for KV_CHAOS_SECS seconds (default
# 90; the disk-full and damaged-file scenarios take the time they take), ROUNDS times (1), one
# at a time, in release mode; after each, `linearizable: yes/no/unknown` per recorded history
# (on no: the first violating key and its operations); then a table of what each run did. Exit
# status non-zero if any scenario failed (a non-linearizable history fails its scenario). The
# clock scenarios need libfaketime (`apt-get install -y libfaketime`).
#
#   scripts/chaos.sh                     # about 10 minutes
#   KV_CHAOS_SECS=300 ROUNDS=3 scripts/chaos.sh
#   KV_CHAOS_SEED=1234 scripts/chaos.sh kill   # replay one scenario with a printed seed
#   CHAOS_PROFILE=debug scripts/chaos.sh        # skip the release build
set -uo pipefail
cd "$(dirname "$0")/.."
export KV_CHAOS_SECS="${KV_CHAOS_SECS:-90}"
rounds="${ROUNDS:-1}"
profile=(--release)
[ "${CHAOS_PROFILE:-release}" = release ] || profile=()
scenarios=("$@")
[ ${#scenarios[@]} -gt 0 ] || scenarios=(kill:: pause:: partition:: rolling:: clock:: slow:: disk:: recovery::)
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
status=0
echo "chaos: ${scenarios[*]}, ${KV_CHAOS_SECS}s each, ${rounds} round(s); logs in $out while running"
cargo build "${profile[@]}" -q -p kv-node -p kv-lb -p kv-tests --tests || exit 1
for round in $(seq 1 "$rounds"); do
  for s in "${scenarios[@]}"; do
    start=$(date +%s)
    if cargo test "${profile[@]}" -q -p kv-tests --test chaos "$s" -- --test-threads=1 --nocapture \
      >"$out/$s.$round.log" 2>&1; then result=ok; else result=FAILED; status=1; fi
    echo "round $round: $s $result in $(( $(date +%s) - start ))s"
    grep -h "^CHAOS-RESULT" "$out/$s.$round.log" | sed "s/\$/ result=$result/" >>"$out/results"
    grep -h "KV_CHAOS_SEED=" "$out/$s.$round.log" || true
    # One verdict per recorded history; the checker's report when it is not a plain yes.
    grep -h "^CHAOS-LINEARIZABLE" "$out/$s.$round.log" | while read -r _ scenario verdict _; do
      echo "  ${scenario#scenario=}: linearizable: ${verdict#verdict=}"
      [ "${verdict#verdict=}" = yes ] ||
        grep -h "^CHAOS-LIN-REPORT ${scenario#scenario=} | " "$out/$s.$round.log" | sed 's/^[^|]*| /    /'
    done
    [ "$result" = ok ] || grep -h -A15 "panicked" "$out/$s.$round.log" | head -30
  done
done
echo
# One row per CHAOS-RESULT line: key=value fields, missing ones shown as '-'.
awk '
  BEGIN { printf "%-12s %6s %8s %7s %8s %7s %5s %6s %4s  %s\n", "scenario", "secs", "ops", "faults", "acked", "failed", "lost", "stale", "lin", "notes" }
  /^CHAOS-RESULT/ {
    delete f; notes = ""
    for (i = 2; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
    split("scenario secs ops faults acked failed_ops lost stale phantom linearizable", known, " ")
    for (k in f) { skip = 0; for (j in known) if (known[j] == k) skip = 1; if (!skip) notes = notes " " k "=" f[k] }
    printf "%-12s %6s %8s %7s %8s %7s %5s %6s %4s %s\n", f["scenario"], (f["secs"] ? f["secs"] : "-"), (f["ops"] ? f["ops"] : "-"),
      f["faults"], f["acked"], (f["failed_ops"] != "" ? f["failed_ops"] : "-"), (f["lost"] != "" ? f["lost"] : "-"),
      (f["stale"] != "" ? f["stale"] : "-"), (f["linearizable"] != "" ? f["linearizable"] : "-"),
      (f["phantom"] != "" ? " phantom=" f["phantom"] : "") notes
  }' "$out/results"
exit $status
