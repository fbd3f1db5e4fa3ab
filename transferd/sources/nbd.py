"""An NBD source read with libnbd's asynchronous API, one thread per connection.

libnbd owns the protocol. Each connection's thread sends the commands the
event loop queues for it and runs libnbd's `poll`, which receives replies
straight into the caller's buffers without holding the GIL; completion
callbacks settle the loop's futures. Nothing is ever written to the source.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import nbd

from ferry import errors
from ferry.errors import shown
from transferd.endpoints import DeliveryFailed, Then
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
# The first connection proved the server there; more are only extra speed.
EXTRA_CONNECT_SECONDS = 5.0
DISCONNECT_TIMEOUT_SECONDS = 5.0
# How long a connection's thread waits in poll before it looks for new
# commands (new commands do not interrupt a poll) and for a stop.
POLL_MS = 20


def check_uri(uri: str) -> None:
    """Refuses what is not an NBD URI, and a Unix socket that does not exist,
    before any connection is tried."""
    if not uri:
        raise errors.InvalidInput(
            "the source URI is empty; pass nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH"
        )
    try:
        parts = urlsplit(uri)
    except ValueError as e:
        raise errors.InvalidInput(
            f"source {shown(uri)!r} is not a well-formed URI ({e}); pass "
            "nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH"
        ) from e
    if parts.scheme not in SCHEMES:
        raise errors.InvalidInput(
            f"source {shown(uri)!r} is not an NBD URI (scheme {parts.scheme!r}); pass "
            "nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH"
        )
    if not uri.startswith(parts.scheme):
        raise errors.InvalidInput(
            f"source {shown(uri)!r}: write the scheme in lower case ({parts.scheme}://)"
        )
    if parts.scheme.endswith("+unix"):
        sockets = parse_qs(parts.query, keep_blank_values=True).get("socket", [])
        if len(sockets) > 1:
            raise errors.InvalidInput(
                f"source {shown(uri)!r} names {len(sockets)} sockets; give socket= once"
            )
        if not sockets or not sockets[0]:
            raise errors.InvalidInput(
                f"source {shown(uri)!r} names no socket; add ?socket=PATH to the URI"
            )
        path = unquote(sockets[0])
        if not os.path.exists(path):
            raise errors.NotFound(
                f"source socket {path} does not exist; start the NBD server "
                f"(nbdkit, qemu-nbd) on it or fix the source URI {shown(uri)!r}"
            )
    elif not parts.hostname:
        raise errors.InvalidInput(f"source {shown(uri)!r} names no host; pass nbd://HOST[:PORT]/EXPORT")
    else:
        try:
            port = parts.port
        except ValueError:
            port = 0
        if port == 0 and parts.netloc.rpartition("]")[2].count(":"):
            raise errors.InvalidInput(
                f"source {shown(uri)!r} has a port that is not a number from 1 to 65535; "
                "fix it, or leave it out for NBD's 10809"
            )


@dataclass(frozen=True)
class _Info:
    """What the handshake told about the export, read once by the thread."""

    size: int
    multi_conn: bool
    max_request: int
    contexts: frozenset[str]


@dataclass
class _Command:
    kind: str  # "pread", "block_status" or "disconnect"
    fut: asyncio.Future[Any]
    offset: int = 0
    length: int = 0
    buf: memoryview | None = None
    then: Then | None = None


class _Connection:
    """One libnbd handle, owned and driven by a thread of its own.

    Why a thread: receiving a reply is copying its data out of the socket,
    and libnbd's `poll` does that in C with the GIL released. A thread per
    connection spreads those copies over every core (an event loop driving
    all the handles did them on one core, with a Python callback per socket
    wake-up), and hands each read's data straight to the target's writer
    (`then`) without a trip through the loop. The loop hands commands over
    through a queue and awaits futures that the thread settles; nothing
    else touches the handle. A lost connection fails every command in
    flight."""

    def __init__(self, uri: str, loop: asyncio.AbstractEventLoop,
                 contexts: tuple[str, ...] = (nbd.CONTEXT_BASE_ALLOCATION,),
                 timeout: float = CONNECT_TIMEOUT_SECONDS) -> None:
        self.uri = uri
        self._timeout = timeout
        self._loop = loop
        self._contexts = contexts
        self._queue: deque[_Command] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._outstanding = 0  # commands submitted and not settled (loop side)
        self._inflight: dict[int, _Command] = {}  # commands libnbd has (thread side)
        self._lost: str | None = None
        self._info: _Info | None = None
        self._thread: threading.Thread | None = None
        self._exited: asyncio.Future[None] = loop.create_future()

    async def connect(self) -> None:
        ready: asyncio.Future[_Info] = self._loop.create_future()
        self._thread = threading.Thread(target=self._serve, args=(ready,), daemon=True,
                                        name="transferd-nbd")
        self._thread.start()
        try:
            self._info = await ready
        except BaseException:
            self.close()
            raise

    # -- the connection's thread ----------------------------------------------

    def _settle(self, fut: asyncio.Future[Any], result: Any = None,
                error: BaseException | None = None) -> None:
        """Resolves a loop future from the thread (a closed loop has no one
        left to tell)."""
        def settle() -> None:
            if not fut.done():
                fut.set_exception(error) if error is not None else fut.set_result(result)
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(settle)

    def _serve(self, ready: asyncio.Future[_Info]) -> None:
        h = nbd.NBD()
        try:
            try:
                self._handshake(h)
            except errors.FerryError as e:
                self._settle(ready, error=e)
                return
            self._settle(ready, _Info(
                size=int(h.get_size()), multi_conn=bool(h.can_multi_conn()),
                max_request=int(h.get_block_size(nbd.SIZE_MAXIMUM)),
                contexts=frozenset(c for c in self._contexts if h.can_meta_context(c)),
            ))
            self._run(h)
        except BaseException as e:
            self._die(f"the connection's thread failed: {e!r}")
            raise
        finally:
            del h  # closes the socket; libnbd lets go of every buffer
            self._settle(self._exited)

    def _handshake(self, h: nbd.NBD) -> None:
        for context in self._contexts:
            h.add_meta_context(context)
        # Buffers are overwritten by a successful read; a failed one fails the
        # transfer, so libnbd need not clear them first.
        h.set_pread_initialize(False)
        try:
            h.aio_connect_uri(self.uri)
        except nbd.Error as e:
            raise self._unreachable(e) from e
        deadline = time.monotonic() + self._timeout
        try:
            while not h.aio_is_ready():
                if self._stop:
                    raise errors.Cancelled(f"connecting to source {self.uri} was cancelled")
                if h.aio_is_dead() or h.aio_is_closed():
                    raise nbd.Error("the server closed the connection", errno.ENOTCONN)
                if time.monotonic() > deadline:
                    raise errors.Unavailable(
                        f"source {self.uri} did not complete the NBD handshake within "
                        f"{self._timeout:.0f} s; check that an NBD server listens there"
                    )
                h.poll(POLL_MS)
        except nbd.Error as e:
            raise errors.FailedPrecondition(
                f"source {self.uri} is not a usable NBD server: {e}; check that the URI "
                "points at an NBD server (nbdkit, qemu-nbd) and that the export exists"
            ) from e

    def _unreachable(self, e: nbd.Error) -> errors.FerryError:
        """Failures before any NBD byte was exchanged."""
        if e.errnum == errno.ENOENT:
            return errors.NotFound(f"source {self.uri} does not exist ({e}); fix the source URI")
        return errors.Unavailable(
            f"cannot reach source {self.uri}: {e}; start the NBD server or fix the source URI"
        )

    def _run(self, h: nbd.NBD) -> None:
        """Sends what the loop queued and receives replies until the
        connection is closed, lost or said goodbye to."""
        inflight = self._inflight
        disconnecting: float | None = None
        while True:
            with self._cond:
                while not (self._queue or self._stop or inflight or disconnecting):
                    self._cond.wait()
                if self._stop:
                    break
                batch = list(self._queue)
                self._queue.clear()
            try:
                for cmd in batch:
                    if cmd.kind == "disconnect":
                        h.aio_disconnect()
                        disconnecting = time.monotonic() + DISCONNECT_TIMEOUT_SECONDS
                        self._settle(cmd.fut)
                    else:
                        self._send(h, cmd, inflight)
                # Replies are read inside poll, without the GIL; a command
                # queued meanwhile waits for the next reply, or POLL_MS.
                h.poll(POLL_MS)
            except nbd.Error as e:
                self._die(str(e))
                return
            if h.aio_is_closed() or (disconnecting and time.monotonic() > disconnecting):
                self._die("the source was closed")
                return
            if h.aio_is_dead():
                self._die("the server closed the connection")
                return
        self._die("the source was closed")

    def _send(self, h: nbd.NBD, cmd: _Command, inflight: dict[int, _Command]) -> None:
        """Hands one command to libnbd; its completion callback settles it.
        A command libnbd refuses fails alone unless the connection is gone."""
        key = id(cmd)

        def completed(error: Any) -> int:
            inflight.pop(key, None)
            if error.value:
                self._settle(cmd.fut, error=OSError(error.value, os.strerror(error.value)))
            elif cmd.then is not None:
                assert cmd.buf is not None
                # The read ends once its data is written.
                cmd.then(cmd.buf, lambda failed: self._settle(
                    cmd.fut, error=None if failed is None else DeliveryFailed(failed)))
            else:
                self._settle(cmd.fut, entries if cmd.kind == "block_status" else None)
            return 1  # retires the command inside libnbd

        entries: dict[str, list[int]] = {}

        def extent(metacontext: str, start: int, got: list[int], error: Any) -> int:
            if start == cmd.offset:
                entries.setdefault(metacontext, []).extend(got)
            return 0

        inflight[key] = cmd
        try:
            if cmd.kind == "pread":
                assert cmd.buf is not None
                # The view itself, not nbd.Buffer.from_buffer(view): libnbd
                # 1.14 keeps a reference to a wrapped buffer for good.
                h.aio_pread(cmd.buf, cmd.offset, completed)
            else:
                h.aio_block_status(cmd.length, cmd.offset, extent, completed)
        except nbd.Error as e:
            inflight.pop(key, None)
            if h.aio_is_dead() or h.aio_is_closed():
                raise
            self._settle(cmd.fut, error=OSError(e.errnum or errno.EIO, e.string))

    def _die(self, reason: str) -> None:
        """The connection is gone: fail what waits on it, now and later."""
        with self._cond:
            self._lost = self._lost or reason
            waiting = [*self._inflight.values(), *self._queue]
            self._queue.clear()
        self._inflight.clear()
        for cmd in waiting:
            self._settle(cmd.fut, error=OSError(errno.ENOTCONN, reason))

    # -- commands (called on the loop) ------------------------------------------

    async def _call(self, cmd: _Command) -> Any:
        with self._cond:
            if self._lost is not None:
                raise OSError(errno.ENOTCONN, self._lost)
            self._queue.append(cmd)
            self._cond.notify()
        self._outstanding += 1
        try:
            return await cmd.fut
        finally:
            self._outstanding -= 1

    async def pread(self, offset: int, buf: memoryview, then: Then | None = None) -> None:
        await self._call(
            _Command("pread", self._loop.create_future(), offset, len(buf), buf, then))

    async def block_status(self, offset: int, length: int) -> dict[str, list[int]]:
        """The reply of every negotiated meta context, each as the flat
        [length, flags, ...] list starting at `offset`."""
        entries: dict[str, list[int]] = await self._call(
            _Command("block_status", self._loop.create_future(), offset, length))
        return entries

    @property
    def inflight(self) -> int:
        return self._outstanding

    @property
    def lost(self) -> bool:
        """The connection is gone (as opposed to one command failing)."""
        return self._lost is not None

    def _known(self) -> _Info:
        assert self._info is not None, "not connected"
        return self._info

    @property
    def size(self) -> int:
        return self._known().size

    def can_meta_context(self, context: str) -> bool:
        return context in self._known().contexts

    @property
    def can_multi_conn(self) -> bool:
        return self._known().multi_conn

    @property
    def max_request(self) -> int:
        return self._known().max_request

    async def disconnect(self) -> None:
        """Says goodbye (NBD_CMD_DISC) so the server does not log a broken
        connection, and waits for the thread to close the handle."""
        if self._thread is None:
            return
        if self._lost is None:
            with contextlib.suppress(OSError):
                await self._call(_Command("disconnect", self._loop.create_future()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._exited), DISCONNECT_TIMEOUT_SECONDS + 1)
        self.close()

    def close(self) -> None:
        """Stops the thread, which drops the handle and so the socket.
        Pending reads are abandoned (libnbd holds their buffers until then)."""
        with self._cond:
            self._stop = True
            self._lost = self._lost or "the source was closed"
            self._cond.notify()


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
                more = [_Connection(uri, loop, contexts, EXTRA_CONNECT_SECONDS)
                        for _ in range(connections - 1)]
                got = await asyncio.gather(*(c.connect() for c in more), return_exceptions=True)
                # All that connected first, so a failure below closes them too.
                conns += [c for c, outcome in zip(more, got, strict=True) if outcome is None]
                for outcome in got:
                    if outcome is not None and not isinstance(outcome, errors.FerryError):
                        raise outcome
                if len(conns) < connections:
                    # A server may take fewer clients than it allows
                    # multi-conn for (qemu-nbd --shared=N): copy over those.
                    log.warning("source %s took %d of the %d connections asked for; copying "
                                "over %d", uri, len(conns), connections, len(conns))
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

    async def read_into(self, offset: int, buf: memoryview, then: Then | None = None) -> None:
        await self._retrying(f"to read {len(buf)} bytes at offset {offset}",
                             lambda c: c.pread(offset, buf, then))
        self.bytes_read += len(buf)

    async def close(self) -> None:
        for task in list(self._reconnecting.values()):
            with contextlib.suppress(BaseException):
                await task
        for c in self._conns:
            await c.disconnect()
