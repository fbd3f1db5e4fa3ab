"""A block hash of a disk, the same whether computed over NBD (the source) or
from a file or block device (the target), so the two can be compared.

The disk is cut into fixed blocks; each block's blake2b-256 digest is taken
(a precomputed one for a block known to be zero, so holes are never read),
and the checksum is the blake2b-256 of the disk size followed by every block
digest in order. Blocks are hashed in threads (hashlib releases the GIL on
large buffers) while the next ones are read.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from transferd import extents
from transferd.endpoints import Source

BLOCK_SIZE = 4 << 20
ALGORITHM = "blake2b-256-blocks"
HASH_THREADS = 4
BLOCKS_IN_FLIGHT = 8
HASH_BATCH = 64
STATUS_WINDOW = 1 << 30


def _digest(data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=32).digest()


@functools.cache
def zero_digest(length: int) -> bytes:
    """The digest of `length` zero bytes (computed once per length)."""
    return _digest(bytes(length))


@dataclass(frozen=True)
class Checksum:
    algorithm: str
    block_size: int
    size: int
    digest: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.digest}"


def combine(size: int, digests: list[bytes]) -> Checksum:
    h = hashlib.blake2b(size.to_bytes(8, "little"), digest_size=32)
    h.update(b"".join(digests))
    return Checksum(ALGORITHM, BLOCK_SIZE, size, h.hexdigest())


def zero_digests(size: int) -> list[bytes]:
    """The digests of a disk of `size` zero bytes, the start of every
    checksum: data blocks then replace theirs."""
    full, rest = divmod(size, BLOCK_SIZE)
    return [zero_digest(BLOCK_SIZE)] * full + ([zero_digest(rest)] if rest else [])


def block_range(offset: int, length: int) -> range:
    """Indices of the blocks that [offset, offset + length) touches."""
    return range(offset // BLOCK_SIZE, -(-(offset + length) // BLOCK_SIZE))


def block_at(index: int, size: int) -> tuple[int, int]:
    offset = index * BLOCK_SIZE
    return offset, min(BLOCK_SIZE, size - offset)


async def source_checksum(source: Source, request_size: int,
                          on_block: Callable[[int], None] | None = None) -> Checksum:
    """Reads the blocks of `source` that hold data (per block status; the
    others are zero and never read) in `request_size` pieces."""
    size = source.size
    digests = zero_digests(size)
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(BLOCKS_IN_FLIGHT)
    with ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="transferd-hash") as pool:

        async def hash_block(index: int) -> None:
            offset, length = block_at(index, size)
            try:
                buf = bytearray(length)
                view = memoryview(buf)
                await asyncio.gather(*(
                    source.read_into(o, view[o - offset:o - offset + n])
                    for o, n in extents.split(offset, length, request_size)
                ))
                digests[index] = await loop.run_in_executor(pool, _digest, view)
                if on_block is not None:
                    on_block(length)
            finally:
                slots.release()

        next_block = 0  # blocks before this one are scheduled or known zero

        def zero_until(index: int) -> None:
            """Blocks from next_block up to `index` hold no data."""
            nonlocal next_block
            if index > next_block:
                if on_block is not None:
                    on_block(min(index * BLOCK_SIZE, size) - next_block * BLOCK_SIZE)
                next_block = index

        async with asyncio.TaskGroup() as tg:
            described = 0
            while described < size:
                window = await source.extents(described, min(STATUS_WINDOW, size - described))
                for e in window:
                    if e.kind is not extents.Kind.DATA:
                        continue
                    for index in block_range(e.offset, e.length):
                        if index >= next_block:
                            zero_until(index)
                            next_block = index + 1
                            await slots.acquire()
                            tg.create_task(hash_block(index))
                described = window[-1].end
                zero_until(described // BLOCK_SIZE)
            zero_until(len(digests))
    return combine(size, digests)


def _data_ranges(fd: int, size: int, is_file: bool) -> list[tuple[int, int]]:
    """Where a file holds data (SEEK_DATA / SEEK_HOLE); everything for a
    block device or a filesystem that cannot tell."""
    if not is_file:
        return [(0, size)] if size else []
    out: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == 6:  # ENXIO: nothing but a hole is left
                    break
                raise
            if start >= size:
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            out.append((start, end - start))
            pos = end
    except OSError:
        return [(0, size)] if size else []
    return out


def path_checksum(path: str, size: int,
                  on_block: Callable[[int], None] | None = None) -> Checksum:
    """The checksum of the first `size` bytes of a file or block device;
    holes of a file are never read. Blocking: run it off the event loop.
    `on_block(n)` is called, from hashing threads, as blocks are done."""
    digests = zero_digests(size)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        is_file = stat.S_ISREG(os.fstat(fd).st_mode)
        wanted: list[int] = []
        for o, n in _data_ranges(fd, size, is_file):
            wanted += [i for i in block_range(o, n) if not wanted or i > wanted[-1]]
        if on_block is not None:
            on_block(size - sum(block_at(i, size)[1] for i in wanted))

        def hash_block(index: int) -> None:
            offset, length = block_at(index, size)
            buf = bytearray(length)
            view = memoryview(buf)
            got = 0
            while got < length:
                n = os.preadv(fd, [view[got:]], offset + got)
                if n <= 0:
                    break  # a file shorter than `size` reads as zeros past its end
                got += n
            digests[index] = _digest(view)
            if on_block is not None:
                on_block(length)

        with ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="transferd-hash") as pool:
            # In batches, so a huge disk never has a future per block at once.
            for start in range(0, len(wanted), HASH_BATCH):
                list(pool.map(hash_block, wanted[start:start + HASH_BATCH]))
    finally:
        os.close(fd)
    return combine(size, digests)
