"""Block device targets on real loop devices (needs root and losetup)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from ferry.v1 import transfer_pb2 as pb
from tests.transferd.conftest import (
    KiB,
    MiB,
    NbdServer,
    Transferd,
    details,
    wait_final,
)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("losetup") is None,
    reason="loop devices need root and losetup",
)

SOURCE_SIZE = 16 * MiB
RUNS = [(0, 64 * KiB), (3 * MiB + 4096, 700 * KiB), (SOURCE_SIZE - 128 * KiB, 128 * KiB)]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    image = tmp_path_factory.mktemp("src") / "disk.img"
    fd = os.open(image, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, SOURCE_SIZE)
        for offset, length in RUNS:
            os.pwrite(fd, os.urandom(length), offset)
    finally:
        os.close(fd)
    return image


@pytest.fixture(scope="module")
def source(image: Path) -> Iterator[NbdServer]:
    with NbdServer.qemu(image, image.with_suffix(".sock")) as server:
        yield server


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[Callable[[int], tuple[str, Path]]]:
    """Makes loop devices over files filled with 0xAA; detaches them after."""
    made: list[str] = []

    def make(size: int) -> tuple[str, Path]:
        backing = tmp_path / f"backing{len(made)}.img"
        backing.write_bytes(b"\xaa" * size)
        dev = subprocess.run(["losetup", "--find", "--show", str(backing)], check=True,
                             capture_output=True, text=True).stdout.strip()
        made.append(dev)
        return dev, backing

    yield make
    for dev in made:
        subprocess.run(["losetup", "--detach", dev], check=False)


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where journals of block device targets go (not beside them in /dev)."""
    monkeypatch.setenv("FERRY_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


def digest(path: Path | str, size: int) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(size)).hexdigest()


def test_block_device_smaller_than_the_source_is_refused_before_any_write(
    transferd: Transferd, source: NbdServer, loop_device: Callable[[int], tuple[str, Path]]
):
    dev, backing = loop_device(SOURCE_SIZE // 2)
    before = digest(backing, SOURCE_SIZE)
    with pytest.raises(grpc.RpcError) as e:
        transferd.stub.StartTransfer(pb.StartTransferRequest(source_uri=source.uri,
                                                             target_path=dev))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (f"target block device {dev} holds {SOURCE_SIZE // 2} bytes but the source "
            f"has {SOURCE_SIZE}") in details(e.value)
    assert digest(backing, SOURCE_SIZE) == before


def test_block_device_gets_data_and_zeroes_not_skips(
    transferd: Transferd, source: NbdServer, image: Path,
    loop_device: Callable[[int], tuple[str, Path]], state_dir: Path,
):
    """A device is not known to be zero: the 0xAA left outside the data runs
    must become zeros."""
    dev, backing = loop_device(SOURCE_SIZE + MiB)
    started = transferd.stub.StartTransfer(
        pb.StartTransferRequest(source_uri=source.uri, target_path=dev,
                                options=pb.TransferOptions(verify=True)))
    final = wait_final(transferd.stub, started.id)

    assert final.state == pb.TransferState.TRANSFER_STATE_SUCCEEDED, final.error
    assert final.progress.bytes_verified == SOURCE_SIZE
    of_device = transferd.stub.Checksum(pb.ChecksumRequest(path=dev, size=SOURCE_SIZE))
    of_image = transferd.stub.Checksum(pb.ChecksumRequest(source_uri=source.uri))
    assert final.checksum == f"blake2b-256-blocks:{of_image.digest}" == \
        f"blake2b-256-blocks:{of_device.digest}"
    assert os.listdir(state_dir / "transferd-journals") == []  # removed once complete
    p = final.progress
    assert p.bytes_skipped == 0
    assert p.bytes_zeroed > 0
    assert p.bytes_read + p.bytes_zeroed == SOURCE_SIZE
    assert digest(dev, SOURCE_SIZE) == digest(image, SOURCE_SIZE)
    # The device is left as is beyond the source's end.
    with open(backing, "rb") as f:
        f.seek(SOURCE_SIZE)
        assert f.read() == b"\xaa" * MiB


def test_block_device_written_with_o_direct_verifies(
    transferd: Transferd, source: NbdServer, image: Path,
    loop_device: Callable[[int], tuple[str, Path]], state_dir: Path,
):
    dev, _ = loop_device(SOURCE_SIZE)
    started = transferd.stub.StartTransfer(pb.StartTransferRequest(
        source_uri=source.uri, target_path=dev,
        options=pb.TransferOptions(direct=True, verify=True, request_size=256 * KiB)))
    final = wait_final(transferd.stub, started.id)

    assert final.state == pb.TransferState.TRANSFER_STATE_SUCCEEDED, final.error
    assert final.options.direct
    assert final.checksum
    assert digest(dev, SOURCE_SIZE) == digest(image, SOURCE_SIZE)
