"""An NBD source read with libnbd's asynchronous API on the asyncio loop.

libnbd owns the protocol; this module only drives its state machine from the
event loop: it watches the handle's socket in the direction libnbd asks for
(`aio_get_direction`), calls `aio_notify_read` / `aio_notify_write` when the
socket is ready, and resolves one future per command from libnbd's completion
callbacks. Nothing is ever written to the source.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import nbd

from ferry import errors
from ferry.rpc import shown
from transferd.extents import (
    Extent,
    Kind,
    from_block_status,
    from_dirty_bitmap,
    normalize_areas,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix")
CONNECT_TIMEOUT_SECONDS = 30.0
DISCONNECT_TIMEOUT_SECONDS = 5.0


def check_uri(uri: str) -> None:
    """Refuses what is not an NBD URI, and a Unix socket that does not exist,
    before any connection is tried."""
    if not uri:
        raise errors.InvalidInput(
            "source_uri is empty; pass nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH"
        )
    parts = urlsplit(uri)
    if parts.scheme not in SCHEMES:
        raise errors.InvalidInput(
            f"source {shown(uri)!r} is not an NBD URI (scheme {parts.scheme!r}); pass "
            "nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH"
        )
    if parts.scheme.endswith("+unix"):
        sockets = parse_qs(parts.query).get("socket", [])
        if len(sockets) != 1 or not sockets[0]:
            raise errors.InvalidInput(
                f"source {shown(uri)!r} names no socket; add ?socket=PATH to the URI"
            )
        path = unquote(sockets[0])
        if not os.path.exists(path):
            raise errors.NotFound(
                f"source socket {path} does not exist; start the NBD server "
                f"(nbdkit, qemu-nbd) on it or fix source_uri {shown(uri)!r}"
            )
    elif not parts.hostname:
        raise errors.InvalidInput(f"source {shown(uri)!r} names no host; pass nbd://HOST[:PORT]/EXPORT")


class _Connection:
    """One libnbd handle driven by the loop. Commands are futures; a lost
    connection fails every command in flight."""

    def __init__(self, uri: str, loop: asyncio.AbstractEventLoop,
                 contexts: tuple[str, ...] = (nbd.CONTEXT_BASE_ALLOCATION,)) -> None:
        self.uri = uri
        self._loop = loop
        self._h = nbd.NBD()
        for context in contexts:
            self._h.add_meta_context(context)
        # Buffers are overwritten by a successful read; a failed one fails the
        # transfer, so libnbd need not clear them first.
        self._h.set_pread_initialize(False)
        self._fd = -1
        self._reading = False
        self._writing = False
        self._pending: set[asyncio.Future[None]] = set()
        self._ready: asyncio.Future[None] | None = None
        self._lost: str | None = None
        self._gone = asyncio.Event()
        self._closed = False

    async def connect(self) -> None:
        self._ready = self._loop.create_future()
        try:
            self._h.aio_connect_uri(self.uri)
        except nbd.Error as e:
            raise self._unreachable(e) from e
        self._fd = self._h.aio_get_fd()
        self._rearm()
        self._check_ready()
        try:
            await asyncio.wait_for(self._ready, CONNECT_TIMEOUT_SECONDS)
        except TimeoutError as e:
            self.close()
            raise errors.Unavailable(
                f"source {self.uri} did not complete the NBD handshake within "
                f"{CONNECT_TIMEOUT_SECONDS:.0f} s; check that an NBD server listens there"
            ) from e
        except nbd.Error as e:
            self.close()
            raise errors.FailedPrecondition(
                f"source {self.uri} is not a usable NBD server: {e}; check that the URI "
                "points at an NBD server (nbdkit, qemu-nbd) and that the export exists"
            ) from e

    def _unreachable(self, e: nbd.Error) -> errors.FerryError:
        """Failures before any NBD byte was exchanged."""
        if e.errnum == errno.ENOENT:
            return errors.NotFound(f"source {self.uri} does not exist ({e}); fix source_uri")
        return errors.Unavailable(
            f"cannot reach source {self.uri}: {e}; start the NBD server or fix source_uri"
        )

    # -- event loop integration -------------------------------------------------

    def _rearm(self) -> None:
        """Watches the socket in the direction libnbd wants next."""
        if self._fd < 0:
            return
        direction = self._h.aio_get_direction()
        want_read = bool(direction & nbd.AIO_DIRECTION_READ)
        want_write = bool(direction & nbd.AIO_DIRECTION_WRITE)
        if want_read and not self._reading:
            self._loop.add_reader(self._fd, self._on_readable)
        elif not want_read and self._reading:
            self._loop.remove_reader(self._fd)
        if want_write and not self._writing:
            self._loop.add_writer(self._fd, self._on_writable)
        elif not want_write and self._writing:
            self._loop.remove_writer(self._fd)
        self._reading, self._writing = want_read, want_write

    def _on_readable(self) -> None:
        self._notify(self._h.aio_notify_read)

    def _on_writable(self) -> None:
        self._notify(self._h.aio_notify_write)

    def _notify(self, notify: Any) -> None:
        try:
            notify()
        except nbd.Error as e:
            self._die(e)
            return
        if self._h.aio_is_dead() or self._h.aio_is_closed():
            self._die(nbd.Error("the server closed the connection", errno.ENOTCONN))
            return
        self._rearm()
        self._check_ready()

    def _check_ready(self) -> None:
        if self._ready is not None and not self._ready.done() and self._h.aio_is_ready():
            self._ready.set_result(None)

    def _die(self, e: nbd.Error) -> None:
        """The connection is gone: stop watching and fail what waits on it."""
        self._lost = str(e)
        self._gone.set()
        self._unwatch()
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(e)
        for fut in list(self._pending):
            if not fut.done():
                fut.set_exception(OSError(errno.ENOTCONN, str(e)))

    def _unwatch(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._fd)
        if self._writing:
            self._loop.remove_writer(self._fd)
        self._reading = self._writing = False

    # -- commands ---------------------------------------------------------------

    def _command(self) -> tuple[asyncio.Future[None], Any]:
        """A future and the completion callback that resolves it. Returning 1
        from the callback retires the command inside libnbd."""
        fut: asyncio.Future[None] = self._loop.create_future()

        def completed(error: Any) -> int:
            if not fut.done():
                if error.value:
                    fut.set_exception(OSError(error.value, os.strerror(error.value)))
                else:
                    fut.set_result(None)
            return 1

        return fut, completed

    async def _run(self, fut: asyncio.Future[None]) -> None:
        self._pending.add(fut)
        self._rearm()
        try:
            await fut
        finally:
            self._pending.discard(fut)

    def _not_sent(self, e: nbd.Error) -> OSError:
        """A command libnbd refused to send. When that is because the
        connection died (e.g. an idle connection whose server went away), the
        connection is marked lost so the source reconnects."""
        if self._h.aio_is_dead() or self._h.aio_is_closed():
            self._die(e)
            return OSError(errno.ENOTCONN, self._lost or e.string)
        return OSError(e.errnum or errno.EIO, e.string)

    def _alive(self) -> None:
        if self._lost is not None:
            raise OSError(errno.ENOTCONN, self._lost)

    async def pread(self, offset: int, buf: memoryview) -> None:
        self._alive()
        fut, completed = self._command()
        try:
            self._h.aio_pread(nbd.Buffer.from_buffer(buf), offset, completed)
        except nbd.Error as e:
            raise self._not_sent(e) from e
        await self._run(fut)

    async def block_status(self, offset: int, length: int) -> dict[str, list[int]]:
        """The reply of every negotiated meta context, each as the flat
        [length, flags, ...] list starting at `offset`."""
        self._alive()
        fut, completed = self._command()
        entries: dict[str, list[int]] = {}

        def extent(metacontext: str, start: int, got: list[int], error: Any) -> int:
            if start == offset:
                entries.setdefault(metacontext, []).extend(got)
            return 0

        try:
            self._h.aio_block_status(length, offset, extent, completed)
        except nbd.Error as e:
            raise self._not_sent(e) from e
        await self._run(fut)
        return entries

    @property
    def inflight(self) -> int:
        return len(self._pending)

    @property
    def lost(self) -> bool:
        """The connection is gone (as opposed to one command failing)."""
        return self._lost is not None

    @property
    def size(self) -> int:
        return int(self._h.get_size())

    def can_meta_context(self, context: str) -> bool:
        return bool(self._h.can_meta_context(context))

    @property
    def can_multi_conn(self) -> bool:
        return bool(self._h.can_multi_conn())

    @property
    def max_request(self) -> int:
        return int(self._h.get_block_size(nbd.SIZE_MAXIMUM))

    async def disconnect(self) -> None:
        """Says goodbye (NBD_CMD_DISC) so the server does not log a broken
        connection, then closes."""
        if self._closed:
            return
        if self._lost is None and self._h.aio_is_ready():
            try:
                self._h.aio_disconnect()
            except nbd.Error:
                pass
            else:
                self._rearm()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._gone.wait(), DISCONNECT_TIMEOUT_SECONDS)
        self.close()

    def close(self) -> None:
        """Drops the handle; libnbd closes the socket. Pending reads are
        abandoned (their buffers stay referenced by libnbd until then)."""
        if self._closed:
            return
        self._closed = True
        self._unwatch()
        self._fd = -1
        self._lost = self._lost or "the source was closed"
        del self._h


@dataclass(frozen=True)
class RetryPolicy:
    """How a failed source command is retried: `attempts` tries in all, the
    waits between them doubling from `first_delay` up to `max_delay`. A lost
    connection is reopened before the next try."""

    attempts: int = 5
    first_delay: float = 0.2
    max_delay: float = 5.0

    def delay(self, attempt: int) -> float:
        return float(min(self.max_delay, self.first_delay * 2 ** (attempt - 1)))


def bitmap_context(name: str) -> str:
    return f"qemu:dirty-bitmap:{name}"


class NbdSource:
    """A disk behind an NBD URI, over one connection or, when the server
    advertises multi-conn, several; each command goes to the least busy one.

    A failed read or block-status query is retried under the retry policy;
    its buffer is never handed on, so a failure can only ever end in another
    try or in a clear error, never in wrong data."""

    def __init__(self, uri: str, connections: list[_Connection], contexts: tuple[str, ...],
                 retry: RetryPolicy, on_retry: Callable[[], None] | None) -> None:
        self._uri = uri
        self._conns = connections
        self._contexts = contexts
        self._retry = retry
        self._on_retry = on_retry
        self._size = connections[0].size
        self._reconnecting: dict[int, asyncio.Task[None]] = {}
        self.bytes_read = 0
        self.retries = 0

    @classmethod
    async def open(
        cls, uri: str, connections: int = 1, bitmap: str = "",
        retry: RetryPolicy | None = None, on_retry: Callable[[], None] | None = None,
    ) -> NbdSource:
        """Connects; opens up to `connections` connections when the server
        allows multi-conn (one otherwise). With `bitmap`, the server must export
        that dirty bitmap (qemu-nbd -B NAME)."""
        check_uri(uri)
        contexts: tuple[str, ...] = (nbd.CONTEXT_BASE_ALLOCATION,)
        if bitmap:
            contexts += (bitmap_context(bitmap),)
        loop = asyncio.get_running_loop()
        first = _Connection(uri, loop, contexts)
        await first.connect()
        conns = [first]
        try:
            if bitmap and not first.can_meta_context(bitmap_context(bitmap)):
                raise errors.FailedPrecondition(
                    f"source {uri} does not export the dirty bitmap {bitmap!r}; export it "
                    f"(qemu-nbd -B {bitmap}) or copy without --dirty-bitmap"
                )
            if connections > 1 and first.can_multi_conn:
                more = [_Connection(uri, loop, contexts) for _ in range(connections - 1)]
                await asyncio.gather(*(c.connect() for c in more))
                conns += more
        except BaseException:
            for c in conns:
                c.close()
            raise
        return cls(uri, conns, contexts, retry or RetryPolicy(), on_retry)

    @property
    def size(self) -> int:
        return self._size

    @property
    def description(self) -> str:
        return self._uri

    @property
    def connections(self) -> int:
        return len(self._conns)

    @property
    def inflight(self) -> int:
        return sum(c.inflight for c in self._conns)

    @property
    def max_request(self) -> int:
        """The largest read the server accepts (0 when it does not say)."""
        return self._conns[0].max_request

    def _conn(self) -> _Connection:
        live = [c for c in self._conns if not c.lost] or self._conns
        return min(live, key=lambda c: c.inflight)

    def _failed(self, conn: _Connection, what: str, e: OSError, attempts: int) -> errors.FerryError:
        tries = f"; gave up after {attempts} attempts" if attempts > 1 else ""
        if conn.lost:
            return errors.Unavailable(
                f"source {self._uri} stopped answering after {self.bytes_read} bytes read: "
                f"{e.strerror or e}{tries}; check that the NBD server is running"
            )
        return errors.OperationFailed(
            f"source {self._uri} failed {what}: {e.strerror or e} (after {self.bytes_read} "
            f"bytes read{tries}); check the NBD server's log"
        )

    async def _reconnect(self, lost: _Connection) -> None:
        """Replaces a lost connection; concurrent commands that saw the same
        loss share one attempt. Failing to reconnect only costs a try."""
        index = next((i for i, c in enumerate(self._conns) if c is lost), None)
        if index is None:
            return  # already replaced
        task = self._reconnecting.get(index)
        if task is None:
            task = asyncio.create_task(self._replace(index, lost))
            self._reconnecting[index] = task
            task.add_done_callback(lambda _: self._reconnecting.pop(index, None))
        await asyncio.shield(task)

    async def _replace(self, index: int, lost: _Connection) -> None:
        conn = _Connection(self._uri, asyncio.get_running_loop(), self._contexts)
        try:
            await conn.connect()
        except errors.FerryError as e:
            log.warning("reconnecting to source %s failed: %s", self._uri, e)
            return
        if conn.size != self._size:
            conn.close()
            raise errors.OperationFailed(
                f"source {self._uri} came back with {conn.size} bytes instead of "
                f"{self._size}; it is not the same disk, start the transfer again"
            )
        lost.close()
        self._conns[index] = conn
        log.info("reconnected to source %s", self._uri)

    async def _retrying(self, what: str, op: Callable[[_Connection], Awaitable[T]]) -> T:
        attempt = 0
        while True:
            conn = self._conn()
            try:
                return await op(conn)
            except OSError as e:
                attempt += 1
                if attempt >= self._retry.attempts:
                    raise self._failed(conn, what, e, attempt) from e
                delay = self._retry.delay(attempt)
                self.retries += 1
                if self._on_retry is not None:
                    self._on_retry()
                log.warning("source %s failed %s: %s; try %d of %d in %.1f s", self._uri,
                            what, e.strerror or e, attempt + 1, self._retry.attempts, delay)
                await asyncio.sleep(delay)
                if conn.lost:
                    await self._reconnect(conn)

    async def extents(self, offset: int, length: int) -> list[Extent]:
        replies = await self._retrying(
            f"to describe {length} bytes at offset {offset}",
            lambda c: c.block_status(offset, length),
        )
        found = from_block_status(
            offset, replies.get(nbd.CONTEXT_BASE_ALLOCATION, []), offset + length
        )
        # A server that describes nothing is read in full rather than trusted.
        return found or [Extent(offset, length, Kind.DATA)]

    async def dirty_areas(self, bitmap: str, window: int) -> list[tuple[int, int]]:
        """Every area the dirty bitmap marks, in `window`-sized queries."""
        context = bitmap_context(bitmap)
        areas: list[tuple[int, int]] = []
        offset = 0
        while offset < self._size:
            length = min(window, self._size - offset)
            replies = await self._retrying(
                f"to describe dirty bitmap {bitmap!r} at offset {offset}",
                lambda c, o=offset, n=length: c.block_status(o, n),  # type: ignore[misc]
            )
            found, end = from_dirty_bitmap(offset, replies.get(context, []), offset + length)
            if end <= offset:
                raise errors.OperationFailed(
                    f"source {self._uri} described no part of dirty bitmap {bitmap!r} at "
                    f"offset {offset}; check the NBD server's log"
                )
            areas += found
            offset = end
        return normalize_areas(areas, self._size)

    async def read_into(self, offset: int, buf: memoryview) -> None:
        await self._retrying(f"to read {len(buf)} bytes at offset {offset}",
                             lambda c: c.pread(offset, buf))
        self.bytes_read += len(buf)

    async def close(self) -> None:
        for task in list(self._reconnecting.values()):
            with contextlib.suppress(BaseException):
                await task
        for c in self._conns:
            await c.disconnect()
