"""The gRPC service on a unix socket: bad input is refused with a status
code and a message that names the disk and the fix, before and after the
appliance starts."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
from pathlib import Path

import grpc
import pytest

from converter.server import start
from ferry.v1 import converter_pb2, converter_pb2_grpc
from tests.converter.conftest import DEBIAN_SKELETON, make_disk


async def _convert(socket: str, req: converter_pb2.ConvertRequest) -> grpc.aio.AioRpcError:
    server, _ = await start(f"unix:{socket}")
    try:
        async with grpc.aio.insecure_channel(f"unix:{socket}") as ch:
            stub = converter_pb2_grpc.ConverterServiceStub(ch)
            events = []
            try:
                async for ev in stub.Convert(req):
                    events.append(ev)
            except grpc.aio.AioRpcError as e:
                return e
            raise AssertionError(f"conversion did not fail: {events}")
    finally:
        await server.stop(None)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_disk_without_os_is_failed_precondition(blank_disk: Path, tmp_path: Path):
    before = _digest(blank_disk)
    err = asyncio.run(_convert(
        str(tmp_path / "c.sock"),
        converter_pb2.ConvertRequest(disk_paths=[str(blank_disk)], vm="blank-vm"),
    ))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "VM blank-vm: no operating system found on" in (err.details() or "")
    assert str(blank_disk) in (err.details() or "")
    assert "partially converted" not in (err.details() or "")
    assert _digest(blank_disk) == before


def test_missing_disk_is_not_found(tmp_path: Path):
    err = asyncio.run(_convert(
        str(tmp_path / "c.sock"),
        converter_pb2.ConvertRequest(disk_paths=[str(tmp_path / "nope.raw")], vm="vm1"),
    ))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == (f"VM vm1: disk {tmp_path / 'nope.raw'} does not exist; pass the "
                             "path of the copied target disk")


def test_vmdk_is_refused_as_a_source_disk(tmp_path: Path):
    vmdk = tmp_path / "src.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(vmdk), "16M"], check=True)
    err = asyncio.run(_convert(
        str(tmp_path / "c.sock"),
        converter_pb2.ConvertRequest(disk_paths=[str(vmdk)], vm="vm1"),
    ))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"VM vm1: disk {vmdk} is vmdk, not a target copy (raw or qcow2)" in (err.details() or "")


@pytest.mark.parametrize("mac", ["zz:zz", ""])
def test_bad_target_mac_is_invalid_argument(blank_disk: Path, tmp_path: Path, mac: str):
    err = asyncio.run(_convert(
        str(tmp_path / "c.sock"),
        converter_pb2.ConvertRequest(disk_paths=[str(blank_disk)], vm="vm1",
                                     nics=[converter_pb2.TargetNic(mac=mac)]),
    ))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "target NIC MAC" in (err.details() or "")


def test_fstab_entry_on_a_disk_not_given_is_refused_before_any_change(tmp_path: Path):
    disk = make_disk(tmp_path / "web02-disk0.raw", {
        **DEBIAN_SKELETON,
        "/etc/fstab": "/dev/sda1 / ext4 defaults 0 1\n/dev/sdb1 /srv ext4 defaults 0 2\n",
    })
    before = _digest(disk)
    err = asyncio.run(_convert(
        str(tmp_path / "c.sock"),
        converter_pb2.ConvertRequest(disk_paths=[str(disk)], vm="web02"),
    ))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (err.details() or "").startswith(
        "VM web02: /etc/fstab refers to /dev/sdb1 ('/dev/sdb1 /srv ext4 defaults 0 2'), which "
        f"is not a filesystem on the disks given ({disk})")
    assert "Pass all the VM's disks in boot order" in (err.details() or "")
    assert _digest(disk) == before


def test_non_debian_linux_is_refused(tmp_path: Path):
    disk = make_disk(tmp_path / "db01.raw", {
        "/etc/os-release": 'NAME="Fedora Linux"\nID=fedora\nVERSION_ID=39\n',
        "/etc/fedora-release": "Fedora release 39 (Thirty Nine)\n",
        "/etc/fstab": "/dev/sda1 / ext4 defaults 0 1\n",
        "/bin/.keep": "",
    })
    err = asyncio.run(_convert(
        str(tmp_path / "c.sock"),
        converter_pb2.ConvertRequest(disk_paths=[str(disk)], vm="db01"),
    ))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "VM db01: the guest on" in (err.details() or "")
    assert "is fedora" in (err.details() or "")
    assert "Debian-family guests" in (err.details() or "")


@pytest.mark.parametrize("req, named", [
    (converter_pb2.ConvertRequest(disk_paths=["/tmp/a\0b.raw"], vm="vm1"),
     "VM vm1: disk_paths[0] '/tmp/a\\x00b.raw' contains a NUL byte; pass plain text"),
    (converter_pb2.ConvertRequest(disk_paths=["/d.raw"], vm="vm\0"),
     "the VM name 'vm\\x00' contains a NUL byte; pass plain text"),
    (converter_pb2.ConvertRequest(disk_paths=["/d.raw"], vm="vm1", plan="y" * 100_000),
     "VM vm1: plan 'yyy"),
    (converter_pb2.ConvertRequest(disk_paths=["/d.raw"], vm="vm1", nics=[
        converter_pb2.TargetNic(mac="52:54:00:12:34:56", guest_name="e\0")]),
     "VM vm1: nics[0].guest_name 'e\\x00' contains a NUL byte"),
    (converter_pb2.ConvertRequest(disk_paths=["/d.raw"], vm="vm1", nics=[
        converter_pb2.TargetNic(mac="52:54:00:12:34:56"),
        converter_pb2.TargetNic(mac="52:54:00:12:34:56:78")]),
     "VM vm1: target NIC MAC '52:54:00:12:34:56:78' (nics[1]) is not a MAC address"),
])
def test_nul_bytes_long_fields_and_bad_macs_are_invalid_argument(
    tmp_path: Path, req: converter_pb2.ConvertRequest, named: str
):
    err = asyncio.run(_convert(str(tmp_path / "c.sock"), req))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.details() or "").startswith(named)
    assert len(err.details() or "") < 500


def test_inspect_with_a_nul_byte_is_invalid_argument(tmp_path: Path):
    async def inspect() -> grpc.aio.AioRpcError:
        sock = f"unix:{tmp_path / 'c.sock'}"
        server, _ = await start(sock)
        try:
            async with grpc.aio.insecure_channel(sock) as ch:
                stub = converter_pb2_grpc.ConverterServiceStub(ch)
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.Inspect(converter_pb2.InspectRequest(disk_paths=["x\0"]))
                return e.value
        finally:
            await server.stop(None)

    err = asyncio.run(inspect())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.details() or "").startswith("disk_paths[0] 'x\\x00' contains a NUL byte")


def test_qcow2_with_missing_backing_file_is_failed_precondition(tmp_path: Path):
    base, top = tmp_path / "base.qcow2", tmp_path / "disk0.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                    str(top)], check=True)
    base.unlink()
    err = asyncio.run(_convert(
        str(tmp_path / "c.sock"), converter_pb2.ConvertRequest(disk_paths=[str(top)], vm="vm1"),
    ))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (err.details() or "").startswith(
        f"VM vm1: disk {top}'s backing file {base} is missing; restore it, or give a "
        "self-contained copy")
