"""What file and block targets share: a file descriptor written with pwrite
by writer threads of its own, so neither the event loop nor a source's
receiving thread ever waits for the disk."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import os
import queue
import struct
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from ferry import errors
from transferd.endpoints import Done

# Threads for zeroing and flushing.
WORKER_THREADS = 2
# Threads writing data where writes can run side by side (block devices,
# O_DIRECT). Buffered writes to a regular file get one: the kernel runs them
# one at a time under the file's lock anyway, and a second writer waiting
# there spins on a core the NBD server needs (measured: a quarter of
# transferd's CPU, and no gain in speed).
PARALLEL_WRITERS = 4
# O_DIRECT writes must start and end on this boundary (a page covers 512 and
# 4096-byte logical blocks); other writes go through the page cache.
DIRECT_ALIGN = 4096
ZERO_CHUNK = 1 << 20
_ZEROS = bytes(ZERO_CHUNK)

T = TypeVar("T")

# The C library already loaded (find_library would run ldconfig at import).
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


# statfs(2) f_type of filesystems that are views of the kernel, not storage:
# a "file" there is a kernel interface (/proc/self/mem, /sys/...).
PSEUDO_FILESYSTEMS = {
    0x9FA0: "proc", 0x62656572: "sysfs", 0x64626720: "debugfs", 0x74726163: "tracefs",
    0x73636673: "securityfs", 0x27E0EB: "cgroup", 0x63677270: "cgroup2",
    0xCAFE4A11: "bpf", 0x62656570: "configfs", 0x6165676C: "pstore",
    0xDE5E81E4: "efivarfs", 0xF97CFF8C: "selinuxfs", 0x65735543: "fusectl",
    0x42494E4D: "binfmt_misc", 0x6E736673: "nsfs",
}

# struct statfs on 64-bit Linux starts with f_type (a long); 120 bytes in all.
_STATFS_SIZE = 120
_libc.statfs.argtypes = [ctypes.c_char_p, ctypes.c_char_p]


def filesystem_type(path: str) -> int:
    """statfs(2)'s f_type for the filesystem holding `path` (0 if unknown)."""
    buf = ctypes.create_string_buffer(_STATFS_SIZE)
    if _libc.statfs(os.fsencode(path), buf) != 0:
        return 0
    return int(struct.unpack_from("l", buf.raw)[0]) & 0xFFFFFFFF


def refuse_kernel_filesystem(target: str, where: str) -> None:
    """Refuses `target` when `where` (the target, its directory, or its
    open descriptor under /proc/self/fd) is on a kernel filesystem."""
    fs = PSEUDO_FILESYSTEMS.get(filesystem_type(where))
    if fs is not None:
        raise errors.InvalidInput(
            f"target {target} is on {fs}, a kernel interface and no storage; pass a file "
            "on a disk's filesystem or a block device"
        )


# struct flock on Linux: l_type, l_whence, l_start, l_len, l_pid (+ padding).
FLOCK = "hhqqi4x"


def in_use(path: str) -> str:
    """Why a locked target is refused."""
    return (f"target {path} is in use by another process (a transfer writing it, or "
            "qemu-nbd/qemu, holds a lock on it); wait for it to end or stop it, or choose "
            "another target (a disk served as the source cannot be its own target)")


def lock_for_writing(fd: int) -> bool:
    """Takes an open-file-description write lock on the whole file, held
    until `fd` is closed: another transfer opening the same file under any
    name, and qemu or qemu-nbd (which lock the images they open), see it and
    keep off. False when another one holds a lock already."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack(FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        if e.errno != errno.ENOLCK:  # a filesystem without locks
            raise
    return True


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode, which the os module does not offer."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """pwrite until every byte is written (pwrite may write less)."""
    while data:
        n = os.pwrite(fd, data, offset)
        if n <= 0:
            raise OSError(errno.EIO, "pwrite wrote nothing")
        data, offset = data[n:], offset + n


def write_zeros(fd: int, offset: int, length: int) -> None:
    """The zeroing that works everywhere, used when nothing cheaper does."""
    end = offset + length
    while offset < end:
        n = min(ZERO_CHUNK, end - offset)
        pwrite_all(fd, memoryview(_ZEROS)[:n], offset)
        offset += n


class LocalTarget:
    """Base of FileTarget and BlockTarget; subclasses decide how to zero."""

    kind = "target"

    def __init__(self, path: str, fd: int, reads_as_zero: bool, direct_fd: int = -1,
                 writers: int = PARALLEL_WRITERS) -> None:
        self._path = path
        self._fd = fd
        self._direct_fd = direct_fd
        self._reads_as_zero = reads_as_zero
        # Writes run on other threads: closing waits for those in progress,
        # so a descriptor is never closed (and its number reused) under one.
        self._writers = 0
        self._touched = False  # a write or a zeroing was tried
        self._closed = False
        self._io = threading.Condition()
        self._pool = ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="transferd-target")
        self._queued: queue.SimpleQueue[tuple[int, memoryview, Done] | None] = (
            queue.SimpleQueue())
        self._writer_threads = [
            threading.Thread(target=self._write_queued, daemon=True, name="transferd-writer")
            for _ in range(writers)
        ]
        for t in self._writer_threads:
            t.start()

    @property
    def path(self) -> str:
        return self._path

    @property
    def reads_as_zero(self) -> bool:
        return self._reads_as_zero

    @property
    def created(self) -> bool:
        """This transfer created the target (it is removed on failure)."""
        return False

    async def _off_loop(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _failed(self, what: str, e: OSError) -> OSError:
        fix = ("; free space on its filesystem and run the transfer again (it resumes)"
               if e.errno in (errno.ENOSPC, errno.EDQUOT) else "")
        return OSError(e.errno, f"{what} {self.kind} {self._path} failed: {e.strerror or e}{fix}")

    def _pwrite(self, data: memoryview, offset: int) -> None:
        """O_DIRECT for aligned writes when asked for (the engine's buffers
        are page aligned), the page cache for the unaligned rest."""
        if (self._direct_fd >= 0 and offset % DIRECT_ALIGN == 0
                and len(data) % DIRECT_ALIGN == 0):
            n = os.pwrite(self._direct_fd, data, offset)
            data, offset = data[n:], offset + n
        pwrite_all(self._fd, data, offset)

    def write_soon(self, offset: int, data: memoryview, done: Done) -> None:
        with self._io:
            if not self._closed:
                # Under the lock, so it is queued before `_close`'s stops.
                self._queued.put((offset, data, done))
                return
        done(self._closed_error())

    def _closed_error(self) -> OSError:
        return OSError(errno.EBADF, f"{self.kind} {self._path} is already closed")

    def _write_queued(self) -> None:
        """A writer thread: writes what is queued until told to stop (None)."""
        while (item := self._queued.get()) is not None:
            offset, data, done = item
            try:
                self.write(offset, data)
            except OSError as e:
                done(e)
            else:
                done(None)

    def write(self, offset: int, data: memoryview) -> None:
        """Writes on the calling thread; refuses once the target is closed."""
        with self._io:
            if self._closed:
                raise self._closed_error()
            self._writers += 1
            self._touched = True
        try:
            self._pwrite(data, offset)
        except OSError as e:
            raise self._failed(f"writing {len(data)} bytes at offset {offset} of", e) from e
        finally:
            with self._io:
                self._writers -= 1
                self._io.notify_all()

    def _zero(self, offset: int, length: int) -> None:
        write_zeros(self._fd, offset, length)

    async def zero(self, offset: int, length: int) -> None:
        self._touched = True
        try:
            await self._off_loop(self._zero, offset, length)
        except OSError as e:
            raise self._failed(f"zeroing {length} bytes at offset {offset} of", e) from e

    async def sync(self) -> None:
        """Makes the writes so far durable (a journal checkpoint needs it)."""
        try:
            await self._off_loop(os.fdatasync, self._fd)
        except OSError as e:
            raise self._failed("flushing (fdatasync)", e) from e

    async def finish(self) -> None:
        """Flushes and closes, keeping the target: at the end of a copy, or
        after a stop that keeps it for a resume (zeroing still in progress
        is waited for first). Once closed, there is nothing left to do."""
        if self._fd >= 0:
            await asyncio.get_running_loop().run_in_executor(None, self._flush_and_close)

    def _flush_and_close(self) -> None:
        """In one thread, in order: a cancel of the caller cannot close the
        descriptor under a flush still running."""
        self._pool.shutdown(wait=True)
        try:
            os.fdatasync(self._fd)
        except OSError as e:
            raise self._failed("flushing (fdatasync)", e) from e
        finally:
            self._close()

    def _close(self, last: Callable[[], None] | None = None) -> None:
        """Waits for zeroing in progress, stops the writers and closes the
        descriptors; `last` runs in between, while the descriptor still
        holds the target's lock."""
        self._pool.shutdown(wait=True)
        with self._io:
            if not self._closed:
                self._closed = True
                # Writes still queued are refused, then each writer stops.
                for _ in self._writer_threads:
                    self._queued.put(None)
            self._io.wait_for(lambda: self._writers == 0)
        if last is not None:
            last()
        if self._direct_fd >= 0:
            os.close(self._direct_fd)
            self._direct_fd = -1
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @property
    def file_id(self) -> tuple[int, int]:
        """(st_dev, st_ino) of the file or device node opened, whatever its
        path names now."""
        st = os.fstat(self._fd)
        return st.st_dev, st.st_ino

    async def abort(self) -> str:
        """Waits for writes and zeroing in progress before closing, so
        nothing lands after; says what became of the target."""
        await asyncio.get_running_loop().run_in_executor(None, self._close, self._discard)
        return self._abort_note()

    def _discard(self) -> None:
        """What an abort does to the target before letting go of it."""

    def _abort_note(self) -> str:
        if not self._touched:
            return f"the existing {self.kind} {self._path} was left as is (nothing was written)"
        return (f"the existing {self.kind} {self._path} was left as is, holding what was "
                "written to it; do not use it as a copy")


def open_direct(path: str, kind: str) -> int:
    """A second descriptor on the target for O_DIRECT writes."""
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as e:
        raise errors.FailedPrecondition(
            f"cannot open target {kind} {path} with O_DIRECT: {e.strerror}; its filesystem "
            "does not support direct I/O, copy without the direct option"
        ) from e
