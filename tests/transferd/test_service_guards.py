"""What an adversarial tester found in the service's guards: a waiting
transfer that changed its target, busy targets and Checksum fooled by other
names of a file, reused and malformed transfer ids, and a daemon restart
that lost the copies it was making."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from ferry.v1 import transfer_pb2 as pb
from ferry.v1 import transfer_pb2_grpc as pb_grpc
from tests.transferd.conftest import (
    MiB,
    NbdServer,
    Transferd,
    details,
    in_process_transferd,
    transferd_subprocess,
    wait_final,
)

S = pb.TransferState
JOURNAL = ".ferry-journal"


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("src") / "disk.img"
    path.write_bytes(os.urandom(8 * MiB))
    return path


@pytest.fixture
def slow(image: Path, tmp_path: Path) -> Iterator[NbdServer]:
    """A second per MiB read: a transfer from it runs while the test looks."""
    with NbdServer.nbdkit(image, tmp_path / "slow.sock", "delay",
                          params=("rdelay=1000ms",)) as server:
        yield server


@pytest.fixture
def fast(image: Path, tmp_path: Path) -> Iterator[NbdServer]:
    with NbdServer.nbdkit(image, tmp_path / "fast.sock") as server:
        yield server


def slow_request(source: NbdServer, target: Path | str) -> pb.StartTransferRequest:
    return pb.StartTransferRequest(source_uri=source.uri, target_path=str(target),
                                   options=pb.TransferOptions(request_size=MiB,
                                                              max_requests=1))


@contextlib.contextmanager
def running(td: Transferd, request: pb.StartTransferRequest) -> Iterator[pb.Transfer]:
    """A transfer that is cancelled when the test is done with it."""
    started: pb.Transfer = td.stub.StartTransfer(request)
    try:
        yield started
    finally:
        with contextlib.suppress(grpc.RpcError):  # it may have ended already
            td.stub.CancelTransfer(pb.CancelTransferRequest(transfer_id=started.id),
                                   timeout=60)


def refused(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value


# -- 1: a PENDING transfer leaves its target alone ------------------------------


def test_a_pending_transfer_leaves_an_existing_target_as_it_is(
    one_at_a_time: Transferd, slow: NbdServer, fast: NbdServer, tmp_path: Path
):
    td = one_at_a_time
    target = tmp_path / "b.img"
    before = b"\xaa" * MiB  # smaller than the source: opening it would resize it
    target.write_bytes(before)
    with running(td, slow_request(slow, tmp_path / "a.img")) as first:
        assert first.state == S.TRANSFER_STATE_RUNNING
        second = td.stub.StartTransfer(pb.StartTransferRequest(
            source_uri=fast.uri, target_path=str(target)))
        assert second.state == S.TRANSFER_STATE_PENDING
        assert second.progress.size_bytes == second.progress.bytes_planned == 8 * MiB
        assert second.options.connections == 1
        assert target.read_bytes() == before
        assert not Path(f"{target}{JOURNAL}").exists()
        cancelled = td.stub.CancelTransfer(pb.CancelTransferRequest(transfer_id=second.id))

    assert cancelled.state == S.TRANSFER_STATE_CANCELLED
    assert cancelled.error.startswith("cancelled by the operator; nothing was written")
    assert target.read_bytes() == before
    assert list(tmp_path.glob(f"*{JOURNAL}")) == []


# -- 2: a busy target under another name ----------------------------------------


@pytest.mark.parametrize("name", ["dot", "slashes", "symlink"])
def test_a_running_transfers_target_under_another_name_is_refused_naming_it(
    transferd: Transferd, slow: NbdServer, tmp_path: Path, name: str
):
    target = tmp_path / "out" / "t.img"
    target.parent.mkdir()
    link = tmp_path / "link.img"
    link.symlink_to(target)
    other = {"dot": f"{target.parent}/./t.img", "slashes": f"{target.parent}//t.img",
             "symlink": str(link)}[name]
    with running(transferd, slow_request(slow, target)) as first:
        err = refused(lambda: transferd.stub.StartTransfer(pb.StartTransferRequest(
            source_uri=slow.uri, target_path=other)))
        assert target.exists()

    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details(err) == (
        f"target {other} is the target of transfer {first.id} (as {target}), which has not "
        "ended; wait for it to end or cancel it first")


@pytest.mark.parametrize("kind", ["symlink", "hard link"])
def test_a_pending_transfers_target_under_another_name_is_refused_naming_it(
    one_at_a_time: Transferd, slow: NbdServer, fast: NbdServer, tmp_path: Path, kind: str
):
    td = one_at_a_time
    target = tmp_path / "b.img"
    target.write_bytes(b"\xaa" * MiB)
    link = tmp_path / "link.img"
    if kind == "symlink":
        link.symlink_to(target)
    else:
        os.link(target, link)
    with running(td, slow_request(slow, tmp_path / "a.img")), \
            running(td, pb.StartTransferRequest(source_uri=fast.uri,
                                                target_path=str(target))) as second:
        assert second.state == S.TRANSFER_STATE_PENDING
        err = refused(lambda: td.stub.StartTransfer(pb.StartTransferRequest(
            source_uri=fast.uri, target_path=str(link))))

    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details(err).startswith(
        f"target {link} is the target of transfer {second.id} (as {target}), which has not "
        "ended")


# -- 3: Checksum hashes only the files transfers wrote --------------------------


def copied(td: Transferd, source: NbdServer, target: Path) -> pb.Transfer:
    final = wait_final(td.stub, td.stub.StartTransfer(pb.StartTransferRequest(
        source_uri=source.uri, target_path=str(target))).id)
    assert final.state == S.TRANSFER_STATE_SUCCEEDED, final.error
    return final


def test_checksum_of_a_target_replaced_by_a_link_to_another_file_is_refused(
    transferd: Transferd, fast: NbdServer, tmp_path: Path
):
    secret = tmp_path / "secret"
    secret.write_bytes(b"hunter2\n")
    secret.chmod(0o600)
    target = tmp_path / "t.img"
    final = copied(transferd, fast, target)
    # The file the transfer wrote is hashed under any name of it.
    of_source = transferd.stub.Checksum(pb.ChecksumRequest(source_uri=fast.uri))
    assert transferd.stub.Checksum(pb.ChecksumRequest(path=f"{tmp_path}/./t.img")) == of_source

    target.unlink()
    target.symlink_to(secret)
    err = refused(lambda: transferd.stub.Checksum(pb.ChecksumRequest(path=str(target), size=1)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(err).startswith(
        f"path {target} is no longer the file transfer {final.id} wrote (it was replaced, or "
        "is a link to another file, since)")


def test_checksum_of_a_target_replaced_by_a_fifo_is_refused_at_once(
    transferd: Transferd, fast: NbdServer, tmp_path: Path
):
    target = tmp_path / "t.img"
    copied(transferd, fast, target)
    target.unlink()
    os.mkfifo(target)
    try:
        err = refused(lambda: transferd.stub.Checksum(pb.ChecksumRequest(path=str(target)),
                                                      timeout=10))
    finally:
        # Lets a reader that did open it go (no reader: ENXIO).
        with contextlib.suppress(OSError):
            os.close(os.open(target, os.O_WRONLY | os.O_NONBLOCK))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(err).startswith(f"{target} is neither a regular file nor a block device")


# -- 4: one transfer_id, one request --------------------------------------------


def _verify(r: pb.StartTransferRequest) -> None:
    r.options.verify = True


def _vm(r: pb.StartTransferRequest) -> None:
    r.labels.vm = "vm2"


def _areas(r: pb.StartTransferRequest) -> None:
    r.changed_areas.add(offset=0, length=MiB)


def _bitmap(r: pb.StartTransferRequest) -> None:
    r.dirty_bitmap = "b0"


@pytest.mark.parametrize(("change", "field"), [
    (_verify, "options.verify"), (_vm, "labels.vm"), (_areas, "changed_areas"),
    (_bitmap, "dirty_bitmap"),
])
def test_the_same_id_with_any_other_field_already_exists_naming_it(
    transferd: Transferd, fast: NbdServer, tmp_path: Path,
    change: Callable[[pb.StartTransferRequest], None], field: str
):
    request = pb.StartTransferRequest(
        transfer_id=f"reuse-{field}", source_uri=fast.uri, target_path=str(tmp_path / "t.img"),
        labels=pb.TransferLabels(plan="p1", vm="vm1", disk="disk0"))
    first = transferd.stub.StartTransfer(request)
    assert transferd.stub.StartTransfer(request).id == first.id
    other = pb.StartTransferRequest()
    other.CopyFrom(request)
    change(other)
    err = refused(lambda: transferd.stub.StartTransfer(other))

    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert details(err).startswith(
        f"transfer {first.id} already exists with another {field} (it copies {fast.uri} to "
        f"{tmp_path / 't.img'}); send the same request to follow it, or use another "
        "transfer_id")
    final = wait_final(transferd.stub, first.id)
    assert final.state == S.TRANSFER_STATE_SUCCEEDED
    assert not final.options.verify


def test_the_same_id_sent_again_while_its_start_is_under_way_gets_the_one_transfer(
    transferd: Transferd, image: Path, tmp_path: Path
):
    """A retry of a start whose answer is slow (the source takes a second
    to open) waits for that start instead of racing it."""
    with NbdServer.nbdkit(image, tmp_path / "nbd.sock", "delay",
                          params=("delay-open=1000ms",)) as server:
        request = pb.StartTransferRequest(transfer_id="slow-open", source_uri=server.uri,
                                          target_path=str(tmp_path / "a.img"))
        other = pb.StartTransferRequest(transfer_id="slow-open", source_uri=server.uri,
                                        target_path=str(tmp_path / "b.img"))
        answers: list[pb.Transfer] = []
        first = threading.Thread(
            target=lambda: answers.append(transferd.stub.StartTransfer(request, timeout=60)))
        first.start()
        time.sleep(0.3)
        again = transferd.stub.StartTransfer(request, timeout=60)
        err = refused(lambda: transferd.stub.StartTransfer(other, timeout=60))
        first.join(timeout=60)
        final = wait_final(transferd.stub, "slow-open")

    assert [a.id for a in answers] == [again.id] == ["slow-open"]
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "already exists with another target_path" in details(err)
    assert final.state == S.TRANSFER_STATE_SUCCEEDED, final.error
    assert not (tmp_path / "b.img").exists()


def test_a_failed_transfer_says_that_running_it_again_takes_a_new_id(
    transferd: Transferd, image: Path, tmp_path: Path
):
    target = tmp_path / "t.img"
    target.write_bytes(b"\xaa" * MiB)
    with NbdServer.nbdkit(image, tmp_path / "nbd.sock", "error",
                          params=("error-pread=EIO", "error-pread-rate=100%")) as server:
        request = pb.StartTransferRequest(transfer_id="fails", source_uri=server.uri,
                                          target_path=str(target))
        final = wait_final(transferd.stub, transferd.stub.StartTransfer(request).id)
        again = transferd.stub.StartTransfer(request)

    assert final.state == S.TRANSFER_STATE_FAILED
    assert final.error.endswith(
        "; to run it again, start it under a new transfer_id (starting it under this one "
        "returns this result)")
    assert (again.state, again.error) == (final.state, final.error)


# -- 5: transfer ids ------------------------------------------------------------


@pytest.mark.parametrize("bad", ["a\nb", "   ", "x\u202eexe.txt", "tab\there", "é", "a" * 129])
def test_transfer_ids_of_other_characters_are_invalid(
    transferd: Transferd, fast: NbdServer, tmp_path: Path, bad: str
):
    err = refused(lambda: transferd.stub.StartTransfer(pb.StartTransferRequest(
        transfer_id=bad, source_uri=fast.uri, target_path=str(tmp_path / "t.img"))))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(err).startswith("transfer_id ")
    assert details(err).endswith(
        " is not 1 to 128 of the characters A-Z a-z 0-9 . _ : / @ + -; pass such an id, or "
        "none to get a random one")
    assert "\n" not in details(err) and "\u202e" not in details(err)
    assert not (tmp_path / "t.img").exists()


def test_ids_the_control_plane_makes_are_accepted(
    transferd: Transferd, fast: NbdServer, tmp_path: Path
):
    # controlplane/migration.py: migration id, VM name (1-63 of A-Z a-z 0-9 . _ -), disk.
    for i, transfer_id in enumerate([f"{uuid.uuid4().hex}-{'v' * 63}-disk15",
                                     f"{uuid.uuid4().hex}-web-01.prod_a-disk0",
                                     "plan:p1/vm@host+x-1"]):
        started = transferd.stub.StartTransfer(pb.StartTransferRequest(
            transfer_id=transfer_id, source_uri=fast.uri, target_path=str(tmp_path / f"{i}")))
        assert started.id == transfer_id
        assert wait_final(transferd.stub, transfer_id).state == S.TRANSFER_STATE_SUCCEEDED


# -- 6: a daemon that stops keeps the copies it was making -----------------------


def test_sigterm_keeps_the_target_and_journal_and_a_new_transferd_resumes(tmp_path: Path):
    image = tmp_path / "dense.img"
    image.write_bytes(os.urandom(32 * MiB))
    sock = tmp_path / "transferd.sock"
    log = tmp_path / "transferd.log"
    target = tmp_path / "out.img"
    nbd_sock = tmp_path / "nbd.sock"
    with log.open("wb") as err:
        proc = transferd_subprocess(sock, err)
    try:
        with grpc.insecure_channel(f"unix:{sock}") as channel, \
                NbdServer.nbdkit(image, nbd_sock, "delay", params=("rdelay=500ms",)) as server:
            grpc.channel_ready_future(channel).result(timeout=30)
            stub = pb_grpc.TransferServiceStub(channel)
            request = pb.StartTransferRequest(
                transfer_id="restarted", source_uri=server.uri, target_path=str(target),
                options=pb.TransferOptions(request_size=MiB, max_requests=2))
            stub.StartTransfer(request)
            stopping = False
            last = None
            for last in stub.WatchTransfer(pb.WatchTransferRequest(transfer_id="restarted",
                                                                   interval_ms=50), timeout=60):
                if last.progress.bytes_written >= 4 * MiB and not stopping:
                    proc.send_signal(signal.SIGTERM)
                    stopping = True
            assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert last is not None
    assert last.state == S.TRANSFER_STATE_FAILED
    assert last.error == (f"transferd shut down before the transfer ended; the target {target} "
                          f"and its journal {target}{JOURNAL} were kept; a transfer of the "
                          "same source onto it resumes")
    assert 4 * MiB <= last.progress.bytes_written < 32 * MiB
    assert target.exists()
    assert Path(f"{target}{JOURNAL}").exists()
    text = log.read_text()
    assert ("transferd stopping 1 transfer(s): what they wrote stays, with its journal, so "
            "the same transfers started again resume") in text

    # The same URI (the journal names the source by it), served anew.
    nbd_sock.unlink()
    nbd_sock.with_suffix(".pid").unlink()
    with NbdServer.nbdkit(image, nbd_sock), in_process_transferd() as td:
        final = wait_final(td.stub, td.stub.StartTransfer(request).id)
    assert final.state == S.TRANSFER_STATE_SUCCEEDED, final.error
    # Everything written before the stop was journaled, and is not copied again.
    assert final.progress.bytes_resumed == last.progress.bytes_written
    assert final.progress.bytes_resumed + final.progress.bytes_planned == 32 * MiB
    assert target.read_bytes() == image.read_bytes()
    assert not Path(f"{target}{JOURNAL}").exists()
