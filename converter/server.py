"""The converter's gRPC server (`ferry serve converter`)."""

from __future__ import annotations

import asyncio
import logging

import grpc

from converter.service import ConverterService
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
    await server.wait_for_termination()


def serve(listen: str) -> None:
    """Runs the converter until interrupted."""
    asyncio.run(_serve(listen))
