"""Bus-specific device names and how to replace them with filesystem UUIDs.

On VMware the guest calls its disks /dev/sda… (pvscsi, LSI) or /dev/hda…
(IDE); on KubeVirt virtio-blk calls them /dev/vda… and the order may
differ, so every reference to a disk by bus name must become `UUID=`. The
libguestfs appliance has its own names for the same disks (/dev/sda… in the
order the disks were added), so a guest name is mapped to the appliance's
by disk position and partition number."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

_LETTERED = re.compile(r"^/dev/(?:sd|hd|vd|xvd)([a-z]+)(\d*)$")
_NVME = re.compile(r"^/dev/nvme(\d+)n(\d+)(?:p(\d+))?$")
_BY_BUS = re.compile(r"^/dev/disk/by-(?:path|id)/")

Resolver = Callable[[str], "str | None"]


def letters_to_index(letters: str) -> int:
    """'a' -> 0, 'z' -> 25, 'aa' -> 26, as the kernel names sd devices."""
    n = 0
    for ch in letters:
        n = n * 26 + (ord(ch) - ord("a") + 1)
    return n - 1


def index_to_letters(index: int) -> str:
    out = ""
    n = index + 1
    while n > 0:
        n, rem = divmod(n - 1, 26)
        out = chr(ord("a") + rem) + out
    return out


def is_bus_specific(spec: str) -> bool:
    """True for a device path that names a disk by controller or bus and so
    changes or disappears when the disk moves to virtio."""
    return bool(_LETTERED.match(spec) or _NVME.match(spec) or _BY_BUS.match(spec))


def disk_position(spec: str) -> tuple[int, int | None] | None:
    """(disk index, partition number or None) of a guest device path such
    as /dev/sdb2 or /dev/nvme0n1p3; None for paths that carry no position
    (by-id, by-path, UUID=, LVM, …)."""
    m = _LETTERED.match(spec)
    if m:
        return letters_to_index(m.group(1)), int(m.group(2)) if m.group(2) else None
    m = _NVME.match(spec)
    if m:
        return int(m.group(1)), int(m.group(3)) if m.group(3) else None
    return None


def appliance_device(spec: str) -> str | None:
    """The libguestfs appliance's name for the guest's device `spec`."""
    pos = disk_position(spec)
    if pos is None:
        return None
    disk, part = pos
    return f"/dev/sd{index_to_letters(disk)}{part if part is not None else ''}"


@dataclass(frozen=True)
class Filesystem:
    device: str   # appliance name
    fstype: str   # as blkid says: ext4, swap, crypto_LUKS, …
    uuid: str


class DeviceMap:
    """Resolves guest device paths to `UUID=…` using the filesystems the
    appliance sees."""

    def __init__(self, filesystems: list[Filesystem]) -> None:
        self.by_device = {fs.device: fs for fs in filesystems}

    def filesystem(self, spec: str) -> Filesystem | None:
        dev = appliance_device(spec)
        if dev is None:
            return None
        fs = self.by_device.get(dev)
        return fs if fs is not None and fs.uuid else None

    def resolve(self, spec: str) -> str | None:
        """`UUID=…` for a bus-specific device path, None when unmappable."""
        fs = self.filesystem(spec)
        return f"UUID={fs.uuid}" if fs is not None else None


_CMDLINE_DEVICE_KEYS = ("root", "resume")


def rewrite_cmdline(cmdline: str, resolve: Resolver) -> tuple[str, list[str]]:
    """Replaces bus-specific `root=` / `resume=` values on a kernel command
    line. Returns the new line and the values that could not be mapped."""
    unmapped: list[str] = []

    def sub(m: re.Match[str]) -> str:
        key, value = m.group(1), m.group(2)
        if not is_bus_specific(value):
            return m.group(0)
        new = resolve(value)
        if new is None:
            unmapped.append(value)
            return m.group(0)
        return f"{key}={new}"

    keys = "|".join(_CMDLINE_DEVICE_KEYS)
    out = re.sub(rf"(?<![\w.-])({keys})=([^\s\"']+)", sub, cmdline)
    return out, unmapped
