#!/usr/bin/env bash
# bench/vs-ceph.sh — Ceph 16 and basalt side by side, in one run on this machine.
#
#   1. ../shared/bench/ceph-baseline.sh: a throwaway Ceph 16 cluster (1 mon, 3 BlueStore OSDs,
#      pool rbd size 3 / min_size 2), the five fio block workloads through qemu-nbd and librbd,
#      and the disk itself (a plain file, O_DIRECT, O_DSYNC writes).
#   2. basalt in the same shape (1 monitor, 3 OSDs on 3 hosts, pool rbd size 3 / min_size 2,
#      32 PGs, one basalt-gw), a 2 GiB image filled sequentially first, and the same five fio
#      jobs with the same options (the Ceph script's own functions, sourced) through basalt-gw.
#   3. One table: each workload for Ceph via NBD, Ceph via librbd, the disk, basalt, and
#      basalt ÷ Ceph's faster path; CPU per op and peak RSS of each system's daemons; the load
#      while each ran; basalt's per-stage latency breakdown from its Prometheus histograms.
#
# Usage (as root; ~20 minutes; installs Ceph's packages with apt on first use):
#   bench/vs-ceph.sh
# Environment: FIO_RUNTIME (20 s per job), IMG_SIZE (2G), the Ceph harness's own knobs such as
# OSD_SIZE (12G here, the harness's own default is 16G), CEPH_BASELINE (path of
# ceph-baseline.sh), CEPH_RESULTS (reuse an earlier Ceph run's results dir instead of running
# Ceph again; the table then says so), OUT (the table's path), BEFORE_BIN (a directory with an
# earlier build's basalt, basalt-mon, basalt-osd and basalt-gw: measured too, in the same run,
# as the column "basalt before", to show a change's effect), PROFILE (1: also profile one more
# 4k randwrite QD32 job of basalt with `perf record -a`; needs linux-perf).
# The table goes to bench/results/vs-ceph-<UTC date>.md; raw outputs stay under /tmp.
set -Eeuo pipefail
. "$(dirname "$0")/plain-nbd.sh"
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STAMP=$(date -u +%Y%m%d-%H%M)
OUT=${OUT:-$ROOT/bench/results/vs-ceph-$STAMP.md}
WORK=$(mktemp -d /tmp/basalt-vs-ceph.XXXXXX)
BASELINE=${CEPH_BASELINE:-$ROOT/../shared/bench/ceph-baseline.sh}
export FIO_RUNTIME=${FIO_RUNTIME:-20} IMG_SIZE=${IMG_SIZE:-2G}
# Ceph's harness sizes each OSD's sparse file at 16G and refuses to start unless /tmp could
# hold all three full; the 2 GiB image (6 GiB replicated) fits 12G files with room to spare.
export OSD_SIZE=${OSD_SIZE:-12G}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/basalt-target}
BIN=$CARGO_TARGET_DIR/release
PROFILE=${PROFILE:-1}
CLUSTER=$WORK/basalt-cluster

say() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
[[ $EUID -eq 0 ]] || { echo "bench/vs-ceph.sh must run as root (Ceph's harness installs packages and runs daemons)" >&2; exit 1; }
[[ -r $BASELINE ]] || { echo "Ceph's harness is missing: $BASELINE (set CEPH_BASELINE)" >&2; exit 1; }
if ss -Hltn '( sport = :6789 or sport = :10809 )' | grep -q .; then
  echo "ports 6789/10809 are in use: stop the local basalt cluster first (basalt cluster down)" >&2
  exit 1
fi

if [[ $PROFILE == 1 ]] && ! command -v perf >/dev/null; then
  echo "perf is missing: apt-get install linux-perf (or run with PROFILE=0)" >&2; exit 1
fi
say "building basalt (release; a no-op when up to date)"
"$ROOT/scripts/setup.sh"
(cd "$ROOT" && cargo build --release --locked --workspace --all-targets)

# --- a sampler: every second, RSS of each daemon of both systems and the load average -------
SAMPLES=$WORK/samples.tsv
sampler() {
  set +e  # ps finds none of these processes between the two systems' runs
  while :; do
    local now; now=$(date +%s)
    ps -C ceph-mon,ceph-mgr,ceph-osd,qemu-nbd,basalt-mon,basalt-osd,basalt-gw -o comm=,pid=,rss= 2>/dev/null \
      | awk -v t="$now" -v l="$(cut -d' ' -f1 /proc/loadavg)" '{ print t "\t" $1 "\t" $2 "\t" $3 "\t" l }' >>"$SAMPLES"
    [[ -s $SAMPLES ]] || printf '%s\t-\t-\t0\t%s\n' "$now" "$(cut -d' ' -f1 /proc/loadavg)" >>"$SAMPLES"
    sleep 1
  done
}
sampler &
SAMPLER=$!
cleanup() {
  kill "$SAMPLER" 2>/dev/null || true
  "$BIN/basalt" cluster down --dir "$CLUSTER" >/dev/null 2>&1 || true
}
trap cleanup EXIT

# --- 1. Ceph ---------------------------------------------------------------------------------
CEPH_REUSED=0
if [[ -n ${CEPH_RESULTS:-} ]]; then
  CEPH_REUSED=1
  say "reusing the Ceph results in $CEPH_RESULTS (not measured in this run)"
else
  CEPH_RESULTS=$WORK/ceph
  say "Ceph baseline -> $CEPH_RESULTS"
  RESULTS_DIR=$CEPH_RESULTS WITH_FILE=1 WITH_RBD_ENGINE=1 bash "$BASELINE" \
    || say "the Ceph harness reported failures (see $CEPH_RESULTS/summary.md); continuing with what it measured"
fi
[[ -s $CEPH_RESULTS/raw/rows.tsv ]] || { echo "no Ceph rows in $CEPH_RESULTS/raw/rows.tsv" >&2; exit 1; }

# --- 2. basalt -------------------------------------------------------------------------------
# The Ceph harness's own fio runner and CPU probe, so both systems are measured alike.
RESULTS_DIR=$WORK/basalt
# shellcheck source=/dev/null
source "$BASELINE"
trap cleanup EXIT
trap - ERR
eval "ceph_run_fio() $(declare -f run_fio | tail -n +2)"

run_basalt() {  # run_basalt <bin dir> <results dir> <fio group>
  local bin=$1 raw=$2 group=$3 f pid m i
  RAW=$raw; ROWS=$raw/rows.tsv
  mkdir -p "$RAW"; : >"$ROWS"
  rm -rf "$CLUSTER"
  say "basalt ($bin): 1 monitor, 3 OSDs on 3 hosts, pool rbd size 3 / min_size 2 (32 PGs), one gateway"
  "$bin/basalt" cluster up --dir "$CLUSTER" $(plain_nbd "$bin") --mons 1 --hosts 3 --osds-per-host 1 --gateways 1 --pg-num 32 >/dev/null
  export BASALT_CONFIG=$CLUSTER/cluster.toml
  "$bin/basalt" rbd create rbd/bench --size "$IMG_SIZE" >/dev/null
  PIDS=(); PNAMES=(); METRICS=()
  for f in "$CLUSTER"/*.pid; do
    pid=$(cat "$f")
    PIDS+=("$pid"); PNAMES+=("$(cat "/proc/$pid/comm")")
    m=$(tr '\0' '\n' <"/proc/$pid/cmdline" | awk 'p { print; exit } $0 == "--metrics" { p = 1 }')
    [[ -n $m ]] && METRICS+=("$m")
  done
  local uri=nbd://127.0.0.1:10809/rbd/bench
  say "basalt: filling the image (1 MiB writes, QD8)"
  run_fio "$group" prefill-seqwrite-1m-qd8 --ioengine=nbd --uri="$uri" --rw=write --bs=1M --iodepth=8
  say "basalt: the five workloads"
  block_patterns "$group" --ioengine=nbd --uri="$uri"
  if [[ $PROFILE == 1 && $bin == "$BIN" ]]; then
    # One more 4k randwrite QD32 job under a system-wide sampling profile (not in the table:
    # perf itself costs CPU). cpu-clock, because this VM has no hardware counters.
    say "basalt: CPU profile of 4k randwrite QD32 (perf record -a)"
    perf record -a -e cpu-clock -F 499 -o "$RAW/perf.data" -- sleep $((FIO_RUNTIME + FIO_RAMP)) \
      >"$RAW/perf-record.log" 2>&1 &
    local perf_pid=$!
    run_fio "$group-profiled" randwrite-4k-qd32 --ioengine=nbd --uri="$uri" --time_based \
      --runtime="$FIO_RUNTIME" --ramp_time="$FIO_RAMP" --rw=randwrite --bs=4k --iodepth=32
    wait "$perf_pid" || true
    perf report -i "$RAW/perf.data" --no-children --sort comm,dso,sym --stdio 2>/dev/null \
      | grep -v '^#' | grep -v '^$' | head -40 >"$RAW/perf-top.txt" || true
    perf report -i "$RAW/perf.data" --no-children --sort comm --stdio 2>/dev/null \
      | grep -v '^#' | grep -v '^$' | head -12 >"$RAW/perf-comm.txt" || true
  fi
  for ((i = 0; i < ${#PIDS[@]}; i++)); do
    awk -v n="${PNAMES[i]}" -v p="${PIDS[i]}" '/VmHWM/ { print n "\t" p "\t" $2 }' "/proc/${PIDS[i]}/status"
  done >"$RAW/peak-rss.tsv"
  "$bin/basalt" cluster down --dir "$CLUSTER" >/dev/null
}
scrape() {  # scrape <file>: every daemon's /metrics, concatenated
  local m; : >"$1"
  for m in "${METRICS[@]}"; do curl -sf --max-time 5 "http://$m/metrics" >>"$1" || true; done
}
run_fio() {  # the harness's run_fio, with metrics snapshots and the load average around it
  scrape "$RAW/metrics-before-$2.txt"
  ceph_run_fio "$@"
  scrape "$RAW/metrics-after-$2.txt"
  printf '%s\t%s\n' "$2" "$(cut -d' ' -f1-3 /proc/loadavg)" >>"$RAW/loadavg.tsv"
}
if [[ -n ${BEFORE_BIN:-} ]]; then
  BEFORE_START=$(date +%s)
  run_basalt "$BEFORE_BIN" "$WORK/basalt-before" basalt
  printf '%s\t%s\n' "$BEFORE_START" "$(date +%s)" >"$WORK/basalt-before/window.tsv"
fi
BASALT_START=$(date +%s)
run_basalt "$BIN" "$WORK/basalt/raw" basalt
printf '%s\t%s\n' "$BASALT_START" "$(date +%s)" >"$WORK/basalt/raw/window.tsv"
kill "$SAMPLER" 2>/dev/null || true

# --- 3. the table ----------------------------------------------------------------------------
mkdir -p "$(dirname "$OUT")"
python3 "$ROOT/bench/vs_ceph_table.py" \
  --ceph "$CEPH_RESULTS" --basalt "$WORK/basalt/raw" --samples "$SAMPLES" \
  ${BEFORE_BIN:+--before "$WORK/basalt-before"} \
  --ceph-reused "$CEPH_REUSED" --runtime "$FIO_RUNTIME" >"$OUT"
cat "$OUT"
say "table: $OUT   raw: $WORK"
