#!/usr/bin/env bash
# Installs what is missing, builds basalt, and starts a local cluster under
# ./var/cluster: 3 monitors, 6 OSDs on 3 (pretend) hosts, one NBD gateway on
# 127.0.0.1:10809, pool `rbd` and a 1 GiB demo image `rbd/demo`. Running it
# again restarts whatever is not running, with its data (the power-loss path).
# Stop it with scripts/down.sh. Extra arguments go to `basalt cluster up`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/basalt-target}"
echo "building (the first build compiles RocksDB: about 20 minutes on 2 cores)..."
# The same target set as scripts/test.sh, so RocksDB compiles once for both.
cargo build --release --locked --workspace --all-targets
exec "$CARGO_TARGET_DIR/release/basalt" cluster up --dir "$PWD/var/cluster" "$@"
