"""VMware Tools removal. open-vm-tools is purged with the guest's own dpkg
(apt would want a network); a tarball install of VMware Tools is removed
with its own uninstaller. Left in place they fail units at every boot."""

from __future__ import annotations

from converter.context import GuestContext
from ferry import errors

DPKG_STATUS = "/var/lib/dpkg/status"
PACKAGES = (
    "open-vm-tools-desktop",
    "open-vm-tools-sdmp",
    "open-vm-tools-containerinfo",
    "open-vm-tools",
)
TARBALL_UNINSTALLER = "/usr/bin/vmware-uninstall-tools.pl"


def package_states(status_text: str) -> dict[str, str]:
    """Package name -> dpkg state ("installed", "config-files", …) from
    /var/lib/dpkg/status."""
    states: dict[str, str] = {}
    for stanza in status_text.split("\n\n"):
        name = state = ""
        for line in stanza.splitlines():
            if line.startswith("Package:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("Status:"):
                words = line.split(":", 1)[1].split()
                state = words[-1] if words else ""
        if name:
            states[name] = state
    return states


def to_purge(states: dict[str, str]) -> list[str]:
    """The VMware packages present in any form dpkg still tracks, in an
    order dpkg accepts (dependants first)."""
    return [p for p in PACKAGES if states.get(p, "not-installed") != "not-installed"]


def apply(ctx: GuestContext) -> None:
    status = ctx.read(DPKG_STATUS) or ""
    purge = to_purge(package_states(status))
    if purge:
        before = package_states(status)
        try:
            ctx.run(["/usr/bin/env", "DEBIAN_FRONTEND=noninteractive",
                     "dpkg", "--purge", *purge])
        except RuntimeError as e:
            raise errors.OperationFailed(
                f"VM {ctx.info.name}: `dpkg --purge {' '.join(purge)}` failed in the guest: "
                f"{e}"
            ) from e
        after = package_states(ctx.read(DPKG_STATUS) or "")
        left = [p for p in purge if after.get(p, "not-installed") != "not-installed"]
        if left:
            raise errors.OperationFailed(
                f"VM {ctx.info.name}: dpkg left {', '.join(left)} in the guest after purging; "
                "remove them on the source VM and copy it again"
            )
        for p in purge:
            ctx.report.change("remove-package", p, f"{before[p]} -> purged (dpkg --purge)")
    if ctx.g.is_file(TARBALL_UNINSTALLER, followsymlinks=True):
        try:
            ctx.run(["/usr/bin/perl", TARBALL_UNINSTALLER])
        except RuntimeError as e:
            ctx.report.warn(
                f"VMware Tools (tarball install) could not be removed: {e}; run "
                f"{TARBALL_UNINSTALLER} in the migrated VM"
            )
        else:
            ctx.report.change(
                "remove-package", "vmware-tools", "tarball install -> removed "
                f"({TARBALL_UNINSTALLER})"
            )
