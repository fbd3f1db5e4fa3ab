"""libguestfs inspection: which OS is on the disks, whether the converter
supports it, and mounting its filesystems where its own fstab puts them.

The handle is opened on the target copies only, never a source disk: the
disks must be raw or qcow2 (what transferd writes); a VMDK is refused."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

import guestfs

from ferry import errors

DEBIAN_FAMILY = ("debian", "ubuntu", "linuxmint", "kalilinux", "pardus")
TARGET_FORMATS = ("raw", "qcow2")
ESP_GPT_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ESP_MBR_ID = 0xEF


@dataclass
class GuestInfo:
    name: str                       # VM label for messages
    disks: list[str]                # target disk paths, boot order
    root: str = ""                  # root filesystem, appliance name
    root_uuid: str = ""
    os_type: str = ""
    distro: str = ""
    version: str = ""
    product_name: str = ""
    arch: str = ""
    firmware: str = ""
    kernels: list[str] = field(default_factory=list)
    mountpoints: dict[str, str] = field(default_factory=dict)
    unmounted: dict[str, str] = field(default_factory=dict)  # mountpoint -> why
    unsupported: str = ""           # why it cannot be converted (Inspect only)


def disk_format(path: str, vm: str) -> str:
    """The image format of a target disk, checked: it exists, is writable
    when `writable`, and is raw or qcow2."""
    if not os.path.exists(path):
        raise errors.NotFound(
            f"VM {vm}: disk {path} does not exist; pass the path of the copied target disk"
        )
    st = os.stat(path)
    if stat.S_ISBLK(st.st_mode):
        return "raw"
    if not stat.S_ISREG(st.st_mode):
        raise errors.InvalidInput(f"VM {vm}: disk {path} is neither a file nor a block device")
    info = _image_info(path, vm, path)
    fmt = str(info.get("format", ""))
    if fmt not in TARGET_FORMATS:
        raise errors.InvalidInput(
            f"VM {vm}: disk {path} is {fmt}, not a target copy (raw or qcow2); the "
            "converter never changes a source disk: copy it first (transferd, or "
            f"`qemu-img convert -O raw {os.path.basename(path)} copy.raw`) and convert the copy"
        )
    _check_backing_chain(path, info, vm)
    return fmt


def _image_info(image: str, vm: str, disk: str) -> dict[str, Any]:
    """`qemu-img info` of one image (never opening its backing file)."""
    proc = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", image],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        what = f"disk {disk}" if image == disk else f"disk {disk}'s backing file {image}"
        raise errors.InvalidInput(f"VM {vm}: cannot read {what}: {proc.stderr.strip()}")
    info: dict[str, Any] = json.loads(proc.stdout)
    return info


def backing_file(image: str, info: dict[str, Any]) -> str | None:
    """The local backing file of `image` from its `qemu-img info` JSON (a
    relative name is relative to the image's directory), None when it has
    none or it is not a plain file (json:, nbd://, …)."""
    name = str(info.get("backing-filename") or "")
    if not name or name.startswith("json:") or "://" in name:
        return None
    return os.path.join(os.path.dirname(image), name)


def _check_backing_chain(path: str, info: dict[str, Any], vm: str) -> None:
    """Refuses a qcow2 whose backing chain has a missing file: libguestfs
    would only say its appliance did not start."""
    seen = {os.path.realpath(path)}
    image = path
    while (backing := backing_file(image, info)) is not None:
        if not os.path.exists(backing):
            raise errors.FailedPrecondition(
                f"VM {vm}: disk {path}'s backing file {backing} is missing; restore it, "
                "or give a self-contained copy (`qemu-img convert -O qcow2` of the "
                "complete chain)"
            )
        real = os.path.realpath(backing)
        if real in seen:
            raise errors.InvalidInput(
                f"VM {vm}: disk {path}'s backing chain loops back to {backing}; give a "
                "self-contained copy"
            )
        seen.add(real)
        image, info = backing, _image_info(backing, vm, path)


def check_disks(paths: list[str], vm: str, writable: bool) -> list[tuple[str, str]]:
    """(path, format) for each disk, refusing what must not be opened."""
    if not paths:
        raise errors.InvalidInput(f"VM {vm}: no disk paths given; pass the copied disks")
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    for p in paths:
        real = os.path.realpath(p)
        if real in seen:
            raise errors.InvalidInput(f"VM {vm}: disk {p} is given twice; pass each disk once")
        seen.add(real)
        fmt = disk_format(p, vm)
        if writable and not os.access(p, os.W_OK):
            raise errors.FailedPrecondition(
                f"VM {vm}: disk {p} is not writable; the converter changes the target "
                "copy in place, so give it a writable copy"
            )
        out.append((p, fmt))
    return out


def open_handle(disks: list[tuple[str, str]], readonly: bool) -> tuple[Any, float]:
    """A launched libguestfs handle on the disks, and the launch time."""
    g = guestfs.GuestFS(python_return_dict=True)
    if not os.environ.get("LIBGUESTFS_BACKEND"):
        # Ferry installs no libvirt daemon; the direct backend runs qemu itself.
        g.set_backend("direct")
    for path, fmt in disks:
        g.add_drive_opts(path, format=fmt, readonly=readonly)
    started = time.monotonic()
    try:
        g.launch()
    except RuntimeError as e:
        g.close()
        raise errors.OperationFailed(
            f"the libguestfs appliance did not start on {', '.join(p for p, _ in disks)}: {e}; "
            "run `libguestfs-test-tool` on the converter host to see why (without a working "
            "KVM, set LIBGUESTFS_BACKEND_SETTINGS=force_tcg)"
        ) from e
    return g, time.monotonic() - started


def _firmware(g: Any) -> str:
    """uefi when a disk has an EFI system partition, else bios."""
    for dev in g.list_devices():
        try:
            parttype = g.part_get_parttype(dev)
        except RuntimeError:
            continue  # no partition table (whole-disk filesystem)
        for part in g.part_list(dev):
            num = part["part_num"]
            if parttype == "gpt":
                if g.part_get_gpt_type(dev, num).upper() == ESP_GPT_TYPE:
                    return "uefi"
            elif parttype == "msdos" and g.part_get_mbr_id(dev, num) == ESP_MBR_ID:
                return "uefi"
    return "bios"


def _version_key(v: str) -> list[tuple[int, str]]:
    return [(int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"[.\-+~]", v)]


def installed_kernels(g: Any) -> list[str]:
    """Kernel versions with both /boot/vmlinuz-VER and /lib/modules/VER,
    newest first."""
    if not g.is_dir("/lib/modules", followsymlinks=True):
        return []
    vers = [
        v for v in g.ls("/lib/modules")
        if g.is_file(f"/boot/vmlinuz-{v}", followsymlinks=True)
    ]
    return sorted(vers, key=_version_key, reverse=True)


def remount_rw(g: Any, info: GuestInfo) -> None:
    """Mounts the guest read-write once the checks passed; until then even
    a refused guest's disk stays bit-identical (a rw mount writes ext4's
    superblock)."""
    g.umount_all()
    for mp in sorted(info.mountpoints, key=len):
        g.mount(info.mountpoints[mp], mp)


def inspect_guest(g: Any, vm: str, disks: list[str], strict: bool = True) -> GuestInfo:
    """Finds the one OS on the disks and mounts its filesystems read-only.
    An OS the converter does not support is refused when `strict`, else
    described (and not mounted) with the reason in `unsupported`."""
    info = GuestInfo(name=vm, disks=disks)
    where = ", ".join(disks)
    roots = g.inspect_os()
    if not roots:
        raise errors.FailedPrecondition(
            f"VM {vm}: no operating system found on {where}; check that these are the "
            "VM's disks, in boot order, and that the copy finished"
        )
    if len(roots) > 1:
        raise errors.FailedPrecondition(
            f"VM {vm}: {len(roots)} operating systems found on {where} ({', '.join(roots)}); "
            "the converter handles one OS per VM: migrate a multi-boot VM by hand"
        )
    root = roots[0]
    info.root = root
    info.os_type = g.inspect_get_type(root)
    info.distro = g.inspect_get_distro(root)
    info.product_name = g.inspect_get_product_name(root)
    info.arch = g.inspect_get_arch(root)
    major, minor = g.inspect_get_major_version(root), g.inspect_get_minor_version(root)
    info.version = f"{major}.{minor}" if minor else str(major)
    unsupported = ""
    if info.os_type != "linux":
        unsupported = (f"VM {vm}: the guest on {where} is {info.os_type} ({info.product_name}); "
                       "this converter handles Debian-family Linux guests only")
    elif info.distro not in DEBIAN_FAMILY and g.inspect_get_package_format(root) != "deb":
        unsupported = (f"VM {vm}: the guest on {where} is {info.distro} ({info.product_name}); "
                       "this converter handles Debian-family guests (Debian, Ubuntu, …) only")
    if unsupported:
        if strict:
            raise errors.FailedPrecondition(unsupported)
        info.unsupported = unsupported
        return info
    info.mountpoints = dict(g.inspect_get_mountpoints(root))
    for mp in sorted(info.mountpoints, key=len):
        dev = info.mountpoints[mp]
        try:
            g.mount_ro(dev, mp)
        except RuntimeError as e:
            if mp == "/":
                raise errors.FailedPrecondition(
                    f"VM {vm}: cannot mount the root filesystem {dev} on {where}: {e}; "
                    "run fsck on the source VM and copy it again"
                ) from e
            # A nofail or stale entry: conversion goes on without it.
            info.unmounted[mp] = f"{dev}: {e}"
    for mp in info.unmounted:
        del info.mountpoints[mp]
    info.root_uuid = g.vfs_uuid(root)
    info.firmware = _firmware(g)
    info.kernels = installed_kernels(g)
    return info
