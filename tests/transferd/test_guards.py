"""What an adversarial caller tried: cancels racing each other, a target that
is the source being served, Checksum on files that are no transfer's target,
and bad input that once came back as a traceback or an internal error."""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from ferry.v1 import transfer_pb2 as pb
from ferry.v1 import transfer_pb2_grpc as pb_grpc
from tests.files import sha256_of
from tests.transferd.conftest import (
    MiB,
    NbdServer,
    Transferd,
    details,
    transferd_subprocess,
    wait_final,
)
from transferd.job import to_the_end
from transferd.targets.file import FileTarget

S = pb.TransferState


@pytest.fixture(scope="module")
def dense_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("src") / "dense.img"
    path.write_bytes(os.urandom(32 * MiB))
    return path




def test_concurrent_cancels_all_return_cancelled_and_sigterm_still_stops(
    dense_image: Path, tmp_path: Path
):
    """transferd as `ferry serve` runs it; five cancels at once on one
    running transfer. Its log names the metrics port it really bound."""
    sock = tmp_path / "transferd.sock"
    log = tmp_path / "transferd.log"
    target = tmp_path / "out.img"
    with log.open("wb") as err:
        proc = transferd_subprocess(sock, err, "127.0.0.1:0")
    try:
        with grpc.insecure_channel(f"unix:{sock}") as channel, \
                NbdServer.nbdkit(dense_image, tmp_path / "nbd.sock", "delay",
                                 params=("rdelay=100ms",)) as server:
            grpc.channel_ready_future(channel).result(timeout=30)
            stub = pb_grpc.TransferServiceStub(channel)
            started = stub.StartTransfer(pb.StartTransferRequest(
                source_uri=server.uri, target_path=str(target),
                options=pb.TransferOptions(request_size=MiB, max_requests=2)))
            assert started.state == S.TRANSFER_STATE_RUNNING
            request = pb.CancelTransferRequest(transfer_id=started.id)
            with ThreadPoolExecutor(5) as pool:
                results = list(pool.map(lambda _: stub.CancelTransfer(request, timeout=60),
                                        range(5)))
            final = stub.GetTransfer(pb.GetTransferRequest(transfer_id=started.id))
        assert [r.state for r in results] == [S.TRANSFER_STATE_CANCELLED] * 5
        assert all(r == results[0] for r in results)
        assert final.state == S.TRANSFER_STATE_CANCELLED
        assert final.error == results[0].error
        assert "cancelled by the operator" in final.error
        assert final.progress.bytes_read < 32 * MiB
        assert not target.exists()
        assert not Path(f"{target}.ferry-journal").exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    port = re.search(r"metrics: http://127\.0\.0\.1:(\d+)/metrics", text)
    assert port is not None, text
    assert int(port[1]) > 0
    assert f"transferd listening on unix:{sock}" in text


def test_cleanup_runs_to_its_end_however_often_the_task_is_cancelled():
    """The fault behind racing cancels: a cancel landing while a cancelled
    transfer cleans up must not cut the cleanup short, and the task still
    ends cancelled once the cleanup is done."""
    steps: list[int] = []

    async def cleanup() -> str:
        for i in range(3):
            await asyncio.sleep(0.01)
            steps.append(i)
        return "removed"

    async def transfer_task() -> str:
        return await to_the_end(cleanup())

    async def main() -> bool:
        task = asyncio.create_task(transfer_task())
        await asyncio.sleep(0)
        for _ in range(3):
            task.cancel()
            await asyncio.sleep(0.005)
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return task.cancelled()

    assert asyncio.run(main()) is True
    assert steps == [0, 1, 2]


def test_cleanup_not_cancelled_returns_its_result():
    async def cleanup() -> str:
        await asyncio.sleep(0.01)
        return "removed"

    assert asyncio.run(to_the_end(cleanup())) == "removed"


def test_target_that_qemu_nbd_serves_as_the_source_is_refused(
    transferd: Transferd, tmp_path: Path
):
    victim = tmp_path / "victim.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(victim), "16M"],
                   check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", str(victim)],
                   check=True, stdout=subprocess.DEVNULL)
    before = sha256_of(victim)
    sock = tmp_path / "nbd.sock"
    argv = ["qemu-nbd", "--read-only", "--persistent", "--format=qcow2",
            f"--socket={sock}", str(victim)]
    with NbdServer(argv, sock) as server:
        with pytest.raises(grpc.RpcError) as e:
            transferd.stub.StartTransfer(pb.StartTransferRequest(
                source_uri=server.uri, target_path=str(victim)))
        copied = subprocess.run([sys.executable, "-m", "ferry.cli", "copy", server.uri,
                                 str(victim)], capture_output=True, text=True, timeout=60,
                                check=False)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details(e.value).startswith(
        f"target {victim} is in use by another process (a transfer writing it, or "
        "qemu-nbd/qemu, holds a lock on it)")
    assert copied.returncode == 2
    assert f"target {victim} is in use by another process" in copied.stderr
    assert sha256_of(victim) == before


def test_checksum_of_a_file_that_is_no_transfer_target_is_refused(
    transferd: Transferd, tmp_path: Path
):
    secret = tmp_path / "secret"
    secret.write_bytes(b"hunter2\n")
    secret.chmod(0o600)
    with pytest.raises(grpc.RpcError) as e:
        transferd.stub.Checksum(pb.ChecksumRequest(path=str(secret), size=1))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"path {secret} is not the target of a transfer on this transferd" in \
        details(e.value)
    # Nor through a symlink to it.
    link = tmp_path / "link"
    link.symlink_to(secret)
    with pytest.raises(grpc.RpcError) as e:
        transferd.stub.Checksum(pb.ChecksumRequest(path=str(link)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.StartTransferRequest(source_uri="nbd+unix:///?socket=/x",
                                 target_path="/tmp/a\0b"), "target_path"),
        (pb.StartTransferRequest(source_uri="nbd://h/\0", target_path="/tmp/a"), "source_uri"),
        (pb.StartTransferRequest(source_uri="nbd://h/", target_path="/tmp/a",
                                 options=pb.TransferOptions(profile="p" * 10_000)),
         "options.profile"),
        (pb.StartTransferRequest(source_uri="nbd://h/", target_path="/tmp/" + "a" * 10_000),
         "target_path"),
    ],
)
def test_start_with_nul_bytes_or_huge_strings_is_invalid_with_a_short_message(
    transferd: Transferd, request_: pb.StartTransferRequest, field: str
):
    with pytest.raises(grpc.RpcError) as e:
        transferd.stub.StartTransfer(request_)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(e.value).startswith(field)
    assert len(details(e.value)) < 500


def test_checksum_with_a_nul_byte_is_invalid(transferd: Transferd):
    with pytest.raises(grpc.RpcError) as e:
        transferd.stub.Checksum(pb.ChecksumRequest(path="/etc/\0passwd"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "contains a NUL byte" in details(e.value)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--requests", "-5"], "argument --requests: '-5' is not a whole number of 0 or more"),
        (["--request-size", "99999999999999999999999"],
         "argument --request-size: '99999999999999999999999' is not a size"),
        (["--request-size", "99999999999999999999"],
         "argument --request-size: '99999999999999999999' is far too large"),
        (["--connections", "99999999999"],
         "argument --connections: '99999999999' is far too large"),
    ],
)
def test_copy_refuses_numbers_out_of_range_before_anything_is_created(
    tmp_path: Path, args: list[str], message: str
):
    target = tmp_path / "out.img"
    done = subprocess.run([sys.executable, "-m", "ferry.cli", "copy", *args,
                           "nbd://127.0.0.1/", str(target)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not target.exists()


def test_serve_with_a_metrics_port_out_of_range_exits_with_a_message(tmp_path: Path):
    done = subprocess.run([sys.executable, "-m", "ferry.cli", "serve", "transferd",
                           "--listen", f"unix:{tmp_path / 't.sock'}",
                           "--metrics-listen", "127.0.0.1:99999"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "metrics address '127.0.0.1:99999' is not host:port (a port is 0..65535)" in \
        done.stderr
    assert "Traceback" not in done.stderr


def test_checksum_of_a_known_target_equals_its_source_and_checks_the_size(
    transferd: Transferd, dense_image: Path, tmp_path: Path
):
    """The rule's other side: a known target is hashed, and equals its source."""
    target = tmp_path / "out.img"
    with NbdServer.qemu(dense_image, tmp_path / "nbd.sock") as server:
        started = transferd.stub.StartTransfer(pb.StartTransferRequest(
            source_uri=server.uri, target_path=str(target)))
        assert wait_final(transferd.stub, started.id).state == S.TRANSFER_STATE_SUCCEEDED
        of_source = transferd.stub.Checksum(pb.ChecksumRequest(source_uri=server.uri))
    of_target = transferd.stub.Checksum(pb.ChecksumRequest(path=str(target)))
    assert of_target == of_source
    with pytest.raises(grpc.RpcError) as e:
        transferd.stub.Checksum(pb.ChecksumRequest(path=str(target), size=1 << 40))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"is beyond the end of {target}" in details(e.value)


def test_copy_that_returns_early_is_failed_not_succeeded(
    transferd: Transferd, dense_image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A fake engine that returns having copied nothing (no real part does
    that on demand): the transfer must not be reported SUCCEEDED."""
    async def copies_nothing(*args: object, **kwargs: object) -> None:
        return None

    monkeypatch.setattr("transferd.engine.copy", copies_nothing)
    target = tmp_path / "out.img"
    with NbdServer.qemu(dense_image, tmp_path / "nbd.sock") as server:
        started = transferd.stub.StartTransfer(pb.StartTransferRequest(
            source_uri=server.uri, target_path=str(target)))
        final = wait_final(transferd.stub, started.id)
    assert final.state == S.TRANSFER_STATE_FAILED
    assert final.error.startswith(
        f"the copy of {server.uri} to {target} stopped early: 0 of {32 * MiB} planned bytes "
        "handled, 0 read but 0 written; the target is incomplete, run the transfer again")
    assert not target.exists()


def test_a_target_refuses_writes_once_closed(tmp_path: Path):
    """Reads land on the source's threads and are queued for the target's
    writer; one that lands after the transfer ended must not write through a
    descriptor number that may already belong to another file."""
    path = tmp_path / "out.img"
    target = FileTarget.open(str(path), MiB)
    outcomes: queue.SimpleQueue[OSError | None] = queue.SimpleQueue()
    target.write_soon(0, memoryview(b"x" * 4096), outcomes.put)
    assert outcomes.get(timeout=10) is None
    asyncio.run(target.finish())
    target.write_soon(4096, memoryview(b"y" * 4096), outcomes.put)
    refused = outcomes.get(timeout=10)
    assert isinstance(refused, OSError)
    assert f"file {path} is already closed" in str(refused)
    assert path.read_bytes()[:4097] == b"x" * 4096 + b"\0"
