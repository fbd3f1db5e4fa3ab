"""Checking a Convert/Inspect request before anything touches a disk: text
fields the OS or the guest's config files would choke on (NUL bytes,
absurd lengths, interface names Linux refuses) are refused with a message
that echoes at most a short prefix of what was sent."""

from __future__ import annotations

import re

from converter.context import TargetNic, normalise_mac
from converter.convert import ConvertJob
from ferry import errors
from ferry.v1 import converter_pb2

ECHO_LIMIT = 200      # characters of a caller's value repeated in a message
PATH_MAX = 4096       # Linux PATH_MAX, terminating NUL included
LABEL_MAX = 253       # plan and VM names: a DNS name's length is plenty
ADDRESS_MAX = 64      # an IPv6 address with zone and prefix fits easily
# Interface names the guest's config files can carry safely (Linux allows
# 1-15 bytes without '/', ':' or whitespace; this is the common subset).
_IFNAME = re.compile(r"[A-Za-z0-9_.\-]{1,15}")


def shown(value: str, limit: int = ECHO_LIMIT) -> str:
    """`value` quoted for a message, cut to `limit` characters."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}… ({len(value)} characters)"


def check_text(value: str, what: str, vm: str | None, limit: int) -> str:
    """`value` when it has no NUL byte and at most `limit` characters;
    messages start with "VM `vm`: " unless `vm` is None."""
    prefix = "" if vm is None else f"VM {vm}: "
    if "\0" in value:
        raise errors.InvalidInput(f"{prefix}{what} {shown(value)} contains a NUL byte; "
                                  "pass plain text")
    if len(value) > limit:
        raise errors.InvalidInput(f"{prefix}{what} {shown(value)} is longer than {limit} "
                                  "characters")
    return value


def check_disk_paths(paths: list[str], vm: str | None) -> list[str]:
    for i, p in enumerate(paths):
        check_text(p, f"disk_paths[{i}]", vm, PATH_MAX - 1)
        if not p:
            prefix = "" if vm is None else f"VM {vm}: "
            raise errors.InvalidInput(
                f"{prefix}disk_paths[{i}] is empty; pass the path of each copied disk"
            )
    return paths


def _nic(n: converter_pb2.TargetNic, i: int, vm: str) -> TargetNic:
    mac = check_text(n.mac, f"nics[{i}].mac", vm, ECHO_LIMIT)
    name = check_text(n.guest_name, f"nics[{i}].guest_name", vm, ECHO_LIMIT)
    if name and (not _IFNAME.fullmatch(name) or name in (".", "..")):
        raise errors.InvalidInput(
            f"VM {vm}: nics[{i}].guest_name {shown(name)} is not a Linux interface name; "
            "pass 1 to 15 letters, digits or '-_.' such as ens192, or leave it empty"
        )
    addresses = tuple(
        check_text(a, f"nics[{i}].addresses[{j}]", vm, ADDRESS_MAX)
        for j, a in enumerate(n.addresses)
    )
    return TargetNic(mac=normalise_mac(mac, vm, f"nics[{i}]"), guest_name=name,
                     addresses=addresses)


def job_from_request(req: converter_pb2.ConvertRequest) -> ConvertJob:
    """The conversion a request asks for, its text fields checked."""
    vm = check_text(req.vm, "the VM name", None, LABEL_MAX) or "?"
    plan = check_text(req.plan, "plan", vm, LABEL_MAX)
    disks = check_disk_paths(list(req.disk_paths), vm)
    nics = [_nic(n, i, vm) for i, n in enumerate(req.nics)]
    names = [n.guest_name for n in nics if n.guest_name]
    if len(set(names)) != len(names):
        raise errors.InvalidInput(f"VM {vm}: two target NICs claim the same guest_name")
    return ConvertJob(disks=disks, nics=nics, plan=plan, vm=req.vm)


def inspect_job(req: converter_pb2.InspectRequest) -> ConvertJob:
    return ConvertJob(disks=check_disk_paths(list(req.disk_paths), None))
