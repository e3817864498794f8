#!/usr/bin/env bash
# Installs the system packages basalt builds and tests with (Debian 12).
# Idempotent; needs root (or sudo) only when something is missing.
set -euo pipefail
pkgs=(libclang-dev pkg-config libnbd-bin fio prometheus iproute2 python3)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
  echo "error: cargo is missing; install Rust (rustup) first" >&2
  exit 1
fi
