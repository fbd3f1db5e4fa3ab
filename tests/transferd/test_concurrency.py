"""Several disks at once in one transferd, under its global limit, and more
than one connection only where the server allows it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import uvloop

from ferry.v1 import transfer_pb2 as pb
from tests.transferd.conftest import (
    MiB,
    NbdServer,
    Transferd,
    wait_final,
)
from transferd.sources.nbd import NbdSource, _Connection

S = pb.TransferState


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("src") / "disk.img"
    path.write_bytes(os.urandom(8 * MiB))
    return path


def test_transfers_beyond_the_limit_wait_pending_then_run(
    one_at_a_time: Transferd, image: Path, tmp_path: Path
):
    td = one_at_a_time
    with NbdServer.nbdkit(image, tmp_path / "slow.sock", "delay",
                          params=("rdelay=50ms",)) as slow, \
            NbdServer.nbdkit(image, tmp_path / "fast.sock") as fast:
        first = td.stub.StartTransfer(pb.StartTransferRequest(
            source_uri=slow.uri, target_path=str(tmp_path / "a.img"),
            options=pb.TransferOptions(request_size=MiB, max_requests=1)))
        second = td.stub.StartTransfer(pb.StartTransferRequest(
            source_uri=fast.uri, target_path=str(tmp_path / "b.img")))
        assert first.state == S.TRANSFER_STATE_RUNNING
        assert second.state == S.TRANSFER_STATE_PENDING
        assert second.progress.bytes_read == 0
        assert second.progress.bytes_planned == 8 * MiB
        done_first = wait_final(td.stub, first.id)
        done_second = wait_final(td.stub, second.id)

    assert done_first.state == done_second.state == S.TRANSFER_STATE_SUCCEEDED
    # The second one only started once the first had finished.
    assert done_second.started_at.ToNanoseconds() >= done_first.finished_at.ToNanoseconds()
    assert (tmp_path / "a.img").read_bytes() == image.read_bytes()
    assert (tmp_path / "b.img").read_bytes() == image.read_bytes()


def test_cancelling_a_pending_transfer_leaves_its_place_to_the_next(
    one_at_a_time: Transferd, image: Path, tmp_path: Path
):
    td = one_at_a_time
    with NbdServer.nbdkit(image, tmp_path / "slow.sock", "delay",
                          params=("rdelay=50ms",)) as slow, \
            NbdServer.nbdkit(image, tmp_path / "fast.sock") as fast:
        first = td.stub.StartTransfer(pb.StartTransferRequest(
            source_uri=slow.uri, target_path=str(tmp_path / "a.img"),
            options=pb.TransferOptions(request_size=MiB, max_requests=1)))
        second = td.stub.StartTransfer(pb.StartTransferRequest(
            source_uri=fast.uri, target_path=str(tmp_path / "b.img")))
        third = td.stub.StartTransfer(pb.StartTransferRequest(
            source_uri=fast.uri, target_path=str(tmp_path / "c.img")))
        cancelled = td.stub.CancelTransfer(pb.CancelTransferRequest(transfer_id=second.id))
        finals = [wait_final(td.stub, t.id) for t in (first, third)]

    assert cancelled.state == S.TRANSFER_STATE_CANCELLED
    assert not (tmp_path / "b.img").exists()
    assert [f.state for f in finals] == [S.TRANSFER_STATE_SUCCEEDED] * 2
    assert (tmp_path / "c.img").read_bytes() == image.read_bytes()


def test_several_disks_copy_at_once(transferd: Transferd, image: Path, tmp_path: Path):
    servers = [NbdServer.nbdkit(image, tmp_path / f"{i}.sock") for i in range(4)]
    try:
        ids = [transferd.stub.StartTransfer(pb.StartTransferRequest(
            source_uri=s.uri, target_path=str(tmp_path / f"{i}.img"))).id
            for i, s in enumerate(servers)]
        finals = [wait_final(transferd.stub, i) for i in ids]
    finally:
        for s in servers:
            s.stop()
    assert [f.state for f in finals] == [S.TRANSFER_STATE_SUCCEEDED] * 4
    for i in range(4):
        assert (tmp_path / f"{i}.img").read_bytes() == image.read_bytes()


@pytest.mark.parametrize(("mode", "want"), [("auto", 4), ("disable", 1)])
def test_connections_beyond_one_only_with_multi_conn(
    transferd: Transferd, image: Path, tmp_path: Path, mode: str, want: int
):
    """nbdkit's file plugin advertises multi-conn unless its multi-conn filter
    is told not to."""
    with NbdServer.nbdkit(image, tmp_path / "nbd.sock", "multi-conn",
                          params=(f"multi-conn-mode={mode}",)) as s:
        final = wait_final(transferd.stub, transferd.stub.StartTransfer(
            pb.StartTransferRequest(source_uri=s.uri, target_path=str(tmp_path / "o.img"),
                                    options=pb.TransferOptions(connections=4))).id)
    assert final.state == S.TRANSFER_STATE_SUCCEEDED, final.error
    assert final.options.connections == want
    assert (tmp_path / "o.img").read_bytes() == image.read_bytes()


def test_pending_transfer_holds_no_connection_and_no_target_until_its_turn(
    one_at_a_time: Transferd, image: Path, tmp_path: Path
):
    """The waiting transfer's qemu-nbd (not --persistent) exits once its
    client left; served again, the transfer copies when its turn comes."""
    td = one_at_a_time
    sock = tmp_path / "pending.sock"
    argv = ["qemu-nbd", "--read-only", "--shared=8", "--format=raw", f"--socket={sock}",
            str(image)]
    target = tmp_path / "b.img"
    with NbdServer.nbdkit(image, tmp_path / "slow.sock", "delay",
                          params=("rdelay=1000ms",)) as slow:
        first = td.stub.StartTransfer(pb.StartTransferRequest(
            source_uri=slow.uri, target_path=str(tmp_path / "a.img"),
            options=pb.TransferOptions(request_size=MiB, max_requests=1)))
        once = NbdServer(argv, sock)
        second = td.stub.StartTransfer(pb.StartTransferRequest(
            source_uri=once.uri, target_path=str(target)))
        assert second.state == S.TRANSFER_STATE_PENDING
        assert once.proc.wait(timeout=30) == 0  # its only client disconnected
        assert not target.exists()
        sock.with_suffix(".pid").unlink()
        with NbdServer([*argv[:1], "--persistent", *argv[1:]], sock):
            td.stub.CancelTransfer(pb.CancelTransferRequest(transfer_id=first.id))
            final = wait_final(td.stub, second.id)

    assert final.state == S.TRANSFER_STATE_SUCCEEDED, final.error
    assert final.progress.bytes_planned == image.stat().st_size
    assert target.read_bytes() == image.read_bytes()


def test_an_unexpected_failure_of_an_extra_connection_closes_every_connection(
    image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """One extra connection failing with an error no server gives (a fault
    made here): every connection already made is closed, also those that
    came up after the failed one in the list (they were once left open)."""
    real_connect, real_close = _Connection.connect, _Connection.close
    made: list[_Connection] = []
    closed: list[_Connection] = []

    async def connect(self: _Connection) -> None:
        made.append(self)
        if len(made) == 3:  # the second extra one, of three
            raise RuntimeError("a fault made by the test")
        await real_connect(self)

    def close(self: _Connection) -> None:
        closed.append(self)
        real_close(self)

    monkeypatch.setattr(_Connection, "connect", connect)
    monkeypatch.setattr(_Connection, "close", close)
    with (NbdServer.nbdkit(image, tmp_path / "nbd.sock") as server,
          pytest.raises(RuntimeError, match="a fault made by the test")):
        uvloop.run(NbdSource.open(server.uri, connections=4))

    connected = [c for i, c in enumerate(made) if i != 2]
    assert len(connected) == 3
    assert all(c in closed for c in connected)
