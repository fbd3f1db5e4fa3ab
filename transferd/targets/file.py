"""A regular file target, sized to the source with ftruncate so the source's
holes stay holes."""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from ferry import errors
from transferd.targets.local import (
    PARALLEL_WRITERS,
    LocalTarget,
    fallocate,
    in_use,
    lock_for_writing,
    open_direct,
    refuse_kernel_filesystem,
    write_zeros,
)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class FileTarget(LocalTarget):
    """A file this transfer creates reads as zero everywhere, so zero extents
    are skipped. An existing file is overwritten in place: it is resized, and
    zero extents are punched out (written as zeros where the filesystem cannot
    punch holes)."""

    kind = "file"

    def __init__(self, path: str, fd: int, created: bool, direct_fd: int = -1) -> None:
        # O_DIRECT writes may run side by side; buffered ones one at a time.
        super().__init__(path, fd, reads_as_zero=created, direct_fd=direct_fd,
                         writers=PARALLEL_WRITERS if direct_fd >= 0 else 1)
        self._created = created

    @property
    def created(self) -> bool:
        return self._created

    @classmethod
    def open(cls, path: str, size: int, created_before: bool = False,
             direct: bool = False) -> FileTarget:
        """`created_before`: an earlier run of this transfer created the file
        (a resume): its unwritten ranges are still holes, and it is removed
        like a created file if this run is cancelled."""
        created = False
        try:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                created = True
            except FileExistsError:
                fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as e:
            raise errors.FailedPrecondition(
                f"cannot open target file {path}: {e.strerror}; fix its permissions or "
                "choose another target"
            ) from e
        try:
            # What was opened, not what the path named when it was checked.
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise errors.InvalidInput(
                    f"target {path} is no longer a regular file; pass a file or a block device"
                )
            refuse_kernel_filesystem(path, f"/proc/self/fd/{fd}")
            if not lock_for_writing(fd):
                # Even a file just created: whoever locked it first owns it.
                raise errors.FailedPrecondition(in_use(path))
        except BaseException:
            os.close(fd)
            raise
        try:
            os.ftruncate(fd, size)
            direct_fd = open_direct(path, cls.kind) if direct else -1
        except BaseException as e:
            os.close(fd)
            if created:
                os.unlink(path)
            if isinstance(e, OSError):
                fix = ("the filesystem cannot hold a file that large; choose another"
                       if e.errno == errno.EFBIG else "free space or choose another filesystem")
                raise errors.FailedPrecondition(
                    f"cannot size target file {path} to {size} bytes: {e.strerror}; {fix}"
                ) from e
            raise
        return cls(path, fd, created or created_before, direct_fd)

    def _zero(self, offset: int, length: int) -> None:
        """Punch a hole (the range stops taking space), else zero the range
        in place, else write zeros: the cheapest the filesystem offers."""
        for mode in (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                     FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE):
            try:
                fallocate(self._fd, mode, offset, length)
                return
            except OSError as e:
                if e.errno not in UNSUPPORTED:
                    raise
        write_zeros(self._fd, offset, length)

    def _discard(self) -> None:
        # Before the descriptor goes, so the lock still keeps others away.
        if self._created:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)

    def _abort_note(self) -> str:
        if not self._created:
            return super()._abort_note()
        return f"the target file {self._path}, created by this transfer, was removed"
