"""Stopping conversions: SIGTERM to `ferry serve converter` and a client
cancelling its Convert both stop the worker process and its qemu
appliance, so nothing keeps converting (or running) afterwards.

Processes are found through the pid tree under the server, never by name
patterns; each is remembered with its start time so a reused pid is not
mistaken for a survivor."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from converter.server import start
from ferry.v1 import converter_pb2, converter_pb2_grpc
from tests.converter.conftest import make_disk

WAIT_FOR_QEMU = 600.0  # the appliance build and qemu start on a busy machine
GONE_WITHIN = 20.0  # SIGTERM, a 5 s grace, SIGKILL; a launch alone takes 30-60 s here

Proc = tuple[int, str]  # pid, start time (field 22 of /proc/PID/stat)


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm_end = text.rindex(")")
    return [text[text.index("(") + 1:comm_end], *text[comm_end + 2:].split()]


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            tree.setdefault(int(st[2]), []).append(int(entry))
    return tree


def _descendants(pid: int) -> dict[Proc, str]:
    """Every process below `pid`: (pid, start time) -> command name."""
    tree, out, todo = _children(), {}, [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            st = _stat(child)
            if st is not None:
                out[(child, st[20])] = st[0]
                todo.append(child)
    return out


def _alive(p: Proc) -> bool:
    st = _stat(p[0])
    return st is not None and st[20] == p[1] and st[1] != "Z"


def _wait_for_qemu(root: int) -> dict[Proc, str]:
    deadline = time.monotonic() + WAIT_FOR_QEMU
    while time.monotonic() < deadline:
        procs = _descendants(root)
        if any(name.startswith("qemu-system") for name in procs.values()):
            return procs
        time.sleep(0.5)
    raise AssertionError(f"no qemu appliance started under pid {root}")


def _worker_tree(root: int) -> dict[Proc, str]:
    """The child of `root` that runs a qemu appliance, with its descendants."""
    for child in _children().get(root, []):
        below = _descendants(child)
        st = _stat(child)
        if st is not None and any(n.startswith("qemu-system") for n in below.values()):
            return {(child, st[20]): st[0], **below}
    raise AssertionError(f"no child of pid {root} runs a qemu appliance")


def _groups(procs: dict[Proc, str]) -> set[str]:
    """Process groups of `procs` other than pytest's own (the worker's)."""
    mine = str(os.getpgrp())
    return {st[3] for p in procs if (st := _stat(p[0])) is not None and st[3] != mine}


def _survivors(procs: dict[Proc, str], groups: set[str]) -> list[str]:
    """What is still running of `procs`, or of their process groups (which
    also hold anything forked after the snapshot), once GONE_WITHIN passed."""
    deadline = time.monotonic() + GONE_WITHIN
    while True:
        left = [f"{p[0]} {n}" for p, n in procs.items() if _alive(p)]
        for entry in os.listdir("/proc"):
            st = _stat(int(entry)) if entry.isdigit() else None
            if st is not None and st[3] in groups and st[1] != "Z":
                left.append(f"{entry} {st[0]} (group {st[3]})")
        if not left or time.monotonic() > deadline:
            return sorted(set(left))
        time.sleep(0.5)


@contextlib.contextmanager
def _converter_server(sock: Path) -> Iterator[tuple[subprocess.Popen[bytes], Any]]:
    """`ferry serve converter` as a subprocess on `sock`, with a ready stub;
    killed at the end if the test left it running."""
    server = subprocess.Popen(
        [sys.executable, "-m", "ferry.cli", "serve", "converter", "--listen", f"unix:{sock}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        with grpc.insecure_channel(f"unix:{sock}") as channel:
            grpc.channel_ready_future(channel).result(timeout=120)
            yield server, converter_pb2_grpc.ConverterServiceStub(channel)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_disk(tmp_path_factory.mktemp("stop") / "stop.raw",
                     {"/data/readme.txt": "no OS here\n"})


def test_sigterm_stops_the_server_its_worker_and_the_appliance(disk: Path, tmp_path: Path):
    sock = tmp_path / "c.sock"
    groups: set[str] = set()
    left: list[str] | None = None
    try:
        with _converter_server(sock) as (server, stub):
            outcome: list[grpc.RpcError] = []

            def call() -> None:
                try:
                    list(stub.Convert(
                        converter_pb2.ConvertRequest(disk_paths=[str(disk)], vm="vm1")
                    ))
                except grpc.RpcError as e:
                    outcome.append(e)

            caller = threading.Thread(target=call)
            caller.start()
            running = _wait_for_qemu(server.pid)
            groups = _groups(running)
            server.send_signal(signal.SIGTERM)
            exit_status = server.wait(timeout=GONE_WITHIN)
            left = _survivors(running, groups)
            caller.join()
    finally:
        if left is None or left:  # the test failed: leave nothing running
            for pgid in groups:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(int(pgid), signal.SIGKILL)
    assert groups
    assert left == []
    assert exit_status == 0
    err = outcome[0]
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert err.details() == (
        "VM vm1: the converter was shut down during the convert; the target copy may be "
        "partially converted: copy the source disks again and retry")


def test_cancelled_convert_stops_its_worker_and_appliance(disk: Path, tmp_path: Path):
    async def cancel_mid_launch() -> tuple[list[str], grpc.StatusCode]:
        sock = f"unix:{tmp_path / 'c.sock'}"
        server, _ = await start(sock)
        try:
            async with grpc.aio.insecure_channel(sock) as ch:
                stub = converter_pb2_grpc.ConverterServiceStub(ch)
                call = stub.Convert(converter_pb2.ConvertRequest(disk_paths=[str(disk)], vm="vm1"))
                await asyncio.to_thread(_wait_for_qemu, os.getpid())
                # Only the worker's own tree: the resource tracker lives on with pytest.
                mine = _worker_tree(os.getpid())
                groups = _groups(mine)
                assert groups
                call.cancel()
                code = await call.code()
                survivors = await asyncio.to_thread(_survivors, mine, groups)
                return survivors, code
        finally:
            await server.stop(None)

    survivors, code = asyncio.run(cancel_mid_launch())
    assert code == grpc.StatusCode.CANCELLED
    assert survivors == []


def test_a_killed_server_takes_its_worker_and_appliance_with_it(disk: Path, tmp_path: Path):
    """SIGKILL leaves the server no chance to stop its worker, which must not
    go on converting a disk nobody waits for: the kernel's parent-death signal
    stops it, and at the latest its next event finds the pipe broken."""
    sock = tmp_path / "k.sock"
    groups: set[str] = set()
    left: list[str] | None = None
    try:
        with _converter_server(sock) as (server, stub):
            calls = stub.Convert(converter_pb2.ConvertRequest(disk_paths=[str(disk)], vm="vm1"))
            running = _wait_for_qemu(server.pid)
            groups = _groups(running)
            server.kill()
            server.wait()
            # Either way the worker acts only once the appliance launch returns
            # (up to a minute here); then it closes the handle.
            deadline = time.monotonic() + 150
            while (left := _survivors(running, groups)) and time.monotonic() < deadline:
                pass
            calls.cancel()
    finally:
        if left is None or left:  # the test failed: leave nothing running
            for pgid in groups:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(int(pgid), signal.SIGKILL)
    assert groups
    assert left == []
