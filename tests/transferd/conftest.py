"""Real NBD servers (qemu-nbd, nbdkit) on Unix sockets, and one in-process
transferd per test module driven through its gRPC API."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import grpc
import pytest
import uvloop

from ferry.v1 import transfer_pb2 as pb
from ferry.v1 import transfer_pb2_grpc as pb_grpc
from tests.threadloop import serving
from transferd.server import RunningServer, start

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


@dataclass
class Transferd:
    stub: pb_grpc.TransferServiceStub
    metrics_url: str


@contextlib.contextmanager
def in_process_transferd(**settings: int) -> Iterator[Transferd]:
    """transferd on its own uvloop thread, as in production, reached through
    a real gRPC channel."""
    with serving(lambda: start("127.0.0.1:0", "127.0.0.1:0", **settings),
                 uvloop.new_event_loop) as served:
        running: RunningServer = served.server
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield Transferd(
                pb_grpc.TransferServiceStub(channel),
                f"http://127.0.0.1:{running.metrics_port}/metrics",
            )


@pytest.fixture(scope="module")
def transferd() -> Iterator[Transferd]:
    with in_process_transferd() as td:
        yield td


@pytest.fixture(scope="module")
def one_at_a_time() -> Iterator[Transferd]:
    """A transferd that runs one transfer at a time: the others wait, PENDING."""
    with in_process_transferd(max_transfers=1) as td:
        yield td


def _wait_until_serving(pidfile: Path, proc: subprocess.Popen[bytes]) -> None:
    """qemu-nbd and nbdkit write their pid file once they accept connections."""
    deadline = time.monotonic() + 20
    while not (pidfile.exists() and pidfile.read_text().strip()):
        if proc.poll() is not None:
            raise RuntimeError(f"NBD server exited early: {proc.args!r}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"NBD server did not start: {proc.args!r}")
        time.sleep(0.05)


def ferry_copy(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`ferry copy ARGS` as a user runs it, its output captured."""
    return subprocess.run([sys.executable, "-m", "ferry.cli", "copy", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, check=False)


def transferd_subprocess(sock: Path, err: IO[bytes] | None = None, metrics: str = ""
                         ) -> subprocess.Popen[bytes]:
    """transferd in a process of its own, as `ferry serve transferd` runs it,
    logging at INFO to `err` (by default the test's stderr); `metrics` is its
    metrics address ("" for none)."""
    return subprocess.Popen(
        [sys.executable, "-c",
         "import logging, sys; logging.basicConfig(level=logging.INFO); "
         "from transferd.server import serve; serve(sys.argv[1], sys.argv[2])",
         f"unix:{sock}", metrics],
        stderr=err,
    )


class NbdServer:
    """A read-only NBD server over `image`, stopped on exit."""

    def __init__(self, argv: list[str], sock: Path) -> None:
        self.sock = sock
        self.uri = f"nbd+unix:///?socket={sock}"
        pidfile = sock.with_suffix(".pid")
        self.proc = subprocess.Popen([*argv[:1], f"--pid-file={pidfile}", *argv[1:]],
                                     stdout=subprocess.DEVNULL)
        _wait_until_serving(pidfile, self.proc)

    @classmethod
    def qemu(cls, image: Path, sock: Path) -> NbdServer:
        return cls(["qemu-nbd", "--read-only", "--persistent", "--shared=8",
                    "--format=raw", f"--socket={sock}", str(image)], sock)

    @classmethod
    def nbdkit(cls, image: Path, sock: Path, *filters: str, params: tuple[str, ...] = ()
               ) -> NbdServer:
        argv = ["nbdkit", "--foreground", "--readonly", "--exit-with-parent",
                f"--unix={sock}"]
        argv += [f"--filter={f}" for f in filters]
        return cls([*argv, "file", str(image), *params], sock)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def __enter__(self) -> NbdServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def data_bytes(uri: str) -> int:
    """Bytes the server reports as data (not zero) in base:allocation."""
    out = subprocess.run(["nbdinfo", "--map", "--json", uri], check=True,
                         capture_output=True, text=True).stdout
    return sum(e["length"] for e in json.loads(out) if not e["type"] & 2)


def sparse_hash(path: Path) -> str:
    """sha256 of the size and of every non-zero 64 KiB block with its index.
    Holes (SEEK_HOLE) are never read and zero blocks add nothing, so two files
    hash alike exactly when their contents are equal, however they are
    allocated."""
    block = 64 * KiB
    zeros = bytes(block)
    size = path.stat().st_size
    h = hashlib.sha256(size.to_bytes(8, "little"))
    done = 0  # blocks before this index are hashed
    with path.open("rb") as f:
        fd = f.fileno()
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            for index in range(max(done, data // block), -(-hole // block)):
                chunk = os.pread(fd, block, index * block)
                if chunk != zeros[: len(chunk)]:
                    h.update(index.to_bytes(8, "little") + chunk)
                done = index + 1
            pos = hole
    return h.hexdigest()


def wait_final(stub: pb_grpc.TransferServiceStub, transfer_id: str) -> pb.Transfer:
    """Follows WatchTransfer to its end; returns the last message."""
    stream = list(stub.WatchTransfer(pb.WatchTransferRequest(transfer_id=transfer_id,
                                                             interval_ms=100), timeout=120))
    last: pb.Transfer = stream[-1]
    return last


def details(err: grpc.RpcError) -> str:
    """The status message of a failed call ("" when there is none)."""
    return str(err.details() or "")


def changing_source(sock: Path, size: int) -> NbdServer:
    """An nbdkit server whose data changes after the first read of each
    offset ('a' bytes, then 'b' bytes): a source modified under the copy,
    the fault that verification is there to catch."""
    script = ('if [ -e "$tmpdir/r$4" ]; then head -c "$3" /dev/zero | tr "\\0" b; '
              'else touch "$tmpdir/r$4"; head -c "$3" /dev/zero | tr "\\0" a; fi')
    argv = ["nbdkit", "--foreground", "--readonly", "--exit-with-parent", f"--unix={sock}",
            "eval", f"get_size=echo {size}", f"pread={script}"]
    return NbdServer(argv, sock)


def logged_reads(logfile: Path) -> list[tuple[int, int]]:
    """(offset, count) of every read nbdkit's log filter saw."""
    pattern = re.compile(r" Read id=\d+ offset=0x([0-9a-f]+) count=0x([0-9a-f]+) ")
    return [(int(m[1], 16), int(m[2], 16))
            for m in map(pattern.search, logfile.read_text().splitlines()) if m]
