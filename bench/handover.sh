#!/usr/bin/env bash
# bench/handover.sh — the storage's share of a live migration's switch-over: how long the
# exclusive lock takes to move from one gateway to another.
#
# Two gateways, one image; REPS times: a client writes through the gateway holding the lock,
# flushes and disconnects, and a client already connected to the other gateway writes at once
# (bench/handover_client.py, libnbd; the lock then crosses back the next time). Then REPS more
# the way QEMU migrates: the source flushes but stays connected (a migrated-away QEMU keeps its
# connection until it quits), so the destination's gateway must ask for the lock. Reported as
# p50 / p99 / max in ms:
#   flush        the source's FLUSH (client side)
#   disconnect   NBD_CMD_DISC until the socket is closed (client side)
#   release      the source gateway: from the event that stopped it admitting writes (the
#                destination's lock request, or the disconnect) to its unlock's reply
#                (its "released the exclusive lock" log lines)
#   acquire      the destination gateway: from its first lock attempt to admitting the write
#                (its "acquired the exclusive lock" log lines)
#   first write  the destination's first write, lock acquisition included (client side)
#   gap          FLUSH sent → the destination's first write answered (client side)
# Placements: `local` (`basalt cluster up`: 3 monitors, 6 OSDs, gateways on 127.0.0.1:10809
# and :10810) and `netns` (deploy/netns-cluster.sh: 3 hosts in network namespaces; gateways on
# h1 and h2, the client in the root namespace; needs root).
#
# Usage: bench/handover.sh                      (from a fresh clone: builds first)
# Environment: REPS (50), PLACEMENTS ("local netns"), BEFORE_BIN (a directory with an earlier
# build's basalt, basalt-mon, basalt-osd and basalt-gw: measured too, in the same run, as
# "before"), ROUNDS (2: each build is measured ROUNDS times per placement, on a fresh cluster
# each time, alternating before/after/after/before… so a machine whose load drifts favours
# neither; the table pools the rounds' samples), OUT (the table; default bench/results/handover-<UTC date>.md),
# BASALT_NETNS_PREFIX / BASALT_NETNS_NET (the netns placement's names, default bho / 10.77.21).
# Uses ports 6789-6791 and 10809-10810 on 127.0.0.1 (stop any local cluster first).
set -Eeuo pipefail
. "$(dirname "$0")/plain-nbd.sh"
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPS=${REPS:-50}
ROUNDS=${ROUNDS:-2}
PLACEMENTS=${PLACEMENTS:-local netns}
STAMP=$(date -u +%Y%m%d-%H%M)
OUT=${OUT:-$ROOT/bench/results/handover-$STAMP.md}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/basalt-target}
export BASALT_NETNS_PREFIX=${BASALT_NETNS_PREFIX:-bho} BASALT_NETNS_NET=${BASALT_NETNS_NET:-10.77.21}
WORK=$(mktemp -d /tmp/basalt-handover.XXXXXX)
# nbdsh/libnbd's python bindings live in Debian's python.
export PATH=/usr/bin:$PATH

say() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { say "$*"; exit 1; }

[[ $PLACEMENTS != *netns* || $EUID -eq 0 ]] ||
  die "the netns placement needs root (ip netns); run as root or with PLACEMENTS=local"
/usr/bin/python3 -c 'import nbd' 2>/dev/null || die "libnbd's python bindings are missing: apt-get install python3-libnbd"
if [[ $PLACEMENTS == *local* ]] && ss -Hltn '( sport = :6789 or sport = :10809 or sport = :10810 )' | grep -q .; then
  die "ports 6789/10809/10810 are in use: stop the local basalt cluster first (basalt cluster down)"
fi
say "building basalt (release; a no-op when up to date)"
(cd "$ROOT" && ./scripts/setup.sh >/dev/null && cargo build --release --locked --workspace --all-targets)

CURRENT=""   # what to stop on exit: "local DIR BIN" or "netns DIR BIN"
cleanup() {
  set +e
  read -r kind dir bin <<<"$CURRENT"
  case $kind in
  local) "$bin/basalt" cluster down --dir "$dir" >/dev/null 2>&1 ;;
  netns) BASALT_BIN_DIR=$bin "$ROOT/deploy/netns-cluster.sh" down "$dir" >/dev/null 2>&1 ;;
  esac
}
trap cleanup EXIT

# Creates the image (retrying while the fresh pool's PGs activate) — bounded at 120 s.
create_image() {
  local bin=$1 conf=$2 deadline=$((SECONDS + 120))
  until "$bin/basalt" --config "$conf" --timeout 10 rbd create --size 256M rbd/handover >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "could not create rbd/handover within 120 s"
    sleep 1
  done
}

# run LABEL BIN PLACEMENT ROUND: one measured cluster, both modes; leaves
# $WORK/LABEL-PLACEMENT-ROUND/{client,gateway,load}-MODE*
run() {
  local label=$1 bin=$2 placement=$3 d=$WORK/$1-$3-$4 conf uri_a uri_b logs
  mkdir -p "$d"
  say "$label / $placement / round $4: starting a fresh cluster"
  case $placement in
  local)
    CURRENT="local $d/cluster $bin"
    "$bin/basalt" cluster up --dir "$d/cluster" $(plain_nbd "$bin") --gateways 2 >"$d/up.log" 2>&1 ||
      die "the local cluster did not come up (ports 6789-6791, 10809-10810 free?); see $d/up.log"
    conf=$d/cluster/cluster.toml
    uri_a=nbd://127.0.0.1:10809/rbd/handover uri_b=nbd://127.0.0.1:10810/rbd/handover
    logs=("$d/cluster/gw0.log" "$d/cluster/gw1.log")
    ;;
  netns)
    CURRENT="netns $d/cluster $bin"
    BASALT_BIN_DIR=$bin "$ROOT/deploy/netns-cluster.sh" up "$d/cluster" >"$d/up.log" 2>&1 ||
      die "the netns cluster did not come up; see $d/up.log"
    conf=$d/cluster/cluster.toml
    "$bin/basalt" --config "$conf" pool create rbd --pg-num 64 >>"$d/up.log" 2>&1 ||
      die "could not create pool rbd on the netns cluster; see $d/up.log"
    uri_a=nbd://$BASALT_NETNS_NET.1:10809/rbd/handover uri_b=nbd://$BASALT_NETNS_NET.2:10809/rbd/handover
    logs=("$d/cluster/h1/gw.log" "$d/cluster/h2/gw.log")
    ;;
  *) die "unknown placement $placement (local or netns)" ;;
  esac
  create_image "$bin" "$conf"
  local mode
  for mode in disconnect stay; do
    say "$label / $placement / round $4: $REPS hand-overs, source ${mode/stay/stays connected}"
    local sizes=() k
    for k in "${!logs[@]}"; do sizes[k]=$(stat -c %s "${logs[$k]}"); done
    cut -d' ' -f1-3 /proc/loadavg >"$d/load-$mode"
    /usr/bin/python3 "$ROOT/bench/handover_client.py" "$uri_a" "$uri_b" "$REPS" "$d/client-$mode.tsv" "$mode"
    cut -d' ' -f1-3 /proc/loadavg >>"$d/load-$mode"
    # The gateways' own view of each hand-over (parsed with the table): this mode's lines.
    for k in "${!logs[@]}"; do tail -c +"$((sizes[k] + 1))" "${logs[$k]}"; done |
      grep -a 'the exclusive lock' >"$d/gateway-$mode.log" || true
  done
  cleanup
  CURRENT=""
}

labels=(after)
bins=("$CARGO_TARGET_DIR/release")
if [[ -n ${BEFORE_BIN:-} ]]; then
  for b in basalt basalt-mon basalt-osd basalt-gw; do
    [[ -x $BEFORE_BIN/$b ]] || die "BEFORE_BIN=$BEFORE_BIN has no executable $b"
  done
  labels=(before after)
  bins=("$BEFORE_BIN" "$CARGO_TARGET_DIR/release")
fi
for placement in $PLACEMENTS; do
  for ((round = 1; round <= ROUNDS; round++)); do
    order=("${!labels[@]}")
    ((round % 2 == 1)) || order=($(printf '%s\n' "${order[@]}" | tac))
    for i in "${order[@]}"; do
      run "${labels[$i]}" "${bins[$i]}" "$placement" "$round"
    done
  done
done

mkdir -p "$(dirname "$OUT")"
/usr/bin/python3 - "$WORK" "$REPS" "$OUT" "${labels[*]}" "$PLACEMENTS" "$(git -C "$ROOT" rev-parse --short HEAD)" "$ROUNDS" <<'PY'
import csv, glob, os, re, sys
work, reps, out, labels, placements, rev, rounds = sys.argv[1:]
def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, -(-len(xs) * p // 100) - 1))]
def cell(xs):
    return "—" if not xs else f"{pct(xs, 50):.1f} / {pct(xs, 99):.1f} / {max(xs):.1f}"
def gateway(path, what):
    # Every "released the exclusive lock" but a daemon shutdown's close, and every "acquired
    # the exclusive lock" (whether it found a holder to ask or, relinquished already, none):
    # one per hand-over, plus the warm-up write's acquisition and the final disconnect's
    # release of each mode (REPS + 1 samples).
    xs = []
    for line in open(path, errors="replace"):
        line = re.sub(r"\x1b\[[0-9;]*m", "", line)
        if what not in line:
            continue
        f = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        if "elapsed_us" not in f or f.get("cause", "").strip('"') == "close":
            continue
        xs.append(int(f["elapsed_us"]) / 1000)
    return xs
lines = [f"{reps} hand-overs per round, {rounds} round(s) per row (a fresh cluster each), commit {rev}. "
         "Each cell: p50 / p99 / max in ms.", "",
         "| placement | source after its flush | build | load (min – max) | flush | disconnect | "
         "release (source gw) | acquire (destination gw) | first write | gap |",
         "|---|---|---|---|---|---|---|---|---|---|"]
for placement in placements.split():
    for mode in ("disconnect", "stay"):
        for label in labels.split():
            dirs = sorted(glob.glob(os.path.join(work, f"{label}-{placement}-*")))
            rows = [r for d in dirs
                    for r in csv.DictReader(open(os.path.join(d, f"client-{mode}.tsv")), delimiter="\t")]
            col = lambda k: [float(r[k]) for r in rows]
            released = [x for d in dirs for x in gateway(os.path.join(d, f"gateway-{mode}.log"), "released")]
            acquired = [x for d in dirs for x in gateway(os.path.join(d, f"gateway-{mode}.log"), "acquired")]
            loads = [float(l.split()[0]) for d in dirs
                     for l in open(os.path.join(d, f"load-{mode}")).read().splitlines()]
            load = [f"{min(loads):.2f}", f"{max(loads):.2f}"]
            how = "disconnects" if mode == "disconnect" else "stays connected"
            disc = cell(col("disconnect_ms")) if mode == "disconnect" else "—"
            lines.append(f"| {placement} | {how} | {label} | {' – '.join(load)} | {cell(col('flush_ms'))} | "
                         f"{disc} | {cell(released)} | {cell(acquired)} | "
                         f"{cell(col('first_write_ms'))} | {cell(col('gap_ms'))} |")
text = "\n".join(lines) + "\n"
open(out, "w").write(text)
print(text)
PY
say "table written to $OUT; raw results in $WORK"
