"""What file and block targets share: a file descriptor written with pwrite
by writer threads of its own, so neither the event loop nor a source's
receiving thread ever waits for the disk."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import queue
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
        return OSError(e.errno, f"{what} {self.kind} {self._path} failed: {e.strerror or e}")

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
        try:
            await self._off_loop(os.fdatasync, self._fd)
        except OSError as e:
            raise self._failed("flushing (fdatasync)", e) from e
        finally:
            self._close()

    def _close(self) -> None:
        with self._io:
            if not self._closed:
                self._closed = True
                # Writes still queued are refused, then each writer stops.
                for _ in self._writer_threads:
                    self._queued.put(None)
            self._io.wait_for(lambda: self._writers == 0)
        if self._direct_fd >= 0:
            os.close(self._direct_fd)
            self._direct_fd = -1
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._pool.shutdown(wait=False)

    async def abort(self) -> str:
        """Waits for writes and zeroing in progress before closing, so
        nothing lands after."""
        await asyncio.get_running_loop().run_in_executor(None, self._pool.shutdown, True)
        await asyncio.get_running_loop().run_in_executor(None, self._close)
        return self._after_abort()

    def _after_abort(self) -> str:
        return f"the existing {self.kind} {self._path} was left as is (partially written)"


def open_direct(path: str, kind: str) -> int:
    """A second descriptor on the target for O_DIRECT writes."""
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as e:
        raise errors.FailedPrecondition(
            f"cannot open target {kind} {path} with O_DIRECT: {e.strerror}; its filesystem "
            "does not support direct I/O, copy without the direct option"
        ) from e
