"""Read buffers shared by the transfers of one daemon stay within their
limit, are reused, and a buffer that may still be written into is never
handed out again."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import uvloop

from transferd.engine import Buffers


def run(coro: Coroutine[Any, Any, None]) -> None:
    uvloop.run(coro)


def test_buffers_are_reused_and_bounded():
    async def scenario() -> None:
        pool = Buffers(4096)
        a = await pool.get(2048)
        b = await pool.get(2048)
        waiter = asyncio.create_task(pool.get(2048))
        await asyncio.sleep(0)
        assert not waiter.done()  # the limit is reached
        await pool.put(a)
        assert await waiter is a  # reused, not allocated
        assert pool.held == 4096
        await pool.discard(b)
        assert pool.held == 2048
        c = await pool.get(2048)
        assert c is not b
    run(scenario())


def test_kept_buffers_of_another_size_make_room():
    async def scenario() -> None:
        pool = Buffers(4096)
        small = [await pool.get(1024) for _ in range(4)]
        for buf in small:
            await pool.put(buf)
        big = await pool.get(4096)
        assert len(big) == 4096
        assert pool.held == 4096
    run(scenario())
