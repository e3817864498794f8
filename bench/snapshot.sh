#!/usr/bin/env bash
# bench/snapshot.sh — what a snapshot costs a VM disk's writes (issue 19): fio 4k randwrite
# QD32 through the gateway with no snapshot, right after one (every first write to a 64 KiB
# chunk copies it), and twice more as the copies run out; plus how long `rbd snap create`
# and `rbd clone` of a 10 GiB image take. The ratios are within one run on one cluster.
#
# Usage: bench/snapshot.sh [BIN]   (BIN: directory with basalt, basalt-mon, basalt-osd,
#        basalt-gw; default ~/.cache/basalt-target/release). Environment: SECS (fio seconds
#        per job, default 20), ROUNDS (fresh clusters, default 2), OUT (results file,
#        default bench/results/snapshot-<UTC date>.txt).
# Each round: `basalt cluster up` (1 monitor, 3 OSDs on 3 hosts, 32 PGs, one gateway), a 1 GiB
# image filled with 1 MiB writes. Each line records the 1-minute load average at its start.
# Uses the ports of `basalt cluster up` (6789, 9280+, 10809): stop any other local cluster.
set -euo pipefail
. "$(dirname "$0")/plain-nbd.sh"
cd "$(dirname "$0")/.."
bin=${1:-${CARGO_TARGET_DIR:-$HOME/.cache/basalt-target}/release}
secs=${SECS:-20} rounds=${ROUNDS:-2}
out=${OUT:-bench/results/snapshot-$(date -u +%Y%m%d-%H%M).txt}
command -v fio >/dev/null || { echo "fio is missing: apt-get install fio" >&2; exit 1; }
dir=$(mktemp -d /tmp/basalt-snapbench.XXXXXX)
trap '"$bin/basalt" cluster down --dir "$dir/c" >/dev/null 2>&1; rm -rf "$dir"' EXIT
uri=nbd://127.0.0.1:10809/rbd/bench

fio_job() { # label
  local load r
  load=$(cut -d' ' -f1 /proc/loadavg)
  r=$(fio --name=j --ioengine=nbd --uri=$uri --rw=randwrite --bs=4k --iodepth=32 --size=1G \
        --time_based --runtime="$secs" --output-format=json 2>/dev/null |
      python3 bench/fio_summary.py --p99)
  printf 'round %d  %-28s load %5s  %s\n' "$round" "$1" "$load" "$r" | tee -a "$out"
}

timed() { # label command...
  local label=$1 t0 t1
  shift
  t0=$(date +%s%N)
  "$@" >/dev/null
  t1=$(date +%s%N)
  printf 'round %d  %-28s %8.1f ms\n' "$round" "$label" "$(((t1 - t0) / 1000))e-3" | tee -a "$out"
}

echo "# bench/snapshot.sh $(date -u +%FT%TZ): bin=$bin, $secs s per fio job, commit $(git rev-parse --short HEAD)" | tee -a "$out"
for ((round = 1; round <= rounds; round++)); do
  rm -rf "$dir/c"
  "$bin/basalt" cluster up --dir "$dir/c" $(plain_nbd "$bin") --mons 1 --hosts 3 --osds-per-host 1 --gateways 1 --pg-num 32 >/dev/null
  export BASALT_CONFIG=$dir/c/cluster.toml
  "$bin/basalt" rbd create rbd/bench --size 1G >/dev/null
  fio --name=fill --ioengine=nbd --uri=$uri --rw=write --bs=1M --iodepth=8 --size=1G >/dev/null
  fio_job "no snapshot"
  timed "rbd snap create" "$bin/basalt" rbd snap create rbd/bench@s1
  fio_job "first run after a snapshot"
  fio_job "second run after it"
  fio_job "third run after it"
  "$bin/basalt" rbd create rbd/big --size 10G >/dev/null
  "$bin/basalt" rbd snap create rbd/big@base >/dev/null
  "$bin/basalt" rbd snap protect rbd/big@base >/dev/null
  timed "rbd clone of a 10 GiB image" "$bin/basalt" rbd clone rbd/big@base rbd/big-clone
  "$bin/basalt" cluster down --dir "$dir/c" >/dev/null
done
