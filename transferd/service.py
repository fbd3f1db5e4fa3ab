"""The gRPC TransferService and the registry of transfers it runs.

StartTransfer validates everything it can (options, source, target, sizes)
before anything is created, so a bad request comes back as a status code with
nothing left behind; the copy then runs as a task and is followed with
GetTransfer / WatchTransfer / CancelTransfer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import stat
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from ferry import errors
from ferry.errors import shown
from ferry.logs import ContextLogger, context_logger
from ferry.rpc import check_strings
from ferry.v1 import transfer_pb2 as pb
from ferry.v1 import transfer_pb2_grpc as pb_grpc
from transferd import checksum, engine
from transferd.job import Job, Spec, check_spec, first_error, to_the_end, tuning_from
from transferd.metrics import TransferMetrics
from transferd.sources.nbd import NbdSource
from transferd.targets.block import device_size

log = logging.getLogger(__name__)

State = pb.TransferState
FINAL = (State.TRANSFER_STATE_SUCCEEDED, State.TRANSFER_STATE_FAILED,
         State.TRANSFER_STATE_CANCELLED)
MAX_ID_LENGTH = 128
# Ids go into logs, metrics and file names: nothing that could break a line,
# hide in blanks or reorder text (bidi controls) when shown.
_ID = re.compile(rf"[A-Za-z0-9._:/@+-]{{1,{MAX_ID_LENGTH}}}")
DEFAULT_MAX_TRANSFERS = 8
# Checksums of targets run in threads of their own, at most this many at once:
# a slow disk holds these, never the loop's default executor, which journal
# commits and cleanups of every transfer need.
CHECKSUM_THREADS = 4
# What a FAILED or CANCELLED transfer says about a new run: starting it
# again under its id returns it as it is (a retried start is not a new run).
RUN_AGAIN = ("to run it again, start it under a new transfer_id (starting it under this "
             "one returns this result)")
# Read buffers of all transfers together (each transfer alone would use up
# to its max_bytes_in_flight, 64 MiB by default).
DEFAULT_BUFFER_BYTES = 128 << 20


def _state_name(state: int) -> str:
    return State.Name(state).removeprefix("TRANSFER_STATE_").lower()


def _timestamp(t: float | None) -> Timestamp | None:
    if t is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


@dataclass
class _Record:
    """One transfer. `job` is None until it opens the source and the target
    (a PENDING one holds neither); until then `spec` and `connections` are
    what the check found."""

    id: str
    request: pb.StartTransferRequest
    spec: Spec
    connections: int
    # The target's keys in the busy-target check, its real path first.
    busy_keys: list[str]
    log: ContextLogger
    progress: engine.Progress
    job: Job | None = None
    # (st_dev, st_ino) of the target the job opened: what Checksum may hash.
    target_inode: tuple[int, int] | None = None
    state: int = State.TRANSFER_STATE_PENDING
    error: str = ""
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    task: asyncio.Task[None] | None = None
    cancelling: bool = False
    # Cancelled by the daemon's shutdown: the target and journal stay.
    suspending: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def real_target(self) -> str:
        return self.busy_keys[0]

    def to_proto(self) -> pb.Transfer:
        p = self.progress
        tuning = self.spec.tuning
        rate = p.rate()
        return pb.Transfer(
            id=self.id,
            state=self.state,  # type: ignore[arg-type]
            source_uri=self.request.source_uri,
            target_path=self.request.target_path,
            options=pb.TransferOptions(
                request_size=tuning.request_size,
                max_requests=tuning.max_requests,
                max_bytes_in_flight=tuning.max_bytes_in_flight,
                connections=self.connections,
                verify=self.spec.verify,
                direct=self.spec.direct,
                profile=self.request.options.profile or "default",
            ),
            labels=self.request.labels,
            progress=pb.TransferProgress(
                size_bytes=p.size,
                bytes_read=p.read,
                bytes_written=p.written,
                bytes_zeroed=p.zeroed,
                bytes_skipped=p.skipped,
                rate_bytes_per_second=rate,
                elapsed_seconds=p.elapsed,
                inflight_requests=p.inflight,
                bytes_planned=p.planned,
                bytes_resumed=p.resumed,
                bytes_verified=p.verified,
                eta_seconds=p.eta() if self.state == State.TRANSFER_STATE_RUNNING else 0.0,
                retries=p.retries,
                inflight_bytes=p.inflight_bytes,
            ),
            checksum=str(self.job.checksum) if self.job and self.job.checksum else "",
            error=self.error,
            started_at=_timestamp(self.started_at),
            finished_at=_timestamp(self.finished_at),
        )


class TransferService(pb_grpc.TransferServiceServicer):  # type: ignore[misc]
    def __init__(self, metrics: TransferMetrics,
                 max_transfers: int = DEFAULT_MAX_TRANSFERS,
                 buffer_bytes: int = DEFAULT_BUFFER_BYTES) -> None:
        self._metrics = metrics
        self._buffers = engine.Buffers(max(buffer_bytes, engine.MAX_REQUEST_SIZE))
        self._records: dict[str, _Record] = {}
        # Real path of each target a transfer holds -> (transfer id, the path
        # it was given as).
        self._busy_targets: dict[str, tuple[str, str]] = {}
        # Starts under way, by transfer id: the same start sent again waits
        # for the one under way, and shutdown for all of them.
        self._starting: dict[str, asyncio.Event] = {}
        self._stopping = False
        self._hashing = ThreadPoolExecutor(CHECKSUM_THREADS,
                                           thread_name_prefix="transferd-checksum")
        # Transfers beyond this many wait, PENDING, for one to finish, in
        # the order they were started.
        self._max_transfers = max_transfers
        self._running = 0
        self._waiting: deque[asyncio.Future[None]] = deque()
        metrics.track_inflight(
            lambda: sum(r.progress.inflight for r in self._records.values()),
            lambda: sum(r.progress.inflight_bytes for r in self._records.values()),
        )

    # -- registry ---------------------------------------------------------------

    def _get(self, transfer_id: str) -> _Record:
        rec = self._records.get(transfer_id)
        if rec is None:
            raise errors.NotFound(
                f"transfer {shown(transfer_id)!r} does not exist on this transferd (ids do not "
                "survive a restart); list transfers with ListTransfers"
            )
        return rec

    def _set_state(self, rec: _Record, state: int) -> None:
        self._metrics.transfers.labels(_state_name(rec.state)).dec()
        self._metrics.transfers.labels(_state_name(state)).inc()
        rec.state = state

    def _existing(self, transfer_id: str, req: pb.StartTransferRequest) -> _Record | None:
        """The transfer a start sent again means: only the very same request
        (a retry) gets it, whatever state it is in."""
        rec = self._records.get(transfer_id)
        if rec is None:
            return None
        differ = _differences(rec.request, req)
        if differ:
            raise errors.AlreadyExists(
                f"transfer {transfer_id} already exists with another {', '.join(differ)} "
                f"(it copies {rec.request.source_uri} to {rec.request.target_path}); send "
                "the same request to follow it, or use another transfer_id"
            )
        return rec

    # -- RPCs -------------------------------------------------------------------

    async def StartTransfer(
        self, request: pb.StartTransferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Transfer:
        check_strings(request)
        if request.transfer_id and not _ID.fullmatch(request.transfer_id):
            raise errors.InvalidInput(
                f"transfer_id {shown(request.transfer_id, 60)!r} is not 1 to {MAX_ID_LENGTH} "
                "of the characters A-Z a-z 0-9 . _ : / @ + -; pass such an id, or none to get "
                "a random one"
            )
        transfer_id = request.transfer_id or uuid.uuid4().hex
        while (under_way := self._starting.get(transfer_id)) is not None:
            await under_way.wait()
        existing = self._existing(transfer_id, request)
        if existing is not None:
            return existing.to_proto()
        if self._stopping:
            raise errors.Unavailable(
                "transferd is shutting down; start the transfer again once it is back "
                "(it resumes)"
            )
        self._starting[transfer_id] = done = asyncio.Event()
        try:
            return await self._start(transfer_id, request)
        finally:
            del self._starting[transfer_id]
            done.set()

    async def _start(self, transfer_id: str, request: pb.StartTransferRequest) -> pb.Transfer:
        spec = Spec(
            source_uri=request.source_uri,
            target_path=request.target_path,
            tuning=tuning_from(request.options),
            verify=request.options.verify,
            changed_areas=tuple((a.offset, a.length) for a in request.changed_areas)
            if request.changed_areas else None,
            dirty_bitmap=request.dirty_bitmap,
            direct=request.options.direct,
        )
        path = request.target_path
        # Any name of the file (./, //, a symlink) is the same target. Checked
        # first: the target's checks would find the lock the holder took.
        keys = _busy_keys(path)
        busy = next((self._busy_targets[k] for k in keys if k in self._busy_targets), None)
        if os.path.isabs(path) and busy is not None:
            holder, as_path = busy
            named = f" (as {as_path})" if as_path != path else ""
            raise errors.FailedPrecondition(
                f"target {path} is the target of transfer {holder}{named}, which has not "
                "ended; wait for it to end or cancel it first"
            )
        check_spec(spec)
        for key in keys:
            self._busy_targets[key] = (transfer_id, path)
        progress = engine.Progress(on_bytes=self._metrics.count_bytes)
        # A place is taken before opening, so no other start takes it meanwhile.
        admitted = self._running < self._max_transfers
        if admitted:
            self._running += 1
        job: Job | None = None
        try:
            if admitted:
                job = await self._open(spec, progress)
                connections = job.connections
            else:
                # A transfer that will wait holds no connection and leaves the
                # target as it is: checked now, opened on its turn.
                connections = await Job.check(spec, progress)
        except BaseException:
            for key in keys:
                del self._busy_targets[key]
            if admitted:
                self._leave()
            raise
        if not admitted and self._running < self._max_transfers:
            self._running += 1  # a place came free during the check
            admitted = True
        labels = request.labels
        rec = _Record(
            id=transfer_id,
            request=request,
            spec=spec,
            connections=connections,
            busy_keys=keys,
            log=context_logger(log, {"plan": labels.plan, "vm": labels.vm,
                                     "disk": labels.disk, "transfer": transfer_id}),
            progress=progress,
        )
        if job is not None:
            self._opened(rec, job)
        self._records[transfer_id] = rec
        self._metrics.transfers.labels(_state_name(rec.state)).inc()
        if admitted:
            self._set_state(rec, State.TRANSFER_STATE_RUNNING)
        tuning = rec.spec.tuning
        rec.log.info(
            "transfer %s: %s -> %s, %d bytes (%d to copy, %d done by an earlier run), "
            "request size %d, %d requests in flight, %d connection(s)",
            "started" if admitted else "waiting for a place", request.source_uri, path,
            progress.size, progress.planned, progress.resumed, tuning.request_size,
            tuning.max_requests, rec.connections,
        )
        rec.task = asyncio.create_task(self._run(rec, admitted))
        return rec.to_proto()

    def _opened(self, rec: _Record, job: Job) -> Job:
        """The job opened (and perhaps created) the target: the record takes
        what the job settled, and the target's inode is busy too from now on."""
        rec.job, rec.spec, rec.connections = job, job.spec, job.connections
        rec.target_inode = job.target.file_id
        key = _inode_key(*rec.target_inode)
        if key not in rec.busy_keys:
            rec.busy_keys.append(key)
            self._busy_targets[key] = (rec.id, rec.request.target_path)
        return job

    async def _wait_turn(self) -> None:
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._leave()  # the turn came just as the wait was cancelled
            raise

    def _leave(self) -> None:
        """A running transfer ended: its place goes to the oldest waiter."""
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self._running -= 1

    def _retried(self, progress: engine.Progress) -> Callable[[], None]:
        def count() -> None:
            progress.retries += 1
            self._metrics.retries.inc()
        return count

    async def _open(self, spec: Spec, progress: engine.Progress) -> Job:
        job = await Job.open(spec, progress, on_retry=self._retried(progress))
        job.buffers = self._buffers
        return job

    async def _run(self, rec: _Record, admitted: bool) -> None:
        """Runs the transfer to its final state; `admitted` says whether it
        has a place already (else it waits for one)."""
        # FAILED until the copy (and verify) really completed: nothing but
        # that path may record SUCCEEDED.
        state = State.TRANSFER_STATE_FAILED
        try:
            try:
                if not admitted:
                    await self._wait_turn()
                    admitted = True
                    self._set_state(rec, State.TRANSFER_STATE_RUNNING)
                    rec.progress.started = time.monotonic()
                    rec.started_at = time.time()
                job = rec.job or self._opened(rec, await self._open(rec.spec, rec.progress))
                await job.run()
                state = State.TRANSFER_STATE_SUCCEEDED
            except asyncio.CancelledError:
                if rec.suspending:
                    note = (await to_the_end(rec.job.suspend()) if rec.job
                            else "nothing was written")
                    rec.error = f"transferd shut down before the transfer ended; {note}"
                else:
                    rec.error = f"cancelled by the operator; {await self._abort(rec)}"
                    state = State.TRANSFER_STATE_CANCELLED
            except Exception as group:  # every failure ends the transfer
                e = first_error(group)
                note = await self._abort(rec)
                if isinstance(e, errors.FerryError | OSError):
                    rec.error = f"{errors.said(e)}; {note}"
                else:
                    rec.log.error("transfer failed on an unexpected error", exc_info=e)
                    rec.error = f"internal error in transferd: {e!r}; {note}"
            if state != State.TRANSFER_STATE_SUCCEEDED and not rec.suspending:
                rec.error = f"{rec.error}; {RUN_AGAIN}"
        finally:
            try:
                # Closed before the final state shows, so a watcher that sees
                # it can reuse the source and the target at once.
                if rec.job is not None:
                    await to_the_end(rec.job.close())
            finally:
                for key in rec.busy_keys:
                    self._busy_targets.pop(key, None)
                self._finish(rec, state)
                if admitted:
                    self._leave()
                rec.done.set()

    async def _abort(self, rec: _Record) -> str:
        """Cleans up after a failure or cancel and says what became of the target."""
        if rec.job is None:
            return "nothing was written"
        note = await to_the_end(rec.job.abort())
        if rec.job.target.created:
            # Removed: whatever takes its inode number later is no target.
            rec.target_inode = None
        return note

    def _cancel(self, rec: _Record, suspend: bool = False) -> None:
        """Cancels the transfer's task once: a second cancel landing while
        the first one cleans up would cut the cleanup short. `suspend`
        keeps the target and journal (the daemon is stopping)."""
        if rec.task is not None and not rec.cancelling:
            rec.cancelling = True
            rec.suspending = suspend
            rec.task.cancel()

    def _finish(self, rec: _Record, state: int) -> None:
        rec.progress.finished = time.monotonic()
        rec.finished_at = time.time()
        self._set_state(rec, state)
        self._metrics.duration.labels(_state_name(state)).observe(rec.progress.elapsed)
        p = rec.progress
        rec.log.log(
            logging.INFO if state == State.TRANSFER_STATE_SUCCEEDED else logging.WARNING,
            "transfer %s after %.1f s: read %d, written %d, zeroed %d, skipped %d bytes%s",
            _state_name(state), p.elapsed, p.read, p.written, p.zeroed, p.skipped,
            f": {rec.error}" if rec.error else "",
        )

    async def WatchTransfer(
        self, request: pb.WatchTransferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.Transfer]:
        rec = self._get(request.transfer_id)
        interval = (request.interval_ms or 1000) / 1000
        while True:
            # Checked before the snapshot: a transfer that ends while a message
            # is being sent still gets its final message.
            finished = rec.done.is_set()
            yield rec.to_proto()
            if finished:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(rec.done.wait(), interval)

    async def GetTransfer(
        self, request: pb.GetTransferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Transfer:
        return self._get(request.transfer_id).to_proto()

    async def ListTransfers(
        self, request: pb.ListTransfersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListTransfersResponse:
        return pb.ListTransfersResponse(transfers=[r.to_proto() for r in self._records.values()])

    async def CancelTransfer(
        self, request: pb.CancelTransferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Transfer:
        rec = self._get(request.transfer_id)
        if rec.done.is_set():
            if rec.state == State.TRANSFER_STATE_CANCELLED:
                return rec.to_proto()
            raise errors.FailedPrecondition(
                f"transfer {rec.id} already {_state_name(rec.state)}; there is nothing to cancel"
            )
        self._cancel(rec)
        # Every caller waits for the one cancel and sees the same result.
        await asyncio.shield(rec.done.wait())
        return rec.to_proto()

    async def Checksum(
        self, request: pb.ChecksumRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ChecksumResponse:
        check_strings(request)
        if bool(request.source_uri) == bool(request.path):
            raise errors.InvalidInput(
                "pass exactly one of source_uri (an NBD URI) and path (a file or block device)"
            )
        if request.source_uri:
            source = await NbdSource.open(request.source_uri)
            try:
                if request.size and request.size != source.size:
                    raise errors.InvalidInput(
                        f"size {request.size} differs from source {request.source_uri}'s "
                        f"{source.size} bytes; pass 0 to hash the whole source"
                    )
                limit = source.max_request or engine.DEFAULT_REQUEST_SIZE
                result = await checksum.source_checksum(
                    source, min(limit, engine.DEFAULT_REQUEST_SIZE))
            finally:
                await source.close()
        else:
            inodes = self._written_as(request.path)
            result = await asyncio.get_running_loop().run_in_executor(
                self._hashing, _target_checksum, request.path, request.size, inodes)
        return pb.ChecksumResponse(algorithm=result.algorithm, block_size=result.block_size,
                                   size=result.size, digest=result.digest)

    def _written_as(self, path: str) -> dict[tuple[int, int], str]:
        """The files transfers with target `path` wrote, (st_dev, st_ino) ->
        transfer id. Checksum hashes only those: transferd may read files
        its callers may not, and the hash of a readable file's first bytes
        would let them guess its content (a target replaced by a link to
        such a file keeps its name, not its inode)."""
        if not os.path.isabs(path):
            raise errors.InvalidInput(f"path {shown(path)!r} is not absolute; pass a full path")
        real = os.path.realpath(path)
        named = [r for r in self._records.values()
                 if path == r.request.target_path or real == r.real_target]
        if not named:
            raise errors.InvalidInput(
                f"path {shown(path)} is not the target of a transfer on this transferd; "
                "Checksum hashes only such targets (ids and targets do not survive a "
                "restart): pass the target_path of a transfer, or hash a source with "
                "source_uri"
            )
        written = {r.target_inode: r.id for r in named if r.target_inode is not None}
        if not written:
            raise errors.FailedPrecondition(
                f"path {path} is the target of transfer {', '.join(r.id for r in named)}, "
                "which has not written it; Checksum hashes a target once its transfer ran"
            )
        return written

    async def shutdown(self) -> None:
        """Stops every transfer keeping its target and journal, so the same
        transfer started again (on a transferd started again) resumes: a
        restart must not lose the copies under way."""
        self._stopping = True
        for under_way in list(self._starting.values()):
            await under_way.wait()
        running = [r for r in self._records.values() if not r.done.is_set()]
        if running:
            log.info("transferd stopping %d transfer(s): what they wrote stays, with its "
                     "journal, so the same transfers started again resume", len(running))
        for rec in running:
            self._cancel(rec, suspend=True)
        for rec in running:
            await rec.done.wait()

    def close(self) -> None:
        """Once nothing is served any more: lets the checksum threads go."""
        self._hashing.shutdown(wait=False, cancel_futures=True)


def _differences(a: Message, b: Message, prefix: str = "") -> list[str]:
    """The fields (dotted) whose values differ between two messages; an
    unset message field equals one set to its defaults."""
    out: list[str] = []
    for f in a.DESCRIPTOR.fields:
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.type == f.TYPE_MESSAGE and not f.is_repeated:
            out += _differences(x, y, f"{prefix}{f.name}.")
        elif x != y:
            out.append(prefix + f.name)
    return out


def _busy_keys(path: str) -> list[str]:
    """What makes two names one target (./, //, a symbolic link, a hard
    link): the real path and, once the file exists, its inode."""
    keys = [os.path.realpath(path)]
    with contextlib.suppress(OSError):
        st = os.stat(path)
        keys.append(_inode_key(st.st_dev, st.st_ino))
    return keys


def _inode_key(dev: int, ino: int) -> str:
    return f"inode {dev}:{ino}"


def _check_written(path: str, st: os.stat_result,
                   written: dict[tuple[int, int], str]) -> None:
    if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise errors.InvalidInput(
            f"{path} is neither a regular file nor a block device (it was replaced since "
            f"transfer {', '.join(written.values())} wrote it); Checksum hashes only files "
            "transfers wrote"
        )
    if (st.st_dev, st.st_ino) not in written:
        raise errors.InvalidInput(
            f"path {path} is no longer the file transfer {', '.join(written.values())} wrote "
            "(it was replaced, or is a link to another file, since); Checksum hashes only "
            "files transfers wrote"
        )


def _target_checksum(path: str, size: int,
                     written: dict[tuple[int, int], str]) -> checksum.Checksum:
    """The checksum of a target (its first `size` bytes, all of it when 0),
    if it is still a file in `written`: checked before it is opened (nothing
    else is opened, not even a FIFO) and again on what was opened, which is
    then hashed through its descriptor, so a swap of the name meanwhile
    changes nothing."""
    try:
        _check_written(path, os.stat(path), written)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise errors.NotFound(
            f"{path} does not exist (it was removed since transfer "
            f"{', '.join(written.values())} wrote it); pass an existing target"
        ) from None
    except OSError as e:
        raise errors.FailedPrecondition(f"cannot open {path}: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        _check_written(path, st, written)
        have = device_size(fd) if stat.S_ISBLK(st.st_mode) else st.st_size
        if size > have:
            raise errors.InvalidInput(f"size {size} is beyond the end of {path} ({have} bytes)")
        return checksum.path_checksum(f"/proc/self/fd/{fd}", size or have)
    finally:
        os.close(fd)
