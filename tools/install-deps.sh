#!/usr/bin/env bash
# Installs the Debian packages Ferry needs, only those missing, so a second run
# takes well under a second. Run as root on Debian 12.
set -euo pipefail

packages=(
  python3-venv python3-libnbd python3-guestfs libguestfs-tools linux-image-amd64
  nbdkit libnbd-bin qemu-utils qemu-system-x86 debootstrap e2fsprogs fdisk
  make time
)

missing=()
for p in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [[ "$status" == "install ok installed" ]] || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
