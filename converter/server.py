"""The converter's gRPC server (`ferry serve converter`)."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc

from converter.service import STOP_GRACE_SECONDS, ConverterService, stop_all_workers
from ferry.rpc import start_server
from ferry.v1 import converter_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = "ferry.v1.ConverterService"


async def start(listen: str) -> tuple[grpc.aio.Server, int]:
    """Starts the server on `listen` (host:port or unix:/path); returns it
    and the bound port (meaningless for a unix socket)."""
    def register(server: grpc.aio.Server) -> None:
        converter_pb2_grpc.add_ConverterServiceServicer_to_server(ConverterService(), server)

    return await start_server(listen, register, [SERVICE_NAME])


async def _serve(listen: str) -> None:
    server, port = await start(listen)
    unix = listen.startswith("unix:")
    log.info("converter listening on %s", listen if unix else f"{listen} (port {port})")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("converter stopping: cancelling running conversions")
    # Workers are stopped before the server: a conversion cut short must not
    # leave a worker or a qemu appliance running after this process exits.
    await asyncio.to_thread(stop_all_workers)
    await server.stop(STOP_GRACE_SECONDS)  # time to tell the callers why


def serve(listen: str) -> None:
    """Runs the converter until SIGTERM or SIGINT."""
    asyncio.run(_serve(listen))
