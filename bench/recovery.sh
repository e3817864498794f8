#!/usr/bin/env bash
# Client latency while an OSD catches up (issue 5). On a fresh local cluster (3 hosts × 2
# OSDs, pool rbd size 3): 4 KiB object writes at 16 in flight are measured
#   1. on the healthy cluster,
#   2. with one OSD SIGKILLed and marked down (PGs degraded, 2 copies),
#   3. right after the OSD is started again, while its PGs recover the writes it missed.
# Between 2 and 3, 1 MiB objects are written for FILL_SECONDS so there is data to recover.
# Usage: bench/recovery.sh [FILL_SECONDS]   (default 20)
# Needs the release build; uses ports 6789-6791 and 9280+ (stop any other local cluster).
set -euo pipefail
cd "$(dirname "$0")/.."
fill=${1:-20}
. bench/fresh-cluster.sh
fresh_cluster --gateways 0
cat >"$dir/show.py" <<'PY'
import json, sys
j = json.load(sys.stdin)
if sys.argv[1] == "fill":
    print(f"written meanwhile: {j['bytes'] / 2**20:.0f} MiB in {j['objects']} objects")
else:
    l = j["latency_ms"]
    print(f"{sys.argv[1]:30} {j['iops']:6.0f} IOPS  p50 {l['p50']:7.1f} ms"
          f"  p99 {l['p99']:7.1f} ms  max {l['max']:7.1f} ms")
PY
measure() { # label seconds
  "$bin/basalt" bench write --block-size 4K --threads 16 --seconds "$2" --format json 2>/dev/null |
    python3 "$dir/show.py" "$1"
}
measure "healthy" 10
id=$(sed -n 's/.*know this OSD as osd\.\([0-9]*\) .*/\1/p' "$dir/osd5.log" | head -1)
kill -9 "$(cat "$dir/osd5.pid")"
"$bin/basalt" osd down "$id" >/dev/null
measure "osd.$id down (degraded)" 10
"$bin/basalt" bench write --block-size 1M --threads 8 --seconds "$fill" --no-cleanup --format json \
  2>/dev/null | python3 "$dir/show.py" fill
start=$(date +%s.%N)
# `cluster up` restarts the missing OSD and returns once every PG is active+clean.
"$bin/basalt" cluster up --dir "$dir" --gateways 0 >"$dir/up.out" 2>&1 &
up=$!
sleep 1
measure "osd.$id back, recovering" 10
wait "$up"
printf 'osd.%s back to every PG active+clean: %.1f s\n' "$id" "$(echo "$(date +%s.%N) - $start" | bc)"
printf 'catch-ups: %s by log, %s by backfill\n' \
  "$(cat "$dir"/osd*.log | grep -c 'log-based recovery' || true)" \
  "$(cat "$dir"/osd*.log | grep -c 'INFO.*backfill pg=' || true)"
