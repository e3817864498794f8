#!/usr/bin/env bash
# bench/tls.sh — the cost of encryption in transit, through the gateway: the same build with
# TLS off (`[tls] enabled = false`) and on (the default: TLS between every daemon and from
# the gateway to the OSDs), interleaved on fresh clusters (off, on, on, off: a drifting load
# favours neither). The NBD hop is plain text in both (see the note at `uri=` below).
#
# Usage: bench/tls.sh [BIN]   (directory with basalt, basalt-mon, basalt-osd, basalt-gw;
#        default $CARGO_TARGET_DIR/release or ~/.cache/basalt-target/release).
#        Environment: SECS (fio seconds per job, default 20), ROUNDS (default 2), OUT
#        (results file, default bench/results/tls-<UTC date>.txt), IMG (image size, default
#        1G), FULL_RATIO (if set, `osd set-full-ratio` to it, with backfillfull and nearfull
#        just below: for a build machine whose disk is nearly full, which the OSDs count).
# Each round: `basalt cluster up` (1 monitor, 3 OSDs on 3 hosts, 32 PGs, one gateway), a
# 1 GiB image filled with 1 MiB writes, then fio (ioengine=nbd) 4k randwrite QD32, 4k
# randread QD32 and 1M read QD4; each line records the 1-minute load average at its start.
# Uses the ports of `basalt cluster up` (6789, 9280+, 10809): stop any other local cluster.
set -euo pipefail
. "$(dirname "$0")/plain-nbd.sh"
cd "$(dirname "$0")/.."
bin=${1:-${CARGO_TARGET_DIR:-$HOME/.cache/basalt-target}/release}
secs=${SECS:-20} rounds=${ROUNDS:-2} img=${IMG:-1G}
out=${OUT:-bench/results/tls-$(date -u +%Y%m%d-%H%M).txt}
command -v fio >/dev/null || { echo "fio is missing: apt-get install fio" >&2; exit 1; }
dir=$(mktemp -d /tmp/basalt-tls.XXXXXX)
trap '"$bin/basalt" cluster down --dir "$dir/c" >/dev/null 2>&1; rm -rf "$dir"' EXIT

one_round() { # off|on
  local mode=$1 uri job load r
  rm -rf "$dir/c"
  "$bin/basalt" cluster up --dir "$dir/c" $(plain_nbd "$bin") --mons 1 --hosts 3 --osds-per-host 1 --gateways 1 --pg-num 32 >/dev/null
  if [[ $mode == off ]]; then
    # The same cluster restarted with TLS off everywhere (the stores do not care).
    "$bin/basalt" cluster down --dir "$dir/c" >/dev/null
    sed -i '/^\[tls\]/,/^\[/ s/^enabled = true/enabled = false/' "$dir/c/cluster.toml"
    grep -q '^enabled = false' "$dir/c/cluster.toml" || { echo "cannot turn TLS off" >&2; exit 1; }
    "$bin/basalt" cluster up --dir "$dir/c" $(plain_nbd "$bin") >/dev/null
    uri=nbd://127.0.0.1:10809/rbd/tls
  else
    # NBD itself stays plain text: fio's nbd engine cannot pass a certificate directory
    # (libnbd refuses `tls-certificates` in a URI unless the program allows local files, and
    # fio does not; only libnbd's default directory would work, ~/.pki/libnbd or
    # /etc/pki/libnbd for root), so this measures TLS between the gateway and the OSDs and
    # among OSDs.
    uri=nbd://127.0.0.1:10809/rbd/tls
  fi
  if [[ -n ${FULL_RATIO:-} ]]; then
    for r in full backfillfull nearfull; do
      BASALT_CONFIG=$dir/c/cluster.toml "$bin/basalt" osd set-$r-ratio "$FULL_RATIO" >/dev/null
    done
  fi
  BASALT_CONFIG=$dir/c/cluster.toml "$bin/basalt" rbd create rbd/tls --size "$img" >/dev/null
  fio --name=fill --ioengine=nbd --uri="$uri" --rw=write --bs=1M --iodepth=8 --size="$img" >/dev/null
  for job in "randwrite 4k 32" "randread 4k 32" "read 1M 4"; do
    set -- $job
    load=$(cut -d' ' -f1 /proc/loadavg)
    r=$(fio --name=j --ioengine=nbd --uri="$uri" --rw="$1" --bs="$2" --iodepth="$3" --size="$img" \
          --time_based --runtime="$secs" --ramp_time=2 --output-format=json 2>/dev/null |
        python3 bench/fio_summary.py)
    printf 'tls-%-3s %-15s load %5s  %s\n' "$mode" "$1-$2-qd$3" "$load" "$r" | tee -a "$out"
  done
  "$bin/basalt" cluster down --dir "$dir/c" >/dev/null
}

mkdir -p "$(dirname "$out")"
echo "# bench/tls.sh $(date -u +%FT%TZ): $bin, $secs s per job, $(nproc) CPUs" | tee -a "$out"
for ((i = 0; i < rounds; i++)); do
  if ((i % 2 == 0)); then one_round off; one_round on
  else one_round on; one_round off; fi
done
