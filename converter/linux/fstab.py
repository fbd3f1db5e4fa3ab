"""Block devices: /etc/fstab, /etc/crypttab and the initramfs resume device
referring to disks by bus name (/dev/sda1, /dev/hdb, /dev/nvme0n1p2) become
`UUID=` of the same filesystem, so the guest finds them on any bus."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from converter.context import GuestContext
from converter.linux.devices import Resolver, is_bus_specific
from ferry import errors

FSTAB = "/etc/fstab"
CRYPTTAB = "/etc/crypttab"
RESUME_CONF = "/etc/initramfs-tools/conf.d/resume"

_FIELDS = re.compile(r"^(\s*)(\S+)(\s+)(\S+)(.*)$")
_RESUME = re.compile(r"""^(\s*RESUME\s*=\s*)(["']?)([^"'\s#]+)(["']?)(.*)$""")


@dataclass
class Rewrite:
    """The result of rewriting one file: new text, each (old, new)
    replacement, and device paths that could not be mapped (with the line)."""

    text: str
    replaced: list[tuple[str, str]] = field(default_factory=list)
    unmapped: list[tuple[str, str]] = field(default_factory=list)
    optional_unmapped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.replaced)


def _is_optional(options: str) -> bool:
    """An fstab entry the boot does not wait for (noauto / nofail)."""
    return any(o in ("noauto", "nofail") for o in options.split(","))


def rewrite_table(text: str, field_index: int, resolve: Resolver) -> Rewrite:
    """Rewrites the device in column `field_index` (0 for fstab, 1 for
    crypttab) of every non-comment line; keeps spacing and comments."""
    out: list[str] = []
    result = Rewrite(text="")
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\n")
        if not body.strip() or body.lstrip().startswith("#"):
            out.append(line)
            continue
        parts = re.split(r"(\s+)", body)
        # parts alternates token, space, token …; a leading blank yields "".
        tokens = [i for i, p in enumerate(parts) if p and not p.isspace()]
        if len(tokens) <= field_index:
            out.append(line)
            continue
        pos = tokens[field_index]
        device = parts[pos]
        if not is_bus_specific(device):
            out.append(line)
            continue
        new = resolve(device)
        if new is None:
            options = parts[tokens[3]] if len(tokens) > 3 else ""
            target = result.optional_unmapped if _is_optional(options) else result.unmapped
            target.append((device, body.strip()))
            out.append(line)
            continue
        parts[pos] = new
        result.replaced.append((device, new))
        out.append("".join(parts) + line[len(body):])
    result.text = "".join(out)
    return result


def rewrite_resume(text: str, resolve: Resolver) -> Rewrite:
    """Rewrites `RESUME=/dev/sdX` in initramfs-tools' conf.d/resume."""
    out: list[str] = []
    result = Rewrite(text="")
    for line in text.splitlines(keepends=True):
        m = _RESUME.match(line.rstrip("\n"))
        if m and is_bus_specific(m.group(3)):
            new = resolve(m.group(3))
            if new is None:
                result.unmapped.append((m.group(3), line.strip()))
            else:
                result.replaced.append((m.group(3), new))
                eol = line[len(line.rstrip("\n")):]
                line = f"{m.group(1)}{m.group(2)}{new}{m.group(4)}{m.group(5)}{eol}"
        out.append(line)
    result.text = "".join(out)
    return result


def plan(ctx: GuestContext) -> dict[str, Rewrite]:
    """Reads the three files and works out every rewrite, before anything is
    changed; an entry the boot needs that cannot be mapped stops the
    conversion here, while the target copy is still untouched."""
    resolve = ctx.devices.resolve
    plans: dict[str, Rewrite] = {}
    for path in (FSTAB, CRYPTTAB, RESUME_CONF):
        text = ctx.read(path)
        if text is None:
            continue
        if path == RESUME_CONF:
            r = rewrite_resume(text, resolve)
        else:
            r = rewrite_table(text, 1 if path == CRYPTTAB else 0, resolve)
        if r.unmapped:
            dev, line = r.unmapped[0]
            raise errors.FailedPrecondition(
                f"VM {ctx.info.name}: {path} refers to {dev} ({line!r}), which is not a "
                f"filesystem on the disks given ({', '.join(ctx.info.disks)}); on KVM the "
                "disk names change, so the guest would not find it. Pass all the VM's "
                "disks in boot order, or change the entry to UUID= on the source VM"
            )
        for dev, line in r.optional_unmapped:
            ctx.report.warn(
                f"{path}: optional entry {line!r} refers to {dev}, which is not on the "
                "disks given; left as it is (it is noauto/nofail)"
            )
        plans[path] = r
    return plans


def apply(ctx: GuestContext, plans: dict[str, Rewrite]) -> None:
    for path, r in plans.items():
        if not r.changed:
            continue
        detail = ", ".join(f"{old} -> {new}" for old, new in r.replaced)
        ctx.write(path, r.text, "rewrite-block-device", detail)
        if path in (CRYPTTAB, RESUME_CONF):
            ctx.initramfs_reasons.append(f"{path} changed")
