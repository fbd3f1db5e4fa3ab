"""virtio drivers in the initramfs. The guest's initramfs was built on
VMware (often MODULES=list or dep with pvscsi only), so it cannot find its
root disk on virtio. Each installed kernel's initramfs is listed with the
guest's lsinitramfs and rebuilt with its own update-initramfs only when
something is missing; the modules go into /etc/initramfs-tools/modules so
later rebuilds in the guest keep them (that file is honoured with every
MODULES= setting, where MODULES=dep in the appliance would detect the
appliance's hardware instead of the VM's)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from converter.context import GuestContext
from ferry import errors

MODULES_FILE = "/etc/initramfs-tools/modules"
# What the VM needs to reach its disks (either bus) and network; sd_mod is
# the disk driver above virtio_scsi, which modules.dep does not pull in.
REQUIRED = ("virtio_pci", "virtio_blk", "virtio_scsi", "sd_mod", "virtio_net")
_KO = re.compile(r"\.ko(?:\.(?:xz|zst|gz))?$")


def module_name(path: str) -> str:
    """kernel/drivers/block/virtio_blk.ko.xz -> virtio_blk."""
    base = path.rsplit("/", 1)[-1]
    return _KO.sub("", base).replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """module -> direct dependencies, from /lib/modules/VER/modules.dep."""
    deps: dict[str, list[str]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        mod, rest = line.split(":", 1)
        deps[module_name(mod.strip())] = [module_name(d) for d in rest.split()]
    return deps


def parse_builtin(text: str) -> set[str]:
    """Modules built into the kernel, from modules.builtin."""
    return {module_name(line.strip()) for line in text.splitlines() if line.strip()}


def closure(names: tuple[str, ...] | list[str], deps: dict[str, list[str]]) -> list[str]:
    """`names` and everything they depend on, dependencies first."""
    out: list[str] = []

    def visit(n: str) -> None:
        if n in out:
            return
        for d in deps.get(n, []):
            visit(d)
        out.append(n)

    for n in names:
        visit(n)
    return out


def initramfs_modules(listing: str) -> set[str]:
    """Module names in an lsinitramfs listing."""
    return {module_name(line) for line in listing.splitlines() if _KO.search(line)}


def has_udev(listing: str) -> bool:
    return any(line.endswith("systemd-udevd") for line in listing.splitlines())


def has_file(listing: str, path: str) -> bool:
    """Whether `path` (as in the guest, /lib/… or /etc/…) is in the listing;
    merged-/usr listings write usr/lib/… ."""
    rel = path.lstrip("/")
    names = {line.strip().removeprefix("./") for line in listing.splitlines()}
    return rel in names or f"usr/{rel}" in names


@dataclass
class KernelCheck:
    version: str
    missing: list[str] = field(default_factory=list)     # modules to add
    absent: list[str] = field(default_factory=list)      # not in this kernel at all


def check_kernel(
    version: str, deps: dict[str, list[str]], builtin: set[str], present: set[str]
) -> KernelCheck:
    """Which required modules (with their dependencies) the initramfs lacks."""
    check = KernelCheck(version)
    for mod in closure(list(REQUIRED), deps):
        if mod in builtin or mod in present:
            continue
        if mod not in deps:
            check.absent.append(mod)
        else:
            check.missing.append(mod)
    return check


def add_to_modules_file(text: str, modules: tuple[str, ...]) -> tuple[str, list[str]]:
    """Appends the modules the file does not list yet."""
    listed = {
        line.split()[0] for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }
    added = [m for m in modules if m not in listed]
    if not added:
        return text, []
    if text and not text.endswith("\n"):
        text += "\n"
    text += "# virtio drivers for KVM, added by Ferry\n" + "".join(f"{m}\n" for m in added)
    return text, added


def precheck(ctx: GuestContext) -> None:
    """Refuses a guest whose initramfs cannot be rebuilt, before any change."""
    if not ctx.info.kernels:
        raise errors.FailedPrecondition(
            f"VM {ctx.info.name}: no kernel found in /boot with modules in /lib/modules; "
            "the guest cannot boot as it is"
        )
    if not ctx.g.is_file("/usr/sbin/update-initramfs", followsymlinks=True):
        raise errors.FailedPrecondition(
            f"VM {ctx.info.name}: the guest has no update-initramfs (initramfs-tools); "
            "the converter rebuilds Debian-family initramfs images with it"
        )
    newest = ctx.info.kernels[0]
    deps = parse_modules_dep(ctx.read(f"/lib/modules/{newest}/modules.dep") or "")
    builtin = parse_builtin(ctx.read(f"/lib/modules/{newest}/modules.builtin") or "")
    absent = check_kernel(newest, deps, builtin, set()).absent
    if absent:
        raise errors.FailedPrecondition(
            f"VM {ctx.info.name}: kernel {newest} has no {', '.join(absent)} module, so it "
            "cannot boot on virtio; install a kernel with virtio drivers on the source VM "
            "and copy it again"
        )


def apply(ctx: GuestContext, link_files: list[str]) -> None:
    """Checks every installed kernel's initramfs and rebuilds what needs it.
    `link_files` are the .link files the network step pins names with; when
    the initramfs runs udev it must carry them too."""
    for ver in ctx.info.kernels:
        initrd = f"/boot/initrd.img-{ver}"
        deps = parse_modules_dep(ctx.read(f"/lib/modules/{ver}/modules.dep") or "")
        builtin = parse_builtin(ctx.read(f"/lib/modules/{ver}/modules.builtin") or "")
        exists = ctx.g.is_file(initrd, followsymlinks=True)
        listing = ctx.run(["lsinitramfs", initrd]) if exists else ""
        check = check_kernel(ver, deps, builtin, initramfs_modules(listing))
        if check.absent:  # an older kernel (precheck covered the newest)
            ctx.report.warn(
                f"kernel {ver} has no {', '.join(check.absent)} module; it cannot boot on "
                "virtio: boot the newest kernel"
            )
            continue
        reasons: list[str] = []
        if not exists:
            reasons.append("no initramfs")
        if check.missing:
            reasons.append("missing " + ", ".join(check.missing))
        reasons.extend(ctx.initramfs_reasons)
        if exists and has_udev(listing):
            # Debian's udev hook copies /etc/systemd/network/*.link there.
            reasons.extend(
                f"{f} not in it" for f in link_files
                if not has_file(listing, "/lib/systemd/network/" + f.rsplit("/", 1)[-1])
                and f"{f} changed" not in reasons
            )
        if not reasons:
            continue
        if check.missing:
            current = ctx.read(MODULES_FILE) or ""
            text, added = add_to_modules_file(current, REQUIRED)
            if added:
                ctx.write(MODULES_FILE, text, "add-initramfs-modules", "added " + ", ".join(added))
        started = time.monotonic()
        ctx.run(["update-initramfs", "-u" if exists else "-c", "-k", ver])
        took = time.monotonic() - started
        ctx.report.timing(f"update-initramfs {ver}", took)
        after = ctx.run(["lsinitramfs", initrd])
        still = check_kernel(ver, deps, builtin, initramfs_modules(after)).missing
        if still:
            raise errors.OperationFailed(
                f"VM {ctx.info.name}: update-initramfs for kernel {ver} did not add "
                f"{', '.join(still)}; check {MODULES_FILE} and the guest's initramfs hooks"
            )
        ctx.report.change(
            "rebuild-initramfs", initrd,
            f"update-initramfs {'-u' if exists else '-c'} -k {ver} ({'; '.join(reasons)}); "
            f"took {took:.1f} s",
        )
        ctx.log.info("rebuilt %s in %.1f s", initrd, took)
