#!/usr/bin/env bash
# bench/ab.sh — two basalt builds through the gateway, interleaved on fresh clusters: a quick
# before/after of one change. Not a figure of record (that is bench/vs-ceph.sh, side by side
# with Ceph); use it to see whether a change moves the data path at all.
#
# Usage: bench/ab.sh BEFORE_BIN AFTER_BIN   (directories holding basalt, basalt-mon, basalt-osd,
#        basalt-gw). Environment: SECS (fio seconds per job, default 10), ROUNDS (default 2:
#        before, after, after, before — a drifting load favours neither), OUT (results file,
#        default bench/results/ab-<UTC date>.txt).
# Each round: `basalt cluster up` (1 monitor, 3 OSDs on 3 hosts, 32 PGs, one gateway), a 1 GiB
# image filled with 1 MiB writes, then fio (ioengine=nbd) 4k randwrite QD1 and QD32, 4k
# randread QD32, 1M write QD4; each line records the 1-minute load average at its start.
# Uses the ports of `basalt cluster up` (6789, 9280+, 10809): stop any other local cluster.
set -euo pipefail
. "$(dirname "$0")/plain-nbd.sh"
cd "$(dirname "$0")/.."
[[ $# == 2 ]] || { echo "usage: bench/ab.sh BEFORE_BIN AFTER_BIN" >&2; exit 2; }
before=$1 after=$2 secs=${SECS:-10} rounds=${ROUNDS:-2}
out=${OUT:-bench/results/ab-$(date -u +%Y%m%d-%H%M).txt}
command -v fio >/dev/null || { echo "fio is missing: apt-get install fio" >&2; exit 1; }
dir=$(mktemp -d /tmp/basalt-ab.XXXXXX)
current=""
trap '[[ -n $current ]] && "$current/basalt" cluster down --dir "$dir/c" >/dev/null 2>&1; rm -rf "$dir"' EXIT

one_build() { # label bin
  local label=$1 bin=$2 uri=nbd://127.0.0.1:10809/rbd/ab job load r
  rm -rf "$dir/c"
  current=$bin
  "$bin/basalt" cluster up --dir "$dir/c" $(plain_nbd "$bin") --mons 1 --hosts 3 --osds-per-host 1 --gateways 1 --pg-num 32 >/dev/null
  BASALT_CONFIG=$dir/c/cluster.toml "$bin/basalt" rbd create rbd/ab --size 1G >/dev/null
  fio --name=fill --ioengine=nbd --uri=$uri --rw=write --bs=1M --iodepth=8 --size=1G >/dev/null
  for job in "randwrite 4k 1" "randwrite 4k 32" "randread 4k 32" "write 1M 4"; do
    set -- $job
    load=$(cut -d' ' -f1 /proc/loadavg)
    r=$(fio --name=j --ioengine=nbd --uri=$uri --rw="$1" --bs="$2" --iodepth="$3" --size=1G \
          --time_based --runtime="$secs" --ramp_time=2 --output-format=json 2>/dev/null |
        python3 bench/fio_summary.py)
    printf '%-7s %-15s load %5s  %s\n' "$label" "$1-$2-qd$3" "$load" "$r" | tee -a "$out"
  done
  "$bin/basalt" cluster down --dir "$dir/c" >/dev/null
  current=""
}

echo "# bench/ab.sh $(date -u +%FT%TZ): before=$before after=$after, $secs s per job" | tee -a "$out"
for ((i = 0; i < rounds; i++)); do
  if ((i % 2 == 0)); then one_build before "$before"; one_build after "$after"
  else one_build after "$after"; one_build before "$before"; fi
done
