"""What every conversion step works with: the libguestfs handle on the
mounted guest, what inspection found, the report being built, and small
file helpers that record each change they make."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from converter.inspect import GuestInfo
from converter.linux.devices import DeviceMap
from converter.report import ReportBuilder
from ferry import errors
from ferry.logs import ContextLogger

_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


@dataclass(frozen=True)
class TargetNic:
    """A NIC of the target VM (from `ConvertRequest.nics`), MAC normalised."""

    mac: str
    guest_name: str = ""
    addresses: tuple[str, ...] = ()


def normalise_mac(mac: str, vm: str, nic: str = "") -> str:
    """Lower-case colon form; InvalidInput naming `nic` (e.g. "nics[1]")
    for anything else."""
    m = mac.strip().lower().replace("-", ":")
    if not _MAC.fullmatch(m):
        shown = repr(mac) if len(mac) <= 40 else f"{mac[:40]!r}… ({len(mac)} characters)"
        where = f" ({nic})" if nic else ""
        raise errors.InvalidInput(
            f"VM {vm or '?'}: target NIC MAC {shown}{where} is not a MAC address; "
            "pass six hex bytes such as 52:54:00:12:34:56"
        )
    return m


@dataclass
class GuestContext:
    g: Any  # guestfs.GuestFS; the module ships no type information
    info: GuestInfo
    report: ReportBuilder
    devices: DeviceMap
    log: ContextLogger
    nics: list[TargetNic] = field(default_factory=list)
    # Why the initramfs must be rebuilt even when it has the drivers (files
    # it copies from /etc changed).
    initramfs_reasons: list[str] = field(default_factory=list)

    def read(self, path: str) -> str | None:
        """Text of a guest file, None when it does not exist."""
        if not self.g.is_file(path, followsymlinks=True):
            return None
        data: bytes = self.g.read_file(path)
        return data.decode("utf-8", errors="surrogateescape")

    def write(self, path: str, text: str, kind: str, detail: str) -> None:
        """Writes a guest file (keeping its mode when it exists) and records it."""
        self.g.write(path, text.encode("utf-8", errors="surrogateescape"))
        self.report.change(kind, path, detail)
        self.log.info("%s: %s (%s)", kind, path, detail)

    def remove(self, path: str, kind: str, detail: str) -> None:
        self.g.rm_f(path)
        self.report.change(kind, path, detail)
        self.log.info("%s: %s (%s)", kind, path, detail)

    def run(self, argv: list[str]) -> str:
        """Runs a guest program chrooted into the guest (libguestfs binds
        /dev, /proc and /sys), with a PATH that finds /usr/sbin tools."""
        env = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        out: str = self.g.command(["/usr/bin/env", env, "LC_ALL=C.UTF-8", *argv])
        return out
