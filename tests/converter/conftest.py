"""Shared fixtures: a blank disk with a filesystem and no OS, and one
conversion of the test guest."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from converter.report import to_json
from converter.server import start
from ferry.v1 import converter_pb2, converter_pb2_grpc
from tests.files import sha256_of


@pytest.fixture(scope="session")
def blank_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A 64 MiB raw disk: MBR, one ext4 partition with a few files, no OS."""
    yield make_disk(tmp_path_factory.mktemp("blank") / "blank.raw",
                    {"/data/readme.txt": "not an operating system\n"})


def make_disk(path: Path, files: dict[str, str], size_mib: int = 64) -> Path:
    """A raw MBR disk with one ext4 partition holding `files` (path ->
    text), made without libguestfs or loop devices."""
    tree = path.parent / f"{path.stem}-tree"
    for name, text in files.items():
        f = tree / name.lstrip("/")
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    subprocess.run(["truncate", "-s", f"{size_mib}M", str(path)], check=True)
    subprocess.run(["sfdisk", "-q", str(path)], input=b"label: dos\nstart=1MiB, type=83\n",
                   check=True)
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-E", f"offset={1024 * 1024}", "-d", str(tree),
                    str(path), f"{(size_mib - 1) * 1024}k"], check=True)
    return path


# The files libguestfs inspection needs to call a filesystem a Debian root.
DEBIAN_SKELETON = {
    "/etc/debian_version": "12.8\n",
    "/etc/os-release": 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\n'
                       'VERSION_ID="12"\nID=debian\n',
    "/bin/.keep": "",
    "/var/lib/dpkg/status": "",
}


# The MAC the migrated VM gets on KVM; deliberately not the VMware one.
KVM_MAC = "52:54:00:6b:3c:01"


@dataclass
class Converted:
    """One conversion of a raw copy of the test guest, through the gRPC service."""

    guest: Any            # tests.guest.image's guest description
    source_sha256: str    # of the cached VMDK, before the conversion
    disk: Path            # the converted raw copy
    events: list[converter_pb2.ConvertEvent]
    report: converter_pb2.ConversionReport
    seconds: float




async def convert_over_grpc(
    socket: Path, req: converter_pb2.ConvertRequest
) -> list[converter_pb2.ConvertEvent]:
    """Starts the converter service on a unix socket and runs one Convert."""
    server, _ = await start(f"unix:{socket}")
    try:
        async with grpc.aio.insecure_channel(f"unix:{socket}") as ch:
            stub = converter_pb2_grpc.ConverterServiceStub(ch)
            return [ev async for ev in stub.Convert(req)]
    finally:
        await server.stop(None)


async def inspect_over_grpc(socket: Path, disk: Path) -> converter_pb2.ConversionReport:
    server, _ = await start(f"unix:{socket}")
    try:
        async with grpc.aio.insecure_channel(f"unix:{socket}") as ch:
            stub = converter_pb2_grpc.ConverterServiceStub(ch)
            report: converter_pb2.ConversionReport = await stub.Inspect(
                converter_pb2.InspectRequest(disk_paths=[str(disk)]))
            return report
    finally:
        await server.stop(None)


def convert_disk(disk: Path, vm: str, workdir: Path) -> tuple[list[Any], float]:
    req = converter_pb2.ConvertRequest(
        disk_paths=[str(disk)], vm=vm, plan="test",
        nics=[converter_pb2.TargetNic(mac=KVM_MAC)],
    )
    started = time.monotonic()
    events = asyncio.run(convert_over_grpc(workdir / "converter.sock", req))
    return events, time.monotonic() - started


@pytest.fixture(scope="session")
def converted_guest(tmp_path_factory: pytest.TempPathFactory) -> Converted:
    """The test guest's VMDK copied to raw (never converted itself) and
    converted once; shared by the guest test modules."""
    from tests.guest.image import ensure_guest_image

    guest = ensure_guest_image()
    vmdk = Path(guest.vmdk)
    before = sha256_of(vmdk)
    work = tmp_path_factory.mktemp("converted")
    disk = work / "disk0.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(vmdk), str(disk)], check=True)
    events, seconds = convert_disk(disk, "debian12-web01", work)
    (work / "report.json").write_text(to_json(events[-1].report))
    return Converted(guest, before, disk, events, events[-1].report, seconds)
