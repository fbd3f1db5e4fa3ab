"""Plans: filling in what the source descriptor knows, and validation into
Conditions (Blocking / Warning) whose messages name the VM, the problem and
the fix."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from controlplane.providers import disk_images
from controlplane.targets import local
from ferry.errors import shown
from ferry.v1 import controlplane_pb2

BLOCKING = "Blocking"
WARNING = "Warning"
DEFAULT_MEMORY_MIB = 2048
DEFAULT_CPUS = 2
MEMORY_MIB_RANGE = (64, 4 << 20)  # 64 MiB .. 4 TiB
CPUS_RANGE = (1, 512)

_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_VM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


@dataclass(frozen=True)
class Problem:
    vm: str
    category: str
    type: str
    message: str

    def condition(self) -> controlplane_pb2.Condition:
        return controlplane_pb2.Condition(
            vm=self.vm, category=self.category, type=self.type, message=self.message
        )


def generated_mac(plan_name: str, vm: str, index: int) -> str:
    """A stable, locally administered MAC in QEMU's 52:54:00 range, derived
    from the plan, the VM and the NIC position so re-creating the plan gives
    the same address."""
    digest = hashlib.sha256(f"{plan_name}/{vm}/{index}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def normalize_mac(mac: str) -> str:
    return mac.strip().lower().replace("-", ":")


def is_valid_mac(mac: str) -> bool:
    return _MAC.match(mac) is not None


def mac_problem(mac: str) -> str | None:
    """Why a (normalized) MAC cannot be given to a NIC, or None."""
    if not is_valid_mac(mac):
        return "is not a MAC address"
    if mac == "00:00:00:00:00:00":
        return "is all zeros, which no NIC can have"
    if mac == "ff:ff:ff:ff:ff:ff":
        return "is the broadcast address, which no NIC can have"
    if int(mac[:2], 16) & 1:
        return "is a multicast address, which no NIC can have"
    return None


def hardware_problem(memory_mib: int, cpus: int) -> tuple[str, str] | None:
    """(what, why) for memory or CPUs outside what a VM can have."""
    low, high = MEMORY_MIB_RANGE
    if memory_mib and not low <= memory_mib <= high:
        return "memory", f"{memory_mib} MiB of memory is outside {low} MiB..{high >> 20} TiB"
    low, high = CPUS_RANGE
    if cpus and not low <= cpus <= high:
        return "cpus", f"{cpus} CPUs is outside {low}..{high}"
    return None


def complete_plan(plan: controlplane_pb2.Plan) -> list[Problem]:
    """Fills each VM's memory, CPUs, firmware and NICs from the .vmx beside
    its first disk, then from defaults; a VM with no known MAC gets a
    generated one, with a warning. Edits `plan` in place."""
    problems: list[Problem] = []
    for vm in plan.vms:
        descriptor = None
        if vm.disks:
            vmx = disk_images.find_vmx(vm.disks[0])
            descriptor = disk_images.read_vmx(vmx) if vmx else None
        if vmx and descriptor:
            bad = hardware_problem(descriptor.memory_mib, descriptor.cpus)
            if bad:
                key = "memsize" if bad[0] == "memory" else "numvcpus"
                problems.append(Problem(
                    vm.name, BLOCKING, "InvalidHardware",
                    f"VM {vm.name}: {vmx.name} {key}: {bad[1]}; fix {key} in {vmx}",
                ))
            else:
                vm.memory_mib = vm.memory_mib or descriptor.memory_mib
                vm.cpus = vm.cpus or descriptor.cpus
            vm.firmware = vm.firmware or descriptor.firmware
            if not vm.nics:
                for found in descriptor.nics:
                    if found.mac:
                        vm.nics.add(mac=found.mac, network=found.network)
        vm.memory_mib = vm.memory_mib or DEFAULT_MEMORY_MIB
        vm.cpus = vm.cpus or DEFAULT_CPUS
        vm.firmware = vm.firmware or "bios"
        for nic in vm.nics:
            nic.mac = normalize_mac(nic.mac)
        if not vm.nics:
            mac = generated_mac(plan.name, vm.name, 0)
            vm.nics.add(mac=mac)
            problems.append(Problem(
                vm.name, WARNING, "NoNicMac",
                f"VM {vm.name}: no NIC MAC address is known (no .vmx beside the disk and no "
                f"--mac); the VM gets the generated MAC {mac}, so a guest that pins its "
                "network to the old MAC loses it; pass the source MAC with --mac",
            ))
    return problems


def validate_plan(plan: controlplane_pb2.Plan) -> list[Problem]:
    """Everything that can be checked before a migration starts."""
    problems: list[Problem] = []
    if not plan.vms:
        problems.append(Problem(
            "", BLOCKING, "NoVMs", f"plan {plan.name or plan.id} has no VMs; add at least one"
        ))
    if plan.WhichOneof("source") != "disk_images":
        problems.append(Problem(
            "", BLOCKING, "UnsupportedSource",
            "the plan has no source; set disk_images (the only source in this version)",
        ))
    if plan.WhichOneof("target") != "local":
        problems.append(Problem(
            "", BLOCKING, "UnsupportedTarget",
            "the plan has no target; set local with a directory (the only target in this version)",
        ))
    else:
        for kind, message in local.target_problems(plan.local.directory):
            problems.append(Problem("", BLOCKING, kind, message))

    seen: dict[str, int] = {}
    for vm in plan.vms:
        seen[vm.name] = seen.get(vm.name, 0) + 1
    for name, count in seen.items():
        if count > 1:
            problems.append(Problem(
                name, BLOCKING, "DuplicateVMName",
                f"VM {name}: the name is used by {count} VMs of the plan; "
                "give each VM its own name",
            ))

    target_ok = plan.WhichOneof("target") == "local" and not local.target_problems(
        plan.local.directory
    )
    for vm in plan.vms:
        problems.extend(_validate_vm(vm, plan.local.directory if target_ok else None))
    problems.extend(_duplicates(plan))
    return problems


def _duplicates(plan: controlplane_pb2.Plan) -> list[Problem]:
    """The same disk file (under any name, e.g. a symlink) or the same MAC
    twice in a plan: two copies of one disk, two NICs that collide."""
    out: list[Problem] = []
    disks: dict[str, str] = {}
    macs: dict[str, str] = {}
    for vm in plan.vms:
        for path in vm.disks:
            real = os.path.realpath(path)
            if real in disks:
                same = "" if disks[real] == path else f" (the same file as {disks[real]})"
                out.append(Problem(
                    vm.name, BLOCKING, "DuplicateDisk",
                    f"VM {vm.name}: the disk {path}{same} is given twice; give each disk once",
                ))
            disks.setdefault(real, path)
        for nic in vm.nics:
            if nic.mac in macs and is_valid_mac(nic.mac):
                out.append(Problem(
                    vm.name, BLOCKING, "DuplicateMac",
                    f"VM {vm.name}: the MAC {nic.mac} is used by two NICs ({macs[nic.mac]} "
                    "too); give each NIC its own MAC with --mac",
                ))
            macs.setdefault(nic.mac, vm.name)
    return out


def _validate_vm(vm: controlplane_pb2.PlanVM, target_dir: str | None) -> list[Problem]:
    label = vm.name or "(unnamed)"
    out: list[Problem] = []
    if not _VM_NAME.match(vm.name):
        out.append(Problem(
            vm.name, BLOCKING, "InvalidVMName",
            f"VM {label}: the name must be 1-63 letters, digits, '.', '_' or '-' starting "
            "with a letter or digit, because it names the target directory; pass --name",
        ))
    if not vm.disks:
        out.append(Problem(
            vm.name, BLOCKING, "NoDisks", f"VM {label}: no disk images; add at least one"
        ))
    for path in vm.disks:
        try:
            disk_images.inspect_image(path)
        except disk_images.ImageProblem as e:
            out.append(Problem(vm.name, BLOCKING, e.kind, f"VM {label}: {e}"))
    vmx = disk_images.find_vmx(vm.disks[0]) if vm.disks else None
    descriptor = disk_images.read_vmx(vmx) if vmx else None
    stray = Path(vm.disks[0]).with_suffix(".vmx") if vm.disks else None
    if stray and os.path.lexists(stray) and not stray.is_file():
        out.append(Problem(
            vm.name, WARNING, "VmxNotAFile",
            f"VM {label}: {stray} is not a regular file and was ignored; rename it if it is "
            "not the VM's descriptor",
        ))
    if vmx and descriptor:
        given = {p.rsplit("/", 1)[-1] for p in vm.disks}
        for name in descriptor.disks:
            if name.rsplit("/", 1)[-1] not in given:
                out.append(Problem(
                    vm.name, WARNING, "DiskNotInPlan",
                    f"VM {label}: {vmx.name} lists the disk {name}, which is not in the "
                    "plan; the migrated VM will not have it; add it to the source disks",
                ))
    vmx_nics = descriptor.nics if descriptor else []
    for nic in vm.nics:
        why = mac_problem(nic.mac)
        if why is None:
            continue
        origin = next((f"{vmx.name} {n.mac_key} " for n in vmx_nics
                       if vmx and normalize_mac(n.mac) == nic.mac), "")
        out.append(Problem(
            vm.name, BLOCKING, "InvalidMac",
            f"VM {label}: {origin}{shown(nic.mac)!r} {why}; pass the NIC's MAC with "
            "--mac, written as 00:50:56:aa:bb:cc",
        ))
    bad = hardware_problem(vm.memory_mib, vm.cpus)
    if bad:
        out.append(Problem(
            vm.name, BLOCKING, "InvalidHardware", f"VM {label}: {bad[1]}; ask for less"
        ))
    if vm.firmware not in ("", "bios", "uefi"):
        out.append(Problem(
            vm.name, BLOCKING, "InvalidFirmware",
            f"VM {label}: firmware {vm.firmware!r} is unknown; use bios or uefi",
        ))
    if target_dir is not None and _VM_NAME.match(vm.name):
        problem = local.vm_directory_problem(target_dir, vm.name)
        if problem:
            out.append(Problem(
                vm.name, BLOCKING, "TargetVMDirectoryNotEmpty", f"VM {label}: {problem}"
            ))
    return out


def prepare_plan(plan: controlplane_pb2.Plan) -> controlplane_pb2.Plan:
    """A copy of `plan`, completed, with its conditions replaced by a fresh
    validation."""
    out = controlplane_pb2.Plan()
    out.CopyFrom(plan)
    del out.conditions[:]
    problems = complete_plan(out) + validate_plan(out)
    out.conditions.extend(p.condition() for p in problems)
    return out


def blocking(plan: controlplane_pb2.Plan) -> list[controlplane_pb2.Condition]:
    return [c for c in plan.conditions if c.category == BLOCKING]
