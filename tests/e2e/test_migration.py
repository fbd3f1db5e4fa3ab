"""End to end: the VMware-style Debian guest migrated through the control
plane's gRPC API with the three services running as separate processes, then
booted under qemu on virtio. The converted copy must come up with its original
interface name and static address; the unconverted copy must not."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from controlplane.migrate import build_plan, drive_migration, local_services
from ferry.v1 import controlplane_pb2
from tests.files import sha256_of
from tests.guest.boot import BootResult, boot_guest
from tests.guest.image import GuestImage, ensure_guest_image

pytestmark = [pytest.mark.e2e, pytest.mark.guest]

M = controlplane_pb2.MigrationState




@dataclass(frozen=True)
class Migrated:
    migration: controlplane_pb2.Migration
    vm_dir: Path
    progress_output: str


@pytest.fixture(scope="module")
def guest() -> GuestImage:
    return ensure_guest_image()


@pytest.fixture(scope="module")
def source_digest(guest: GuestImage) -> str:
    return sha256_of(guest.vmdk)


@pytest.fixture(scope="module")
def controlplane_addr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    state = tmp_path_factory.mktemp("state")
    with local_services(str(state), "info") as services:
        yield services.address("controlplane")


def migrate(
    guest: GuestImage, addr: str, target: Path, *, skip_conversion: bool
) -> Migrated:
    plan = build_plan([str(guest.vmdk)], str(target), None, [], skip_conversion)
    out = io.StringIO()
    migration = asyncio.run(drive_migration(addr, plan, out))
    if migration.state != M.MIGRATION_STATE_SUCCEEDED:
        # In full: an assertion's message would be cut to a line.
        pytest.fail(f"the migration ended {M.Name(migration.state)}: {migration.error}\n"
                    f"{out.getvalue()}", pytrace=False)
    return Migrated(migration, target / guest.name, out.getvalue())


@pytest.fixture(scope="module")
def unconverted(
    guest: GuestImage, source_digest: str, controlplane_addr: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Migrated:
    return migrate(guest, controlplane_addr, tmp_path_factory.mktemp("copied"),
                   skip_conversion=True)


@pytest.fixture(scope="module")
def converted(
    guest: GuestImage, source_digest: str, controlplane_addr: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Migrated:
    return migrate(guest, controlplane_addr, tmp_path_factory.mktemp("converted"),
                   skip_conversion=False)


@pytest.fixture(scope="module")
def converted_boot(guest: GuestImage, converted: Migrated) -> BootResult:
    return boot_guest(converted.vm_dir / "disk0.raw", "virtio", guest.mac, fmt="raw")


def test_copied_disk_equals_the_source(guest: GuestImage, unconverted: Migrated) -> None:
    target = unconverted.vm_dir / "disk0.raw"
    compared = subprocess.run(
        ["qemu-img", "compare", "-f", "vmdk", "-F", "raw", str(guest.vmdk), str(target)],
        capture_output=True, text=True,
    )
    assert compared.returncode == 0, compared.stdout + compared.stderr
    (disk,) = unconverted.migration.vms[0].disks
    # Holes of the VMDK are never read: far less is read than the virtual size.
    assert disk.progress.size_bytes == target.stat().st_size
    assert 0 < disk.progress.bytes_read < disk.progress.size_bytes // 2


def test_unconverted_copy_does_not_reach_its_network_on_virtio(
    guest: GuestImage, unconverted: Migrated
) -> None:
    boot = boot_guest(unconverted.vm_dir / "disk0.raw", "virtio", guest.mac, fmt="raw")
    addresses = [a for nic in boot.interfaces().values() for a in nic["addresses"]]
    assert guest.address not in addresses
    # What actually happens: the VMware-only initramfs finds no root disk.
    assert boot.gave_up, boot.serial_log[-3000:]


def test_migration_walks_its_phases_and_reports_the_conversion(
    guest: GuestImage, converted: Migrated
) -> None:
    vm = converted.migration.vms[0]
    phases = {p.name: p.state for p in vm.phases}
    assert phases["CopyDisks"] == M.MIGRATION_STATE_SUCCEEDED
    assert phases["ConvertGuest"] == M.MIGRATION_STATE_SUCCEEDED
    assert phases["CreateVM"] == M.MIGRATION_STATE_SUCCEEDED
    assert "disk0" in converted.progress_output

    report = json.loads(Path(vm.report_file).read_text())
    assert report["distro"] == "debian"
    kinds = {change["kind"] for change in report["changes"]}
    assert {"remove-package", "rebuild-initramfs"} <= kinds, kinds

    domain = ET.parse(vm.libvirt_xml_file).getroot()
    macs = [m.get("address") for m in domain.iter("mac")]
    assert macs == [guest.mac]
    assert [t.get("bus") for t in domain.iter("target") if t.get("bus")] == ["virtio"]
    assert guest.mac in Path(vm.qemu_command_file).read_text()


def test_converted_guest_boots_on_virtio_with_its_network(
    guest: GuestImage, converted_boot: BootResult
) -> None:
    assert converted_boot.marker is not None, converted_boot.serial_log[-3000:]
    interfaces = converted_boot.interfaces()
    assert guest.nic_name in interfaces, interfaces
    nic = interfaces[guest.nic_name]
    assert nic["mac"] == guest.mac
    assert guest.address in nic["addresses"]
    assert converted_boot.marker["failed_units"] == []
    assert converted_boot.marker["gateway"] == guest.gateway
    assert converted_boot.marker["gateway_ping"] is True
    assert "root=UUID=" in converted_boot.marker["cmdline"]


def test_source_vmdk_is_unchanged(
    guest: GuestImage, source_digest: str, unconverted: Migrated, converted: Migrated
) -> None:
    assert sha256_of(guest.vmdk) == source_digest
