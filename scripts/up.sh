#!/usr/bin/env bash
# Installs what is missing, builds basalt, and starts a local cluster under
# ./var/cluster (restarting it with its data if it already exists).
# Today that is three monitors and the `rbd` pool; OSDs and the NBD gateway
# join when they land (see ARCHITECTURE.md). Stop it with scripts/down.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/basalt-target}"
echo "building (the first build compiles RocksDB: about 20 minutes on 2 cores)..."
# The same target set as scripts/test.sh, so RocksDB compiles once for both.
cargo build --release --locked --workspace --all-targets
bin="$CARGO_TARGET_DIR/release"
dir="$PWD/var/cluster"
mkdir -p "$dir"
conf="$dir/cluster.toml"
if [ ! -f "$conf" ]; then
  fsid=$(cat /proc/sys/kernel/random/uuid)
  cat > "$conf" <<CONF
[cluster]
name = "basalt"
fsid = "$fsid"

[[mon]]
rank = 0
addr = "127.0.0.1:6789"
data = "$dir/mon0"

[[mon]]
rank = 1
addr = "127.0.0.1:6790"
data = "$dir/mon1"

[[mon]]
rank = 2
addr = "127.0.0.1:6791"
data = "$dir/mon2"
CONF
fi
for rank in 0 1 2; do
  pidfile="$dir/mon$rank.pid"
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    continue
  fi
  nohup "$bin/basalt-mon" --config "$conf" --id "$rank" --metrics "127.0.0.1:$((9280 + rank))" \
    >>"$dir/mon$rank.log" 2>&1 </dev/null &
  echo $! > "$pidfile"
done
echo "waiting for monitor quorum..."
"$bin/basalt" -c "$conf" --timeout 60 mon stat
"$bin/basalt" -c "$conf" pool get rbd >/dev/null 2>&1 || "$bin/basalt" -c "$conf" pool create rbd --pg-num 64
"$bin/basalt" -c "$conf" status
echo
echo "cluster config: $conf  (export BASALT_CONFIG=$conf, or run basalt from this directory)"
echo "metrics:        http://127.0.0.1:9280/metrics (mon.0), :9281 (mon.1), :9282 (mon.2)"
echo "stop it with:   scripts/down.sh"
