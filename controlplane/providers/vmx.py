"""Reads a VMware .vmx descriptor. Pure: text in, facts out, so it is tested
without files."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_LINE = re.compile(r'^\s*([A-Za-z0-9_.:\-]+)\s*=\s*"(.*)"\s*$')
_DISK_KEY = re.compile(r"^(scsi|sata|nvme|ide)(\d+):(\d+)\.filename$")
_NIC_KEY = re.compile(r"^ethernet(\d+)\.")
# Boot order when a VM has disks on several controller kinds.
_BUS_ORDER = {"scsi": 0, "sata": 1, "nvme": 2, "ide": 3}


@dataclass(frozen=True)
class VmxNic:
    index: int
    mac: str
    network: str
    virtual_dev: str
    mac_key: str = ""  # the key the MAC was read from, as VMware spells it


@dataclass(frozen=True)
class VmxDescriptor:
    display_name: str = ""
    memory_mib: int = 0
    cpus: int = 0
    firmware: str = ""  # bios, uefi, or "" when the file does not say
    guest_os: str = ""
    disks: list[str] = field(default_factory=list)  # file names, in controller order
    nics: list[VmxNic] = field(default_factory=list)


def parse_vmx_pairs(text: str) -> dict[str, str]:
    """`key = "value"` lines; keys lower-cased because VMware treats them
    case-insensitively. Comments, blank and malformed lines are skipped."""
    pairs: dict[str, str] = {}
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        m = _LINE.match(line)
        if m:
            pairs[m.group(1).lower()] = m.group(2)
    return pairs


def _int(value: str) -> int:
    try:
        return max(int(value), 0)
    except ValueError:
        return 0


def _present(pairs: dict[str, str], prefix: str) -> bool:
    return pairs.get(f"{prefix}.present", "TRUE").strip().upper() == "TRUE"


def parse_vmx(text: str) -> VmxDescriptor:
    pairs = parse_vmx_pairs(text)

    disks: list[tuple[int, int, int, str]] = []
    for key, value in pairs.items():
        m = _DISK_KEY.match(key)
        if not m or not value:
            continue
        bus, ctl, unit = m.group(1), int(m.group(2)), int(m.group(3))
        prefix = f"{bus}{ctl}:{unit}"
        device_type = pairs.get(f"{prefix}.devicetype", "").lower()
        if "cdrom" in device_type or "atapi" in device_type:
            continue
        if not (_present(pairs, prefix) and _present(pairs, f"{bus}{ctl}")):
            continue
        disks.append((_BUS_ORDER[bus], ctl, unit, value))
    disks.sort()

    nic_indexes = sorted(
        {int(m.group(1)) for key in pairs if (m := _NIC_KEY.match(key)) is not None}
    )
    nics: list[VmxNic] = []
    for i in nic_indexes:
        prefix = f"ethernet{i}"
        if not _present(pairs, prefix):
            continue
        address_type = pairs.get(f"{prefix}.addresstype", "").lower()
        static = pairs.get(f"{prefix}.address", "")
        generated = pairs.get(f"{prefix}.generatedaddress", "")
        if (address_type == "static" and static) or not generated:
            mac, mac_key = static, f"{prefix}.address"
        else:
            mac, mac_key = generated, f"{prefix}.generatedAddress"
        nics.append(VmxNic(
            index=i,
            mac=mac.lower(),
            mac_key=mac_key,
            network=pairs.get(f"{prefix}.networkname", ""),
            virtual_dev=pairs.get(f"{prefix}.virtualdev", ""),
        ))

    firmware_value = pairs.get("firmware", "").lower()
    firmware = {"efi": "uefi", "bios": "bios"}.get(firmware_value, "")
    return VmxDescriptor(
        display_name=pairs.get("displayname", ""),
        memory_mib=_int(pairs.get("memsize", "")),
        cpus=_int(pairs.get("numvcpus", "")),
        firmware=firmware,
        guest_os=pairs.get("guestos", ""),
        disks=[d[3] for d in disks],
        nics=nics,
    )
