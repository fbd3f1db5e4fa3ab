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
import traceback
from collections.abc import AsyncIterator, Iterator
from multiprocessing.connection import Connection
from typing import Any

import grpc

from converter.context import TargetNic, normalise_mac
from converter.convert import ConvertJob, Event, claim, convert, inspect_only
from ferry import errors
from ferry.logs import setup_logging
from ferry.v1 import converter_pb2, converter_pb2_grpc

log = logging.getLogger(__name__)
_spawn = multiprocessing.get_context("spawn")


def job_from_request(req: converter_pb2.ConvertRequest) -> ConvertJob:
    vm = req.vm or "?"
    nics = [
        TargetNic(mac=normalise_mac(n.mac, vm), guest_name=n.guest_name,
                  addresses=tuple(n.addresses))
        for n in req.nics
    ]
    names = [n.guest_name for n in nics if n.guest_name]
    if len(set(names)) != len(names):
        raise errors.InvalidInput(f"VM {vm}: two target NICs claim the same guest_name")
    return ConvertJob(disks=list(req.disk_paths), nics=nics, plan=req.plan, vm=req.vm)


def _events(kind: str, job: ConvertJob, conn: Connection) -> Iterator[Event]:
    if kind == "inspect":
        yield Event("inspect", "inspected", inspect_only(job.disks))
    else:
        # The parent sends "stop" when its caller went away; checked between steps.
        yield from convert(job, cancelled=conn.poll)


def _worker(kind: str, job: ConvertJob, conn: Connection, level: int) -> None:
    """Runs in the spawned process: one conversion or inspection, each
    event sent as ("event", step, message, serialized report or b"")."""
    setup_logging(logging.getLevelName(level))
    try:
        for ev in _events(kind, job, conn):
            report = ev.report.SerializeToString() if ev.report is not None else b""
            conn.send(("event", ev.step, ev.message, report))
    except errors.FerryError as e:
        conn.send(("error", type(e).__name__, str(e), b""))
    except BaseException as e:  # reported to the parent, which logs it
        conn.send(("crash", type(e).__name__, f"{e}\n{traceback.format_exc()}", b""))
    finally:
        conn.close()


async def run_in_worker(kind: str, job: ConvertJob) -> AsyncIterator[Event]:
    """Runs `kind` ("convert" or "inspect") for `job` in a worker process
    and yields its events. One job at a time per disk."""
    with claim(job.disks, job.label):
        parent, child = _spawn.Pipe()
        proc = _spawn.Process(
            target=_worker, args=(kind, job, child, logging.getLogger().level),
            name=f"ferry-{kind}", daemon=True,
        )
        proc.start()
        child.close()
        try:
            while True:
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
                    raise cls(b)
                else:
                    log.error("converter worker failed: %s: %s", a, b)
                    raise RuntimeError(b.split("\n", 1)[0])
            if proc.exitcode not in (None, 0):
                raise errors.OperationFailed(
                    f"VM {job.label}: the converter worker died (exit {proc.exitcode}); the "
                    "target copy may be partially converted: copy the source disks again"
                )
        finally:
            if proc.is_alive():
                with contextlib.suppress(OSError):  # it exited meanwhile
                    parent.send("stop")
            await asyncio.to_thread(proc.join)
            parent.close()


class ConverterService(converter_pb2_grpc.ConverterServiceServicer):  # type: ignore[misc]
    async def Convert(
        self, request: converter_pb2.ConvertRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[converter_pb2.ConvertEvent]:
        job = job_from_request(request)
        async for ev in run_in_worker("convert", job):
            yield converter_pb2.ConvertEvent(step=ev.step, message=ev.message, report=ev.report)

    async def Inspect(
        self, request: converter_pb2.InspectRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> converter_pb2.ConversionReport:
        job = ConvertJob(disks=list(request.disk_paths))
        async for ev in run_in_worker("inspect", job):
            if ev.report is not None:
                return ev.report
        raise errors.OperationFailed(f"inspection of {', '.join(job.disks)} returned no report")
