#!/usr/bin/env bash
# fio (ioengine=nbd) against basalt-gw on a fresh local cluster: the DESIGN §C workloads.
# Usage: bench/fio-gateway.sh [SECONDS_PER_JOB]   (default 20)
# Needs the release build (scripts/up.sh or scripts/test.sh builds it) and fio.
# Uses ports 6789-6791, 10809 and 9280+ (stop any other local cluster first).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-20}
. bench/fresh-cluster.sh
fresh_cluster
url="nbd://127.0.0.1:10809/rbd/demo"
run() { # name rw bs iodepth
  fio --name="$1" --ioengine=nbd --uri="$url" --rw="$2" --bs="$3" --iodepth="$4" \
      --size=1G --time_based --runtime="$secs" --ramp_time=2 --group_reporting \
      --output-format=json 2>/dev/null | sed -n '/^{/,$p' > "$dir/$1.json"
  python3 - "$dir/$1.json" "$1" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
io = j["write"] if j["write"]["io_bytes"] else j["read"]
lat = io["clat_ns"]
p = lat.get("percentile", {})
print(f'{sys.argv[2]:16} {io["iops"]:9.0f} IOPS {io["bw"]/1024:8.1f} MiB/s  '
      f'avg {lat["mean"]/1e6:6.2f} ms  p99 {p.get("99.000000", 0)/1e6:6.2f} ms')
PY
}
# Lay the image down first so reads hit data, not holes.
fio --name=fill --ioengine=nbd --uri="$url" --rw=write --bs=1M --iodepth=8 --size=1G >/dev/null
run randwrite-4k-qd1 randwrite 4k 1
run randwrite-4k-qd32 randwrite 4k 32
run randread-4k-qd32 randread 4k 32
run seqwrite-1m-qd4 write 1M 4
run seqread-1m-qd4 read 1M 4
echo "OSD RSS (MiB):"
for p in "$dir"/osd*.pid; do
  awk '/VmRSS/ {printf "  %s %.0f\n", FILENAME, $2/1024}' "/proc/$(cat "$p")/status"
done
