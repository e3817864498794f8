#!/usr/bin/env bash
# Runs the whole test suite: unit tests, the Paxos simulation and model check,
# placement properties, and process-level tests of the real daemons.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/basalt-target}"
export CARGO_TERM_COLOR=never
start=$(date +%s)
# Binaries first: the process-level tests start them from the target dir.
# Build exactly the target set `cargo test` builds (all targets, dev-dependencies
# on): another set unifies dependency features differently and recompiles RocksDB.
cargo build --release --locked --workspace --all-targets
cargo test --release --locked --workspace --no-fail-fast -- --test-threads=2
echo "suite finished in $(( $(date +%s) - start )) s"
