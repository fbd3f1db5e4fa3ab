"""TransferService through gRPC against real qemu-nbd and nbdkit servers."""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from ferry.v1 import transfer_pb2 as pb
from tests.transferd.conftest import (
    GiB,
    KiB,
    MiB,
    NbdServer,
    Transferd,
    data_bytes,
    details,
    sparse_hash,
    wait_final,
)

S = pb.TransferState

# (offset, length) of the data runs in the sparse source; the last one ends
# exactly at the end of the disk, one starts and ends off any block boundary.
SPARSE_SIZE = 8 * GiB
RUNS = [
    (0, 64 * KiB),
    (GiB + 12345, 1 * MiB + 777),
    (3 * GiB, 4 * MiB),
    (5 * GiB + 7 * MiB, 256 * KiB),
    (SPARSE_SIZE - 200 * KiB, 200 * KiB),
]


@pytest.fixture(scope="module")
def sparse_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("src") / "sparse.img"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, SPARSE_SIZE)
        for offset, length in RUNS:
            os.pwrite(fd, os.urandom(length), offset)
    finally:
        os.close(fd)
    return path


@pytest.fixture(scope="module")
def dense_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 MiB of random data: slow enough behind the delay filter to watch."""
    path = tmp_path_factory.mktemp("src") / "dense.img"
    path.write_bytes(os.urandom(32 * MiB))
    return path


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


def start(td: Transferd, source: str, target: Path | str, **options: Any) -> pb.Transfer:
    started: pb.Transfer = td.stub.StartTransfer(
        pb.StartTransferRequest(
            source_uri=source,
            target_path=str(target),
            options=pb.TransferOptions(**options),
            labels=pb.TransferLabels(plan="p1", vm="vm1", disk="disk0"),
        )
    )
    return started


def scrape(td: Transferd) -> dict[str, float]:
    text = urllib.request.urlopen(td.metrics_url, timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_sparse_disk_copies_without_reading_its_holes(
    transferd: Transferd, sparse_image: Path, out_dir: Path, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
):
    caplog.set_level(logging.INFO)
    target = out_dir / "disk.img"
    with NbdServer.qemu(sparse_image, tmp_path / "nbd.sock") as server:
        started = start(transferd, server.uri, target)
        final = wait_final(transferd.stub, started.id)
        allocated = data_bytes(server.uri)

    assert final.state == S.TRANSFER_STATE_SUCCEEDED, final.error
    p = final.progress
    assert p.size_bytes == SPARSE_SIZE
    assert p.bytes_read == allocated
    assert p.bytes_read < 16 * MiB
    assert p.bytes_written == p.bytes_read
    assert p.bytes_zeroed == 0
    assert p.bytes_read + p.bytes_skipped == SPARSE_SIZE
    assert target.stat().st_size == SPARSE_SIZE
    assert target.stat().st_blocks * 512 < 64 * MiB  # holes stayed holes
    assert sparse_hash(target) == sparse_hash(sparse_image)
    assert final.labels.vm == "vm1"
    assert final.finished_at.seconds >= final.started_at.seconds > 0
    lines = [r for r in caplog.records if getattr(r, "transfer", None) == started.id]
    assert any("transfer succeeded" in r.getMessage() for r in lines)
    assert all((r.plan, r.vm, r.disk) == ("p1", "vm1", "disk0") for r in lines)  # type: ignore[attr-defined]


def test_watch_streams_progress_and_ends_at_the_final_state(
    transferd: Transferd, dense_image: Path, out_dir: Path, tmp_path: Path
):
    target = out_dir / "disk.img"
    with NbdServer.nbdkit(dense_image, tmp_path / "nbd.sock", "delay",
                          params=("rdelay=40ms",)) as server:
        started = start(transferd, server.uri, target, request_size=MiB, max_requests=2)
        stream = list(transferd.stub.WatchTransfer(
            pb.WatchTransferRequest(transfer_id=started.id, interval_ms=50)))

    assert stream[0].state == S.TRANSFER_STATE_RUNNING
    assert stream[-1].state == S.TRANSFER_STATE_SUCCEEDED
    assert all(m.state == S.TRANSFER_STATE_RUNNING for m in stream[:-1])
    read = [m.progress.bytes_read for m in stream]
    assert read == sorted(read)
    assert any(0 < r < 32 * MiB for r in read)
    assert read[-1] == 32 * MiB
    assert any(m.progress.rate_bytes_per_second > 0 for m in stream)
    assert any(m.progress.inflight_requests > 0 for m in stream)
    assert any(m.progress.inflight_bytes > 0 for m in stream)
    assert any(m.progress.eta_seconds > 0 for m in stream)
    assert stream[-1].progress.eta_seconds == 0
    assert all(m.progress.bytes_planned == 32 * MiB for m in stream)
    assert target.read_bytes() == dense_image.read_bytes()
    got = transferd.stub.GetTransfer(pb.GetTransferRequest(transfer_id=started.id))
    assert got.state == S.TRANSFER_STATE_SUCCEEDED
    listed = transferd.stub.ListTransfers(pb.ListTransfersRequest()).transfers
    assert started.id in [t.id for t in listed]


def test_source_that_dies_mid_copy_fails_and_the_created_target_is_removed(
    transferd: Transferd, dense_image: Path, out_dir: Path, tmp_path: Path
):
    target = out_dir / "disk.img"
    server = NbdServer.nbdkit(dense_image, tmp_path / "nbd.sock", "delay",
                              params=("rdelay=100ms",))
    try:
        started = start(transferd, server.uri, target, request_size=MiB, max_requests=2)
        for update in transferd.stub.WatchTransfer(
            pb.WatchTransferRequest(transfer_id=started.id, interval_ms=50)
        ):
            if update.progress.bytes_read > 0:
                break
        server.stop()
        final = wait_final(transferd.stub, started.id)
    finally:
        server.stop()

    assert final.state == S.TRANSFER_STATE_FAILED
    assert f"source {server.uri} stopped answering after" in final.error
    assert re.search(r"after [1-9]\d* bytes", final.error)
    assert "gave up after 5 attempts" in final.error
    assert f"the target file {target}, created by this transfer, was removed" in final.error
    assert not target.exists()
    assert list(out_dir.iterdir()) == []


def test_read_error_fails_the_transfer_naming_the_offset(
    transferd: Transferd, dense_image: Path, out_dir: Path, tmp_path: Path
):
    target = out_dir / "disk.img"
    with NbdServer.nbdkit(dense_image, tmp_path / "nbd.sock", "error",
                          params=("error-pread=EIO", "error-pread-rate=100%")) as server:
        final = wait_final(transferd.stub, start(transferd, server.uri, target).id)

    assert final.state == S.TRANSFER_STATE_FAILED
    assert re.search(rf"source {re.escape(server.uri)} failed to read \d+ bytes at offset \d+: "
                     "Input/output error", final.error), final.error
    assert "was removed" in final.error
    assert not target.exists()


@pytest.mark.parametrize("size", [0, 4097, 5 * MiB + 123])
def test_disks_of_odd_sizes_copy_exactly(
    transferd: Transferd, out_dir: Path, tmp_path: Path, size: int
):
    image = tmp_path / "odd.img"
    image.write_bytes(os.urandom(size))
    target = out_dir / "disk.img"
    with NbdServer.nbdkit(image, tmp_path / "nbd.sock") as server:
        final = wait_final(transferd.stub,
                           start(transferd, server.uri, target, request_size=MiB).id)

    assert final.state == S.TRANSFER_STATE_SUCCEEDED, final.error
    assert final.progress.size_bytes == size
    assert target.read_bytes() == image.read_bytes()


def test_cancel_stops_the_copy_and_removes_the_created_target(
    transferd: Transferd, dense_image: Path, out_dir: Path, tmp_path: Path
):
    target = out_dir / "disk.img"
    with NbdServer.nbdkit(dense_image, tmp_path / "nbd.sock", "delay",
                          params=("rdelay=100ms",)) as server:
        started = start(transferd, server.uri, target, request_size=MiB, max_requests=2)
        cancelled = transferd.stub.CancelTransfer(
            pb.CancelTransferRequest(transfer_id=started.id))

    assert cancelled.state == S.TRANSFER_STATE_CANCELLED
    assert "cancelled by the operator" in cancelled.error
    assert "was removed" in cancelled.error
    assert cancelled.progress.bytes_read < 32 * MiB
    assert not target.exists()


def test_existing_target_file_is_overwritten_with_the_source(
    transferd: Transferd, sparse_image: Path, out_dir: Path, tmp_path: Path
):
    """An existing file is not known to be zero: zero extents are punched."""
    target = out_dir / "disk.img"
    target.write_bytes(b"\xaa" * (3 * MiB))
    with NbdServer.qemu(sparse_image, tmp_path / "nbd.sock") as server:
        final = wait_final(transferd.stub, start(transferd, server.uri, target).id)

    assert final.state == S.TRANSFER_STATE_SUCCEEDED, final.error
    assert final.progress.bytes_skipped == 0
    assert final.progress.bytes_zeroed == SPARSE_SIZE - final.progress.bytes_read
    assert sparse_hash(target) == sparse_hash(sparse_image)


def test_unknown_transfer_is_not_found(transferd: Transferd):
    with pytest.raises(grpc.RpcError) as e:
        transferd.stub.GetTransfer(pb.GetTransferRequest(transfer_id="nope"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert "transfer 'nope' does not exist" in details(e.value)
    with pytest.raises(grpc.RpcError) as e:
        list(transferd.stub.WatchTransfer(pb.WatchTransferRequest(transfer_id="nope")))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        transferd.stub.CancelTransfer(pb.CancelTransferRequest(transfer_id="nope"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_metrics_count_bytes_and_transfers(
    transferd: Transferd, sparse_image: Path, out_dir: Path, tmp_path: Path
):
    before = scrape(transferd)
    with NbdServer.qemu(sparse_image, tmp_path / "nbd.sock") as server:
        final = wait_final(transferd.stub, start(transferd, server.uri, out_dir / "d.img").id)
    after = scrape(transferd)

    assert final.state == S.TRANSFER_STATE_SUCCEEDED
    for kind, value in (("read", final.progress.bytes_read),
                        ("written", final.progress.bytes_written),
                        ("skipped", final.progress.bytes_skipped)):
        key = f'ferry_transfer_bytes_total{{kind="{kind}"}}'
        assert after[key] - before[key] == value
    key = 'ferry_transfers{state="succeeded"}'
    assert after[key] == before[key] + 1
    key = 'ferry_transfer_duration_seconds_count{state="succeeded"}'
    assert after[key] == before.get(key, 0) + 1
    assert after["ferry_transfer_inflight_requests"] == 0
    assert after["ferry_transfer_inflight_bytes"] == 0
    assert "ferry_transfer_retries_total" in after


# -- bad input ------------------------------------------------------------------


@pytest.fixture
def not_nbd_socket(tmp_path: Path) -> Iterator[str]:
    """A Unix socket whose server answers like HTTP, not NBD."""
    path = tmp_path / "http.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(4)

    def answer() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n" * 4)

    threading.Thread(target=answer, daemon=True).start()
    yield f"nbd+unix:///?socket={path}"
    srv.close()


@pytest.fixture(scope="module")
def qemu_sparse(
    sparse_image: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NbdServer]:
    with NbdServer.qemu(sparse_image, tmp_path_factory.mktemp("sock") / "nbd.sock") as s:
        yield s


def refused(td: Transferd, source: str, target: Path, **options: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        start(td, source, target, **options)
    return e.value


def test_missing_source_socket_is_not_found(transferd: Transferd, out_dir: Path):
    err = refused(transferd, "nbd+unix:///?socket=/nonexistent/nbd.sock", out_dir / "d.img")
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "source socket /nonexistent/nbd.sock does not exist" in details(err)
    assert list(out_dir.iterdir()) == []


def test_source_that_is_not_nbd_is_refused(
    transferd: Transferd, out_dir: Path, not_nbd_socket: str
):
    err = refused(transferd, not_nbd_socket, out_dir / "d.img")
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"source {not_nbd_socket} is not a usable NBD server" in details(err)
    assert list(out_dir.iterdir()) == []


def test_uri_that_is_not_nbd_is_invalid(transferd: Transferd, out_dir: Path):
    err = refused(transferd, "http://example.invalid/disk.img", out_dir / "d.img")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "is not an NBD URI" in details(err)


def test_source_nobody_listens_on_is_unavailable(transferd: Transferd, out_dir: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        err = refused(transferd, f"nbd://127.0.0.1:{port}/", out_dir / "d.img")
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert f"cannot reach source nbd://127.0.0.1:{port}/" in details(err)
    assert list(out_dir.iterdir()) == []


def test_missing_target_directory_is_not_found(
    transferd: Transferd, qemu_sparse: NbdServer, out_dir: Path
):
    err = refused(transferd, qemu_sparse.uri, out_dir / "missing" / "d.img")
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert f"target directory {out_dir / 'missing'} does not exist" in details(err)
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"request_size": 3 * MiB}, "options.request_size 3145728 is not a power of two"),
        ({"request_size": 1 << 40}, "options.request_size 1099511627776"),
        ({"request_size": 512}, "options.request_size 512 is outside 4096 (4 KiB) to 33554432"),
        ({"max_requests": 1000}, "options.max_requests 1000"),
        ({"max_bytes_in_flight": 1 << 40}, "options.max_bytes_in_flight"),
        ({"request_size": 8 * MiB, "max_bytes_in_flight": MiB}, "options.max_bytes_in_flight"),
        ({"connections": 17}, "options.connections 17 is above 16"),
        ({"profile": "vmware"}, "options.profile 'vmware' is unknown"),
        ({"profile": "vddk", "request_size": 4 * MiB},
         "options.request_size 4194304 is outside 4096 (4 KiB) to 2097152 (2 MiB), the range of "
         "profile vddk"),
        ({"profile": "vddk", "connections": 2},
         "options.connections 2 is above 1, the most profile vddk uses"),
    ],
)
def test_bad_options_are_invalid_and_leave_nothing(
    transferd: Transferd, qemu_sparse: NbdServer, out_dir: Path,
    options: dict[str, int], field: str
):
    err = refused(transferd, qemu_sparse.uri, out_dir / "d.img", **options)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in details(err)
    assert list(out_dir.iterdir()) == []


def test_same_id_with_another_target_already_exists(
    transferd: Transferd, qemu_sparse: NbdServer, out_dir: Path
):
    req = pb.StartTransferRequest(transfer_id="dup", source_uri=qemu_sparse.uri,
                                  target_path=str(out_dir / "a.img"))
    first = transferd.stub.StartTransfer(req)
    again = transferd.stub.StartTransfer(req)
    assert again.id == first.id == "dup"
    req.target_path = str(out_dir / "b.img")
    with pytest.raises(grpc.RpcError) as e:
        transferd.stub.StartTransfer(req)
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert wait_final(transferd.stub, "dup").state == S.TRANSFER_STATE_SUCCEEDED
    assert not (out_dir / "b.img").exists()
    with pytest.raises(grpc.RpcError) as e:
        transferd.stub.CancelTransfer(pb.CancelTransferRequest(transfer_id="dup"))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "transfer dup already succeeded; there is nothing to cancel" in details(e.value)
