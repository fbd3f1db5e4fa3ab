"""A block device target. It is never known to read as zero, so the source's
zero extents are zeroed, never skipped; and it cannot grow, so a device
smaller than the source is refused before any write."""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from ferry import errors
from transferd.targets.local import LocalTarget, open_direct, write_zeros

BLKGETSIZE64 = 0x80081272  # _IOR(0x12, 114, size_t)
BLKZEROOUT = 0x127F  # _IO(0x12, 127)
SECTOR = 512


def device_size(fd: int) -> int:
    buf = bytearray(8)
    fcntl.ioctl(fd, BLKGETSIZE64, buf)
    return int(struct.unpack("=Q", buf)[0])


def check_room(path: str, have: int, size: int) -> None:
    """A device cannot grow: one smaller than the source is refused."""
    if have < size:
        raise errors.FailedPrecondition(
            f"target block device {path} holds {have} bytes but the source has {size}; "
            f"give it at least {size} bytes (e.g. a larger PVC) and retry"
        )


class BlockTarget(LocalTarget):
    kind = "block device"

    @classmethod
    def open(cls, path: str, size: int, direct: bool = False) -> BlockTarget:
        try:
            # O_EXCL on a block device: refuse one that is mounted or in use.
            fd = os.open(path, os.O_RDWR | os.O_EXCL | os.O_CLOEXEC)
        except OSError as e:
            if e.errno == errno.EBUSY:
                hint = "it is in use (mounted?)"
            elif e.errno in (errno.EROFS, errno.EPERM, errno.EACCES):
                hint = f"{e.strerror} (the device is read-only, or transferd may not write it)"
            else:
                hint = e.strerror or str(e)
            raise errors.FailedPrecondition(
                f"cannot open target block device {path}: {hint}; free it or choose another"
            ) from e
        try:
            check_room(path, device_size(fd), size)
            direct_fd = open_direct(path, cls.kind) if direct else -1
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, reads_as_zero=False, direct_fd=direct_fd)

    def _zero(self, offset: int, length: int) -> None:
        """BLKZEROOUT on the sector-aligned middle, writes at unaligned edges
        or when the device does not take the ioctl."""
        start = -(-offset // SECTOR) * SECTOR
        end = (offset + length) // SECTOR * SECTOR
        if end <= start:
            write_zeros(self._fd, offset, length)
            return
        try:
            fcntl.ioctl(self._fd, BLKZEROOUT, struct.pack("=QQ", start, end - start))
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                raise
            write_zeros(self._fd, start, end - start)
        write_zeros(self._fd, offset, start - offset)
        write_zeros(self._fd, end, offset + length - end)
