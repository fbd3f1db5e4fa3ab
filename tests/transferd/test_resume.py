"""A transfer whose transferd was killed (SIGKILL) resumes from its journal
when started again: only what was not done is copied, and the result
verifies."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import uvloop

from ferry.v1 import transfer_pb2 as pb
from ferry.v1 import transfer_pb2_grpc as pb_grpc
from tests.transferd.conftest import KiB, MiB, NbdServer, transferd_subprocess, wait_final
from transferd import engine, journal
from transferd.job import Job, Spec
from transferd.targets.local import LocalTarget

S = pb.TransferState
SIZE = 64 * MiB


@contextmanager
def transferd_process(sock: Path) -> Iterator[tuple[subprocess.Popen[bytes],
                                                    pb_grpc.TransferServiceStub]]:
    proc = transferd_subprocess(sock)
    try:
        with grpc.insecure_channel(f"unix:{sock}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            yield proc, pb_grpc.TransferServiceStub(channel)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def journaled_ranges(path: Path) -> int:
    try:
        return len(path.read_text().splitlines()) - 1
    except FileNotFoundError:
        return 0


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(SIZE))
    return path


async def run_job(spec: Spec) -> Job:
    """One transfer in-process, run to its end and closed."""
    job = await Job.open(spec, engine.Progress())
    try:
        await job.run()
    finally:
        await job.close()
    return job


def start_request(source: str, target: Path) -> pb.StartTransferRequest:
    return pb.StartTransferRequest(
        transfer_id="disk0", source_uri=source, target_path=str(target),
        options=pb.TransferOptions(request_size=512 * KiB, max_requests=2, verify=True))


def test_sigkilled_transfer_resumes_copying_only_what_was_not_done(
    image: Path, tmp_path: Path
):
    target = tmp_path / "out" / "disk.img"
    target.parent.mkdir()
    journal_file = Path(f"{target}{journal.SUFFIX}")
    sock = tmp_path / "nbd.sock"
    with NbdServer.nbdkit(image, sock, "delay", params=("rdelay=50ms",)) as server, \
            transferd_process(tmp_path / "t1.sock") as (proc, stub):
        stub.StartTransfer(start_request(server.uri, target))
        # Killed once part of the copy is journaled (checkpoints are taken
        # every second; the whole copy takes several).
        while journaled_ranges(journal_file) < 1:
            got = stub.GetTransfer(pb.GetTransferRequest(transfer_id="disk0"))
            assert got.state == S.TRANSFER_STATE_RUNNING, got.error
            time.sleep(0.05)
        proc.kill()
        proc.wait()
    assert target.exists()

    # A new source server on the same socket, as a restarted migration pod
    # would start (nbdkit 1.32 may abort when its client dies mid-reply).
    sock.unlink(missing_ok=True)
    with NbdServer.nbdkit(image, sock) as server, \
            transferd_process(tmp_path / "t2.sock") as (_, stub):
        stub.StartTransfer(start_request(server.uri, target))
        final = wait_final(stub, "disk0")

    assert final.state == S.TRANSFER_STATE_SUCCEEDED, final.error
    p = final.progress
    assert p.bytes_resumed > 0
    assert p.bytes_read < SIZE
    assert p.bytes_read + p.bytes_resumed == SIZE
    assert p.bytes_verified == SIZE
    assert final.checksum
    assert target.read_bytes() == image.read_bytes()
    assert not journal_file.exists()
    assert sorted(os.listdir(target.parent)) == ["disk.img"]


def test_journal_of_another_source_is_not_trusted(image: Path, tmp_path: Path):
    """A journal left by a transfer from another disk of the same size says
    nothing about this one: everything is copied."""
    target = tmp_path / "disk.img"
    target.write_bytes(bytes(SIZE))
    j = journal.Journal.create(f"{target}{journal.SUFFIX}",
                               journal.Identity("nbd://elsewhere/", SIZE, "full"),
                               created=True, done=[journal.Written.of(0, SIZE, None)],
                               target_path=str(target))
    j.close()
    with NbdServer.nbdkit(image, tmp_path / "nbd.sock") as server, \
            transferd_process(tmp_path / "t.sock") as (_, stub):
        stub.StartTransfer(start_request(server.uri, target))
        final = wait_final(stub, "disk0")

    assert final.state == S.TRANSFER_STATE_SUCCEEDED, final.error
    assert final.progress.bytes_resumed == 0
    assert final.progress.bytes_read == SIZE
    assert target.read_bytes() == image.read_bytes()


def test_journal_load_ignores_a_torn_last_line(tmp_path: Path):
    path = str(tmp_path / "j")
    target = tmp_path / "t"
    target.write_bytes(bytes(1 << 20))
    ident = journal.Identity("nbd://h/", 1 << 20, "full")
    zeros = [journal.Written.of(o, 4096, None) for o in (0, 8192, 12288)]
    j = journal.Journal.create(path, ident, created=False, done=zeros[:1],
                               target_path=str(target))
    j.commit(zeros[1:])
    j.close()
    with open(path, "a") as f:
        f.write("16384 40")  # the process died here
    loaded = journal.load(path, ident, str(target))
    assert loaded is not None and not loaded.created
    assert loaded.written == zeros
    assert loaded.done == [(0, 4096), (8192, 8192)]
    assert journal.load(path, journal.Identity("nbd://h/", 1 << 20, "dirty-bitmap:b"),
                        str(target)) is None


def test_unwritable_journal_directory_only_costs_the_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A block device's journal goes to the state directory; when that cannot
    be written the copy still runs (and says it cannot resume)."""
    blocker = tmp_path / "state"
    blocker.write_text("a file where a directory should be")
    monkeypatch.setenv("FERRY_STATE_DIR", str(blocker))
    monkeypatch.setattr("transferd.job.is_block_device", lambda path: True)
    monkeypatch.setattr("transferd.job.check_device_size", lambda path, size: None)
    image = tmp_path / "d.img"
    image.write_bytes(os.urandom(MiB))
    target = tmp_path / "out.img"

    with NbdServer.nbdkit(image, tmp_path / "nbd.sock") as server:
        job = uvloop.run(run_job(Spec(server.uri, str(target), engine.Tuning())))
    assert job.journal.enabled is False
    assert target.read_bytes() == image.read_bytes()


def test_a_checkpoint_due_as_the_copy_ends_does_not_fail_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Checkpoints run back to back here, so one is always due as the copy
    flushes and closes its target: it must be over by then (it once ran on
    the closed target and failed the copy with an internal error)."""
    monkeypatch.setattr(journal, "CHECKPOINT_SECONDS", 0)
    image = tmp_path / "d.img"
    image.write_bytes(os.urandom(8 * MiB))

    with NbdServer.nbdkit(image, tmp_path / "nbd.sock") as server:
        for n in range(20):
            target = tmp_path / f"out{n}.img"
            job = uvloop.run(run_job(Spec(server.uri, str(target),
                                          engine.Tuning(request_size=256 * KiB))))
            assert target.read_bytes() == image.read_bytes()
            # Complete: neither the journal nor the unfinished mark is left.
            assert not os.path.exists(job.journal.path)
            assert not journal.is_marked(str(target))


def test_a_stop_as_the_copy_ends_journals_all_it_flushed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """transferd stopping (SIGTERM) as a copy ends, while a checkpoint is
    under way: the checkpoint, the final flush and the last journal entry
    still complete, so the resume has nothing left to copy (the cut-short
    checkpoint once lost its ranges and the resume copied half again)."""
    monkeypatch.setattr(journal, "CHECKPOINT_SECONDS", 0)
    real_sync = LocalTarget.sync

    async def slow_sync(self: LocalTarget) -> None:
        await asyncio.sleep(0.2)  # a checkpoint is under way whenever the copy ends
        await real_sync(self)

    monkeypatch.setattr(LocalTarget, "sync", slow_sync)
    image = tmp_path / "d.img"
    image.write_bytes(os.urandom(8 * MiB))
    target = tmp_path / "out.img"

    async def stopped_as_it_ends(uri: str) -> None:
        spec = Spec(uri, str(target), engine.Tuning(request_size=256 * KiB))
        job = await Job.open(spec, engine.Progress())
        copying = asyncio.create_task(job.copy())
        while job.progress.done < job.progress.size:
            await asyncio.sleep(0.001)
        copying.cancel()  # what the service does on SIGTERM, then suspends
        with pytest.raises(asyncio.CancelledError):
            await copying
        await job.suspend()
        await job.close()

    with NbdServer.nbdkit(image, tmp_path / "nbd.sock") as server:
        uvloop.run(stopped_as_it_ends(server.uri))
        resumed = uvloop.run(run_job(Spec(server.uri, str(target),
                                          engine.Tuning(request_size=256 * KiB))))

    assert resumed.progress.resumed == 8 * MiB
    assert resumed.progress.read == 0
    assert target.read_bytes() == image.read_bytes()
