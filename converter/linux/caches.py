"""Stale caches that remember the VMware disks: blkid's cache and the LVM
devices file (which lists PVs by their old device IDs, so LVM would ignore
them on virtio)."""

from __future__ import annotations

from converter.context import GuestContext

STALE = (
    "/etc/blkid.tab",
    "/etc/blkid.tab.old",
    "/etc/lvm/devices/system.devices",
    "/etc/lvm/cache/.cache",
)


def apply(ctx: GuestContext) -> None:
    for path in STALE:
        if ctx.g.is_file(path):
            ctx.remove(path, "remove-stale-cache", "deleted (refers to the old disks)")
            if path.startswith("/etc/lvm/"):
                ctx.initramfs_reasons.append(f"{path} removed")
