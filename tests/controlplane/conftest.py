"""Real disk images made with qemu-img / sfdisk in tmp directories, and the
real transferd on a Unix socket."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.threadloop import serving


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def make_raw_with_mbr(path: Path, size_mib: int = 16, data: bool = True) -> Path:
    """A raw disk with a real DOS partition table (sfdisk) and, optionally,
    random data in a few places so a copy that drops data shows."""
    qemu_img("create", "-f", "raw", str(path), f"{size_mib}M")
    subprocess.run(
        ["sfdisk", "--quiet", str(path)], input=b"label: dos\n,,L\n", check=True,
        capture_output=True,
    )
    if data:
        with open(path, "r+b") as f:
            for offset in (1 << 20, (size_mib // 2) << 20, (size_mib << 20) - 65536):
                f.seek(offset)
                f.write(os.urandom(65536))
    return path


@pytest.fixture
def raw_disk(tmp_path: Path) -> Path:
    return make_raw_with_mbr(tmp_path / "disk.raw")


@pytest.fixture(scope="session")
def big_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 GiB with 1.5 GiB of real data: a copy long enough (seconds) to be
    interrupted while it runs. Tests must not modify it."""
    path = make_raw_with_mbr(tmp_path_factory.mktemp("big") / "big.raw", size_mib=2048,
                             data=False)
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x61 1M 1536M", str(path)],
                   check=True, capture_output=True)
    return path


@pytest.fixture(scope="module")
def transferd_addr() -> Iterator[str]:
    """The real transferd on its own event loop thread, on a Unix socket."""
    from transferd.server import start

    workdir = tempfile.mkdtemp(prefix="ferry-td-")
    address = f"unix:{workdir}/transferd.sock"
    try:
        with serving(lambda: start(address, "")):
            yield address
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def qemu_nbd_serving(path: Path) -> list[int]:
    """Pids of qemu-nbd processes that have `path` on their command line."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"qemu-nbd") and str(path).encode() in argv:
            pids.append(int(pid))
    return pids


