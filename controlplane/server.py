"""`ferry serve controlplane`: the ControlPlane gRPC server. On start-up it
marks migrations cut off by a previous stop as FAILED; on SIGTERM / SIGINT it
stops running migrations cleanly before exiting."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

import grpc

from controlplane.migration import Services
from controlplane.service import SERVICE_NAME, ControlPlaneService
from controlplane.store import Store
from ferry.rpc import start_server
from ferry.v1 import controlplane_pb2_grpc

log = logging.getLogger(__name__)


@dataclass
class RunningControlPlane:
    server: grpc.aio.Server
    port: int
    service: ControlPlaneService
    store: Store
    services: Services

    async def stop(self) -> None:
        """Ends running migrations (recorded as FAILED with the phase), then
        stops serving."""
        await self.service.shutdown()
        await self.server.stop(5)
        await self.services.close()
        self.store.close()


async def start(
    listen: str, state_dir: str, transferd_addr: str, converter_addr: str
) -> RunningControlPlane:
    """Starts serving on `listen` (host:port, port 0 picks one, or unix:/path)."""
    store = Store(state_dir)
    for migration in store.fail_interrupted():
        log.warning("migration %s: %s", migration.id, migration.error,
                    extra={"plan": migration.plan_id})
    services = Services(transferd_addr, converter_addr)
    service = ControlPlaneService(store, services, state_dir)
    try:
        server, port = await start_server(
            listen,
            lambda s: controlplane_pb2_grpc.add_ControlPlaneServicer_to_server(service, s),
            [SERVICE_NAME],
        )
    except BaseException:
        await services.close()
        store.close()
        raise
    log.info("control plane serving (state in %s)", store.path)
    return RunningControlPlane(server, port, service, store, services)


def serve(listen: str, state_dir: str, transferd_addr: str, converter_addr: str) -> None:
    """Blocks until SIGTERM or SIGINT."""
    asyncio.run(_serve(listen, state_dir, transferd_addr, converter_addr))


async def _serve(listen: str, state_dir: str, transferd_addr: str, converter_addr: str) -> None:
    running = await start(listen, state_dir, transferd_addr, converter_addr)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("control plane stopping")
    await running.stop()
