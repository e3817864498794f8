#!/usr/bin/env bash
# bench/du.sh — how long `basalt rbd du` of a 10 GiB image with a snapshot takes (issue 19's
# target: < 1 s), from the object maps and, for comparison, from the objects (maps off).
#
# Usage: bench/du.sh [BIN]   (BIN: directory with basalt, basalt-mon, basalt-osd, basalt-gw;
#        default ~/.cache/basalt-target/release). Environment: OUT (results file, default
#        bench/results/du-<UTC date>.txt).
# `basalt cluster up` (1 monitor, 3 OSDs on 3 hosts, 32 PGs, one gateway), a 10 GiB image,
# 3,000 random 4 KiB writes through the gateway, a snapshot, 1,000 more; then each `rbd du`
# is the whole CLI process (connect, read, print). Each line records the 1-minute load
# average at its start. Uses the ports of `basalt cluster up`: stop any other local cluster.
set -euo pipefail
. "$(dirname "$0")/plain-nbd.sh"
cd "$(dirname "$0")/.."
bin=${1:-${CARGO_TARGET_DIR:-$HOME/.cache/basalt-target}/release}
out=${OUT:-bench/results/du-$(date -u +%Y%m%d-%H%M).txt}
command -v fio >/dev/null || { echo "fio is missing: apt-get install fio" >&2; exit 1; }
dir=$(mktemp -d /tmp/basalt-dubench.XXXXXX)
trap '"$bin/basalt" cluster down --dir "$dir/c" >/dev/null 2>&1; rm -rf "$dir"' EXIT
uri=nbd://127.0.0.1:10809/rbd/du10g

timed() { # label command...
  local label=$1 load t0 t1
  shift
  load=$(cut -d' ' -f1 /proc/loadavg)
  t0=$(date +%s%N)
  "$@" >/dev/null 2>&1
  t1=$(date +%s%N)
  printf '%-40s load %5s  %8.1f ms\n' "$label" "$load" "$(((t1 - t0) / 1000))e-3" | tee -a "$out"
}

writes() { # count
  fio --name=w --ioengine=nbd --uri=$uri --rw=randwrite --bs=4k --iodepth=16 --size=10G \
    --number_ios="$1" --randrepeat=0 >/dev/null
}

echo "# bench/du.sh $(date -u +%FT%TZ): bin=$bin, commit $(git rev-parse --short HEAD)" | tee -a "$out"
"$bin/basalt" cluster up --dir "$dir/c" $(plain_nbd "$bin") --mons 1 --hosts 3 --osds-per-host 1 --gateways 1 --pg-num 32 >/dev/null
export BASALT_CONFIG=$dir/c/cluster.toml
"$bin/basalt" rbd create rbd/du10g --size 10G >/dev/null
writes 3000
"$bin/basalt" rbd snap create rbd/du10g@s1 >/dev/null
writes 1000
"$bin/basalt" rbd du rbd/du10g | tee -a "$out"
for i in 1 2 3; do timed "rbd du (object maps) #$i" "$bin/basalt" rbd du rbd/du10g; done
"$bin/basalt" rbd feature disable rbd/du10g object-map fast-diff >/dev/null
for i in 1 2; do timed "rbd du (no maps: every object) #$i" "$bin/basalt" rbd du rbd/du10g; done
timed "rbd feature enable (rebuild)" "$bin/basalt" rbd feature enable rbd/du10g object-map fast-diff
timed "rbd du (rebuilt maps)" "$bin/basalt" rbd du rbd/du10g
