"""`ferry copy` as users run it: a subprocess, real qemu-nbd / nbdkit sources,
exit status and messages checked."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.transferd.conftest import KiB, MiB, NbdServer, ferry_copy, sparse_hash
from transferd import engine
from transferd.copy import parse_size, progress_line

SIZE = 64 * MiB
RUNS = [(0, 64 * KiB), (5 * MiB + 4097, 3 * MiB), (SIZE - 100 * KiB, 100 * KiB)]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("src") / "disk.img"
    with path.open("wb") as f:
        f.truncate(SIZE)
        for offset, length in RUNS:
            f.seek(offset)
            f.write(os.urandom(length))
    return path


def test_local_image_copies_sparse_verified_with_progress(image: Path, tmp_path: Path):
    target = tmp_path / "out.img"
    done = ferry_copy(image, target, "--verify", "--progress")

    assert done.returncode == 0, done.stderr
    assert sparse_hash(target) == sparse_hash(image)
    assert target.stat().st_blocks * 512 < 16 * MiB  # holes stayed holes
    summary = done.stderr.strip().splitlines()[-1]
    data = sum(n for _, n in RUNS)
    assert re.match(r"copied 64\.0 MiB in [\d.]+ s over 1 connection\(s\): read ", summary)
    assert "verified blake2b-256-blocks:" in summary
    assert "Traceback" not in done.stderr
    assert data <= 8 * MiB  # the read figure is MiB-rounded; the runs are small
    assert not (tmp_path / "out.img.ferry-journal").exists()


def test_qcow2_image_is_served_in_its_format(image: Path, tmp_path: Path):
    qcow2 = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(image), str(qcow2)], check=True)
    target = tmp_path / "out.img"
    done = ferry_copy(qcow2, target)

    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # quiet without --progress
    assert sparse_hash(target) == sparse_hash(image)


def test_nbd_uri_with_tunables_and_multi_conn(image: Path, tmp_path: Path):
    target = tmp_path / "out.img"
    with NbdServer.nbdkit(image, tmp_path / "nbd.sock") as server:  # advertises multi-conn
        done = ferry_copy(server.uri, target, "--request-size", "256K", "--requests", "4",
                          "--connections", "2", "--progress")

    assert done.returncode == 0, done.stderr
    assert "over 2 connection(s)" in done.stderr
    assert sparse_hash(target) == sparse_hash(image)


def test_direct_io_target_file_copies_and_verifies(image: Path, tmp_path: Path):
    target = tmp_path / "out.img"
    done = ferry_copy(image, target, "--direct", "--verify", "--request-size", "1M")

    assert done.returncode == 0, done.stderr
    assert sparse_hash(target) == sparse_hash(image)


def test_existing_target_is_overwritten(image: Path, tmp_path: Path):
    target = tmp_path / "out.img"
    target.write_bytes(b"\xaa" * (2 * SIZE))
    done = ferry_copy(image, target)

    assert done.returncode == 0, done.stderr
    assert target.stat().st_size == SIZE
    assert target.read_bytes() == image.read_bytes()


def test_failing_source_exits_1_and_removes_the_created_target(image: Path, tmp_path: Path):
    target = tmp_path / "out.img"
    with NbdServer.nbdkit(image, tmp_path / "nbd.sock", "error",
                          params=("error-pread=EIO", "error-pread-rate=100%")) as server:
        done = ferry_copy(server.uri, target)

    assert done.returncode == 1
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith(f"ferry: error: source {server.uri} failed to read ")
    assert "Input/output error" in error
    assert "gave up after 5 attempts" in error
    assert f"the target file {target}, created by this transfer, was removed" in error
    assert "Traceback" not in done.stderr
    assert list(tmp_path.glob("out.img*")) == []


def test_a_full_target_fails_at_once_naming_the_target_not_the_source(
        image: Path, tmp_path: Path):
    """Data is written on the thread that received it; a refused write is
    the target's failure: never retried as a failed read, never blamed on
    the source."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(small)], check=True)
    try:
        dense = tmp_path / "dense.img"
        dense.write_bytes(os.urandom(16 * MiB))
        target = small / "out.img"
        done = ferry_copy(dense, target, "--request-size", "1M")
        leftovers = list(small.iterdir())
    finally:
        subprocess.run(["umount", "-l", str(small)], check=True)

    assert done.returncode == 1
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("ferry: error: writing 1048576 bytes at offset ")
    assert f"of file {target} failed: No space left on device" in error
    assert f"the target file {target}, created by this transfer, was removed" in error
    assert "try 2 of" not in done.stderr  # no retry of the source
    assert "Traceback" not in done.stderr
    assert leftovers == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{tmp}/missing.img", "{tmp}/out/t.img"], "source {tmp}/missing.img does not exist"),
        (["{tmp}", "{tmp}/out/t.img"], "is a directory; pass a disk image"),
        (["{image}", "{tmp}/nodir/t.img"], "target directory {tmp}/nodir does not exist"),
        (["{image}", "{tmp}/out/t.img", "--request-size", "3M"],
         "--request-size 3145728 is not a power of two"),
        (["{image}", "{tmp}/out/t.img", "--connections", "99"],
         "--connections 99 is above 16, the most profile default uses; pass 1 to 16, or 0 for "
         "the default (1)"),
        (["{image}", "{tmp}/out/t.img", "--profile", "vddk", "--request-size", "4M"],
         "--request-size 4194304 is outside 4096 (4 KiB) to 2097152 (2 MiB), the range of "
         "profile vddk"),
        (["{image}", "{image}"], "source and target are the same file"),
        (["{image}", "{tmp}/out/t.img", "--changed-areas", "{tmp}/areas.txt"],
         "target {tmp}/out/t.img does not exist; an incremental copy"),
        (["{image}", "{tmp}/out/t.img", "--changed-areas", "{tmp}/nope.txt"],
         "changed areas file {tmp}/nope.txt does not exist"),
        (["{image}", "{tmp}/out/t.img", "--dirty-bitmap", "b0"],
         "target {tmp}/out/t.img does not exist; an incremental copy"),
        (["nbd+unix:///?socket={tmp}/none.sock", "{tmp}/out/t.img"],
         "source socket {tmp}/none.sock does not exist"),
        (["http://example.invalid/d.img", "{tmp}/out/t.img"],
         "source 'http://example.invalid/d.img' is a URI ferry copy cannot read (scheme 'http')"),
        (["NBD+TLS://host/d", "{tmp}/out/t.img"],
         "cannot read (scheme 'nbd+tls'); pass an NBD URI"),
    ],
)
def test_bad_input_exits_2_with_a_message_and_leaves_nothing(
    image: Path, tmp_path: Path, args: list[str], message: str
):
    (tmp_path / "out").mkdir()
    (tmp_path / "areas.txt").write_text("0 4096\n")
    before = sparse_hash(image)
    done = ferry_copy(*(a.format(tmp=tmp_path, image=image) for a in args))

    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("ferry: error: ")
    assert message.format(tmp=tmp_path) in done.stderr
    assert "Traceback" not in done.stderr
    assert list((tmp_path / "out").iterdir()) == []
    assert sparse_hash(image) == before


def test_changed_areas_out_of_the_disk_are_refused_before_writing(image: Path, tmp_path: Path):
    target = tmp_path / "out.img"
    target.write_bytes(b"\xaa" * SIZE)
    areas = tmp_path / "areas.json"
    areas.write_text(f'[{{"start": {SIZE - 4096}, "length": 8192}}]')
    done = ferry_copy(image, target, "--changed-areas", areas)

    assert done.returncode == 2
    assert "changed areas do not fit source" in done.stderr
    assert "ends past the disk's end (67108864 bytes)" in done.stderr
    assert target.read_bytes() == b"\xaa" * SIZE
    assert not (tmp_path / "out.img.ferry-journal").exists()


@pytest.mark.parametrize("size", [2 * SIZE, SIZE // 2])
def test_an_incremental_copy_onto_a_target_of_another_size_is_refused(
        image: Path, tmp_path: Path, size: int):
    """The target of an incremental copy is the earlier full copy; one of
    another size is the wrong file, and resizing it would destroy it."""
    target = tmp_path / "out.img"
    with target.open("wb") as f:
        f.truncate(size)
        f.write(b"\xaa" * 4096)
    areas = tmp_path / "areas.txt"
    areas.write_text("0 4096\n")
    done = ferry_copy(image, target, "--changed-areas", areas)

    assert done.returncode == 2
    assert (f"target {target} holds {size} bytes but source {image} has {SIZE}; an "
            "incremental copy") in done.stderr
    assert target.stat().st_size == size
    assert target.read_bytes()[:4096] == b"\xaa" * 4096
    assert not (tmp_path / "out.img.ferry-journal").exists()


@pytest.mark.parametrize(("text", "value"),
                         [("4096", 4096), ("2M", 2 * MiB), ("256K", 256 * KiB),
                          ("1GiB", 1 << 30), ("2m", 2 * MiB)])
def test_sizes_take_binary_suffixes(text: str, value: int):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "M", "2X", "-1", "1.5M"])
def test_sizes_that_are_not_sizes_are_refused(text: str):
    with pytest.raises(Exception, match="is not a size"):
        parse_size(text)


def test_progress_line_shows_percent_rate_and_eta():
    # 1 MiB read in 2 s, 1 MiB of data left to read.
    p = engine.Progress(size=4 * MiB, planned=4 * MiB, mapped=4 * MiB, to_read=2 * MiB,
                        read=MiB, skipped=MiB, started=0.0, finished=2.0)
    assert progress_line(p, rate=MiB, verifying=False) == (
        " 50.0% 2.0 MiB of 4.0 MiB copied, 1.0 MiB/s, 2 s left")
    assert progress_line(p, rate=MiB, verifying=False, bar=10).startswith("[#####.....]  50.0%")
    p.verified = MiB
    assert progress_line(p, rate=0, verifying=True) == " 25.0% 1.0 MiB of 4.0 MiB verified"


def test_eta_counts_the_data_left_to_read_not_the_holes():
    """A sparse disk: 16 MiB read in 10 s, 16 MiB of data left, and the rest
    holes that take no time; the ETA is 10 s, not 240 MiB at 1.6 MiB/s."""
    p = engine.Progress(planned=256 * MiB, mapped=256 * MiB, to_read=32 * MiB,
                        read=16 * MiB, started=0.0, finished=10.0)
    assert p.eta() == pytest.approx(10.0)


def test_eta_guesses_the_data_not_mapped_yet_from_what_was_mapped():
    # A quarter mapped, a quarter of it data: 896 MiB to read at 12.8 MiB/s.
    p = engine.Progress(planned=4096 * MiB, mapped=1024 * MiB, to_read=256 * MiB,
                        read=128 * MiB, started=0.0, finished=10.0)
    assert p.eta() == pytest.approx(70.0)


def test_eta_is_0_when_nothing_moved_or_nothing_is_left():
    assert engine.Progress(planned=MiB, mapped=MiB, to_read=MiB, started=0.0,
                           finished=10.0).eta() == 0.0
    assert engine.Progress(planned=MiB, mapped=MiB, to_read=MiB, read=MiB, started=0.0,
                           finished=10.0).eta() == 0.0


def test_progress_of_an_empty_plan_is_complete():
    assert progress_line(engine.Progress(), rate=0, verifying=False).startswith("100.0% 0 B")


def test_sigterm_stops_the_copy_and_removes_the_created_target(image: Path, tmp_path: Path):
    target = tmp_path / "out.img"
    with NbdServer.nbdkit(image, tmp_path / "nbd.sock", "delay",
                          params=("rdelay=200ms",)) as server:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ferry.cli", "copy", "--requests", "1", server.uri,
             str(target)], stderr=subprocess.PIPE, text=True)
        while not target.exists():
            assert proc.poll() is None
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)

    assert proc.returncode == 143  # 128 + SIGTERM
    assert stderr.startswith("ferry: error: the copy was interrupted; the target file "
                             f"{target}, created by this transfer, was removed")
    assert list(tmp_path.glob("out.img*")) == []
