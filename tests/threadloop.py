"""Running an asyncio server (transferd, the control plane) in the test
process: on its own event loop thread, as in production, so the test talks to
it through a real gRPC channel with ordinary blocking calls."""

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Generic, Protocol, TypeVar


class Stoppable(Protocol):
    async def stop(self) -> None: ...


S = TypeVar("S", bound=Stoppable)


class Served(Generic[S]):
    """A started server and the loop thread it runs on."""

    def __init__(self, start: Callable[[], Awaitable[S]],
                 loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, daemon=True)
        self._thread.start()
        self._stopped = False

        async def started() -> S:
            return await start()

        self.server: S = asyncio.run_coroutine_threadsafe(started(), loop).result(timeout=60)

    def stop(self) -> None:
        """Stops the server (once; a test may stop it mid-job), then the loop."""
        if not self._stopped:
            self._stopped = True
            asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(timeout=120)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


@contextlib.contextmanager
def serving(
    start: Callable[[], Awaitable[S]],
    new_loop: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop,
) -> Iterator[Served[S]]:
    served = Served(start, new_loop())
    try:
        yield served
    finally:
        served.stop()
