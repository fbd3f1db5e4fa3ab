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
import stat
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from ferry import errors
from ferry.errors import shown
from ferry.logs import ContextLogger, context_logger
from ferry.rpc import check_strings
from ferry.v1 import transfer_pb2 as pb
from ferry.v1 import transfer_pb2_grpc as pb_grpc
from transferd import checksum, engine
from transferd.job import Job, Spec, check_spec, first_error, tuning_from
from transferd.metrics import TransferMetrics
from transferd.sources.nbd import NbdSource
from transferd.targets.block import device_size

log = logging.getLogger(__name__)
T = TypeVar("T")

State = pb.TransferState
FINAL = (State.TRANSFER_STATE_SUCCEEDED, State.TRANSFER_STATE_FAILED,
         State.TRANSFER_STATE_CANCELLED)
MAX_ID_LENGTH = 128
DEFAULT_MAX_TRANSFERS = 8
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
    id: str
    request: pb.StartTransferRequest
    job: Job
    log: ContextLogger
    progress: engine.Progress
    state: int = State.TRANSFER_STATE_PENDING
    error: str = ""
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    task: asyncio.Task[None] | None = None
    cancelling: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def to_proto(self) -> pb.Transfer:
        p = self.progress
        tuning = self.job.spec.tuning
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
                connections=self.job.connections,
                verify=self.job.spec.verify,
                direct=self.job.spec.direct,
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
            checksum=str(self.job.checksum) if self.job.checksum else "",
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
        self._busy_targets: dict[str, str] = {}
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
        rec = self._records.get(transfer_id)
        if rec is None:
            return None
        if (rec.request.source_uri, rec.request.target_path) != (req.source_uri,
                                                                 req.target_path):
            raise errors.AlreadyExists(
                f"transfer {transfer_id!r} already exists with source "
                f"{rec.request.source_uri} and target {rec.request.target_path}; "
                "use another transfer_id"
            )
        return rec

    # -- RPCs -------------------------------------------------------------------

    async def StartTransfer(
        self, request: pb.StartTransferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Transfer:
        check_strings(request)
        transfer_id = request.transfer_id or uuid.uuid4().hex
        if len(transfer_id) > MAX_ID_LENGTH:
            raise errors.InvalidInput(
                f"transfer_id is {len(transfer_id)} characters; use at most {MAX_ID_LENGTH}"
            )
        existing = self._existing(transfer_id, request)
        if existing is not None:
            return existing.to_proto()
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
        check_spec(spec)
        path = request.target_path
        if path in self._busy_targets:
            raise errors.FailedPrecondition(
                f"target {path} is being written by transfer {self._busy_targets[path]}; "
                "wait for it or cancel it first"
            )
        self._busy_targets[path] = transfer_id
        progress = engine.Progress(on_bytes=self._metrics.count_bytes)
        try:
            job = await self._open(spec, progress)
        except BaseException:
            del self._busy_targets[path]
            raise
        opened = self._running < self._max_transfers
        if not opened:
            # A transfer that will wait holds no NBD connection and no target
            # file meanwhile: everything was checked, it opens again on its turn.
            await _to_the_end(job.abort())
            await _to_the_end(job.close())
        existing = self._existing(transfer_id, request)
        if existing is not None:  # the same start raced this one and won
            if opened:
                await job.abort()
                await job.close()
            del self._busy_targets[path]
            return existing.to_proto()
        labels = request.labels
        rec = _Record(
            id=transfer_id,
            request=request,
            job=job,
            log=context_logger(log, {"plan": labels.plan, "vm": labels.vm,
                                     "disk": labels.disk, "transfer": transfer_id}),
            progress=progress,
        )
        self._records[transfer_id] = rec
        self._metrics.transfers.labels(_state_name(rec.state)).inc()
        admitted = self._running < self._max_transfers
        if admitted:
            self._running += 1
            self._set_state(rec, State.TRANSFER_STATE_RUNNING)
        tuning = spec.tuning
        rec.log.info(
            "transfer started: %s -> %s, %d bytes (%d to copy, %d done by an earlier run), "
            "request size %d, %d requests in flight, %d connection(s)",
            request.source_uri, path, progress.size, progress.planned, progress.resumed,
            tuning.request_size, tuning.max_requests, job.connections,
        )
        rec.task = asyncio.create_task(self._run(rec, admitted, opened))
        return rec.to_proto()

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

    async def _run(self, rec: _Record, admitted: bool, opened: bool) -> None:
        """Runs the transfer to its final state; `opened` says whether its
        job still holds the source and the target (a job that was to wait
        was closed and is opened again here)."""
        job = rec.job
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
                if not opened:
                    rec.job = job = await self._open(job.spec, rec.progress)
                    opened = True
                await job.run()
                state = State.TRANSFER_STATE_SUCCEEDED
            except asyncio.CancelledError:
                note = await _to_the_end(job.abort()) if opened else "nothing was written"
                rec.error = f"cancelled by the operator; {note}"
                state = State.TRANSFER_STATE_CANCELLED
            except Exception as group:  # every failure ends the transfer
                e = first_error(group)
                note = await _to_the_end(job.abort()) if opened else "nothing was written"
                if isinstance(e, errors.FerryError | OSError):
                    rec.error = f"{errors.said(e)}; {note}"
                else:
                    rec.log.error("transfer failed on an unexpected error", exc_info=e)
                    rec.error = f"internal error in transferd: {e!r}; {note}"
        finally:
            try:
                # Closed before the final state shows, so a watcher that sees
                # it can reuse the source and the target at once.
                if opened:
                    await _to_the_end(job.close())
            finally:
                self._busy_targets.pop(rec.request.target_path, None)
                self._finish(rec, state)
                if admitted:
                    self._leave()
                rec.done.set()

    def _cancel(self, rec: _Record) -> None:
        """Cancels the transfer's task once: a second cancel landing while
        the first one cleans up would cut the cleanup short."""
        if rec.task is not None and not rec.cancelling:
            rec.cancelling = True
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
            self._check_known_target(request.path)
            result = await asyncio.get_running_loop().run_in_executor(
                None, _path_checksum, request.path, request.size)
        return pb.ChecksumResponse(algorithm=result.algorithm, block_size=result.block_size,
                                   size=result.size, digest=result.digest)

    def _check_known_target(self, path: str) -> None:
        """Checksum hashes only targets of transfers this daemon knows:
        transferd may read files its callers may not, and the hash of any
        readable file's first bytes would let them guess its content."""
        real = os.path.realpath(path)
        for rec in self._records.values():
            target = rec.request.target_path
            if path == target or real == os.path.realpath(target):
                return
        raise errors.InvalidInput(
            f"path {shown(path)} is not the target of a transfer on this transferd; "
            "Checksum hashes only such targets (ids and targets do not survive a "
            "restart): pass the target_path of a transfer, or hash a source with source_uri"
        )

    async def shutdown(self) -> None:
        """Cancels running transfers so targets they created are removed."""
        running = [r for r in self._records.values() if not r.done.is_set()]
        for rec in running:
            self._cancel(rec)
        for rec in running:
            await rec.done.wait()


async def _to_the_end(work: Coroutine[Any, Any, T]) -> T:
    """Runs a transfer's cleanup to its end even if the task is cancelled
    meanwhile: the task is ending anyway, and a cleanup cut short would
    leave the target, the journal and the transfer's state behind."""
    task = asyncio.ensure_future(work)
    while True:
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                raise


def _path_checksum(path: str, size: int) -> checksum.Checksum:
    """The checksum of an existing file or block device (its first `size`
    bytes, all of it when 0)."""
    if not os.path.isabs(path):
        raise errors.InvalidInput(f"path {path!r} is not absolute; pass a full path")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise errors.NotFound(f"{path} does not exist; pass an existing file or block "
                              "device") from None
    except OSError as e:
        raise errors.FailedPrecondition(f"cannot open {path}: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        have = device_size(fd) if stat.S_ISBLK(st.st_mode) else st.st_size
    finally:
        os.close(fd)
    if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise errors.InvalidInput(f"{path} is neither a regular file nor a block device")
    if size > have:
        raise errors.InvalidInput(f"size {size} is beyond the end of {path} ({have} bytes)")
    return checksum.path_checksum(path, size or have)
