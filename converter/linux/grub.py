"""The kernel command line. The guest's GRUB configuration is made
bus-independent (no GRUB_DISABLE_LINUX_UUID, no root=/dev/sdX in
/etc/default/grub), grub.cfg is regenerated with the guest's own
update-grub, and what it wrote is checked: grub-mkconfig in the appliance
sees the appliance's device names, so every `linux` line must end up with
root=UUID= of the guest's root filesystem."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from converter.context import GuestContext
from converter.linux.devices import Resolver, is_bus_specific, rewrite_cmdline

DEFAULT_GRUB = "/etc/default/grub"
GRUB_CFG = "/boot/grub/grub.cfg"
DEVICE_MAP = "/boot/grub/device.map"
DEBCONF = "/var/cache/debconf/config.dat"

_DISABLE_UUID = re.compile(r"""^\s*GRUB_DISABLE_LINUX_UUID\s*=\s*["']?true["']?\s*(#.*)?$""")
_CMDLINE = re.compile(r"^\s*GRUB_CMDLINE_LINUX(?:_DEFAULT)?\s*=")
_LINUX_LINE = re.compile(r"^\s*(linux|linux16|linuxefi)\s")
_ROOT_ARG = re.compile(r"(?<=\s)root=(\S+)")


@dataclass
class DefaultGrubEdit:
    text: str
    details: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)


def edit_default_grub(text: str, resolve: Resolver) -> DefaultGrubEdit:
    """Comments out GRUB_DISABLE_LINUX_UUID=true and maps bus-specific
    root=/resume= in GRUB_CMDLINE_LINUX(_DEFAULT)."""
    out: list[str] = []
    edit = DefaultGrubEdit(text="")
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\n")
        eol = line[len(body):]
        if _DISABLE_UUID.match(body):
            out.append(f"# {body.strip()}  # disabled by Ferry: root= must not name a disk "
                       f"by its bus{eol}")
            edit.details.append("GRUB_DISABLE_LINUX_UUID=true -> commented out")
            continue
        if _CMDLINE.match(body):
            new, unmapped = rewrite_cmdline(body, resolve)
            edit.unmapped.extend(unmapped)
            if new != body:
                edit.details.append(f"{body.strip()} -> {new.strip()}")
                out.append(new + eol)
                continue
        out.append(line)
    edit.text = "".join(out)
    return edit


def linux_roots(cfg: str) -> list[str]:
    """The root= value of every `linux` line of a grub.cfg, in order."""
    roots = []
    for line in cfg.splitlines():
        if _LINUX_LINE.match(line):
            m = _ROOT_ARG.search(line)
            roots.append(m.group(1) if m else "")
    return roots


def root_is_right(value: str, root_uuid: str) -> bool:
    """root= names the root fs by its UUID, or by a bus-independent path
    (an LVM or device-mapper name) that is not another UUID."""
    if value == f"UUID={root_uuid}":
        return True
    if not value or is_bus_specific(value):
        return False
    return not value.upper().startswith(("UUID=", "PARTUUID=", "/DEV/DISK/BY-UUID/"))


def fix_grub_cfg(cfg: str, root_uuid: str) -> tuple[str, list[str]]:
    """Sets root=UUID=<root_uuid> on every `linux` line whose root= is wrong
    or missing. Returns the new text and the values replaced."""
    fixed: list[str] = []
    out: list[str] = []
    want = f"root=UUID={root_uuid}"
    for line in cfg.splitlines(keepends=True):
        if _LINUX_LINE.match(line):
            m = _ROOT_ARG.search(line)
            if m is None:
                body = line.rstrip("\n")
                parts = body.split(None, 2)
                # linux /vmlinuz-… [args]: the root goes right after the image.
                head = body[: body.index(parts[1]) + len(parts[1])]
                line = f"{head} {want}{body[len(head):]}{line[len(body):]}"
                fixed.append("(none)")
            elif not root_is_right(m.group(1), root_uuid):
                fixed.append(m.group(1))
                line = line[: m.start()] + want + line[m.end():]
        out.append(line)
    return "".join(out), fixed


def clean_device_map(text: str) -> tuple[str, list[str]]:
    """Drops device.map lines that name a disk by bus (stale on KVM)."""
    out, dropped = [], []
    for line in text.splitlines(keepends=True):
        parts = line.split()
        if len(parts) >= 2 and not line.lstrip().startswith("#") and is_bus_specific(parts[1]):
            dropped.append(line.strip())
            continue
        out.append(line)
    return "".join(out), dropped


def debconf_install_devices(config_dat: str) -> list[str]:
    """The bus-specific disks grub-pc's debconf answer names (grub-pc
    reinstalls the boot loader there on every upgrade)."""
    m = re.search(r"^Name: grub-pc/install_devices\n(?:.+\n)*?Value: (.*)$", config_dat,
                  re.MULTILINE)
    if not m:
        return []
    return [d for d in re.split(r"[,\s]+", m.group(1)) if d and is_bus_specific(d)]


def _regenerate(ctx: GuestContext) -> str | None:
    """Runs the guest's update-grub (or grub-mkconfig); None when it has
    neither."""
    for tool, argv in (
        ("/usr/sbin/update-grub", ["update-grub"]),
        ("/usr/sbin/grub-mkconfig", ["grub-mkconfig", "-o", GRUB_CFG]),
    ):
        if ctx.g.is_file(tool, followsymlinks=True):
            ctx.run(argv)
            return argv[0]
    return None


def apply(ctx: GuestContext) -> None:
    default = ctx.read(DEFAULT_GRUB)
    default_changed = False
    if default is not None:
        edit = edit_default_grub(default, ctx.devices.resolve)
        for value in edit.unmapped:
            ctx.report.warn(
                f"{DEFAULT_GRUB}: kernel argument value {value} is not on the disks given; "
                "left as it is"
            )
        if edit.text != default:
            ctx.write(DEFAULT_GRUB, edit.text, "edit-grub-default", "; ".join(edit.details))
            default_changed = True

    cfg = ctx.read(GRUB_CFG)
    uuid = ctx.info.root_uuid
    if cfg is None:
        ctx.report.warn(f"{GRUB_CFG} not found: the guest's boot loader was not checked")
    else:
        bad = [r for r in linux_roots(cfg) if not root_is_right(r, uuid)]
        if default_changed or bad:
            tool = _regenerate(ctx)
            new = ctx.read(GRUB_CFG) or ""
            if tool is None:
                ctx.report.warn(
                    "neither update-grub nor grub-mkconfig is in the guest; grub.cfg was "
                    "edited in place"
                )
            elif new != cfg:
                ctx.report.change(
                    "regenerate-grub-cfg", GRUB_CFG,
                    f"{tool}: root= {', '.join(sorted(set(linux_roots(cfg))))} -> "
                    f"{', '.join(sorted(set(linux_roots(new))))}",
                )
            fixed_text, fixed = fix_grub_cfg(new, uuid)
            if fixed:
                ctx.write(
                    GRUB_CFG, fixed_text, "fix-grub-root",
                    f"root= {', '.join(sorted(set(fixed)))} -> UUID={uuid} on "
                    f"{len(fixed)} linux line(s)",
                )
                if tool is not None:
                    ctx.report.warn(
                        f"{tool} wrote root= {', '.join(sorted(set(fixed)))} (the appliance's "
                        f"device names); the converter set root=UUID={uuid} itself. Run "
                        "update-grub in the migrated VM to check"
                    )

    device_map = ctx.read(DEVICE_MAP)
    if device_map is not None:
        text, dropped = clean_device_map(device_map)
        if dropped:
            if text.strip() and any(
                not ln.lstrip().startswith("#") for ln in text.splitlines() if ln.strip()
            ):
                ctx.write(DEVICE_MAP, text, "clean-device-map", "removed " + "; ".join(dropped))
            else:
                ctx.remove(DEVICE_MAP, "clean-device-map", "removed " + "; ".join(dropped))

    debconf = ctx.read(DEBCONF)
    if debconf is not None:
        stale = debconf_install_devices(debconf)
        if stale:
            ctx.report.warn(
                f"grub-pc is set to install the boot loader on {', '.join(stale)} (debconf "
                "grub-pc/install_devices), which do not exist on KVM; run `dpkg-reconfigure "
                "grub-pc` in the migrated VM and pick the boot disk"
            )
