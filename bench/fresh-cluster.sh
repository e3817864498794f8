# Sourced by the bench scripts: starts a fresh local cluster in a temporary directory
# (`basalt cluster up` plus the arguments given to `fresh_cluster`) and removes it on exit.
# Sets $bin (the release binaries), $dir and BASALT_CONFIG.
. "$(dirname "${BASH_SOURCE[0]}")/plain-nbd.sh"
bin="${CARGO_TARGET_DIR:-$HOME/.cache/basalt-target}/release"
dir=$(mktemp -d /tmp/basalt-bench.XXXXXX)
trap '"$bin/basalt" cluster down --dir "$dir" >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT
fresh_cluster() {
  "$bin/basalt" cluster up --dir "$dir" $(plain_nbd "$bin") "$@" >/dev/null
  export BASALT_CONFIG="$dir/cluster.toml"
}
