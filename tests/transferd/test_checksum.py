"""Block hashes of sources and targets, the Checksum RPC, and transfers that
verify their copy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import uvloop

from ferry.v1 import transfer_pb2 as pb
from tests.transferd.conftest import (
    KiB,
    MiB,
    NbdServer,
    Transferd,
    changing_source,
    details,
    wait_final,
)
from transferd import checksum
from transferd.sources.nbd import NbdSource

S = pb.TransferState


def sparse_file(path: Path, size: int, runs: list[tuple[int, int]]) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
        for offset, length in runs:
            f.seek(offset)
            f.write(os.urandom(length))
    return path


def nbd_checksum(uri: str) -> checksum.Checksum:
    async def run() -> checksum.Checksum:
        source = await NbdSource.open(uri)
        try:
            return await checksum.source_checksum(source, MiB)
        finally:
            await source.close()
    result: checksum.Checksum = uvloop.run(run())
    return result


@pytest.mark.parametrize("size", [0, 4097, checksum.BLOCK_SIZE, 3 * checksum.BLOCK_SIZE + 123])
def test_source_and_file_hash_alike_at_any_size(tmp_path: Path, size: int):
    runs = [(0, min(size, 1000)), (max(0, size - 5000), min(size, 5000))]
    image = sparse_file(tmp_path / "d.img", size, runs)
    with NbdServer.nbdkit(image, tmp_path / "nbd.sock") as server:  # exact sizes
        over_nbd = nbd_checksum(server.uri)
    local = checksum.path_checksum(str(image), size)
    assert over_nbd == local
    assert local.size == size and local.algorithm == "blake2b-256-blocks"


def test_holes_and_written_zeros_hash_alike_and_one_byte_differs(tmp_path: Path):
    size = 20 * MiB + 5
    sparse = sparse_file(tmp_path / "sparse.img", size, [(9 * MiB + 1, 100 * KiB)])
    dense = tmp_path / "dense.img"
    dense.write_bytes(sparse.read_bytes())  # every zero written out
    assert dense.stat().st_blocks > sparse.stat().st_blocks
    assert checksum.path_checksum(str(sparse), size) == checksum.path_checksum(str(dense), size)

    with dense.open("r+b") as f:
        f.seek(size - 1)
        f.write(b"\x01")
    assert checksum.path_checksum(str(sparse), size) != checksum.path_checksum(str(dense), size)


def test_checksum_rpc_hashes_a_source_and_a_target_comparably(
    transferd: Transferd, tmp_path: Path
):
    image = sparse_file(tmp_path / "d.img", 10 * MiB, [(MiB, MiB)])
    target = tmp_path / "out.img"
    with NbdServer.qemu(image, tmp_path / "nbd.sock") as server:
        of_source = transferd.stub.Checksum(pb.ChecksumRequest(source_uri=server.uri))
        started = transferd.stub.StartTransfer(pb.StartTransferRequest(
            source_uri=server.uri, target_path=str(target)))
        assert wait_final(transferd.stub, started.id).state == S.TRANSFER_STATE_SUCCEEDED
    of_path = transferd.stub.Checksum(pb.ChecksumRequest(path=str(target)))
    assert of_source == of_path
    assert of_path.size == 10 * MiB
    assert of_path.block_size == checksum.BLOCK_SIZE
    assert len(of_path.digest) == 64
    first_half = transferd.stub.Checksum(pb.ChecksumRequest(path=str(target), size=5 * MiB))
    assert first_half.digest != of_path.digest
    target.unlink()
    with pytest.raises(grpc.RpcError) as e:
        transferd.stub.Checksum(pb.ChecksumRequest(path=str(target)))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert f"{target} does not exist" in details(e.value)


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        (pb.ChecksumRequest(), grpc.StatusCode.INVALID_ARGUMENT, "pass exactly one"),
        (pb.ChecksumRequest(source_uri="nbd://h/", path="/x"),
         grpc.StatusCode.INVALID_ARGUMENT, "pass exactly one"),
        (pb.ChecksumRequest(path="/nonexistent/d.img"), grpc.StatusCode.INVALID_ARGUMENT,
         "path /nonexistent/d.img is not the target of a transfer on this transferd"),
        (pb.ChecksumRequest(path="/etc/hostname", size=1 << 40),
         grpc.StatusCode.INVALID_ARGUMENT,
         "path /etc/hostname is not the target of a transfer on this transferd"),
    ],
)
def test_checksum_rpc_refuses_bad_requests(
    transferd: Transferd, request_: pb.ChecksumRequest, code: grpc.StatusCode, message: str
):
    with pytest.raises(grpc.RpcError) as e:
        transferd.stub.Checksum(request_)
    assert e.value.code() == code
    assert message in details(e.value)


def test_verified_transfer_reports_the_checksum(transferd: Transferd, tmp_path: Path):
    size = 12 * MiB + 999
    image = sparse_file(tmp_path / "d.img", size, [(0, MiB), (7 * MiB, 3 * MiB)])
    target = tmp_path / "out.img"
    with NbdServer.nbdkit(image, tmp_path / "nbd.sock") as server:
        started = transferd.stub.StartTransfer(pb.StartTransferRequest(
            source_uri=server.uri, target_path=str(target),
            options=pb.TransferOptions(verify=True)))
        final = wait_final(transferd.stub, started.id)

    assert final.state == S.TRANSFER_STATE_SUCCEEDED, final.error
    assert final.options.verify
    assert final.progress.bytes_verified == size
    want = checksum.path_checksum(str(image), size)
    assert final.checksum == f"blake2b-256-blocks:{want.digest}"


def test_source_changed_under_the_copy_fails_verification(
    transferd: Transferd, tmp_path: Path
):
    target = tmp_path / "out.img"
    with changing_source(tmp_path / "nbd.sock", 3 * MiB) as server:
        started = transferd.stub.StartTransfer(pb.StartTransferRequest(
            source_uri=server.uri, target_path=str(target),
            options=pb.TransferOptions(verify=True)))
        final = wait_final(transferd.stub, started.id)

    assert final.state == S.TRANSFER_STATE_FAILED
    assert final.error.startswith(f"verification failed: source {server.uri} has checksum "
                                  "blake2b-256-blocks:")
    assert f"but target {target} has blake2b-256-blocks:" in final.error
    assert "do not use it" in final.error
    assert not target.exists()
    assert final.checksum == ""


def test_copy_command_fails_verification_with_exit_1(tmp_path: Path):
    target = tmp_path / "out.img"
    target.write_bytes(b"\xaa" * (3 * MiB))
    with changing_source(tmp_path / "nbd.sock", 3 * MiB) as server:
        done = subprocess.run([sys.executable, "-m", "ferry.cli", "copy", server.uri,
                               str(target), "--verify"],
                              capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1
    assert done.stderr.startswith("ferry: error: verification failed")
    assert f"the existing file {target} was left as is" in done.stderr
    assert not Path(f"{target}.ferry-journal").exists()


def _resident_bytes() -> int:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmRSS:"))
    return int(line.split()[1]) * KiB


def _pattern_server(sock: Path, size: str) -> NbdServer:
    """nbdkit's pattern plugin: data in every block, no file to write."""
    return NbdServer(["nbdkit", "--foreground", "--readonly", "--exit-with-parent",
                      f"--unix={sock}", "pattern", size], sock)


def test_checksumming_a_source_holds_no_memory_per_block(tmp_path: Path):
    # libnbd 1.14's Python bindings kept every buffer wrapped in nbd.Buffer
    # alive: verifying 2 GiB grew transferd by 2 GiB, for good.
    with _pattern_server(tmp_path / "nbd.sock", "512M") as server:
        before = _resident_bytes()
        nbd_checksum(server.uri)
        grown = _resident_bytes() - before
    assert grown < 128 * MiB, f"checksumming 512 MiB left {grown // MiB} MiB resident"


def test_a_read_leaves_no_reference_to_its_buffer(tmp_path: Path):
    """A copy reads into a fresh view of a pooled buffer per request; a
    reference kept per read is memory that a long-running daemon never
    gets back."""
    buf = bytearray(64 * KiB)
    view = memoryview(buf)

    async def read_many() -> int:
        source = await NbdSource.open(server.uri)
        try:
            # The last command may still be referred to until the next.
            await source.read_into(0, view)
            before = sys.getrefcount(view)
            for i in range(1, 50):
                await source.read_into(i * len(view), view)
            return sys.getrefcount(view) - before
        finally:
            await source.close()

    with _pattern_server(tmp_path / "nbd.sock", "16M") as server:
        assert uvloop.run(read_many()) == 0
        # The reads landed: nbdkit's pattern is each 8-byte offset, big-endian.
        assert buf[-8:] == (49 * len(view) + len(view) - 8).to_bytes(8, "big")
