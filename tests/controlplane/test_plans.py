"""Plan completion and validation: each condition names the VM, the problem
and the fix."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from controlplane import plans
from ferry.v1 import controlplane_pb2
from tests.controlplane.conftest import make_raw_with_mbr


def _plan(target: Path, *vms: controlplane_pb2.PlanVM, name: str = "p") -> controlplane_pb2.Plan:
    return controlplane_pb2.Plan(
        name=name,
        disk_images=controlplane_pb2.DiskImageSource(),
        local=controlplane_pb2.LocalTarget(directory=str(target)),
        vms=list(vms),
    )


def _vm(name: str, *disks: Path, macs: tuple[str, ...] = ("00:50:56:00:00:01",)):
    vm = controlplane_pb2.PlanVM(name=name, disks=[str(d) for d in disks])
    for mac in macs:
        vm.nics.add(mac=mac)
    return vm


@pytest.fixture
def target(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    return out


def _conditions(plan: controlplane_pb2.Plan) -> list[tuple[str, str, str, str]]:
    prepared = plans.prepare_plan(plan)
    return [(c.vm, c.category, c.type, c.message) for c in prepared.conditions]


def test_a_good_plan_has_no_conditions(raw_disk: Path, target: Path):
    assert _conditions(_plan(target, _vm("web", raw_disk))) == []


def test_a_missing_disk_blocks_and_names_vm_and_path(tmp_path: Path, target: Path):
    missing = tmp_path / "gone.qcow2"
    assert _conditions(_plan(target, _vm("web", missing))) == [(
        "web", "Blocking", "DiskNotFound",
        f"VM web: disk image {missing} does not exist; check the path",
    )]


def test_a_file_that_is_not_a_disk_image_blocks(tmp_path: Path, target: Path):
    text = tmp_path / "readme.txt"
    text.write_text("not a disk")
    [(vm, category, kind, message)] = _conditions(_plan(target, _vm("web", text)))
    assert (vm, category, kind) == ("web", "Blocking", "NotADiskImage")
    assert message.startswith(f"VM web: {text} is not a disk image")


def test_duplicate_vm_names_block(raw_disk: Path, target: Path):
    cond = _conditions(_plan(target, _vm("web", raw_disk), _vm("web", raw_disk)))
    assert (
        "web", "Blocking", "DuplicateVMName",
        "VM web: the name is used by 2 VMs of the plan; give each VM its own name",
    ) in cond


def test_no_mac_warns_and_gets_a_stable_generated_mac(raw_disk: Path, target: Path):
    plan = _plan(target, _vm("web", raw_disk, macs=()), name="plan-a")
    prepared = plans.prepare_plan(plan)
    [c] = prepared.conditions
    assert (c.vm, c.category, c.type) == ("web", "Warning", "NoNicMac")
    mac = prepared.vms[0].nics[0].mac
    assert mac.startswith("52:54:00:") and plans.is_valid_mac(mac)
    assert f"generated MAC {mac}" in c.message and "--mac" in c.message
    assert plans.prepare_plan(plan).vms[0].nics[0].mac == mac
    assert plans.generated_mac("plan-a", "db", 0) != mac


def test_a_warning_alone_does_not_block(raw_disk: Path, target: Path):
    prepared = plans.prepare_plan(_plan(target, _vm("web", raw_disk, macs=())))
    assert prepared.conditions and plans.blocking(prepared) == []


def test_vmx_beside_the_disk_fills_memory_cpus_firmware_and_nics(tmp_path: Path, target: Path):
    disk = make_raw_with_mbr(tmp_path / "db.vmdk", data=False)
    (tmp_path / "db.vmx").write_text(
        'memSize = "1024"\nnumvcpus = "3"\nfirmware = "efi"\nscsi0:0.fileName = "db.vmdk"\n'
        'ethernet0.present = "TRUE"\nethernet0.generatedAddress = "00:0C:29:12:34:56"\n'
        'ethernet0.networkName = "VM Network"\n'
    )
    prepared = plans.prepare_plan(_plan(target, _vm("db", disk, macs=())))
    vm = prepared.vms[0]
    assert (vm.memory_mib, vm.cpus, vm.firmware) == (1024, 3, "uefi")
    assert [(n.mac, n.network) for n in vm.nics] == [("00:0c:29:12:34:56", "VM Network")]
    assert list(prepared.conditions) == []


def test_defaults_without_a_vmx(raw_disk: Path, target: Path):
    vm = plans.prepare_plan(_plan(target, _vm("web", raw_disk))).vms[0]
    assert (vm.memory_mib, vm.cpus, vm.firmware) == (2048, 2, "bios")


def test_a_disk_the_vmx_lists_but_the_plan_lacks_is_a_warning(tmp_path: Path, target: Path):
    disk = make_raw_with_mbr(tmp_path / "db.vmdk", data=False)
    (tmp_path / "db.vmx").write_text(
        'scsi0:0.fileName = "db.vmdk"\nscsi0:1.fileName = "db-data.vmdk"\n'
    )
    [(vm, category, kind, message)] = _conditions(_plan(target, _vm("db", disk)))
    assert (vm, category, kind) == ("db", "Warning", "DiskNotInPlan")
    assert "db-data.vmdk" in message


def test_a_missing_target_directory_blocks_with_the_fix(raw_disk: Path, tmp_path: Path):
    missing = tmp_path / "nowhere"
    assert _conditions(_plan(missing, _vm("web", raw_disk))) == [(
        "", "Blocking", "TargetDirectoryMissing",
        f"target directory {missing} does not exist; create it (mkdir -p {missing})",
    )]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_a_read_only_target_directory_blocks(raw_disk: Path, target: Path):
    target.chmod(0o555)
    try:
        [(_, _, kind, _)] = _conditions(_plan(target, _vm("web", raw_disk)))
        assert kind == "TargetDirectoryNotWritable"
    finally:
        target.chmod(0o755)


def test_an_existing_non_empty_vm_directory_blocks(raw_disk: Path, target: Path):
    (target / "web").mkdir()
    (target / "web" / "disk0.raw").write_text("old")
    [(vm, category, kind, message)] = _conditions(_plan(target, _vm("web", raw_disk)))
    assert (vm, category, kind) == ("web", "Blocking", "TargetVMDirectoryNotEmpty")
    assert message == (
        f"VM web: {target / 'web'} already exists and is not empty; remove it or pick another "
        "target directory or VM name (--name)"
    )


def test_an_empty_existing_vm_directory_blocks_with_the_fix(raw_disk: Path, target: Path):
    (target / "web").mkdir()
    [(_, category, kind, message)] = _conditions(_plan(target, _vm("web", raw_disk)))
    assert (category, kind) == ("Blocking", "TargetVMDirectoryNotEmpty")
    assert message == (
        f"VM web: {target / 'web'} already exists (empty); remove it (rmdir {target / 'web'}) "
        "or pick another target directory or VM name (--name)"
    )


@pytest.mark.parametrize("name", ["", "../etc", "a b", "-x"])
def test_a_vm_name_that_cannot_be_a_directory_blocks(raw_disk: Path, target: Path, name: str):
    kinds = [k for _, _, k, _ in _conditions(_plan(target, _vm(name, raw_disk)))]
    assert kinds == ["InvalidVMName"]


def test_a_bad_mac_blocks(raw_disk: Path, target: Path):
    [(_, category, kind, message)] = _conditions(_plan(target, _vm("web", raw_disk,
                                                                   macs=("zz:11",))))
    assert (category, kind) == ("Blocking", "InvalidMac")
    assert "'zz:11' is not a MAC address" in message


def test_a_plan_without_vms_blocks(target: Path):
    assert [k for _, _, k, _ in _conditions(_plan(target))] == ["NoVMs"]


def _vmx_vm(tmp_path: Path, body: str) -> tuple[Path, Path]:
    src = tmp_path / "src"
    src.mkdir()
    disk = make_raw_with_mbr(src / "web.raw", data=False)
    (src / "web.vmx").write_text('scsi0:0.fileName = "web.raw"\n' + body)
    return disk, src / "web.vmx"


@pytest.mark.parametrize("body, message", [
    ('memsize = "99999999999"\n',
     "memsize: 99999999999 MiB of memory is outside 64 MiB..4 TiB; fix memsize in"),
    ('memsize = "1"\n', "memsize: 1 MiB of memory is outside 64 MiB..4 TiB; fix memsize in"),
    ('numvcpus = "100000"\n', "numvcpus: 100000 CPUs is outside 1..512; fix numvcpus in"),
])
def test_absurd_hardware_in_the_vmx_blocks_naming_the_key(
    tmp_path: Path, target: Path, body: str, message: str
):
    disk, vmx = _vmx_vm(tmp_path, body)
    conditions = _conditions(_plan(target, _vm("web", disk)))
    assert [(c, k, m) for _, c, k, m in conditions] == [
        ("Blocking", "InvalidHardware", f"VM web: web.vmx {message} {vmx}")
    ]


@pytest.mark.parametrize("memory, cpus, why", [
    (32, 2, "32 MiB of memory is outside 64 MiB..4 TiB"),
    ((4 << 20) + 1, 2, "4194305 MiB of memory is outside 64 MiB..4 TiB"),
    (2048, 513, "513 CPUs is outside 1..512"),
])
def test_absurd_hardware_in_the_plan_blocks(
    raw_disk: Path, target: Path, memory: int, cpus: int, why: str
):
    vm = _vm("web", raw_disk)
    vm.memory_mib, vm.cpus = memory, cpus
    assert _conditions(_plan(target, vm)) == [
        ("web", "Blocking", "InvalidHardware", f"VM web: {why}; ask for less")
    ]


@pytest.mark.parametrize("mac, why", [
    ("01:00:5e:00:00:01", "is a multicast address, which no NIC can have"),
    ("ff:ff:ff:ff:ff:ff", "is the broadcast address, which no NIC can have"),
    ("00:00:00:00:00:00", "is all zeros, which no NIC can have"),
])
def test_a_mac_no_nic_can_have_blocks(raw_disk: Path, target: Path, mac: str, why: str):
    assert _conditions(_plan(target, _vm("web", raw_disk, macs=(mac,)))) == [(
        "web", "Blocking", "InvalidMac",
        f"VM web: {mac!r} {why}; pass the NIC's MAC with --mac, written as 00:50:56:aa:bb:cc",
    )]


def test_a_bad_mac_from_the_vmx_names_the_file_and_key(tmp_path: Path, target: Path):
    disk, _ = _vmx_vm(tmp_path, 'ethernet0.generatedAddress = "01:0c:29:00:00:01"\n')
    vm = controlplane_pb2.PlanVM(name="web", disks=[str(disk)])
    assert _conditions(_plan(target, vm)) == [(
        "web", "Blocking", "InvalidMac",
        "VM web: web.vmx ethernet0.generatedAddress '01:0c:29:00:00:01' is a multicast "
        "address, which no NIC can have; pass the NIC's MAC with --mac, written as "
        "00:50:56:aa:bb:cc",
    )]


def test_a_huge_bad_mac_is_cut_in_the_message(raw_disk: Path, target: Path):
    [(_, _, _, message)] = _conditions(_plan(target, _vm("web", raw_disk, macs=("z" * 5000,))))
    assert len(message) < 400 and "zzz..." in message


def test_the_same_mac_twice_blocks(raw_disk: Path, target: Path):
    vm = _vm("web", raw_disk, macs=("00:50:56:00:00:01", "00:50:56:00:00:01"))
    assert _conditions(_plan(target, vm)) == [(
        "web", "Blocking", "DuplicateMac",
        "VM web: the MAC 00:50:56:00:00:01 is used by two NICs (web too); give each NIC its "
        "own MAC with --mac",
    )]


def test_the_same_disk_twice_blocks_also_through_a_symlink(raw_disk: Path, target: Path):
    alias = raw_disk.parent / "alias.raw"
    alias.symlink_to(raw_disk)
    assert _conditions(_plan(target, _vm("web", raw_disk, raw_disk))) == [(
        "web", "Blocking", "DuplicateDisk",
        f"VM web: the disk {raw_disk} is given twice; give each disk once",
    )]
    assert _conditions(_plan(target, _vm("web", raw_disk, alias))) == [(
        "web", "Blocking", "DuplicateDisk",
        f"VM web: the disk {alias} (the same file as {raw_disk}) is given twice; "
        "give each disk once",
    )]
