"""Extent plans end to end: changed areas (vSphere CBT) and dirty bitmaps
(qemu) copy exactly what changed onto an earlier copy, and a whole-disk plan
copies a sparse disk beyond 2 TiB."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from ferry.v1 import transfer_pb2 as pb
from tests.transferd.conftest import (
    GiB,
    KiB,
    MiB,
    NbdServer,
    Transferd,
    details,
    logged_reads,
    sparse_hash,
    wait_final,
)

S = pb.TransferState
TiB = 1 << 40


def transfer(td: Transferd, source: str, target: Path, **fields: object) -> pb.Transfer:
    started = td.stub.StartTransfer(pb.StartTransferRequest(
        source_uri=source, target_path=str(target), **fields))  # type: ignore[arg-type]
    return wait_final(td.stub, started.id)


def punch(path: Path, offset: int, length: int) -> None:
    subprocess.run(["fallocate", "--punch-hole", f"--offset={offset}", f"--length={length}",
                    str(path)], check=True)


def test_changed_areas_read_exactly_those_and_zero_what_became_zero(
    transferd: Transferd, tmp_path: Path
):
    size = 32 * MiB
    old = tmp_path / "old.img"
    old.write_bytes(os.urandom(size))
    target = tmp_path / "copy.img"
    target.write_bytes(old.read_bytes())  # the earlier full copy

    new = tmp_path / "new.img"
    new.write_bytes(old.read_bytes())
    rewritten = [(3 * MiB, MiB), (10 * MiB + 5, 64 * KiB + 123)]
    with new.open("r+b") as f:
        for offset, length in rewritten:
            f.seek(offset)
            f.write(os.urandom(length))
    zeroed = (20 * MiB, 2 * MiB)
    punch(new, *zeroed)
    areas = [pb.Area(offset=o, length=n) for o, n in [*rewritten, zeroed]]

    log = tmp_path / "reads.log"
    with NbdServer.nbdkit(new, tmp_path / "nbd.sock", "log",
                          params=(f"logfile={log}",)) as server:
        final = transfer(transferd, server.uri, target, changed_areas=areas)

    assert final.state == S.TRANSFER_STATE_SUCCEEDED, final.error
    p = final.progress
    assert p.bytes_read == sum(n for _, n in rewritten)
    assert p.bytes_zeroed == zeroed[1]
    assert p.bytes_skipped == 0
    assert p.bytes_planned == p.bytes_read + p.bytes_zeroed
    reads = logged_reads(log)
    assert sum(n for _, n in reads) == p.bytes_read
    assert all(any(o <= r and r + n <= o + ln for o, ln in rewritten) for r, n in reads)
    assert target.read_bytes() == new.read_bytes()


def test_changed_areas_beyond_the_source_are_refused(transferd: Transferd, tmp_path: Path):
    image = tmp_path / "d.img"
    image.write_bytes(os.urandom(MiB))
    target = tmp_path / "copy.img"
    target.write_bytes(image.read_bytes())
    with NbdServer.nbdkit(image, tmp_path / "nbd.sock") as server, \
            pytest.raises(grpc.RpcError) as e:
        transferd.stub.StartTransfer(pb.StartTransferRequest(
            source_uri=server.uri, target_path=str(target),
            changed_areas=[pb.Area(offset=MiB - 10, length=20)]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "changed areas do not fit source" in details(e.value)
    assert not Path(f"{target}.ferry-journal").exists()


def qemu_io(image: Path, *commands: str) -> None:
    argv = ["qemu-io", "-f", "qcow2"]
    for c in commands:
        argv += ["-c", c]
    subprocess.run([*argv, str(image)], check=True, capture_output=True)


def raw_of(image: Path, out: Path) -> Path:
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(out)], check=True)
    return out


@pytest.fixture
def bitmapped(tmp_path: Path) -> tuple[Path, Path]:
    """A qcow2 disk copied once to a raw target, then changed with its dirty
    bitmap b0 recording the changes."""
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(64 * MiB)],
                   check=True)
    qemu_io(image, "write -P 0x11 0 16M", "write -P 0x22 40M 8M")
    target = raw_of(image, tmp_path / "copy.img")
    subprocess.run(["qemu-img", "bitmap", "--add", str(image), "b0"], check=True)
    qemu_io(image, "write -P 0x5a 1M 128k", "write -P 0x5b 44M 1M", "write -z 4M 64k",
            "write -P 0x5c 60M 192k")
    return image, target


def test_dirty_bitmap_plan_reads_only_dirty_data(
    transferd: Transferd, tmp_path: Path, bitmapped: tuple[Path, Path]
):
    image, target = bitmapped
    sock = tmp_path / "qemu.sock"
    argv = ["qemu-nbd", "--read-only", "--persistent", "--format=qcow2", "--bitmap=b0",
            f"--socket={sock}", str(image)]
    with NbdServer(argv, sock) as server:
        final = transfer(transferd, server.uri, target, dirty_bitmap="b0")

    assert final.state == S.TRANSFER_STATE_SUCCEEDED, final.error
    p = final.progress
    assert p.bytes_read == 128 * KiB + MiB + 192 * KiB
    assert p.bytes_zeroed == 64 * KiB
    assert p.bytes_skipped == 0
    assert target.read_bytes() == raw_of(image, tmp_path / "new.raw").read_bytes()


def test_missing_dirty_bitmap_is_refused(
    transferd: Transferd, tmp_path: Path, bitmapped: tuple[Path, Path]
):
    _, target = bitmapped
    plain = tmp_path / "plain.img"  # a source without bitmaps (not the target itself)
    plain.write_bytes(target.read_bytes())
    with NbdServer.qemu(plain, tmp_path / "nbd.sock") as server, \
            pytest.raises(grpc.RpcError) as e:
        transferd.stub.StartTransfer(pb.StartTransferRequest(
            source_uri=server.uri, target_path=str(target), dirty_bitmap="b0"))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "does not export the dirty bitmap 'b0'" in details(e.value)


def test_copy_command_with_a_dirty_bitmap(tmp_path: Path, bitmapped: tuple[Path, Path]):
    image, target = bitmapped
    done = subprocess.run([sys.executable, "-m", "ferry.cli", "copy", str(image), str(target),
                           "--dirty-bitmap", "b0", "--verify", "--progress"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "read 1.3 MiB, zeroed 64.0 KiB" in done.stderr
    assert target.read_bytes() == raw_of(image, tmp_path / "new.raw").read_bytes()


def test_sparse_disk_beyond_2_tib_copies_and_verifies(transferd: Transferd, tmp_path: Path):
    size = 3 * TiB + 4096 + 512
    image = tmp_path / "huge.img"
    runs = [(0, MiB), (2 * TiB - 7, 3 * MiB), (size - 100 * KiB - 512, 100 * KiB + 512)]
    with image.open("wb") as f:
        f.truncate(size)
        for offset, length in runs:
            f.seek(offset)
            f.write(os.urandom(length))
    target = tmp_path / "out.img"
    with NbdServer.nbdkit(image, tmp_path / "nbd.sock") as server:
        final = transfer(transferd, server.uri, target,
                         options=pb.TransferOptions(verify=True))

    assert final.state == S.TRANSFER_STATE_SUCCEEDED, final.error
    assert final.progress.size_bytes == size
    assert final.progress.bytes_read < 16 * MiB
    assert final.progress.bytes_verified == size
    assert final.checksum.startswith("blake2b-256-blocks:")
    assert target.stat().st_size == size
    assert sparse_hash(target) == sparse_hash(image)
    assert GiB > target.stat().st_blocks * 512


def test_block_status_of_the_next_window_is_asked_before_this_one_is_read(
    transferd: Transferd, tmp_path: Path
):
    """Each status window covers 1 GiB; the query for the second window goes
    out before the reads of the first are done, so reads never wait on it."""
    image = tmp_path / "d.img"
    with image.open("wb") as f:
        f.truncate(2 * GiB + MiB)
        for offset in (0, GiB, 2 * GiB):
            f.seek(offset)
            f.write(os.urandom(4 * MiB if offset < 2 * GiB else MiB))
    log = tmp_path / "requests.log"
    target = tmp_path / "out.img"
    with NbdServer.nbdkit(image, tmp_path / "nbd.sock", "log", "delay",
                          params=(f"logfile={log}", "rdelay=20ms")) as server:
        final = transfer(transferd, server.uri, target,
                         options=pb.TransferOptions(request_size=MiB, max_requests=1))

    assert final.state == S.TRANSFER_STATE_SUCCEEDED, final.error
    order = [(kind, int(offset, 16)) for kind, offset in re.findall(
        r" (Read|Extents) id=\d+ offset=0x([0-9a-f]+) ", log.read_text())]
    second_window = order.index(("Extents", GiB))
    reads_of_first = [i for i, (kind, offset) in enumerate(order)
                      if kind == "Read" and offset < GiB]
    assert len(reads_of_first) == 4
    assert second_window < reads_of_first[1]
    assert sparse_hash(target) == sparse_hash(image)
