"""ConverterService: the gRPC face of convert.py.

libguestfs blocks and forks qemu; grpc's fork handlers make fork() from a
process running a grpc server abort the child (supermin dies of SIGABRT).
So each request runs in a spawned worker process that never imports grpc,
and a thread of this process waits on its pipe, keeping the event loop free."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import traceback
from collections.abc import AsyncGenerator, AsyncIterator
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

import grpc

from converter.convert import ConvertJob, Event, claim, convert, inspect_only
from converter.request import inspect_job, job_from_request
from ferry import errors
from ferry.logs import setup_logging
from ferry.process import die_with_parent
from ferry.v1 import converter_pb2, converter_pb2_grpc

log = logging.getLogger(__name__)
_spawn = multiprocessing.get_context("spawn")
STOP_GRACE_SECONDS = 5.0  # a stopped worker's time to close its appliance before SIGKILL
_live: set[BaseProcess] = set()  # running workers, for stop_all_workers
_shut_down: set[BaseProcess] = set()  # workers stop_all_workers stopped


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise errors.Cancelled("the converter worker was told to stop")


def _worker(kind: str, job: ConvertJob, conn: Connection, level: int, parent: int) -> None:
    """Runs in the spawned process: one conversion or inspection, each
    event sent as ("event", step, message, serialized report or b"").

    It leads its own process group, which the appliance's qemu joins, so
    the parent can stop both with one signal; SIGTERM raises Cancelled,
    so the handle is closed on the way out. If the parent dies without
    stopping it, the kernel sends that SIGTERM."""
    os.setpgid(0, 0)
    signal.signal(signal.SIGTERM, _on_sigterm)
    die_with_parent(parent)
    setup_logging(logging.getLevelName(level))
    try:
        events = (
            iter([Event("inspect", "inspected", inspect_only(job.disks))])
            if kind == "inspect" else convert(job)
        )
        for ev in events:
            report = ev.report.SerializeToString() if ev.report is not None else b""
            conn.send(("event", ev.step, ev.message, report))
    except errors.FerryError as e:
        conn.send(("error", type(e).__name__, str(e), b""))
    except BaseException as e:  # reported to the parent, which logs it
        conn.send(("crash", type(e).__name__, f"{e}\n{traceback.format_exc()}", b""))
    finally:
        conn.close()


def _signal_worker(proc: BaseProcess, sig: int) -> None:
    """Signals the worker's process group (the worker, its appliance and
    libguestfs's recovery process), or the worker alone if it has not yet
    made its group (then it has started nothing)."""
    pid = proc.pid
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def stop_worker(proc: BaseProcess, grace: float = STOP_GRACE_SECONDS) -> None:
    """Stops a worker: SIGTERM to its group, then SIGKILL to the group
    after `grace` seconds. Blocks until it is reaped."""
    if proc.exitcode is None:
        _signal_worker(proc, signal.SIGTERM)
        proc.join(grace)
    if proc.exitcode is None:
        _signal_worker(proc, signal.SIGKILL)
        proc.join()


def stop_all_workers(grace: float = STOP_GRACE_SECONDS) -> None:
    """Stops every running worker (server shutdown)."""
    procs = list(_live)
    _shut_down.update(procs)
    threads = [threading.Thread(target=stop_worker, args=(p, grace)) for p in procs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


async def run_in_worker(kind: str, job: ConvertJob) -> AsyncGenerator[Event, None]:
    """Runs `kind` ("convert" or "inspect") for `job` in a worker process
    and yields its events. One job at a time per disk. When the caller
    goes away (the RPC was cancelled) the worker is stopped at once: the
    control plane deletes the disk right after cancelling."""
    with claim(job.disks, job.label):
        parent, child = _spawn.Pipe()
        proc = _spawn.Process(
            target=_worker, args=(kind, job, child, logging.getLogger().level, os.getpid()),
            name=f"ferry-{kind}", daemon=True,
        )
        proc.start()
        _live.add(proc)
        child.close()
        failure: Exception | None = None
        try:
            while failure is None:
                try:
                    msg: tuple[str, str, str, bytes] = await asyncio.to_thread(parent.recv)
                except EOFError:
                    break
                what, a, b, data = msg
                if what == "event":
                    report = converter_pb2.ConversionReport.FromString(data) if data else None
                    yield Event(a, b, report)
                elif what == "error":
                    cls: Any = getattr(errors, a, errors.OperationFailed)
                    failure = cls(b)
                else:
                    log.error("converter worker failed: %s: %s", a, b)
                    failure = RuntimeError(b.split("\n", 1)[0])
            # It is exiting on its own: it sent its last message.
            await asyncio.to_thread(proc.join)
            if proc in _shut_down:
                raise errors.Unavailable(
                    f"VM {job.label}: the converter was shut down during the {kind}; the "
                    "target copy may be partially converted: copy the source disks again "
                    "and retry"
                )
            if failure is not None:
                raise failure
            if proc.exitcode != 0:
                raise errors.OperationFailed(
                    f"VM {job.label}: the converter worker died (exit {proc.exitcode}); the "
                    "target copy may be partially converted: copy the source disks again"
                )
        finally:
            if proc.exitcode is None:
                # Runs in a thread so a second cancellation cannot skip it.
                await asyncio.to_thread(stop_worker, proc)
            _live.discard(proc)
            _shut_down.discard(proc)
            parent.close()


class ConverterService(converter_pb2_grpc.ConverterServiceServicer):  # type: ignore[misc]
    async def Convert(
        self, request: converter_pb2.ConvertRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[converter_pb2.ConvertEvent]:
        job = job_from_request(request)
        async with contextlib.aclosing(run_in_worker("convert", job)) as events:
            async for ev in events:
                yield converter_pb2.ConvertEvent(step=ev.step, message=ev.message,
                                                 report=ev.report)

    async def Inspect(
        self, request: converter_pb2.InspectRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> converter_pb2.ConversionReport:
        job = inspect_job(request)
        report = None
        # Read to the end, so the worker exits on its own rather than being stopped.
        async with contextlib.aclosing(run_in_worker("inspect", job)) as events:
            async for ev in events:
                if ev.report is not None:
                    report = ev.report
        if report is not None:
            return report
        raise errors.OperationFailed(f"inspection of {', '.join(job.disks)} returned no report")
