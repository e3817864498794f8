#!/usr/bin/env bash
# Stops the local cluster scripts/up.sh started (only its own processes).
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${CARGO_TARGET_DIR:-$HOME/.cache/basalt-target}/release"
exec "$bin/basalt" cluster down --dir "$PWD/var/cluster"
