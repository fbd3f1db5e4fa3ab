"""Keeping the network. The guest's configuration names its interfaces
(ens192 on VMware); on KVM the same NIC would get another name (enp1s0) and
the configuration would no longer apply. The configured names are found in
ifupdown, netplan, systemd-networkd and NetworkManager files, and each is
pinned to the target NIC's MAC with a systemd .link file, which udev also
applies in the initramfs (Debian's udev hook copies /etc/systemd/network/*.link)."""

from __future__ import annotations

import configparser
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from converter.context import GuestContext, TargetNic

INTERFACES = "/etc/network/interfaces"
NETPLAN_GLOB = "/etc/netplan/*.yaml"
NETWORKD_GLOB = "/etc/systemd/network/*.network"
NM_GLOB = "/etc/NetworkManager/system-connections/*"
PERSISTENT_NET = "/etc/udev/rules.d/70-persistent-net.rules"
LINK_DIR = "/etc/systemd/network"

_VIRTUAL = re.compile(r"^(lo|br|bond|vlan|tun|tap|wg|virbr|docker|veth|dummy|team)")
_ENS = re.compile(r"^ens(\d+)$")
_SOURCE_DIR_NAME = re.compile(r"^[a-zA-Z0-9_-]+$")


@dataclass
class NicConfig:
    """One interface as the guest configures it."""

    name: str
    source: str
    method: str = ""
    addresses: list[str] = field(default_factory=list)
    gateway: str = ""
    dns: list[str] = field(default_factory=list)
    old_mac: str = ""   # a MAC the configuration matches on or sets (stale on KVM)


def link_path(name: str) -> str:
    return f"{LINK_DIR}/10-ferry-{name}.link"


def link_file(name: str, mac: str) -> str:
    """A systemd .link file giving the NIC with `mac` the name `name`."""
    return (
        "# Written by Ferry: keeps the interface name the guest used before\n"
        "# migration, so its network configuration still applies.\n"
        "[Match]\n"
        f"MACAddress={mac}\n"
        "\n"
        "[Link]\n"
        f"Name={name}\n"
    )


# --- ifupdown ---------------------------------------------------------------

_STANZA = ("iface", "mapping", "auto", "source", "source-directory", "rename",
           "no-auto-down", "no-scripts", "template")


def _logical_lines(text: str) -> list[str]:
    """Lines with comments dropped and backslash continuations joined."""
    out: list[str] = []
    pending = ""
    for raw in text.splitlines():
        if not pending and raw.lstrip().startswith("#"):
            continue
        if raw.endswith("\\"):
            pending += raw[:-1] + " "
            continue
        line = (pending + raw).strip()
        pending = ""
        if line:
            out.append(line)
    if pending.strip():
        out.append(pending.strip())
    return out


def _cidr(address: str, netmask: str) -> str:
    """address plus a dotted or prefix netmask -> CIDR (as written when it
    already has a prefix or cannot be parsed)."""
    if "/" in address or not netmask:
        return address
    try:
        return str(ipaddress.ip_interface(f"{address}/{netmask}"))
    except ValueError:
        return address


@dataclass
class IfupdownFile:
    nics: list[NicConfig]
    includes: list[tuple[str, str]]  # ("source" | "source-directory", pattern)
    members: list[str]               # NICs named as bridge / bond / VLAN members


def parse_ifupdown(text: str, path: str) -> IfupdownFile:
    """Parses one interfaces(5) file; `source` lines are returned for the
    caller to expand."""
    result = IfupdownFile([], [], [])
    by_name: dict[str, NicConfig] = {}
    current: NicConfig | None = None
    netmask = ""
    family = ""

    def close() -> None:
        if current is not None and netmask and current.addresses:
            current.addresses[-1] = _cidr(current.addresses[-1], netmask)

    for line in _logical_lines(text):
        words = line.split()
        key = words[0]
        if key in _STANZA or key.startswith("allow-"):
            close()
            current, netmask = None, ""
            if key == "iface" and len(words) >= 2:
                name = words[1]
                family = words[2] if len(words) > 2 else "inet"
                method = words[3] if len(words) > 3 else ""
                if name not in by_name:
                    by_name[name] = NicConfig(name=name, source=path)
                    result.nics.append(by_name[name])
                current = by_name[name]
                if family == "inet" or not current.method:
                    current.method = method if family == "inet" else f"{family} {method}"
            elif key in ("source", "source-directory") and len(words) >= 2:
                result.includes.extend((key, w) for w in words[1:])
            continue
        if current is None:
            continue
        value = words[1:]
        if key == "address" and value:
            current.addresses.append(value[0])
        elif key == "netmask" and value:
            netmask = value[0]
        elif key == "gateway" and value and (family == "inet" or not current.gateway):
            current.gateway = value[0]
        elif key in ("dns-nameservers", "dns-nameserver"):
            current.dns.extend(v for v in value if v not in current.dns)
        elif key == "hwaddress" and value:
            current.old_mac = value[-1].lower()
        elif key in ("bridge_ports", "bridge-ports", "bond-slaves", "bond_slaves",
                     "vlan-raw-device", "vlan_raw_device"):
            result.members.extend(v for v in value if v not in ("none", "all"))
    close()
    return result


# --- netplan, systemd-networkd, NetworkManager --------------------------------


def parse_netplan(text: str, path: str) -> list[NicConfig]:
    """Names under `ethernets:` (set-name when given) with dhcp4, inline
    addresses, gateway and nameservers; enough to pin names and report,
    not a YAML parser."""
    nics: list[NicConfig] = []
    section_indent: int | None = None
    nic_indent: int | None = None
    child_indent: int | None = None
    parent = ""  # the nic's child key a deeper line belongs to
    current: NicConfig | None = None
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        stripped = line.strip()
        if stripped == "ethernets:":
            section_indent, nic_indent, current = indent, None, None
            continue
        if section_indent is None:
            continue
        if indent <= section_indent:
            section_indent, current = None, None
            continue
        if nic_indent is None:
            nic_indent = indent
        if indent == nic_indent:
            current, child_indent, parent = None, None, ""
            if stripped.endswith(":"):
                current = NicConfig(name=stripped[:-1].strip("'\""), source=path)
                nics.append(current)
            continue
        if current is None or ":" not in stripped:
            continue
        if child_indent is None:
            child_indent = indent
        k, v = (s.strip() for s in stripped.split(":", 1))
        v = v.strip("'\"")
        if indent == child_indent:
            parent = k
        where = k if indent == child_indent else f"{parent}.{k}"
        values = [a.strip(" '\"") for a in v.strip("[]").split(",") if a.strip()]
        if where == "set-name":
            current.name = v
        elif where == "match.macaddress":
            current.old_mac = v.lower()
        elif where == "dhcp4" and v in ("true", "yes"):
            current.method = "dhcp"
        elif where == "addresses" and v.startswith("["):
            current.addresses.extend(values)
            current.method = current.method or "static"
        elif where == "nameservers.addresses" and v.startswith("["):
            current.dns.extend(values)
        elif where == "gateway4" or (where == "routes.via" and not current.gateway):
            current.gateway = v
    return nics


def _ini(text: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(text)
    return cp


def parse_networkd(text: str, path: str) -> list[NicConfig]:
    """A systemd-networkd .network file matching plain interface names."""
    try:
        cp = _ini(text)
    except configparser.Error:
        return []
    names = cp.get("Match", "Name", fallback="").split()
    names = [n for n in names if not any(c in n for c in "*?[!")]
    nics = []
    for name in names:
        nic = NicConfig(name=name, source=path)
        nic.old_mac = cp.get("Match", "MACAddress", fallback="").split(" ")[0].lower()
        dhcp = cp.get("Network", "DHCP", fallback="")
        nic.method = "dhcp" if dhcp in ("yes", "true", "ipv4", "both") else "static"
        nic.addresses = cp.get("Network", "Address", fallback="").split()
        if cp.has_section("Address"):
            nic.addresses += cp.get("Address", "Address", fallback="").split()
        nic.gateway = cp.get("Network", "Gateway", fallback="")
        nic.dns = cp.get("Network", "DNS", fallback="").split()
        nics.append(nic)
    return nics


def parse_nm_keyfile(text: str, path: str) -> list[NicConfig]:
    """A NetworkManager keyfile bound to an interface name."""
    try:
        cp = _ini(text)
    except configparser.Error:
        return []
    name = cp.get("connection", "interface-name", fallback="")
    if not name:
        return []
    nic = NicConfig(name=name, source=path)
    nic.old_mac = cp.get("ethernet", "mac-address", fallback="").lower()
    method = cp.get("ipv4", "method", fallback="")
    nic.method = {"manual": "static", "auto": "dhcp"}.get(method, method)
    for i in range(1, 10):
        value = cp.get("ipv4", f"address{i}", fallback="")
        if value:
            addr, _, gw = value.partition(",")
            nic.addresses.append(addr)
            nic.gateway = nic.gateway or gw
    nic.gateway = cp.get("ipv4", "gateway", fallback=nic.gateway)
    nic.dns = [d for d in cp.get("ipv4", "dns", fallback="").split(";") if d]
    return [nic]


# --- deciding the pins --------------------------------------------------------


def physical_names(nics: list[NicConfig], members: list[str]) -> list[str]:
    """Names that must belong to a NIC: configured interfaces and bridge /
    bond / VLAN members, minus loopback and virtual devices; a VLAN
    `ens192.10` stands for ens192."""
    seen: list[str] = []
    for name in [n.name for n in nics] + members:
        base = name.split(".", 1)[0].split(":", 1)[0]
        if _VIRTUAL.match(base) or base in seen:
            continue
        seen.append(base)
    return seen


def vmware_order(names: list[str]) -> list[str]:
    """Sorts names in the order vSphere gives NICs their PCI slots: the
    four PCIe root ports at slots 160, 192, 224, 256 take function 0 first
    (ens160/ens192, ens224, ens256), then function 1 (ens161, ens193, …).
    Other names keep their order, after the ensNNN ones."""

    def key(item: tuple[int, str]) -> tuple[int, int, int, int]:
        pos, name = item
        m = _ENS.match(name)
        if m:
            slot = int(m.group(1))
            if 160 <= slot < 288:
                return (0, (slot - 160) % 32, (slot - 160) // 32, pos)
            return (0, 32, slot, pos)
        return (1, 0, 0, pos)

    return [n for _, n in sorted(enumerate(names), key=key)]


@dataclass
class PinPlan:
    pins: list[tuple[str, str]]        # (name, mac)
    unpinned: list[str]                # configured names with no NIC
    spare: list[TargetNic]             # NICs no configuration uses


def plan_pins(names: list[str], nics: list[TargetNic]) -> PinPlan:
    """NICs with a guest_name take that name; the others take the remaining
    configured names in vSphere slot order."""
    taken: dict[str, str] = {}
    by_position: list[TargetNic] = []
    for nic in nics:
        if nic.guest_name:
            taken[nic.guest_name] = nic.mac
        else:
            by_position.append(nic)
    free = [n for n in vmware_order(names) if n not in taken]
    for nic, name in zip(by_position, free, strict=False):
        taken[name] = nic.mac
    pins = sorted(taken.items(), key=lambda p: vmware_order(list(taken)).index(p[0]))
    return PinPlan(
        pins=pins,
        unpinned=[n for n in names if n not in taken],
        spare=by_position[len(free):],
    )


def clean_persistent_net(text: str) -> tuple[str, list[str]]:
    """Drops udev rules that name a NIC by its old MAC."""
    out, dropped = [], []
    for line in text.splitlines(keepends=True):
        if (not line.lstrip().startswith("#") and "ATTR{address}" in line
                and "NAME=" in line):
            dropped.append(line.strip())
            continue
        out.append(line)
    return "".join(out), dropped


# --- guest I/O ----------------------------------------------------------------


def _read_ifupdown(ctx: GuestContext) -> IfupdownFile:
    """/etc/network/interfaces and every file it sources, each once."""
    total = IfupdownFile([], [], [])
    queue, done = [INTERFACES], set()
    while queue:
        path = queue.pop(0)
        if path in done:
            continue
        done.add(path)
        text = ctx.read(path)
        if text is None:
            continue
        parsed = parse_ifupdown(text, path)
        total.nics.extend(parsed.nics)
        total.members.extend(parsed.members)
        base = path.rsplit("/", 1)[0]
        for kind, pattern in parsed.includes:
            full = pattern if pattern.startswith("/") else f"{base}/{pattern}"
            if kind == "source":
                queue.extend(sorted(ctx.g.glob_expand(full)))
            elif ctx.g.is_dir(full, followsymlinks=True):
                queue.extend(
                    f"{full}/{n}" for n in sorted(ctx.g.ls(full)) if _SOURCE_DIR_NAME.match(n)
                )
    return total


def _read_glob(
    ctx: GuestContext, pattern: str, parse: Callable[[str, str], list[NicConfig]]
) -> list[NicConfig]:
    out: list[NicConfig] = []
    for path in sorted(ctx.g.glob_expand(pattern)):
        text = ctx.read(path)
        if text is not None:
            out.extend(parse(text, path))
    return out


def find_configs(ctx: GuestContext) -> tuple[list[NicConfig], list[str]]:
    """Every configured interface (merged by name, first source wins) and
    the bridge/bond members ifupdown names."""
    ifupdown = _read_ifupdown(ctx)
    found = ifupdown.nics
    found += _read_glob(ctx, NETPLAN_GLOB, parse_netplan)
    found += _read_glob(ctx, NETWORKD_GLOB, parse_networkd)
    found += _read_glob(ctx, NM_GLOB, parse_nm_keyfile)
    merged: dict[str, NicConfig] = {}
    for nic in found:
        if nic.name not in merged:
            merged[nic.name] = nic
    return list(merged.values()), ifupdown.members


def describe(ctx: GuestContext, configs: list[NicConfig], pinned: dict[str, str]) -> None:
    """Adds the configured NICs (not loopback or virtual devices) to the
    report, with the MAC each was pinned to; warns about configurations
    tied to a MAC the target NIC does not have."""
    for nic in configs:
        if _VIRTUAL.match(nic.name):
            continue
        base = nic.name.split(".", 1)[0].split(":", 1)[0]
        ctx.report.report.nics.add(
            name=nic.name, config_source=nic.source, method=nic.method,
            addresses=nic.addresses, gateway=nic.gateway, dns=nic.dns,
            mac=pinned.get(base, ""),
        )
        if nic.old_mac and pinned and nic.old_mac not in pinned.values():
            ctx.report.warn(
                f"{nic.source}: {nic.name} is tied to MAC {nic.old_mac}, which the target NIC "
                "does not have; remove the MAC from that configuration in the migrated VM"
            )


def apply(ctx: GuestContext) -> list[str]:
    """Pins each configured name to its target NIC; returns the .link files
    (which the initramfs must carry)."""
    rules = ctx.read(PERSISTENT_NET)
    if rules is not None:
        text, dropped = clean_persistent_net(rules)
        if dropped:
            ctx.write(PERSISTENT_NET, text, "remove-udev-net-rule", "removed " + "; ".join(dropped))
            ctx.initramfs_reasons.append(f"{PERSISTENT_NET} changed")

    configs, members = find_configs(ctx)
    names = physical_names(configs, members)
    plan = plan_pins(names, ctx.nics)
    describe(ctx, configs, dict(plan.pins))
    if not ctx.nics:
        if names:
            ctx.report.warn(
                f"no target NICs given: {', '.join(names)} not pinned; the guest will see "
                "other interface names on KVM and its network configuration will not apply"
            )
        return []
    for name in plan.unpinned:
        ctx.report.warn(f"{name} is configured in the guest but no target NIC takes its name")
    for spare in plan.spare:
        ctx.report.warn(f"target NIC {spare.mac} matches no interface configured in the guest")

    by_name = {c.name: c for c in configs}
    for nic in ctx.nics:
        name = next((n for n, m in plan.pins if m == nic.mac), "")
        config = by_name.get(name)
        if config is not None and config.method == "dhcp":
            continue  # the address comes from DHCP, not the guest's files
        have = config.addresses if config is not None else []
        lost = [a for a in nic.addresses if a not in have]
        if lost:
            ctx.report.warn(
                f"the source reported {', '.join(lost)} on the NIC now {nic.mac}, but the "
                f"guest does not configure it on {name or 'any interface'}; configure it in "
                "the migrated VM"
            )

    links: list[str] = []
    for name, mac in plan.pins:
        path = link_path(name)
        content = link_file(name, mac)
        links.append(path)
        if ctx.read(path) == content:
            continue
        ctx.g.mkdir_p(LINK_DIR)
        ctx.write(path, content, "pin-nic", f"{name} -> MAC {mac}")
        ctx.initramfs_reasons.append(f"{path} changed")

    return links
