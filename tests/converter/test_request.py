"""Request checks that run before any disk is opened: NUL bytes, absurd
lengths and malformed NIC fields are InvalidInput naming the field, and a
message never repeats more than a short prefix of what was sent."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from converter.inspect import backing_file, disk_format
from converter.request import ECHO_LIMIT, inspect_job, job_from_request
from ferry import errors
from ferry.v1 import converter_pb2

MAC = "52:54:00:12:34:56"


def _refused(**fields: object) -> str:
    with pytest.raises(errors.InvalidInput) as e:
        job_from_request(converter_pb2.ConvertRequest(**fields))  # type: ignore[arg-type]
    return str(e.value)


@pytest.mark.parametrize("fields, named", [
    ({"disk_paths": ["/tmp/a\0b.raw"], "vm": "vm1"}, "VM vm1: disk_paths[0] '/tmp/a\\x00b.raw' "
                                                      "contains a NUL byte"),
    ({"disk_paths": ["/d.raw"], "vm": "vm\0x"}, "the VM name 'vm\\x00x' contains a NUL byte"),
    ({"disk_paths": ["/d.raw"], "vm": "vm1", "plan": "p\0"}, "VM vm1: plan 'p\\x00' contains"),
    ({"disk_paths": ["/d.raw"], "vm": "vm1",
      "nics": [converter_pb2.TargetNic(mac=MAC, guest_name="eth\0")]},
     "VM vm1: nics[0].guest_name 'eth\\x00' contains a NUL byte"),
    ({"disk_paths": ["/d.raw"], "vm": "vm1",
      "nics": [converter_pb2.TargetNic(mac=MAC, addresses=["10.0.0.1/24", "10.\0"])]},
     "VM vm1: nics[0].addresses[1] '10.\\x00' contains a NUL byte"),
    ({"disk_paths": ["/d.raw", ""], "vm": "vm1"}, "VM vm1: disk_paths[1] is empty"),
])
def test_nul_bytes_and_empty_paths_are_refused_naming_the_field(
    fields: dict[str, object], named: str
):
    assert named in _refused(**fields)


@pytest.mark.parametrize("field", ["disk_paths", "vm", "plan", "guest_name", "mac", "address"])
def test_absurdly_long_fields_are_refused_and_not_echoed_whole(field: str):
    long = "x" * 1_000_000
    req: dict[str, object] = {"disk_paths": ["/d.raw"], "vm": "vm1"}
    nic = {"mac": MAC}
    if field == "disk_paths":
        req["disk_paths"] = ["/" + long]
    elif field in ("vm", "plan"):
        req[field] = long
    elif field == "address":
        nic["addresses"] = [long]  # type: ignore[assignment]
    else:
        nic[field] = long
    req["nics"] = [converter_pb2.TargetNic(**nic)]
    msg = _refused(**req)
    assert "(1000000 characters)" in msg or "(1000001 characters)" in msg
    assert len(msg) < ECHO_LIMIT + 300


def test_a_path_of_path_max_minus_one_is_accepted():
    path = "/" + "d" * 4094
    assert job_from_request(converter_pb2.ConvertRequest(disk_paths=[path])).disks == [path]


def test_invalid_mac_names_the_nic_and_the_value():
    msg = _refused(disk_paths=["/d.raw"], vm="vm1", nics=[
        converter_pb2.TargetNic(mac=MAC), converter_pb2.TargetNic(mac="52:54:00:12:34:5g")])
    assert msg == ("VM vm1: target NIC MAC '52:54:00:12:34:5g' (nics[1]) is not a MAC address; "
                   "pass six hex bytes such as 52:54:00:12:34:56")


@pytest.mark.parametrize("name", ["eth/0", "a b", "eth0:1", "x" * 16, "..", "e;rm"])
def test_guest_name_that_linux_refuses_is_invalid(name: str):
    msg = _refused(disk_paths=["/d.raw"], vm="vm1",
                   nics=[converter_pb2.TargetNic(mac=MAC, guest_name=name)])
    assert msg.startswith(f"VM vm1: nics[0].guest_name {name!r} is not a Linux interface name")


def test_a_good_request_keeps_its_fields():
    job = job_from_request(converter_pb2.ConvertRequest(
        disk_paths=["/d0.raw", "/d1.qcow2"], vm="web01", plan="p1",
        nics=[converter_pb2.TargetNic(mac="52-54-00-AB-CD-EF", guest_name="ens192",
                                      addresses=["192.0.2.10/24", "2001:db8::10/64"])]))
    assert (job.disks, job.vm, job.plan) == (["/d0.raw", "/d1.qcow2"], "web01", "p1")
    assert job.nics[0].mac == "52:54:00:ab:cd:ef"
    assert job.nics[0].guest_name == "ens192"
    assert job.nics[0].addresses == ("192.0.2.10/24", "2001:db8::10/64")


def test_inspect_paths_are_checked_too():
    with pytest.raises(errors.InvalidInput, match="disk_paths\\[0\\]"):
        inspect_job(converter_pb2.InspectRequest(disk_paths=["a\0"]))


@pytest.mark.parametrize("image, info, want", [
    ("/v/top.qcow2", {}, None),
    ("/v/top.qcow2", {"backing-filename": "base.qcow2"}, "/v/base.qcow2"),
    ("/v/top.qcow2", {"backing-filename": "/w/base.raw"}, "/w/base.raw"),
    ("top.qcow2", {"backing-filename": "base.qcow2"}, "base.qcow2"),
    ("/v/top.qcow2", {"backing-filename": "nbd://host/export"}, None),
    ("/v/top.qcow2", {"backing-filename": 'json:{"file": {}}'}, None),
])
def test_backing_file_is_resolved_next_to_the_image(
    image: str, info: dict[str, str], want: str | None
):
    assert backing_file(image, info) == want


def _qcow2(path: Path, backing: Path | None = None) -> Path:
    opts = ["-b", str(backing), "-F", "qcow2"] if backing else []
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *opts, str(path), "16M"],
                   check=True)
    return path


def test_missing_backing_file_deep_in_the_chain_is_named(tmp_path: Path):
    base = _qcow2(tmp_path / "base.qcow2")
    mid = _qcow2(tmp_path / "mid.qcow2", base)
    top = _qcow2(tmp_path / "top.qcow2", mid)
    assert disk_format(str(top), "vm1") == "qcow2"
    base.unlink()
    with pytest.raises(errors.FailedPrecondition) as e:
        disk_format(str(top), "vm1")
    assert str(e.value).startswith(f"VM vm1: disk {top}'s backing file {base} is missing; ")


def test_backing_chain_loop_is_refused(tmp_path: Path):
    a = _qcow2(tmp_path / "a.qcow2")
    b = _qcow2(tmp_path / "b.qcow2", a)
    subprocess.run(["qemu-img", "rebase", "-q", "-u", "-b", str(b), "-F", "qcow2", str(a)],
                   check=True)
    with pytest.raises(errors.InvalidInput, match="backing chain loops back to"):
        disk_format(str(b), "vm1")
