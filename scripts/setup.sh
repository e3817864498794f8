#!/usr/bin/env bash
# Installs the system packages basalt builds and tests with (Debian 12).
# Idempotent; needs root (or sudo) only when something is missing.
# What the tests call: qemu-img, qemu-io (qemu-utils); nbdinfo, nbdcopy, nbdsh (libnbd-bin,
# nbdsh with python3-libnbd; bench/handover.sh's client uses the same bindings);
# fio (ioengine=nbd); promtool (prometheus); ip (iproute2, the netns test);
# mount/umount/setsid (util-linux: a tmpfs for the ENOSPC test, the netns daemons);
# mkfs.ext4, debugfs, e2fsck (e2fsprogs: a filesystem image cloned in the snapshot tests).
# A test whose tool is missing fails, naming the package: none passes by skipping.
set -euo pipefail
pkgs=(libclang-dev pkg-config qemu-utils libnbd-bin python3-libnbd fio prometheus iproute2 util-linux e2fsprogs python3)
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
for tool in qemu-img qemu-io nbdinfo nbdcopy nbdsh fio promtool ip mount setsid mkfs.ext4 debugfs e2fsck; do
  if ! command -v "$tool" >/dev/null; then
    echo "error: $tool is still missing after installing ${pkgs[*]}" >&2
    exit 1
  fi
done
if ! /usr/bin/python3 -c 'import nbd' 2>/dev/null; then
  echo "error: libnbd's python bindings (nbdsh's) are still missing after installing python3-libnbd" >&2
  exit 1
fi
if ! command -v cargo >/dev/null; then
  echo "error: cargo is missing; install Rust (rustup) first" >&2
  exit 1
fi
