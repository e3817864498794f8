#!/usr/bin/env bash
# Stops the local cluster started by scripts/up.sh (only its own processes, by pid file).
set -euo pipefail
cd "$(dirname "$0")/.."
for pidfile in var/cluster/*.pid; do
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    echo "stopped $(basename "$pidfile" .pid) (pid $pid)"
  fi
  rm -f "$pidfile"
done
