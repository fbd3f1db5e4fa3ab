from __future__ import annotations

import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from controlplane.targets.local import LocalTarget, VMSpec, libvirt_xml, qemu_script
from ferry import errors
from ferry.v1 import controlplane_pb2, converter_pb2
from tests.controlplane.conftest import make_raw_with_mbr

SPEC = VMSpec(
    name="web", memory_mib=3072, cpus=3, firmware="bios",
    macs=["00:50:56:00:00:01", "00:0c:29:aa:bb:cc"],
    disks=["/srv/vms/web/disk0.raw", "/srv/vms/web/disk1.raw"],
)


def _el(parent: ET.Element, path: str) -> ET.Element:
    found = parent.find(path)
    assert found is not None, path
    return found


def test_libvirt_xml_has_virtio_disks_and_the_source_macs():
    root = ET.fromstring(libvirt_xml(SPEC))
    assert root.tag == "domain" and root.findtext("name") == "web"
    assert _el(root, "memory").text == "3072" and _el(root, "memory").get("unit") == "MiB"
    assert root.findtext("vcpu") == "3"
    assert _el(root, "os/type").get("machine") == "q35"
    disks = root.findall("devices/disk")
    assert [_el(d, "source").get("file") for d in disks] == SPEC.disks
    assert [(_el(d, "target").get("dev"), _el(d, "target").get("bus")) for d in disks] == [
        ("vda", "virtio"), ("vdb", "virtio")
    ]
    assert [_el(d, "driver").get("type") for d in disks] == ["raw", "raw"]
    nics = root.findall("devices/interface")
    assert [_el(n, "mac").get("address") for n in nics] == SPEC.macs
    assert [_el(n, "model").get("type") for n in nics] == ["virtio", "virtio"]


def test_libvirt_xml_asks_for_efi_firmware_for_uefi_guests():
    uefi = VMSpec(**{**SPEC.__dict__, "firmware": "uefi"})
    assert _el(ET.fromstring(libvirt_xml(uefi)), "os").get("firmware") == "efi"
    assert _el(ET.fromstring(libvirt_xml(SPEC)), "os").get("firmware") is None


def test_qemu_script_is_valid_sh_with_q35_virtio_and_the_source_macs(tmp_path: Path):
    script = qemu_script(SPEC)
    path = tmp_path / "web.qemu.sh"
    path.write_text(script)
    subprocess.run(["sh", "-n", str(path)], check=True)
    for expected in [
        "-machine q35", "-m 3072", "-smp 3",
        '-drive "file=$QDIR/disk0.raw,format=raw,if=none,id=disk0"',
        "-device virtio-blk-pci,drive=disk0,bootindex=0",
        "-device virtio-blk-pci,drive=disk1",
        "-device virtio-net-pci,netdev=net0,mac=00:50:56:00:00:01",
        "-device virtio-net-pci,netdev=net1,mac=00:0c:29:aa:bb:cc",
        "-serial mon:stdio",
    ]:
        assert expected in script


def _argv(script: str, vm_dir: Path, env: dict[str, str] | None = None) -> list[str]:
    """Runs the script with `printf` in place of qemu to see the real argv."""
    path = vm_dir / "web.qemu.sh"
    path.write_text(script.replace("exec qemu-system-x86_64", "printf '%s\\n'"))
    return subprocess.run(["sh", str(path), "-S"], capture_output=True, text=True, check=True,
                          env={"PATH": os.environ["PATH"], **(env or {})}).stdout.splitlines()


def test_qemu_script_arguments_parse_back_as_qemu_sees_them(tmp_path: Path):
    vm_dir = tmp_path / "my vms" / "web"
    vm_dir.mkdir(parents=True)
    argv = _argv(qemu_script(SPEC), vm_dir)
    assert argv[argv.index("-drive") + 1] == (
        f"file={vm_dir}/disk0.raw,format=raw,if=none,id=disk0"
    )
    # KVM first, TCG when the host has no KVM.
    assert argv[argv.index("-accel"):argv.index("-accel") + 4] == [
        "-accel", "kvm", "-accel", "tcg"
    ]
    assert argv[-1] == "-S"


def test_qemu_script_accelerators_can_be_chosen(tmp_path: Path):
    argv = _argv(qemu_script(SPEC), tmp_path, {"FERRY_QEMU_ACCEL": "tcg"})
    assert [a for i, a in enumerate(argv) if i and argv[i - 1] == "-accel"] == ["tcg"]


def test_prepare_refuses_a_non_empty_vm_directory_before_anything_is_written(tmp_path: Path):
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "keep.txt").write_text("mine")
    with pytest.raises(errors.AlreadyExists, match="already exists and is not empty"):
        LocalTarget(str(tmp_path)).prepare("web")
    assert [p.name for p in (tmp_path / "web").iterdir()] == ["keep.txt"]


def test_prepare_refuses_a_missing_target_directory(tmp_path: Path):
    with pytest.raises(errors.FailedPrecondition, match="does not exist; create it"):
        LocalTarget(str(tmp_path / "nope")).prepare("web")


def test_create_vm_writes_the_files_and_remove_takes_back_what_it_created(tmp_path: Path):
    target = LocalTarget(str(tmp_path))
    target.prepare("web")
    spec = VMSpec(**{**SPEC.__dict__, "disks": target.disk_paths("web", 2)})
    status = controlplane_pb2.VMStatus(name="web")
    target.create_vm(spec, status)
    report = target.write_report("web", converter_pb2.ConversionReport(distro="debian"))
    assert Path(status.qemu_command_file).stat().st_mode & 0o100
    assert Path(status.libvirt_xml_file).read_text().startswith("<domain")
    assert '"distro": "debian"' in Path(report).read_text()
    message = target.remove("web")
    assert message == f"removed {tmp_path / 'web'}, which this migration had created"
    assert list(tmp_path.iterdir()) == []


def test_the_second_of_two_migrations_of_one_vm_cannot_claim_its_directory(tmp_path: Path):
    winner, loser = LocalTarget(str(tmp_path)), LocalTarget(str(tmp_path))
    winner.prepare("web")
    disk = tmp_path / "web" / "disk0.raw"
    disk.write_bytes(b"the winner's disk")
    with pytest.raises(errors.AlreadyExists) as e:
        loser.prepare("web")
    assert str(e.value) == (
        f"VM web: {tmp_path / 'web'} already exists and is not empty; remove it or pick "
        "another target directory or VM name (--name)"
    )
    assert disk.read_bytes() == b"the winner's disk"


def test_prepare_refuses_an_empty_existing_vm_directory_with_the_fix(tmp_path: Path):
    (tmp_path / "web").mkdir()
    with pytest.raises(errors.AlreadyExists) as e:
        LocalTarget(str(tmp_path)).prepare("web")
    assert str(e.value) == (
        f"VM web: {tmp_path / 'web'} already exists (empty); remove it (rmdir "
        f"{tmp_path / 'web'}) or pick another target directory or VM name (--name)"
    )
    assert (tmp_path / "web").is_dir()


def test_prepare_refuses_a_dangling_symlink_at_the_vm_directory(tmp_path: Path):
    (tmp_path / "web").symlink_to(tmp_path / "gone")
    with pytest.raises(errors.AlreadyExists) as e:
        LocalTarget(str(tmp_path)).prepare("web")
    assert str(e.value) == (
        f"VM web: {tmp_path / 'web'} is a dangling symlink; remove it (rm {tmp_path / 'web'}) "
        "or pick another target directory or VM name (--name)"
    )
    assert (tmp_path / "web").is_symlink()


def test_qemu_script_doubles_commas_in_the_disk_path_so_qemu_finds_the_disk(tmp_path: Path):
    vm_dir = tmp_path / "a,b vms" / "web"
    vm_dir.mkdir(parents=True)
    make_raw_with_mbr(vm_dir / "disk0.raw", size_mib=1, data=False)
    argv = _argv(qemu_script(SPEC), vm_dir)
    drive = argv[argv.index("-drive") + 1]
    assert drive == f"file={tmp_path}/a,,b vms/web/disk0.raw,format=raw,if=none,id=disk0"
    # qemu's own option parser reads the doubled comma back as one.
    filename = drive.removeprefix("file=").split(",format=raw")[0]
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", "--image-opts",
         f"driver=raw,file.driver=file,file.filename={filename}"],
        capture_output=True, text=True, check=True,
    )
    assert f'"filename": "{vm_dir}/disk0.raw"' in info.stdout
