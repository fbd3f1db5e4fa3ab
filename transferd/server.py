"""transferd's process: the gRPC TransferService, health, and /metrics, on
one uvloop event loop."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import grpc
import uvloop

from ferry import errors
from ferry.rpc import start_server
from ferry.v1 import transfer_pb2_grpc as pb_grpc
from transferd.metrics import TransferMetrics
from transferd.service import DEFAULT_MAX_TRANSFERS, TransferService

log = logging.getLogger(__name__)

SERVICE_NAME = "ferry.v1.TransferService"


@dataclass
class RunningServer:
    grpc_server: grpc.aio.Server
    port: int
    service: TransferService
    metrics_server: WSGIServer | None
    metrics_port: int

    async def stop(self) -> None:
        """Stops running transfers keeping their targets and journals (a
        restart resumes them), then stops serving."""
        await self.service.shutdown()
        await self.grpc_server.stop(grace=1.0)
        self.service.close()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()


async def start(listen: str, metrics_listen: str = "",
                max_transfers: int = DEFAULT_MAX_TRANSFERS) -> RunningServer:
    """Starts serving on `listen` (host:port or unix:/path) and, unless empty,
    /metrics on `metrics_listen` (host:port). Port 0 picks a free port. At
    most `max_transfers` transfers copy at once; later ones wait as PENDING."""
    metrics = TransferMetrics()
    metrics_server, metrics_port = (
        metrics.serve(metrics_listen) if metrics_listen else (None, 0)
    )
    service = TransferService(metrics, max_transfers)
    try:
        server, port = await start_server(
            listen,
            lambda s: pb_grpc.add_TransferServiceServicer_to_server(service, s),
            [SERVICE_NAME],
        )
    except BaseException:
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
        raise
    # Port 0 picks a free port: the log says which one was bound.
    shown = listen if listen.startswith("unix:") else f"{listen.rpartition(':')[0]}:{port}"
    metrics_shown = (f"http://{metrics_listen.rpartition(':')[0]}:{metrics_port}/metrics"
                     if metrics_server is not None else "off")
    log.info("transferd listening on %s (metrics: %s)", shown, metrics_shown)
    return RunningServer(server, port, service, metrics_server, metrics_port)


def _max_transfers() -> int:
    value = os.environ.get("FERRY_TRANSFERD_MAX_TRANSFERS", "")
    if not value:
        return DEFAULT_MAX_TRANSFERS
    if not (value.isascii() and value.isdigit()) or int(value) < 1:
        raise errors.InvalidInput(
            f"FERRY_TRANSFERD_MAX_TRANSFERS={value!r} is not a positive number; pass e.g. 8"
        )
    return int(value)


async def _serve(listen: str, metrics_listen: str) -> None:
    running = await start(listen, metrics_listen, _max_transfers())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("transferd stopping")
    await running.stop()


def serve(listen: str, metrics_listen: str) -> None:
    """Runs transferd until SIGINT or SIGTERM."""
    uvloop.run(_serve(listen, metrics_listen))
