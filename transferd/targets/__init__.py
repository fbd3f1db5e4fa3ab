"""Targets a transfer writes to: a regular file or a block device.

`check_target` runs before the source is contacted and creates nothing;
`open_target` runs once the source size is known and picks the module by what
the path is.
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct

from ferry import errors
from transferd.targets.block import BlockTarget, check_room, device_size
from transferd.targets.file import FileTarget
from transferd.targets.local import FLOCK, LocalTarget, in_use, refuse_kernel_filesystem


def check_target(path: str) -> None:
    """Refuses a target path that cannot work, before anything is created."""
    if not path:
        raise errors.InvalidInput(
            "the target path is empty; pass the file or block device to write"
        )
    if not os.path.isabs(path):
        raise errors.InvalidInput(f"target {path!r} is not an absolute path; pass a full path")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise errors.NotFound(
                f"target {path} is a symbolic link to {os.readlink(path)}, which does not "
                "exist; pass the path of the file or device itself"
            ) from None
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            raise errors.NotFound(
                f"target directory {parent} does not exist; create it or fix the target path "
                f"{path!r}"
            ) from None
        if not os.access(parent, os.W_OK | os.X_OK):
            raise errors.FailedPrecondition(
                f"target directory {parent} is not writable by transferd; fix its "
                "permissions or choose another target"
            ) from None
        refuse_kernel_filesystem(path, parent)
        return
    if stat.S_ISDIR(st.st_mode):
        raise errors.InvalidInput(
            f"target {path} is a directory; pass a file name inside it or a block device"
        )
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise errors.InvalidInput(
            f"target {path} is neither a regular file nor a block device; pass one of those"
        )
    if stat.S_ISREG(st.st_mode):
        refuse_kernel_filesystem(path, path)
    check_unlocked(path)


def check_device_size(path: str, size: int) -> None:
    """Refuses a block device smaller than the source, without opening it
    for writing."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        check_room(path, device_size(fd), size)
    finally:
        os.close(fd)


def check_unlocked(path: str) -> None:
    """Refuses a target another process holds a byte-range lock on: qemu
    and qemu-nbd lock the image files they have open (even read-only), so
    this catches a target that is also the disk being served as the source,
    or one a running VM uses. Probed with F_OFD_GETLK, which takes no lock."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # opening it for writing later says what is wrong
    try:
        probe = struct.pack(FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        got = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, probe)
    finally:
        os.close(fd)
    if struct.unpack(FLOCK, got)[0] != fcntl.F_UNLCK:
        raise errors.FailedPrecondition(in_use(path))



def is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


def open_target(path: str, size: int, created_before: bool = False,
                direct: bool = False) -> LocalTarget:
    """Opens (or creates) the target for a source of `size` bytes;
    `created_before` says an earlier run of this transfer created the file;
    `direct` writes with O_DIRECT."""
    check_target(path)
    if is_block_device(path):
        return BlockTarget.open(path, size, direct)
    return FileTarget.open(path, size, created_before, direct)
