"""The local target: per VM a directory DIR/<vm>/ with raw disks, a runnable
qemu command line, a libvirt domain XML and the conversion report. File
contents are built by pure functions; the class only does the file I/O."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import json_format

from ferry import errors
from ferry.v1 import controlplane_pb2, converter_pb2

REPORT_FILE = "conversion-report.json"


@dataclass(frozen=True)
class VMSpec:
    """What the target needs to describe a VM: taken from the completed plan."""

    name: str
    memory_mib: int
    cpus: int
    firmware: str  # bios, uefi
    macs: list[str]
    disks: list[str]  # target raw files, boot disk first


def disk_file_name(index: int) -> str:
    return f"disk{index}.raw"


def target_problems(directory: str) -> list[tuple[str, str]]:
    """(condition type, message) for a target directory that cannot be used."""
    if not directory:
        return [("TargetDirectoryMissing", "no target directory given; pass local:DIR")]
    p = Path(directory)
    if not p.exists():
        return [(
            "TargetDirectoryMissing",
            f"target directory {directory} does not exist; create it "
            f"(mkdir -p {shlex.quote(directory)})",
        )]
    if not p.is_dir():
        return [(
            "TargetDirectoryMissing",
            f"target {directory} is not a directory; pass local:DIR with a directory",
        )]
    if not os.access(directory, os.W_OK | os.X_OK):
        return [(
            "TargetDirectoryNotWritable",
            f"target directory {directory} is not writable; fix its permissions or pick another",
        )]
    return []


def vm_directory_problem(directory: str, vm: str) -> str | None:
    """Anything already at DIR/<vm> is refused: the migration claims the VM
    directory by creating it, so a concurrent migration of the same name
    fails instead of overwriting (and later deleting) the other's disks."""
    d = Path(directory) / vm
    fix = "or pick another target directory or VM name (--name)"
    if d.is_symlink() and not d.exists():
        return f"{d} is a dangling symlink; remove it (rm {_hint_path(d)}) {fix}"
    if not os.path.lexists(d):
        return None
    if not d.is_dir():
        return f"{d} already exists and is not a directory; remove it {fix}"
    try:
        empty = not any(d.iterdir())
    except OSError as e:
        return f"{d} already exists and cannot be read ({e.strerror}); remove it {fix}"
    if empty:
        return f"{d} already exists (empty); remove it (rmdir {_hint_path(d)}) {fix}"
    return f"{d} already exists and is not empty; remove it {fix}"


def _hint_path(path: Path) -> str:
    return shlex.quote(str(path))


def qemu_script(spec: VMSpec) -> str:
    """A shell script that boots the migrated VM with qemu: q35, KVM when
    present else TCG, virtio-blk disks, virtio-net with the source MACs, the
    serial console on stdio. Disk paths are relative to the script."""
    groups: list[list[str]] = [
        ["qemu-system-x86_64"],
        ["-name", spec.name],
        ["-machine", "q35"],
        [_ACCEL_ARGS],
        ["-m", str(spec.memory_mib)],
        ["-smp", str(spec.cpus)],
    ]
    if spec.firmware == "uefi":
        groups.append(["-bios", "/usr/share/ovmf/OVMF.fd"])
    for i, disk in enumerate(spec.disks):
        groups.append(["-drive", f"file=$QDIR/{Path(disk).name},format=raw,if=none,id=disk{i}"])
        boot = ",bootindex=0" if i == 0 else ""
        groups.append(["-device", f"virtio-blk-pci,drive=disk{i}{boot}"])
    for i, mac in enumerate(spec.macs):
        groups.append(["-netdev", f"user,id=net{i}"])
        groups.append(["-device", f"virtio-net-pci,netdev=net{i},mac={mac}"])
    groups += [["-display", "none"], ["-serial", "mon:stdio"]]
    lines = [" ".join(_shell_word(a) for a in group) for group in groups]
    body = " \\\n  ".join(lines)
    return (
        "#!/bin/sh\n"
        f"# Boots the VM {spec.name} migrated by Ferry. Extra qemu options may follow.\n"
        "# FERRY_QEMU_ACCEL lists accelerators to try in order (default kvm:tcg, KVM\n"
        "# when the host has it, else TCG); set it to tcg where /dev/kvm misbehaves.\n"
        'DIR="$(cd "$(dirname "$0")" && pwd)"\n'
        "# qemu option values end at a comma; a comma in the path is written twice.\n"
        'QDIR="$(printf \'%s\' "$DIR" | sed \'s/,/,,/g\')"\n'
        "ACCEL_ARGS=\n"
        'for a in $(echo "${FERRY_QEMU_ACCEL:-kvm:tcg}" | tr : " "); do\n'
        '  ACCEL_ARGS="$ACCEL_ARGS -accel $a"\n'
        "done\n"
        f'exec {body} \\\n  "$@"\n'
    )


# qemu 7.2 rejects "-accel kvm:tcg"; the script expands the list into one
# -accel option per accelerator, which qemu tries in order.
_ACCEL_ARGS = "$ACCEL_ARGS"


def _shell_word(arg: str) -> str:
    """$QDIR must expand (in double quotes), $ACCEL_ARGS must split into
    words; everything else is quoted literally."""
    if arg == _ACCEL_ARGS:
        return arg
    if arg.startswith("file=$QDIR/"):
        return f'"{arg}"'
    return shlex.quote(arg)


def libvirt_xml(spec: VMSpec) -> str:
    """A libvirt domain: q35, virtio disks (vda, vdb, ...) and virtio
    interfaces carrying the source MACs."""
    domain = ET.Element("domain", type="kvm")
    ET.SubElement(domain, "name").text = spec.name
    ET.SubElement(domain, "memory", unit="MiB").text = str(spec.memory_mib)
    ET.SubElement(domain, "vcpu").text = str(spec.cpus)
    os_el = ET.SubElement(domain, "os", firmware="efi") if spec.firmware == "uefi" else (
        ET.SubElement(domain, "os")
    )
    ET.SubElement(os_el, "type", arch="x86_64", machine="q35").text = "hvm"
    ET.SubElement(os_el, "boot", dev="hd")
    features = ET.SubElement(domain, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    ET.SubElement(domain, "cpu", mode="host-model")
    devices = ET.SubElement(domain, "devices")
    for i, disk in enumerate(spec.disks):
        d = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(d, "driver", name="qemu", type="raw")
        ET.SubElement(d, "source", file=str(Path(disk).resolve()))
        ET.SubElement(d, "target", dev=f"vd{chr(ord('a') + i)}", bus="virtio")
    for mac in spec.macs:
        n = ET.SubElement(devices, "interface", type="network")
        ET.SubElement(n, "mac", address=mac)
        ET.SubElement(n, "source", network="default")
        ET.SubElement(n, "model", type="virtio")
    serial = ET.SubElement(devices, "serial", type="pty")
    ET.SubElement(serial, "target", port="0")
    console = ET.SubElement(devices, "console", type="pty")
    ET.SubElement(console, "target", type="serial", port="0")
    ET.indent(domain)
    return ET.tostring(domain, encoding="unicode") + "\n"


def _write(path: Path, text: str) -> None:
    """write_text whose OSError names the file (a failed write(), e.g. out
    of space, carries no file name of its own)."""
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from e


class LocalTarget:
    """Creates DIR/<vm>/ and the files in it; remembers what it created so a
    failed or cancelled migration removes exactly that."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def vm_dir(self, vm: str) -> Path:
        return Path(self.directory) / vm

    def disk_paths(self, vm: str, count: int) -> list[str]:
        return [str(self.vm_dir(vm) / disk_file_name(i)) for i in range(count)]

    def prepare(self, vm: str) -> None:
        """Checks the target again (it may have changed since the plan was
        validated) and claims the VM directory by creating it (mkdir fails if
        anything is there) before any byte is copied."""
        problems = target_problems(self.directory)
        if problems:
            raise errors.FailedPrecondition(f"VM {vm}: {problems[0][1]}")
        try:
            self.vm_dir(vm).mkdir()
        except FileExistsError:
            problem = vm_directory_problem(self.directory, vm) or (
                f"{self.vm_dir(vm)} already exists; remove it or pick another VM name (--name)"
            )
            raise errors.AlreadyExists(f"VM {vm}: {problem}") from None

    def write_report(self, vm: str, report: converter_pb2.ConversionReport) -> str:
        path = self.vm_dir(vm) / REPORT_FILE
        doc = json_format.MessageToDict(report, preserving_proto_field_name=True)
        _write(path, json.dumps(doc, indent=2) + "\n")
        return str(path)

    def create_vm(self, spec: VMSpec, status: controlplane_pb2.VMStatus) -> None:
        d = self.vm_dir(spec.name)
        script = d / f"{spec.name}.qemu.sh"
        _write(script, qemu_script(spec))
        script.chmod(0o755)
        xml_path = d / f"{spec.name}.xml"
        _write(xml_path, libvirt_xml(spec))
        status.vm_directory = str(d)
        status.qemu_command_file = str(script)
        status.libvirt_xml_file = str(xml_path)

    def remove(self, vm: str) -> str:
        """Removes the VM directory this migration created (prepare succeeded)
        and says so; never called for a directory it did not create."""
        d = self.vm_dir(vm)
        if not d.is_dir() or d.is_symlink():
            return ""
        shutil.rmtree(d, ignore_errors=True)
        return f"removed {d}, which this migration had created"
