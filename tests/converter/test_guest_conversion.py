"""The real test guest (Debian 12 as left by years on ESXi) converted once
through the gRPC service, then checked from its disk and by booting it on
virtio."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import guestfs
import pytest

from converter.linux.grub import linux_roots
from converter.linux.initramfs import has_file
from converter.linux.network import link_file
from converter.linux.vmware_tools import package_states
from tests.converter.conftest import KVM_MAC, Converted, inspect_over_grpc
from tests.files import sha256_of

pytestmark = pytest.mark.guest

VIRTIO = ("virtio_blk", "virtio_net", "virtio_pci", "virtio_scsi")


@pytest.fixture(scope="module")
def disk(converted_guest: Converted) -> Iterator[Any]:
    """A read-only libguestfs handle on the converted copy, guest mounted."""
    g = guestfs.GuestFS(python_return_dict=True)
    g.add_drive_opts(str(converted_guest.disk), format="raw", readonly=True)
    g.launch()
    g.mount_ro("/dev/sda1", "/")
    yield g
    g.close()


@pytest.fixture(scope="module")
def initrd_listing(disk: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """lsinitramfs (the host's) of each kernel's initramfs on the converted disk."""
    out = {}
    tmp = tmp_path_factory.mktemp("initrd")
    for ver in disk.ls("/lib/modules"):
        local = tmp / f"initrd.img-{ver}"
        disk.download(f"/boot/initrd.img-{ver}", str(local))
        out[ver] = subprocess.run(["lsinitramfs", str(local)], check=True, capture_output=True,
                                  text=True).stdout
    return out


def _text(g: Any, path: str) -> str:
    return bytes(g.read_file(path)).decode()


def test_report_describes_the_guest(converted_guest: Converted):
    r = converted_guest.report
    assert converted_guest.events[-1].step == "done"
    assert (r.os_type, r.distro, r.firmware, r.arch) == ("linux", "debian", "bios", "x86_64")
    assert r.version.startswith("12")
    assert r.converted and r.kernels and r.root_device == "/dev/sda1"
    nic, = [n for n in r.nics if n.name == converted_guest.guest.nic_name]
    assert nic.method == "static"
    assert list(nic.addresses) == [converted_guest.guest.address]
    assert nic.gateway == converted_guest.guest.gateway
    assert list(nic.dns) == [converted_guest.guest.dns]
    assert nic.mac == KVM_MAC
    assert nic.config_source == "/etc/network/interfaces"


def test_fstab_root_is_the_root_filesystem_uuid(disk: Any, converted_guest: Converted):
    uuid = disk.vfs_uuid("/dev/sda1")
    assert converted_guest.report.root_uuid == uuid
    root = [ln.split() for ln in _text(disk, "/etc/fstab").splitlines()
            if ln.strip() and not ln.startswith("#") and ln.split()[1] == "/"]
    assert root == [[f"UUID={uuid}", "/", "ext4", "errors=remount-ro", "0", "1"]]


def test_grub_boots_every_kernel_by_root_uuid(disk: Any):
    uuid = disk.vfs_uuid("/dev/sda1")
    roots = linux_roots(_text(disk, "/boot/grub/grub.cfg"))
    assert roots and set(roots) == {f"UUID={uuid}"}
    default = _text(disk, "/etc/default/grub")
    assert not [ln for ln in default.splitlines() if ln.startswith("GRUB_DISABLE_LINUX_UUID")]


def test_every_initramfs_has_virtio_drivers_and_the_link_file(initrd_listing: dict[str, str]):
    assert initrd_listing
    for ver, listing in initrd_listing.items():
        names = {Path(line).name.split(".ko")[0] for line in listing.splitlines()
                 if ".ko" in line}
        assert set(VIRTIO) <= names, ver
        assert has_file(listing, "/lib/systemd/network/10-ferry-ens192.link"), ver


def test_open_vm_tools_is_purged(disk: Any):
    states = package_states(_text(disk, "/var/lib/dpkg/status"))
    assert states.get("open-vm-tools", "not-installed") == "not-installed"
    assert not disk.exists("/usr/bin/vmtoolsd")


def test_nic_name_is_pinned_to_the_kvm_mac(disk: Any, converted_guest: Converted):
    name = converted_guest.guest.nic_name
    assert _text(disk, f"/etc/systemd/network/10-ferry-{name}.link") == link_file(name, KVM_MAC)


def test_report_lists_the_changes(converted_guest: Converted):
    changes = {(c.kind, c.path) for c in converted_guest.report.changes}
    ver = converted_guest.report.kernels[0]
    assert {
        ("remove-package", "open-vm-tools"),
        ("rewrite-block-device", "/etc/fstab"),
        ("edit-grub-default", "/etc/default/grub"),
        ("regenerate-grub-cfg", "/boot/grub/grub.cfg"),
        ("pin-nic", "/etc/systemd/network/10-ferry-ens192.link"),
        ("add-initramfs-modules", "/etc/initramfs-tools/modules"),
        ("rebuild-initramfs", f"/boot/initrd.img-{ver}"),
    } <= changes
    fstab, = [c for c in converted_guest.report.changes if c.path == "/etc/fstab"]
    assert fstab.detail == f"/dev/sda1 -> UUID={converted_guest.report.root_uuid}"
    steps = [e.step for e in converted_guest.events]
    assert steps == ["launch", "inspect", "remove-vmware-tools", "block-devices", "network",
                     "caches", "initramfs", "grub", "done"]


def test_source_vmdk_is_unchanged(converted_guest: Converted):
    assert sha256_of(Path(converted_guest.guest.vmdk)) == converted_guest.source_sha256


def test_converted_guest_boots_on_virtio_with_its_network(converted_guest: Converted):
    from tests.guest.boot import boot_guest

    result = boot_guest(converted_guest.disk, "virtio", KVM_MAC, fmt="raw", snapshot=True)
    assert not result.gave_up, result.serial_log[-3000:]
    assert result.marker is not None, result.serial_log[-3000:]
    assert f"root=UUID={converted_guest.report.root_uuid}" in result.marker["cmdline"]
    nic = result.interfaces()[converted_guest.guest.nic_name]
    assert nic["mac"] == KVM_MAC
    assert converted_guest.guest.address in nic["addresses"]
    assert result.marker["failed_units"] == []
    assert result.marker["gateway"] == converted_guest.guest.gateway


def test_inspect_rpc_describes_without_converting(converted_guest: Converted, tmp_path: Path):
    report = asyncio.run(inspect_over_grpc(tmp_path / "c.sock", converted_guest.disk))
    assert not report.converted and not report.changes
    assert (report.distro, report.firmware, report.root_uuid) == (
        "debian", "bios", converted_guest.report.root_uuid)
    assert [n.name for n in report.nics] == [converted_guest.guest.nic_name]
