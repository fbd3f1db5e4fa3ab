"""The conversion of one VM's target disks, as an ordered list of steps.
Each step yields a progress event; the last event carries the report.

Everything here blocks (libguestfs): callers run it in a worker thread."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from converter import inspect
from converter.context import GuestContext, TargetNic
from converter.linux import caches, fstab, grub, initramfs, network, vmware_tools
from converter.linux.devices import DeviceMap, Filesystem
from converter.report import ReportBuilder
from ferry import errors
from ferry.logs import context_logger
from ferry.v1 import converter_pb2

log = logging.getLogger(__name__)

_busy: set[str] = set()
_busy_lock = threading.Lock()


@dataclass
class ConvertJob:
    disks: list[str]
    nics: list[TargetNic] = field(default_factory=list)
    plan: str = ""
    vm: str = ""

    @property
    def label(self) -> str:
        return self.vm or (os.path.basename(self.disks[0]) if self.disks else "?")


@dataclass
class Event:
    step: str
    message: str
    report: converter_pb2.ConversionReport | None = None


@contextmanager
def claim(disks: list[str], vm: str) -> Iterator[None]:
    """One conversion at a time per disk: a second request on a disk being
    converted is refused rather than queued behind a half-changed guest."""
    real = {os.path.realpath(d) for d in disks}
    with _busy_lock:
        clash = sorted(real & _busy)
        if clash:
            raise errors.FailedPrecondition(
                f"VM {vm}: disk {clash[0]} is being converted by another request; wait for "
                "it to finish"
            )
        _busy.update(real)
    try:
        yield
    finally:
        with _busy_lock:
            _busy.difference_update(real)


def device_map(g: Any) -> DeviceMap:
    """The filesystems the appliance sees, with their UUIDs."""
    out = []
    for dev, fstype in g.list_filesystems().items():
        if fstype in ("unknown", ""):
            continue
        try:
            uuid = g.vfs_uuid(dev)
        except RuntimeError:
            uuid = ""
        out.append(Filesystem(device=dev, fstype=fstype, uuid=uuid))
    return DeviceMap(out)


def _describe(report: ReportBuilder, info: inspect.GuestInfo) -> None:
    r = report.report
    r.os_type, r.distro, r.version = info.os_type, info.distro, info.version
    r.product_name, r.arch, r.root_device = info.product_name, info.arch, info.root
    r.firmware, r.root_uuid = info.firmware, info.root_uuid
    r.kernels[:] = info.kernels
    r.disk_paths[:] = info.disks
    for mp, why in info.unmounted.items():
        report.warn(f"{mp} was not mounted ({why}); files on it were not converted")


def _close(g: Any) -> None:
    """Unmounts and stops the appliance; an error here may mean lost writes."""
    g.umount_all()
    g.shutdown()


def inspect_only(disks: list[str]) -> converter_pb2.ConversionReport:
    """Inspection without changes, on read-only handles."""
    label = os.path.basename(disks[0]) if disks else "?"
    checked = inspect.check_disks(disks, label, writable=False)
    report = ReportBuilder()
    g, launch = inspect.open_handle(checked, readonly=True)
    try:
        report.timing("launch", launch)
        info = inspect.inspect_guest(g, label, disks, strict=False)
        _describe(report, info)
        if info.unsupported:
            report.warn(info.unsupported)
        else:
            ctx = GuestContext(
                g=g, info=info, report=report, devices=device_map(g),
                log=context_logger(log, {"disk": label}),
            )
            configs, _ = network.find_configs(ctx)
            network.describe(ctx, configs, {})
        _close(g)
    finally:
        g.close()
    return report.finish(converted=False)


Step = tuple[str, Callable[[GuestContext], None]]


def convert(job: ConvertJob) -> Iterator[Event]:
    """Converts the guest on `job.disks` in place. Raises FerryError; after
    the first change the message says the copy is partially converted.
    Callers hold `claim` on the disks."""
    vm = job.label
    clog = context_logger(log, {"plan": job.plan, "vm": job.vm, "disk": job.disks[0]
                                if job.disks else ""})
    checked = inspect.check_disks(job.disks, vm, writable=True)
    report = ReportBuilder()
    yield Event("launch", f"starting the libguestfs appliance on {len(checked)} disk(s)")
    g, launch = inspect.open_handle(checked, readonly=False)
    report.timing("launch", launch)
    clog.info("appliance started in %.1f s", launch)
    try:
        yield from _steps(g, job, vm, report, clog)
    except errors.FerryError as e:
        if report.changed:
            raise type(e)(
                f"{e}. The target copy ({', '.join(job.disks)}) is partially converted: "
                "copy the source disks again before retrying"
            ) from e
        raise
    except RuntimeError as e:  # libguestfs reports guest-side failures so
        msg = f"VM {vm}: conversion failed: {e}"
        if report.changed:
            msg += (f". The target copy ({', '.join(job.disks)}) is partially converted: "
                    "copy the source disks again before retrying")
        raise errors.OperationFailed(msg) from e
    finally:
        g.close()
    final = report.finish(converted=True)
    clog.info("converted in %.1f s with %d change(s)", final.duration_seconds,
              len(final.changes))
    yield Event("done", f"converted with {len(final.changes)} change(s)", final)


def _steps(
    g: Any, job: ConvertJob, vm: str, report: ReportBuilder, clog: Any,
) -> Iterator[Event]:
    started = time.monotonic()
    info = inspect.inspect_guest(g, vm, job.disks)
    _describe(report, info)
    ctx = GuestContext(g=g, info=info, report=report, devices=device_map(g), log=clog,
                       nics=job.nics)
    # Everything that can refuse the guest does so here, before any change.
    block_plan = fstab.plan(ctx)
    initramfs.precheck(ctx)
    inspect.remount_rw(g, info)
    report.timing("inspect", time.monotonic() - started)
    yield Event("inspect", f"{info.product_name} ({info.distro} {info.version}, {info.arch}, "
                f"{info.firmware}), root {info.root}, kernels {', '.join(info.kernels)}")

    links: list[str] = []

    def set_links(c: GuestContext) -> None:
        links.extend(network.apply(c))

    steps: list[Step] = [
        ("remove-vmware-tools", vmware_tools.apply),
        ("block-devices", lambda c: fstab.apply(c, block_plan)),
        ("network", set_links),
        ("caches", caches.apply),
        ("initramfs", lambda c: initramfs.apply(c, links)),
        ("grub", grub.apply),
    ]
    for name, run in steps:
        before = len(report.report.changes)
        t = time.monotonic()
        run(ctx)
        took = time.monotonic() - t
        report.timing(name, took)
        n = len(report.report.changes) - before
        yield Event(name, f"{n} change(s) in {took:.1f} s")
    t = time.monotonic()
    try:
        _close(g)
    except RuntimeError as e:
        raise errors.OperationFailed(
            f"VM {vm}: the appliance failed while writing the changes back: {e}"
        ) from e
    report.timing("finish", time.monotonic() - t)
