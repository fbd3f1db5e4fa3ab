"""Transient source failures: error replies are retried, a lost connection
is reopened, and the copy ends complete and correct; errors that persist end
in a clear failure (see test_service and test_copy)."""

from __future__ import annotations

import os
import time
import urllib.request
from pathlib import Path

import pytest

from ferry.v1 import transfer_pb2 as pb
from tests.transferd.conftest import MiB, NbdServer, Transferd, wait_final

S = pb.TransferState
SIZE = 16 * MiB


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("src") / "disk.img"
    path.write_bytes(os.urandom(SIZE))
    return path


def retries_total(td: Transferd) -> float:
    text = urllib.request.urlopen(td.metrics_url, timeout=10).read().decode()
    return next(float(line.split()[1]) for line in text.splitlines()
                if line.startswith("ferry_transfer_retries_total "))


def wait_for_retry(td: Transferd, transfer_id: str) -> None:
    while True:
        got = td.stub.GetTransfer(pb.GetTransferRequest(transfer_id=transfer_id))
        assert got.state == S.TRANSFER_STATE_RUNNING, got.error
        if got.progress.retries > 0:
            return
        time.sleep(0.02)


def test_read_errors_are_retried_until_the_source_recovers(
    transferd: Transferd, image: Path, tmp_path: Path
):
    failing = tmp_path / "failing"  # nbdkit's error filter fails reads while it exists
    failing.touch()
    target = tmp_path / "out.img"
    before = retries_total(transferd)
    with NbdServer.nbdkit(image, tmp_path / "nbd.sock", "error", params=(
        "error-pread=EIO", "error-pread-rate=100%", f"error-file={failing}",
    )) as server:
        started = transferd.stub.StartTransfer(pb.StartTransferRequest(
            source_uri=server.uri, target_path=str(target),
            options=pb.TransferOptions(request_size=MiB, max_requests=2)))
        wait_for_retry(transferd, started.id)
        failing.unlink()
        final = wait_final(transferd.stub, started.id)

    assert final.state == S.TRANSFER_STATE_SUCCEEDED, final.error
    assert final.progress.retries > 0
    assert final.progress.bytes_read == SIZE  # failed reads are not counted
    assert retries_total(transferd) - before == final.progress.retries
    assert target.read_bytes() == image.read_bytes()


def test_lost_connection_is_reopened_and_the_copy_completes(
    transferd: Transferd, image: Path, tmp_path: Path
):
    sock = tmp_path / "nbd.sock"
    target = tmp_path / "out.img"
    server = NbdServer.nbdkit(image, sock, "delay", params=("rdelay=50ms",))
    try:
        started = transferd.stub.StartTransfer(pb.StartTransferRequest(
            source_uri=server.uri, target_path=str(target),
            options=pb.TransferOptions(request_size=MiB, max_requests=2)))
        while transferd.stub.GetTransfer(
                pb.GetTransferRequest(transfer_id=started.id)).progress.bytes_read == 0:
            time.sleep(0.02)
        server.stop()  # SIGKILL: the connection drops mid-copy
        wait_for_retry(transferd, started.id)
        sock.unlink()
        server = NbdServer.nbdkit(image, sock)
        final = wait_final(transferd.stub, started.id)
    finally:
        server.stop()

    assert final.state == S.TRANSFER_STATE_SUCCEEDED, final.error
    assert final.progress.retries > 0
    assert target.read_bytes() == image.read_bytes()
