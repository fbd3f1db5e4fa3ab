"""`ferry copy` against what goes wrong between runs and around it: a second
copy onto the same target, a target or an image replaced before a resume, an
incremental copy onto an unfinished one, kernel files as targets, a server
that takes fewer connections or smaller requests than asked."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from ferry import errors
from tests.transferd.conftest import KiB, MiB, NbdServer, ferry_copy
from transferd import journal
from transferd.copy import add_arguments, run_copy
from transferd.job import Job

SIZE = 16 * MiB


def start_copy(*args: str | Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "ferry.cli", "copy", *map(str, args)],
                            stderr=subprocess.PIPE, text=True)


def killed_once_journaled(proc: subprocess.Popen[str], target: Path,
                          journal_file: Path | None = None) -> None:
    """SIGKILLs the copy once it wrote a checkpoint: its journal (beside the
    target unless `journal_file` says where) lists a range."""
    journal_file = journal_file or Path(f"{target}{journal.SUFFIX}")
    while not (journal_file.exists() and len(journal_file.read_text().splitlines()) > 1):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.02)
    proc.kill()
    proc.wait()


SLOW = ("--requests", "1", "--request-size", "256K")
# For a local image, which qemu-nbd serves with no delay filter.
TINY_REQUESTS = ("--requests", "1", "--request-size", "4K")


def copy_under_way(uri: str, target: Path) -> subprocess.Popen[str]:
    """A slow copy that has created its target."""
    proc = start_copy(uri, target, *SLOW)
    while not target.exists():
        assert proc.poll() is None
        time.sleep(0.01)
    return proc


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(SIZE))
    return path


@pytest.fixture
def big_image(tmp_path: Path) -> Path:
    """Large enough that a copy in 4 KiB requests outlasts a checkpoint:
    qemu-nbd serving a local image takes no delay filter."""
    path = tmp_path / "big.img"
    path.write_bytes(os.urandom(128 * MiB))
    return path


def slow_server(image: Path, sock: Path) -> NbdServer:
    return NbdServer.nbdkit(image, sock, "delay", params=("rdelay=20ms",))


@pytest.mark.parametrize("target", ["/proc/self/mem", "/proc/sys/kernel/core_pattern",
                                    "/sys/kernel/mm/transparent_hugepage/enabled"])
def test_a_kernel_file_is_refused_as_a_target(image: Path, target: str):
    before = Path(target).read_bytes() if not target.endswith("mem") else b""
    done = ferry_copy(image, target)

    assert done.returncode == 2, done.stderr
    assert f"target {target} is on " in done.stderr and "a kernel interface" in done.stderr
    if before:
        assert Path(target).read_bytes() == before


def test_a_second_copy_onto_a_target_being_written_is_refused(image: Path, tmp_path: Path):
    target = tmp_path / "out.img"
    with slow_server(image, tmp_path / "nbd.sock") as server:
        first = copy_under_way(server.uri, target)
        link = tmp_path / "link.img"
        link.symlink_to(target)
        second = [ferry_copy(server.uri, name) for name in
                  (f"{tmp_path}/./out.img", link)]
        _, stderr = first.communicate(timeout=120)

    for done in second:
        assert done.returncode == 2, done.stderr
        assert "is in use by another process (a transfer writing it" in done.stderr
    assert first.returncode == 0, stderr
    assert target.read_bytes() == image.read_bytes()


def test_a_target_replaced_before_the_resume_is_copied_whole(image: Path, tmp_path: Path):
    target = tmp_path / "out.img"
    with slow_server(image, tmp_path / "nbd.sock") as server:
        killed_once_journaled(start_copy(server.uri, target, *SLOW), target)
        # Another file of the same size under the same name, as a cleanup
        # script or an operator may leave.
        target.unlink()
        with target.open("wb") as f:
            f.truncate(SIZE)
        done = ferry_copy(server.uri, target, "--progress")

    assert done.returncode == 0, done.stderr
    assert "done by an earlier run" not in done.stderr
    assert "is about another target" in done.stderr
    assert target.read_bytes() == image.read_bytes()
    assert journal.MARK_XATTR not in os.listxattr(target)


def test_a_target_emptied_in_place_before_the_resume_is_copied_whole(
        image: Path, tmp_path: Path):
    """Same inode, same size, the journal's mark still on it: only reading
    back what the journal says was written shows the target lost it."""
    target = tmp_path / "out.img"
    with slow_server(image, tmp_path / "nbd.sock") as server:
        killed_once_journaled(start_copy(server.uri, target, *SLOW), target)
        os.truncate(target, 0)
        os.truncate(target, SIZE)
        done = ferry_copy(server.uri, target, "--progress")

    assert done.returncode == 0, done.stderr
    assert "the target no longer holds what was written at offset" in done.stderr
    assert "done by an earlier run" not in done.stderr
    assert target.read_bytes() == image.read_bytes()


def test_an_image_changed_in_place_keeping_its_mtime_is_copied_whole(
        big_image: Path, tmp_path: Path):
    target = tmp_path / "out.img"
    killed_once_journaled(start_copy(big_image, target, *TINY_REQUESTS), target)
    st = big_image.stat()
    with big_image.open("r+b") as f:
        f.write(os.urandom(64 * KiB))
    os.utime(big_image, ns=(st.st_atime_ns, st.st_mtime_ns))
    done = ferry_copy(big_image, target, "--progress")

    assert done.returncode == 0, done.stderr
    assert "the source no longer holds what was written at offset 0" in done.stderr
    assert target.read_bytes() == big_image.read_bytes()


def test_an_image_changed_before_the_resume_is_copied_whole(big_image: Path, tmp_path: Path):
    target = tmp_path / "out.img"
    killed_once_journaled(start_copy(big_image, target, *TINY_REQUESTS), target)
    with big_image.open("r+b") as f:
        f.write(os.urandom(64 * KiB))
    done = ferry_copy(big_image, target, "--progress")

    assert done.returncode == 0, done.stderr
    assert "done by an earlier run" not in done.stderr
    assert target.read_bytes() == big_image.read_bytes()


def test_sigkill_of_a_copy_of_an_image_takes_its_qemu_nbd_along(
        big_image: Path, tmp_path: Path):
    target = tmp_path / "out.img"
    proc = start_copy(big_image, target, *TINY_REQUESTS)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    while not (servers := children.read_text().split()):
        assert proc.poll() is None
        time.sleep(0.01)
    killed_once_journaled(proc, target)
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in servers):
        assert time.monotonic() < deadline, f"qemu-nbd {servers} outlived ferry copy"
        time.sleep(0.05)


def test_an_incremental_copy_onto_an_unfinished_full_copy_is_refused_by_any_name(
        image: Path, tmp_path: Path):
    target = tmp_path / "out.img"
    areas = tmp_path / "areas.txt"
    areas.write_text("0 4096\n")
    (tmp_path / "link.img").symlink_to(target)
    with slow_server(image, tmp_path / "nbd.sock") as server:
        killed_once_journaled(start_copy(server.uri, target, *SLOW), target)
        os.link(target, tmp_path / "hard.img")
        before = target.read_bytes()
        refused = [ferry_copy(server.uri, tmp_path / name, "--changed-areas", areas)
                   for name in ("out.img", "link.img", "hard.img")]

    for done, name in zip(refused, ("out.img", "link.img", "hard.img"), strict=True):
        assert done.returncode == 2, done.stderr
        assert f"target {tmp_path / name} holds an unfinished transfer" in done.stderr
        assert "run that transfer again to finish it" in done.stderr
    assert target.read_bytes() == before


def test_a_target_name_too_long_for_a_journal_beside_it_still_resumes(
        image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FERRY_STATE_DIR", str(tmp_path / "state"))
    target = tmp_path / ("n" * 250)
    with slow_server(image, tmp_path / "nbd.sock") as server:
        in_state_dir = journal.journal_path(str(target), str(tmp_path / "state" /
                                            "transferd-journals"), beside=True)
        killed_once_journaled(start_copy(server.uri, target, *SLOW), target, Path(in_state_dir))
        done = ferry_copy(server.uri, target)  # no --progress: the resume is said anyway

    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith("resuming: ")
    assert f"were copied by an earlier run ({tmp_path}/state/transferd-journals/" in done.stderr
    assert target.read_bytes() == image.read_bytes()


def test_a_truncated_qcow2_is_refused_not_copied_as_zeros(image: Path, tmp_path: Path):
    qcow2 = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(image), str(qcow2)], check=True)
    os.truncate(qcow2, MiB)
    done = ferry_copy(qcow2, tmp_path / "out.img")

    assert done.returncode == 2, done.stderr
    assert f"disk image {qcow2} is truncated or corrupt" in done.stderr
    assert not (tmp_path / "out.img").exists()


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p.write_bytes(b"\xff\xfe garbage"), "is not UTF-8 text (byte 0)"),
    (lambda p: os.mkfifo(p), "is not a regular file"),
    (lambda p: p.write_text('[{"start": -5, "length": 10}]'), "integers of 0 or more"),
    (lambda p: p.write_text("[" * 100000 + "]" * 100000), "JSON nested too deeply"),
    (lambda p: p.write_text("0 \u0664\u0660\u0669\u0666\n"), "expected OFFSET LENGTH in bytes"),
])
def test_a_changed_areas_file_that_is_no_list_is_refused(
        image: Path, tmp_path: Path, make: object, message: str):
    target = tmp_path / "out.img"
    target.write_bytes(bytes(SIZE))
    areas = tmp_path / "areas"
    make(areas)  # type: ignore[operator]
    done = ferry_copy(image, target, "--changed-areas", areas, timeout=30)

    assert done.returncode == 2, done.stderr
    assert f"changed areas file {areas}" in done.stderr and message in done.stderr
    assert "Traceback" not in done.stderr
    assert target.read_bytes() == bytes(SIZE)


@pytest.mark.parametrize(("uri", "message"), [
    ("nbd://127.0.0.1:-1/", "has a port that is not a number from 1 to 65535"),
    ("nbd://127.0.0.1:99999/", "has a port that is not a number from 1 to 65535"),
    ("NBD+UNIX:///?socket=/tmp/x.sock", "write the scheme in lower case (nbd+unix://)"),
    ("nbd+unix:///?socket=/a&socket=/b", "names 2 sockets; give socket= once"),
    ("nbd+unix:///?socket=/a&socket=", "names 2 sockets; give socket= once"),
    ("nbd://[::1/", "is not a well-formed URI (Invalid IPv6 URL)"),
])
def test_a_malformed_nbd_uri_is_invalid_input(tmp_path: Path, uri: str, message: str):
    done = ferry_copy(uri, tmp_path / "out.img")

    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert not (tmp_path / "out.img").exists()


def test_the_default_request_size_shrinks_to_the_servers_limit(image: Path, tmp_path: Path):
    target = tmp_path / "out.img"
    with NbdServer.nbdkit(image, tmp_path / "nbd.sock", "blocksize-policy",
                          params=("blocksize-maximum=1M",)) as server:
        done = ferry_copy(server.uri, target)
        asked = ferry_copy(server.uri, tmp_path / "asked.img", "--request-size", "2M")

    assert done.returncode == 0, done.stderr
    assert target.read_bytes() == image.read_bytes()
    assert asked.returncode == 2
    assert "request size 2097152 is above what source" in asked.stderr
    assert "accepts (1048576); ask for at most 1048576" in asked.stderr


def test_a_server_taking_fewer_clients_than_connections_asked_still_serves_the_copy(
        image: Path, tmp_path: Path):
    target = tmp_path / "out.img"
    sock = tmp_path / "nbd.sock"
    argv = ["qemu-nbd", "--read-only", "--persistent", "--shared=2", "--format=raw",
            f"--socket={sock}", str(image)]
    with NbdServer(argv, sock) as server:
        done = ferry_copy(server.uri, target, "--connections", "4", "--progress")

    assert done.returncode == 0, done.stderr
    assert "took 2 of the 4 connections asked for" in done.stderr
    assert "over 2 connection(s)" in done.stderr
    assert target.read_bytes() == image.read_bytes()


def test_sigint_exits_130(image: Path, tmp_path: Path):
    target = tmp_path / "out.img"
    with slow_server(image, tmp_path / "nbd.sock") as server:
        proc = copy_under_way(server.uri, target)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)

    assert proc.returncode == 130, stderr
    assert "the copy was interrupted" in stderr
    assert not target.exists()


def copy_in_process(*argv: str | Path) -> int:
    """`ferry copy ARGV` in this process (signals to this process reach it),
    so a test can hold it at a chosen step; raises what the CLI reports."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return run_copy(parser.parse_args([str(a) for a in argv]))


def interrupt_once_created(target: Path) -> threading.Thread:
    """Ctrl-C once the copy has created its target."""
    def interrupt() -> None:
        while not target.exists():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)
    thread = threading.Thread(target=interrupt, daemon=True)
    thread.start()
    return thread


def interrupting(step: str) -> Callable[[Job], Coroutine[Any, Any, object]]:
    """`Job.<step>`, with a Ctrl-C landing while it runs."""
    real = getattr(Job, step)

    async def hit(self: Job) -> object:
        os.kill(os.getpid(), signal.SIGINT)
        await asyncio.sleep(0.2)  # the signal is handled meanwhile
        return await real(self)
    return hit


def test_a_second_ctrl_c_does_not_cut_the_cleanup_short(
        image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The second Ctrl-C lands while the first one's cleanup runs: the
    target this copy created and its journal are still removed, and the
    message says so (it once said 'nothing was written' and left both)."""
    monkeypatch.setattr(Job, "abort", interrupting("abort"))
    target = tmp_path / "out.img"
    with slow_server(image, tmp_path / "nbd.sock") as server:
        interrupt_once_created(target)
        with pytest.raises(errors.Cancelled) as stopped:
            copy_in_process(server.uri, target, *SLOW)

    assert stopped.value.exit_code == 130
    assert "the copy was interrupted" in str(stopped.value)
    assert "was removed" in str(stopped.value)
    assert not target.exists()
    assert not Path(f"{target}{journal.SUFFIX}").exists()


def test_a_ctrl_c_after_the_copy_completed_leaves_it_complete(
        image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A Ctrl-C that lands once the target is complete and flushed (as the
    source is let go): the copy succeeded and says so, exit 0 (it once said
    'interrupted before it started; nothing was written')."""
    monkeypatch.setattr(Job, "close", interrupting("close"))
    target = tmp_path / "out.img"
    with NbdServer.nbdkit(image, tmp_path / "nbd.sock") as server:
        assert copy_in_process(server.uri, target) == 0

    assert target.read_bytes() == image.read_bytes()
    assert not Path(f"{target}{journal.SUFFIX}").exists()


# `ferry copy`, then the signal again and again until the process is gone,
# as an impatient user or a supervisor might send it.
SIGNALLED_AFTER_MAIN = """
import os, subprocess, sys
from ferry.cli import main
status = main(["copy", *sys.argv[2:]])
subprocess.Popen(["sh", "-c", f"while kill -{sys.argv[1]} {os.getpid()}; do sleep 0.001; done"],
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
sys.exit(status)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_after_the_copy_ended_does_not_change_its_exit_status(
        image: Path, tmp_path: Path, sig: signal.Signals):
    """Python gives signals back their default action as it exits: SIGTERM
    then killed a process whose copy had succeeded."""
    target = tmp_path / "out.img"
    with NbdServer.nbdkit(image, tmp_path / "nbd.sock") as server:
        done = subprocess.run([sys.executable, "-c", SIGNALLED_AFTER_MAIN, str(int(sig)),
                               server.uri, str(target)],
                              capture_output=True, text=True, timeout=120, check=False)

    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert target.read_bytes() == image.read_bytes()


def test_a_failure_before_any_write_says_the_existing_target_is_untouched(
        image: Path, tmp_path: Path):
    target = tmp_path / "out.img"
    target.write_bytes(b"\xaa" * SIZE)
    with NbdServer.nbdkit(image, tmp_path / "nbd.sock", "error",
                          params=("error-pread=EIO", "error-pread-rate=100%")) as server:
        done = ferry_copy(server.uri, target)

    assert done.returncode == 1
    assert f"the existing file {target} was left as is (nothing was written)" in done.stderr
