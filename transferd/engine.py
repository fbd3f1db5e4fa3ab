"""The copy loop: plan extents window by window, keep many reads in flight,
write each one as it lands. It knows only the Source and Target interfaces."""

from __future__ import annotations

import asyncio
import mmap
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from transferd import extents
from transferd.endpoints import DeliveryFailed, Source, Target

MiB = 1 << 20
DEFAULT_REQUEST_SIZE = 2 * MiB
MIN_REQUEST_SIZE = 4096
MAX_REQUEST_SIZE = 32 * MiB
DEFAULT_MAX_REQUESTS = 16
MAX_MAX_REQUESTS = 256
DEFAULT_MAX_BYTES_IN_FLIGHT = 64 * MiB
MAX_MAX_BYTES_IN_FLIGHT = 1 << 30
# How much of the disk one block-status query covers (NBD lengths are 32-bit).
STATUS_WINDOW = 1 << 30
# Windows of block status fetched ahead of the reads.
STATUS_AHEAD = 4
# Zeroing is split so progress moves and one call never holds a thread long.
ZERO_STEP = 256 * MiB
RATE_WINDOW_SECONDS = 5.0


@dataclass(frozen=True)
class Tuning:
    request_size: int = DEFAULT_REQUEST_SIZE
    # Per connection.
    max_requests: int = DEFAULT_MAX_REQUESTS
    max_bytes_in_flight: int = DEFAULT_MAX_BYTES_IN_FLIGHT
    connections: int = 1
    # False when request_size is the profile's default, which a server's
    # smaller limit may lower; an explicit size is refused instead.
    request_size_asked: bool = False


@dataclass
class Progress:
    """Counters the engine moves; `on_bytes(kind, n)` mirrors them elsewhere
    (metrics) as they change. `planned` is what this run has to handle (the
    plan's bytes less what an earlier run finished, `resumed`); `mapped` is
    how much of it the block status fetched so far describes, `to_read` the
    data in that part."""

    size: int = 0
    planned: int = 0
    resumed: int = 0
    mapped: int = 0
    to_read: int = 0
    read: int = 0
    written: int = 0
    zeroed: int = 0
    skipped: int = 0
    inflight: int = 0
    inflight_bytes: int = 0
    retries: int = 0
    verified: int = 0
    verifying: bool = False  # the copy is complete and flushed; verify runs
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    on_bytes: Callable[[str, int], None] | None = None
    _samples: deque[tuple[float, int, int]] = field(default_factory=deque)

    def add(self, kind: str, n: int) -> None:
        setattr(self, kind, getattr(self, kind) + n)
        if self.on_bytes is not None:
            self.on_bytes(kind, n)

    @property
    def done(self) -> int:
        return self.read + self.zeroed + self.skipped

    @property
    def elapsed(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    def _base(self, now: float) -> tuple[float, int, int]:
        """The oldest sample in the window as (time, done, read); the start
        of the transfer when it is too recent to measure from."""
        t0, d0, r0 = self._samples[0] if self._samples else (self.started, 0, 0)
        return (self.started, 0, 0) if now - t0 < 0.5 else (t0, d0, r0)

    def rate(self) -> float:
        """(read + zeroed + skipped) per second over the last few seconds;
        each call records a sample for this and for `eta`."""
        now = self.finished or time.monotonic()
        self._samples.append((now, self.done, self.read))
        while len(self._samples) > 1 and now - self._samples[1][0] >= RATE_WINDOW_SECONDS:
            self._samples.popleft()
        t0, d0, _ = self._base(now)
        return (self.done - d0) / (now - t0) if now > t0 else 0.0

    def eta(self) -> float:
        """Seconds left; 0 when done or when nothing moves yet. Reading is
        what takes time (holes are skipped or zeroed almost at once), so it
        is the data still to read at the recent read rate; where block
        status is not fetched yet, the share of data seen so far stands in."""
        left = self.planned - self.done
        now = self.finished or time.monotonic()
        t0, d0, r0 = self._base(now)
        if left <= 0 or now <= t0:
            return 0.0
        unread = self.to_read - self.read
        if self.mapped:
            unread += (self.planned - self.mapped) * self.to_read // self.mapped
        read_rate = (self.read - r0) / (now - t0)
        if unread > 0 and read_rate > 0:
            return unread / read_rate
        done_rate = (self.done - d0) / (now - t0)
        return left / done_rate if done_rate > 0 else 0.0


class _ByteBudget:
    """Bounds bytes read but not yet written."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._used = 0
        self._cond = asyncio.Condition()

    async def acquire(self, n: int) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: self._used + n <= self._limit)
            self._used += n

    async def release(self, n: int) -> None:
        async with self._cond:
            self._used -= n
            self._cond.notify_all()


class Buffers:
    """Read buffers for one or more transfers (a daemon shares one among all
    its transfers): at most `limit` bytes of buffers exist at once, in use
    or kept for reuse, so memory stays bounded however many disks copy at
    once. Freed buffers are reused rather than allocated again."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held = 0
        self._free: dict[int, list[mmap.mmap]] = {}
        self._cond = asyncio.Condition()

    @property
    def held(self) -> int:
        return self._held

    def _take(self, size: int) -> mmap.mmap | None:
        free = self._free.get(size)
        if free:
            return free.pop()
        if self._held + size > self.limit:
            # Make room by dropping kept buffers of other sizes.
            for other in self._free.values():
                while other and self._held + size > self.limit:
                    self._held -= len(other.pop())
        if self._held + size > self.limit:
            return None
        self._held += size
        # Anonymous mappings are page aligned (O_DIRECT writes need that) and
        # go back to the system as soon as they are dropped.
        return mmap.mmap(-1, size)

    async def get(self, size: int) -> mmap.mmap:
        async with self._cond:
            while (buf := self._take(size)) is None:
                await self._cond.wait()
            return buf

    async def put(self, buf: mmap.mmap) -> None:
        """Gives back a buffer for reuse."""
        async with self._cond:
            self._free.setdefault(len(buf), []).append(buf)
            self._cond.notify_all()

    async def discard(self, buf: mmap.mmap) -> None:
        """Gives back a buffer that must not be reused (it may still be
        written into); its room is freed once this reference is gone."""
        async with self._cond:
            self._held -= len(buf)
            self._cond.notify_all()


@dataclass(frozen=True)
class Plan:
    """What to copy. `areas` None is the whole disk, guided by allocation (a
    zero extent is skipped on a target that reads as zero); a list is the
    changed areas of an incremental copy, where every zero extent is zeroed
    because the target holds an older copy. `done` is left out (a resume)."""

    areas: tuple[tuple[int, int], ...] | None = None
    done: tuple[tuple[int, int], ...] = ()

    def covered(self, size: int) -> list[tuple[int, int]]:
        return list(self.areas) if self.areas is not None else ([(0, size)] if size else [])

    def remaining(self, size: int) -> int:
        """Bytes this plan leaves to do."""
        steps = [extents.Step(o, n, extents.Action.READ) for o, n in self.covered(size)]
        return sum(s.length for s in extents.subtract(steps, self.done))


async def _planned_steps(
    source: Source, target: Target, plan: Plan, progress: Progress,
    out: asyncio.Queue[list[extents.Step] | None],
) -> None:
    """Fetches block status window by window ahead of the reads and queues
    each window's steps (counted into `progress` for the ETA); None marks
    the end."""
    for area_offset, area_length in plan.covered(source.size):
        offset, end = area_offset, area_offset + area_length
        while offset < end:
            window = await source.extents(offset, min(STATUS_WINDOW, end - offset))
            if plan.areas is None:
                steps = extents.plan(window, target.reads_as_zero)
            else:
                steps = extents.changed_plan(window)
            left = extents.subtract(steps, plan.done)
            progress.mapped += sum(s.length for s in left)
            progress.to_read += sum(s.length for s in left if s.action is extents.Action.READ)
            await out.put(left)
            offset = window[-1].end
    await out.put(None)


async def copy(
    source: Source, target: Target, tuning: Tuning, progress: Progress,
    plan: Plan = Plan(), on_done: Callable[[int, int, memoryview | None], None] | None = None,
    buffers: Buffers | None = None,
) -> None:
    """Copies what `plan` covers from the source onto the target; the caller
    flushes it (`finish`) once its own bookkeeping is done. `on_done(offset,
    length, data)` is told of every range written (`data` what was written,
    valid only during the call) or zeroed (None): the journal. `buffers` may
    be shared with other transfers (by default the transfer has its own, as
    large as its bytes in flight). Raises the first failure; the caller
    decides what happens to the target."""
    progress.size = source.size
    progress.planned = plan.remaining(source.size)
    slots = asyncio.Semaphore(tuning.max_requests * max(1, source.connections))
    budget = _ByteBudget(tuning.max_bytes_in_flight)
    pool = buffers or Buffers(max(tuning.max_bytes_in_flight, tuning.request_size))
    ahead: asyncio.Queue[list[extents.Step] | None] = asyncio.Queue(STATUS_AHEAD)

    def finished(offset: int, length: int, data: memoryview | None) -> None:
        if on_done is not None:
            on_done(offset, length, data)

    # Buffers handed to tasks and not yet given back: a task cancelled
    # before it ran cannot give its buffer back itself.
    lent: dict[int, mmap.mmap] = {}

    async def read_write(offset: int, length: int, buf: mmap.mmap) -> None:
        view = memoryview(buf)[:length]
        reusable = False
        try:
            progress.inflight += 1
            try:
                # The receiving thread hands the data to the target's writer
                # as soon as it lands; the read ends once it is written.
                await source.read_into(
                    offset, view, lambda data, done: target.write_soon(offset, data, done))
            except DeliveryFailed as e:
                raise e.error from None
            finally:
                progress.inflight -= 1
            progress.add("read", length)
            progress.add("written", length)
            finished(offset, length, view)
            reusable = True
        finally:
            slots.release()
            progress.inflight_bytes -= length
            del lent[id(buf)]
            # A buffer whose read failed or was cancelled may still be filled
            # later by libnbd or a write thread: it is dropped, never reused.
            await (pool.put(buf) if reusable else pool.discard(buf))
            await budget.release(length)

    async def zero(offset: int, length: int) -> None:
        try:
            for off, n in extents.split(offset, length, ZERO_STEP):
                await target.zero(off, n)
                progress.add("zeroed", n)
                finished(off, n, None)
        finally:
            slots.release()

    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(_planned_steps(source, target, plan, progress, ahead))
            while (steps := await ahead.get()) is not None:
                for step in steps:
                    if step.action is extents.Action.SKIP:
                        progress.add("skipped", step.length)
                    elif step.action is extents.Action.ZERO:
                        await slots.acquire()
                        tg.create_task(zero(step.offset, step.length))
                    else:
                        for off, n in extents.split(step.offset, step.length, tuning.request_size):
                            await slots.acquire()
                            await budget.acquire(n)
                            buf = await pool.get(tuning.request_size)
                            lent[id(buf)] = buf
                            progress.inflight_bytes += n
                            tg.create_task(read_write(off, n, buf))
    finally:
        # A task cancelled before it ran never counted itself out.
        progress.inflight = progress.inflight_bytes = 0
        for buf in lent.values():
            await pool.discard(buf)
