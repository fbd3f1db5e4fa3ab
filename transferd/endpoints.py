"""The small interface between the copy loop and its endpoints. The engine
knows only these; a new source (another protocol) or target (another kind of
storage) is one new module implementing one of them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from transferd.extents import Extent

# Says how a write handed on ended: None once written, or the error.
Done = Callable[[OSError | None], None]
# Runs on the thread that received a read, right after the data landed: hands
# the data on (to the target's writer) and calls `done` once it is written.
Then = Callable[[memoryview, Done], None]


class DeliveryFailed(Exception):
    """A read's `then` failed (the target refused a write). It is not the
    source's fault, so it is never retried as a failed read; `error` is
    what `then` raised."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


class Source(Protocol):
    """A disk to read: its size, which parts hold data, and the data."""

    @property
    def size(self) -> int: ...

    @property
    def description(self) -> str:
        """How operators name the source in messages (its URI)."""
        ...

    @property
    def inflight(self) -> int:
        """Requests sent and not yet answered."""
        ...

    @property
    def connections(self) -> int:
        """Connections reads are spread over."""
        ...

    async def extents(self, offset: int, length: int) -> list[Extent]:
        """Describes [offset, offset + length) from the start; may stop early
        but always describes at least one byte."""
        ...

    async def read_into(self, offset: int, buf: memoryview, then: Then | None = None) -> None:
        """Fills `buf` with the bytes at `offset`. With `then`, `then(buf,
        done)` runs on the thread that received the data as soon as it
        landed, and the read ends when `done` is called; an error passed to
        `done` fails the read with DeliveryFailed."""
        ...

    async def close(self) -> None: ...


class Target(Protocol):
    """Where the copy lands. Every method may run I/O off the event loop."""

    @property
    def path(self) -> str: ...

    @property
    def reads_as_zero(self) -> bool:
        """True when unwritten ranges are known to read as zero, so zero
        extents of the source need no write at all."""
        ...

    def write_soon(self, offset: int, data: memoryview, done: Done) -> None:
        """Queues a write from any thread (a source's receiving thread, so
        it can go back to receiving at once); `done` runs on a writer thread
        when it is written or failed. After `finish` or `abort` the write is
        refused (through `done`) rather than touch a closed file."""
        ...

    async def zero(self, offset: int, length: int) -> None: ...

    async def sync(self) -> None:
        """Makes the writes so far durable without closing."""
        ...

    async def finish(self) -> None:
        """Makes every write durable (fdatasync) and closes."""
        ...

    async def abort(self) -> str:
        """Closes after a failure or cancel; removes what this transfer
        created. Returns a sentence for the operator saying what was done."""
        ...
