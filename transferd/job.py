"""One transfer from start to end, shared by the gRPC service and `ferry copy`:
check the request, connect to the source, work out the plan (whole disk,
changed areas or dirty bitmap, less what a journal says is done), open the
target, copy with journal checkpoints, verify when asked."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from ferry import errors
from ferry.errors import shown
from transferd import checksum, engine, extents, journal
from transferd.sources.nbd import NbdSource, check_uri
from transferd.targets import check_device_size, check_target, is_block_device, open_target
from transferd.targets.local import LocalTarget

log = logging.getLogger(__name__)

MiB = 1 << 20
MAX_CONNECTIONS = 16
# Journaled ranges whose ends a resume reads back before trusting the
# journal: enough to catch a target or source replaced or truncated, few
# enough to cost a fraction of a second even from a slow source.
RESUME_SAMPLES = 128


@dataclass(frozen=True)
class Profile:
    """Defaults for one kind of source, and the largest request it takes."""

    request_size: int
    max_requests: int
    connections: int
    max_request_size: int
    max_connections: int


PROFILES = {
    # One connection: with the target written by a thread of its own, a
    # second connection to nbdkit or qemu-nbd was no faster and cost CPU and
    # memory (bench/README.md); more can be asked for where the server
    # allows multi-conn.
    "default": Profile(engine.DEFAULT_REQUEST_SIZE, engine.DEFAULT_MAX_REQUESTS, 1,
                       engine.MAX_REQUEST_SIZE, MAX_CONNECTIONS),
    # nbdkit's VDDK plugin: one connection per disk, requests of at most 2 MiB.
    "vddk": Profile(2 * MiB, engine.DEFAULT_MAX_REQUESTS, 1, 2 * MiB, 1),
}


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def option_name(name: str) -> str:
    return f"options.{name}"


class Options(Protocol):
    """The tunables a caller asks for, 0 or "" for the profile's default:
    gRPC's TransferOptions, or `ferry copy`'s flags (which thereby start
    without loading protobuf)."""

    @property
    def request_size(self) -> int: ...
    @property
    def max_requests(self) -> int: ...
    @property
    def max_bytes_in_flight(self) -> int: ...
    @property
    def connections(self) -> int: ...
    @property
    def profile(self) -> str: ...


def tuning_from(options: Options,
                flag: Callable[[str], str] = option_name) -> engine.Tuning:
    """Fills the profile's defaults into the options and refuses values out
    of range, each with the accepted range in the message. `flag` names an
    option as the caller's user knows it (a proto field, a CLI flag)."""
    profile_name = options.profile or "default"
    profile = PROFILES.get(profile_name)
    if profile is None:
        raise errors.InvalidInput(
            f"{flag('profile')} {shown(options.profile)!r} is unknown; pass one of "
            f"{', '.join(sorted(PROFILES))}"
        )
    request_size = options.request_size or profile.request_size
    if not _power_of_two(request_size):
        raise errors.InvalidInput(
            f"{flag('request_size')} {request_size} is not a power of two; pass e.g. "
            "2097152 (2 MiB), or 0 for the default"
        )
    if not engine.MIN_REQUEST_SIZE <= request_size <= profile.max_request_size:
        raise errors.InvalidInput(
            f"{flag('request_size')} {request_size} is outside {engine.MIN_REQUEST_SIZE} "
            f"(4 KiB) to {profile.max_request_size} ({profile.max_request_size // MiB} MiB), "
            f"the range of profile {profile_name}; pass e.g. {profile.request_size}, or 0 "
            "for the default"
        )
    max_requests = options.max_requests or profile.max_requests
    if max_requests > engine.MAX_MAX_REQUESTS:
        raise errors.InvalidInput(
            f"{flag('max_requests')} {max_requests} is above {engine.MAX_MAX_REQUESTS}; "
            f"pass 1 to {engine.MAX_MAX_REQUESTS}, or 0 for the default ({profile.max_requests})"
        )
    in_flight = options.max_bytes_in_flight or max(
        engine.DEFAULT_MAX_BYTES_IN_FLIGHT, request_size
    )
    if not request_size <= in_flight <= engine.MAX_MAX_BYTES_IN_FLIGHT:
        raise errors.InvalidInput(
            f"{flag('max_bytes_in_flight')} {in_flight} must be between the request size "
            f"({request_size}) and {engine.MAX_MAX_BYTES_IN_FLIGHT} (1 GiB); pass 0 for "
            "the default (64 MiB)"
        )
    connections = options.connections or profile.connections
    if connections > profile.max_connections:
        raise errors.InvalidInput(
            f"{flag('connections')} {connections} is above {profile.max_connections}, the "
            f"most profile {profile_name} uses; pass 1 to {profile.max_connections}, or 0 for "
            f"the default ({profile.connections})"
        )
    return engine.Tuning(request_size, max_requests, in_flight, connections,
                         request_size_asked=bool(options.request_size))


@dataclass(frozen=True)
class Spec:
    """What to copy where. `source_id` names the source in the journal (the
    URI unless the URI changes between runs, as a temporary socket does);
    `source_label` is what messages call it (the URI when empty)."""

    source_uri: str
    target_path: str
    tuning: engine.Tuning
    verify: bool = False
    changed_areas: tuple[tuple[int, int], ...] | None = None
    dirty_bitmap: str = ""
    source_id: str = ""
    source_label: str = ""
    direct: bool = False

    @property
    def source_name(self) -> str:
        return self.source_label or self.source_uri

    @property
    def incremental(self) -> bool:
        return self.changed_areas is not None or bool(self.dirty_bitmap)

    def plan_key(self) -> str:
        if self.dirty_bitmap:
            return f"dirty-bitmap:{self.dirty_bitmap}"
        if self.changed_areas is not None:
            text = "".join(f"{o} {n}\n" for o, n in self.changed_areas)
            return "changed-areas:" + hashlib.sha256(text.encode()).hexdigest()
        return "full"


def check_spec(spec: Spec) -> None:
    """Everything that can be refused before the source is contacted."""
    check_uri(spec.source_uri)
    if spec.changed_areas is not None and spec.dirty_bitmap:
        raise errors.InvalidInput(
            "changed areas and a dirty bitmap were both given; pass one of them"
        )
    check_target_for(spec.target_path, spec.incremental)


def check_target_for(path: str, incremental: bool) -> None:
    """Refuses a target that cannot work, and an incremental copy onto a
    target that holds no earlier copy."""
    check_target(path)
    if incremental and not os.path.exists(path):
        raise errors.FailedPrecondition(
            f"target {path} does not exist; an incremental copy (changed areas "
            "or dirty bitmap) applies on top of an earlier full copy, so copy the whole "
            "disk first"
        )


def _journal_dir() -> str:
    base = os.environ.get("FERRY_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "ferry"
    )
    return os.path.join(base, "transferd-journals")


@dataclass(frozen=True)
class _Prepared:
    """What opening a transfer found out before touching the target."""

    spec: Spec
    plan: engine.Plan
    identity: journal.Identity
    journal_path: str
    created_before: bool
    written: list[journal.Written]


async def _prepare(spec: Spec, source: NbdSource, progress: engine.Progress) -> _Prepared:
    """Everything a transfer checks once the source is open, before the
    target is created or changed: request size, areas, the target's size
    and journal. Fills in the sizes of `progress`."""
    limit = source.max_request
    if limit and spec.tuning.request_size > limit:
        if spec.tuning.request_size_asked:
            raise errors.InvalidInput(
                f"request size {spec.tuning.request_size} is above what source "
                f"{spec.source_name} accepts ({limit}); ask for at most {limit}"
            )
        # The profile's default is only a default: the server's limit wins.
        request_size = 1 << (limit.bit_length() - 1)
        spec = dataclasses.replace(spec, tuning=dataclasses.replace(spec.tuning,
                                                                    request_size=request_size))
    size = source.size
    areas: tuple[tuple[int, int], ...] | None = None
    if spec.changed_areas is not None:
        try:
            areas = tuple(extents.normalize_areas(spec.changed_areas, size))
        except ValueError as e:
            raise errors.InvalidInput(
                f"changed areas do not fit source {spec.source_name}: {e}; the list "
                "was made for another disk or snapshot"
            ) from e
    elif spec.dirty_bitmap:
        areas = tuple(await source.dirty_areas(spec.dirty_bitmap, engine.STATUS_WINDOW))
    path = spec.target_path
    block = is_block_device(path)
    if block:
        check_device_size(path, size)
    elif areas is not None:
        have = os.path.getsize(path)
        if have != size:
            raise errors.FailedPrecondition(
                f"target {path} holds {have} bytes but source {spec.source_name} has "
                f"{size}; an incremental copy (changed areas or dirty bitmap) goes onto "
                "the earlier full copy of this disk, which has its size: check the "
                "target, or copy the whole disk"
            )
    identity = journal.Identity(spec.source_id or spec.source_uri, size, spec.plan_key())
    jpath = journal.journal_path(path, _journal_dir(), beside=not block)
    loaded = journal.load(jpath, identity, path) if os.path.exists(path) else None
    if loaded is not None and (differs := await _first_unlike(loaded.written, source, path)):
        log.warning("journal %s: the %s no longer holds what was written at offset %d; "
                    "copying everything again", jpath, differs[0], differs[1])
        loaded = None
    if loaded is None and areas is not None:
        old = journal.read_header(jpath)
        if old is not None or journal.is_marked(path):
            about = (f"its journal {jpath} is about {old.get('plan', '?')} from "
                     f"{old.get('source', '?')}" if old is not None else
                     "a transfer marked it and did not complete; its journal is elsewhere")
            raise errors.FailedPrecondition(
                f"target {path} holds an unfinished transfer ({about}); an incremental "
                "copy goes onto a complete copy: run that transfer again to finish it, or "
                "copy the whole disk"
            )
    plan = engine.Plan(areas, tuple(loaded.done) if loaded else ())
    progress.size = size
    progress.planned = plan.remaining(size)
    progress.resumed = engine.Plan(areas).remaining(size) - progress.planned
    return _Prepared(spec, plan, identity, jpath, bool(loaded and loaded.created),
                     loaded.written if loaded else [])


async def _first_unlike(written: list[journal.Written], source: NbdSource,
                        target_path: str) -> tuple[str, int] | None:
    """Reads back the ends of up to RESUME_SAMPLES journaled ranges, spread
    over the journal, from the target and the source; the first that
    differs from what was written, as ("target" or "source", offset)."""
    picked = written[::-(-len(written) // RESUME_SAMPLES)] if written else []
    samples = [s for w in picked for s in w.samples()]

    def from_target() -> list[str]:
        fd = os.open(target_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return [journal.digest(os.pread(fd, n, offset)) for offset, n, _ in samples]
        finally:
            os.close(fd)

    async def from_source(offset: int, n: int) -> str:
        buf = memoryview(bytearray(n))
        await source.read_into(offset, buf)
        return journal.digest(buf)

    on_target = await asyncio.get_running_loop().run_in_executor(None, from_target)
    on_source = await asyncio.gather(*(from_source(o, n) for o, n, _ in samples))
    for (offset, _, want), got_target, got_source in zip(samples, on_target, on_source,
                                                          strict=True):
        if got_target != want:
            return "target", offset
        if got_source != want:
            return "source", offset
    return None


T = TypeVar("T")


async def to_the_end(work: Coroutine[Any, Any, T]) -> T:
    """Runs `work` to its end even if the task is cancelled meanwhile, then
    lets the cancel go on: cleanup or bookkeeping cut short would leave the
    target, the journal and the transfer's state behind, or journal less
    than was flushed."""
    task = asyncio.ensure_future(work)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result


def first_error(e: BaseException) -> BaseException:
    """The engine's TaskGroup raises a group; the first leaf is the cause."""
    while isinstance(e, BaseExceptionGroup):
        e = e.exceptions[0]
    return e


class VerifyFailed(errors.OperationFailed):
    """Source and target checksums differ after a copy."""


class Job:
    def __init__(self, spec: Spec, source: NbdSource, target: LocalTarget,
                 plan: engine.Plan, journal_: journal.Journal,
                 progress: engine.Progress) -> None:
        self.buffers: engine.Buffers | None = None  # shared ones, set by a daemon
        self.spec = spec
        self.source = source
        self.target = target
        self.plan = plan
        self.journal = journal_
        self.progress = progress
        self.checksum: checksum.Checksum | None = None

    @classmethod
    async def open(cls, spec: Spec, progress: engine.Progress,
                   on_retry: Callable[[], None] | None = None) -> Job:
        """Validates and opens everything; creates the target last, so a
        refused request leaves nothing behind."""
        check_spec(spec)
        source = await NbdSource.open(spec.source_uri, spec.tuning.connections,
                                      spec.dirty_bitmap, on_retry=on_retry)
        try:
            ready = await _prepare(spec, source, progress)
            return cls._open_target(ready, source, progress)
        except BaseException:
            await source.close()
            raise

    @classmethod
    async def check(cls, spec: Spec, progress: engine.Progress) -> int:
        """Validates what `open` would, without creating or changing the
        target (for a transfer that has to wait its turn), and fills in the
        sizes of `progress`; returns the connections the source allows."""
        check_spec(spec)
        source = await NbdSource.open(spec.source_uri, spec.tuning.connections,
                                      spec.dirty_bitmap)
        try:
            await _prepare(spec, source, progress)
            return source.connections
        finally:
            await source.close()

    @classmethod
    def _open_target(cls, ready: _Prepared, source: NbdSource,
                     progress: engine.Progress) -> Job:
        spec, path = ready.spec, ready.spec.target_path
        target = open_target(path, source.size, ready.created_before, spec.direct)
        try:
            # The state directory, for a block device or a name too long.
            os.makedirs(os.path.dirname(ready.journal_path), exist_ok=True)
            jnl = journal.Journal.create(ready.journal_path, ready.identity, target.created,
                                         ready.written, path)
        except OSError as e:
            fix = ("free space there" if e.errno in (errno.ENOSPC, errno.EDQUOT)
                   else "make the directory writable")
            log.warning("cannot write the transfer journal %s (%s): the transfer of %s "
                        "cannot resume if transferd stops; %s", ready.journal_path,
                        e.strerror, path, fix)
            jnl = journal.Journal.disabled(ready.journal_path)
        return cls(spec, source, target, ready.plan, jnl, progress)

    @property
    def connections(self) -> int:
        return self.source.connections

    async def _commit(self, ranges: list[journal.Written]) -> None:
        """Journals ranges already durable on the target."""
        await asyncio.get_running_loop().run_in_executor(None, self.journal.commit, ranges)

    async def _checkpoint(self) -> None:
        ranges = self.journal.take()
        if ranges:
            await self.target.sync()
            await self._commit(ranges)

    async def _flush_all(self) -> None:
        """Flushes and closes the target, then journals all it was told of."""
        await self.target.finish()
        await self._commit(self.journal.take())

    async def _checkpoints(self, stop: asyncio.Event) -> None:
        """A checkpoint every CHECKPOINT_SECONDS until `stop` is set. One
        under way is finished, never cut short: its flush and its journal
        append run in threads, which a cancel would leave running on a
        target and a journal about to be closed."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), journal.CHECKPOINT_SECONDS)
            if stop.is_set():
                return
            await self._checkpoint()

    async def run(self) -> None:
        """Copies, then verifies when asked. Raises on failure; `abort` then
        cleans up."""
        await self.copy()
        if self.spec.verify:
            await self.verify()
        self.finish()

    async def copy(self) -> None:
        """Copies the plan onto the target and flushes it, journaling
        completed ranges as it goes."""
        stop = asyncio.Event()
        checkpoints = asyncio.create_task(self._checkpoints(stop))
        try:
            await engine.copy(self.source, self.target, self.spec.tuning, self.progress,
                              self.plan, on_done=self.journal.record, buffers=self.buffers)
            self._check_complete()
        except BaseException:
            stop.set()
            await to_the_end(self._last_checkpoint(checkpoints))
            raise
        stop.set()
        await to_the_end(self._flushed(checkpoints))

    async def _last_checkpoint(self, checkpoints: asyncio.Task[None]) -> None:
        """After a failure or a stop: what was written before it stays
        journaled for a resume. After a failed flush nothing more is
        journaled (a second fdatasync may pass although the data was lost)."""
        with contextlib.suppress(Exception):
            await checkpoints
            await self._checkpoint()

    async def _flushed(self, checkpoints: asyncio.Task[None]) -> None:
        """The copy is complete: the last checkpoint ends, the target is
        flushed and closed, and all of it is journaled, so a stop during
        verify resumes there."""
        await checkpoints
        await self._flush_all()

    def _check_complete(self) -> None:
        """The copy returned: refuses to call it done unless every planned
        byte was handled and every byte read was written."""
        p = self.progress
        if p.done != p.planned or p.written != p.read:
            raise errors.OperationFailed(
                f"the copy of {self.spec.source_name} to {self.spec.target_path} stopped "
                f"early: {p.done} of {p.planned} planned bytes handled, {p.read} read but "
                f"{p.written} written; the target is incomplete, run the transfer again"
            )

    def finish(self) -> None:
        """The transfer is complete: its journal has no more use."""
        # The mark first: a journal left by a kill in between belongs to
        # no target, where a mark without a journal would refuse the next
        # incremental copy.
        journal.unmark(self.spec.target_path)
        self.journal.remove()

    async def verify(self) -> None:
        """Hashes source and target at once and compares. Progress counts
        what both sides have hashed."""
        self.progress.verifying = True
        done = [0, 0]  # source, target
        lock = threading.Lock()  # the target side counts from hashing threads

        def counter(side: int) -> Callable[[int], None]:
            def count(n: int) -> None:
                with lock:
                    done[side] += n
                    self.progress.verified = min(done)
            return count

        loop = asyncio.get_running_loop()
        size = self.source.size
        src, dst = await asyncio.gather(
            checksum.source_checksum(self.source, self.spec.tuning.request_size, counter(0)),
            loop.run_in_executor(None, checksum.path_checksum, self.spec.target_path, size,
                                 counter(1)),
        )
        if src != dst:
            self.journal.remove()
            raise VerifyFailed(
                f"verification failed: source {self.spec.source_name} has checksum {src} "
                f"but target {self.spec.target_path} has {dst}; the target is not a "
                "faithful copy, do not use it and run the transfer again"
            )
        self.checksum = src

    async def abort(self) -> str:
        """After a failure or cancel: closes the target (removing a file this
        transfer created, with its journal) and says what was done."""
        note = await self.target.abort()
        if self.target.created:
            self.journal.remove()
            return note
        self.journal.close()
        if self.journal.enabled and os.path.exists(self.journal.path):
            note += (f"; the journal {self.journal.path} was kept, so a transfer of the "
                     "same source onto it resumes")
        return note

    async def suspend(self) -> str:
        """After the copy was stopped for a shutdown (not by the operator):
        makes what was written durable and journaled, and keeps the target
        and its journal, even a target this transfer created, for a resume."""
        await self._flush_all()
        self.journal.close()
        if not self.journal.enabled:
            return (f"the target {self.spec.target_path} was kept, without a journal: the "
                    "transfer starts over when it runs again")
        return (f"the target {self.spec.target_path} and its journal {self.journal.path} "
                "were kept; a transfer of the same source onto it resumes")

    async def close(self) -> None:
        self.journal.close()
        await self.source.close()
