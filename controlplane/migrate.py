"""`ferry migrate`: one VM made of local disk images to a local directory.
Checks the flags and files before anything is created, starts the three
services as subprocesses on Unix sockets (unless --controlplane names one),
then creates a plan, starts the migration and shows its progress."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controlplane import plans
from controlplane.migration import TERMINAL, TRANSFER_DONE
from controlplane.providers import disk_images
from ferry import errors
from ferry.cli import DIE_WITH_PARENT_ENV
from ferry.rpc import check_address, error_from_rpc
from ferry.v1 import controlplane_pb2, controlplane_pb2_grpc

M = controlplane_pb2.MigrationState
T = TypeVar("T")
SERVICE_START_TIMEOUT = 120.0
SERVICE_STOP_TIMEOUT = 60.0
PLAIN_PROGRESS_EVERY = 5.0
MIB = 1024 * 1024


def parse_source(value: str) -> list[str]:
    kind, _, rest = value.partition(":")
    paths = [p.strip() for p in rest.split(",") if p.strip()]
    if kind.strip() != "disk" or not paths:
        raise errors.InvalidInput(
            f"--source {value!r} is not understood; write disk:PATH[,PATH...], "
            "e.g. --source disk:/vms/web.vmdk"
        )
    return [os.path.abspath(os.path.expanduser(p)) for p in paths]


def parse_target(value: str) -> str:
    kind, _, rest = value.partition(":")
    rest = rest.strip()
    if kind.strip() != "local" or not rest:
        raise errors.InvalidInput(
            f"--target {value!r} is not understood; write local:DIR, e.g. --target local:/srv/vms"
        )
    return os.path.abspath(os.path.expanduser(rest))


def check_state_dir(state_dir: str) -> None:
    """--state-dir is checked before any service starts, so a wrong one is
    one line and exit 2, not a control plane that dies at start-up."""
    if not state_dir:
        return
    p = Path(state_dir)
    if p.exists() and not p.is_dir():
        raise errors.InvalidInput(
            f"--state-dir {state_dir} is not a directory; pass a directory"
        )
    if p.is_dir() and not os.access(state_dir, os.W_OK | os.X_OK):
        raise errors.InvalidInput(
            f"--state-dir {state_dir} is not writable; fix its permissions or pass another"
        )


def build_plan(
    disks: list[str], directory: str, name: str | None, macs: list[str], skip_conversion: bool
) -> controlplane_pb2.Plan:
    """The plan `ferry migrate` asks for; the name and NICs default to what a
    .vmx beside the first disk says (filled in by plans.complete_plan)."""
    vmx = disk_images.find_vmx(disks[0]) if os.path.exists(disks[0]) else None
    descriptor = disk_images.read_vmx(vmx) if vmx else None
    vm_name = name or disk_images.vm_name_from(disks[0], descriptor)
    vm = controlplane_pb2.PlanVM(name=vm_name, disks=disks)
    for mac in macs:
        normalized = plans.normalize_mac(mac)
        if not plans.is_valid_mac(normalized):
            raise errors.InvalidInput(
                f"--mac {mac!r} is not a MAC address; write it as 00:50:56:aa:bb:cc"
            )
        vm.nics.add(mac=normalized)
    return controlplane_pb2.Plan(
        name=vm_name,
        disk_images=controlplane_pb2.DiskImageSource(),
        local=controlplane_pb2.LocalTarget(directory=directory),
        vms=[vm],
        skip_conversion=skip_conversion,
    )


def check_plan(plan: controlplane_pb2.Plan) -> list[str]:
    """Validates locally, as the control plane will; raises InvalidInput with
    every blocking problem, returns the warnings."""
    prepared = plans.prepare_plan(plan)
    blockers = [c.message for c in plans.blocking(prepared)]
    if len(blockers) == 1:
        raise errors.InvalidInput(blockers[0])
    if blockers:
        raise errors.InvalidInput(
            "the migration cannot start:\n  " + "\n  ".join(blockers)
        )
    return [c.message for c in prepared.conditions if c.category == plans.WARNING]


# Signals

# SIGTERM (kill, systemd) and SIGHUP (closed terminal) mean what Ctrl-C means:
# cancel the migration, stop the services, clean up.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    old = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in STOP_SIGNALS:
        signal.signal(sig, _raise_interrupt)
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    sigs = (signal.SIGINT, *STOP_SIGNALS)
    old = {sig: signal.getsignal(sig) for sig in sigs}
    for sig in sigs:
        signal.signal(sig, signal.SIG_IGN)
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


async def _cancelled_by_signals(coro: Awaitable[T]) -> T:
    """Runs `coro` with SIGTERM/SIGHUP cancelling it, as asyncio.run does
    for SIGINT, so its cleanup (CancelMigration) runs."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await coro
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
            signal.signal(sig, _raise_interrupt)


def _run_async(coro: Awaitable[T]) -> T:
    try:
        return asyncio.run(_cancelled_by_signals(coro))
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None


# Services as subprocesses


@dataclass
class LocalServices:
    """transferd, the converter and the control plane as child processes on
    Unix sockets in a private directory; `stop` ends them, control plane
    first so it can cancel transfers cleanly."""

    workdir: str
    state_dir: str
    log_level: str
    # Without conversion the converter (and its libguestfs) is not started.
    with_converter: bool = True
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def address(self, name: str) -> str:
        return f"unix:{self.workdir}/{name}.sock"

    def log_file(self, name: str) -> str:
        return os.path.join(self.workdir, f"{name}.log")

    def start(self) -> None:
        commands = {
            "transferd": ["transferd", "--listen", self.address("transferd"),
                          "--metrics-listen", ""],
            "converter": ["converter", "--listen", self.address("converter")],
            "controlplane": [
                "controlplane", "--listen", self.address("controlplane"),
                "--state-dir", self.state_dir,
                "--transferd", self.address("transferd"),
                "--converter", self.address("converter"),
            ],
        }
        if not self.with_converter:
            del commands["converter"]
        for name, cmd in commands.items():
            with open(self.log_file(name), "wb") as log:
                self.procs[name] = subprocess.Popen(
                    [sys.executable, "-m", "ferry.cli", "--log-level", self.log_level,
                     "serve", *cmd],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    # Own session: Ctrl-C reaches ferry migrate only, which
                    # cancels the migration and then stops the services in order.
                    # If ferry migrate dies anyway (kill -9), the kernel sends
                    # the services SIGTERM (see ferry.cli).
                    start_new_session=True,
                    env={**os.environ, DIE_WITH_PARENT_ENV: str(os.getpid())},
                )
        for name in commands:
            self._wait_serving(name)

    def _wait_serving(self, name: str) -> None:
        deadline = time.monotonic() + SERVICE_START_TIMEOUT
        with grpc.insecure_channel(self.address(name)) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.procs[name].poll() is not None:
                    raise errors.Unavailable(
                        f"{name} exited at start-up:\n{self.log_tail(name)}"
                    )
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise errors.Unavailable(
            f"{name} did not become ready within {SERVICE_START_TIMEOUT:.0f} s; "
            f"its log:\n{self.log_tail(name)}"
        )

    def log_tail(self, name: str, lines: int = 15) -> str:
        try:
            text = Path(self.log_file(name)).read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.strip().splitlines()[-lines:])

    def stop(self) -> None:
        """Uninterruptible: a second Ctrl-C or a SIGTERM while the services
        stop would otherwise leave them (and the work directory) behind."""
        with _signals_ignored():
            self._stop()

    def _stop(self) -> None:
        for name in ("controlplane", "transferd", "converter"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=SERVICE_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def local_services(
    state_dir: str, log_level: str, with_converter: bool = True
) -> Iterator[LocalServices]:
    workdir = _short_workdir()
    services = LocalServices(
        workdir=workdir,
        state_dir=state_dir or os.path.join(workdir, "state"),
        log_level=log_level,
        with_converter=with_converter,
    )
    try:
        services.start()
        yield services
    finally:
        with _signals_ignored():
            services.stop()
            shutil.rmtree(workdir, ignore_errors=True)


# Unix socket paths are limited to 107 bytes; "/controlplane.sock" is the longest name.
MAX_WORKDIR = 107 - len("/controlplane.sock") - len("ferry-XXXXXXXX/")


def _short_workdir() -> str:
    """A private directory for the sockets and logs: under $TMPDIR when its
    path is short enough for Unix socket names, else under /tmp."""
    base = tempfile.gettempdir()
    if len(base) > MAX_WORKDIR:
        base = "/tmp"
    try:
        return tempfile.mkdtemp(prefix="ferry-", dir=base)
    except OSError as e:
        raise errors.FailedPrecondition(
            f"cannot create a work directory in {base}: {e.strerror}; "
            "set TMPDIR to a short writable directory"
        ) from e


# Progress


def _state_word(state: controlplane_pb2.MigrationState) -> str:
    return M.Name(state).removeprefix("MIGRATION_STATE_").lower()


def format_disk_line(vm: str, phase: str, disk: controlplane_pb2.DiskStatus) -> str:
    p = disk.progress
    done = p.bytes_read + p.bytes_zeroed + p.bytes_skipped
    percent = 100.0 * min(done, p.size_bytes) / p.size_bytes if p.size_bytes else 0.0
    size = f"{p.size_bytes / MIB:,.0f} MiB" if p.size_bytes else "size unknown"
    return (
        f"{vm} {disk.name} [{phase}] {percent:5.1f}% of {size}, "
        f"{p.rate_bytes_per_second / MIB:6.1f} MiB/s"
    )


class ProgressView:
    """Per-disk lines redrawn in place on a terminal; plain lines otherwise
    (on every state change and every few seconds). Phase changes and
    conversion steps are printed as they happen."""

    def __init__(self, out: TextIO, tty: bool) -> None:
        self.out = out
        self.tty = tty
        self._drawn = 0
        self._said: dict[str, str] = {}
        self._last_plain: dict[str, float] = {}
        self._last_state: dict[str, int] = {}

    def _say(self, line: str) -> None:
        self._erase()
        print(line, file=self.out)

    def _erase(self) -> None:
        if self.tty and self._drawn:
            self.out.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def update(self, migration: controlplane_pb2.Migration) -> None:
        for vm in migration.vms:
            for ph in vm.phases:
                key = f"{vm.name}/{ph.name}"
                said = f"{M.Name(ph.state)}|{ph.message}"
                if ph.state == M.MIGRATION_STATE_PENDING or self._said.get(key) == said:
                    continue
                self._said[key] = said
                detail = f": {ph.message}" if ph.message else ""
                self._say(f"{vm.name}: {ph.name} {_state_word(ph.state)}{detail}")
        lines = [
            (f"{vm.name}/{d.name}", d.state, format_disk_line(vm.name, vm.phase, d))
            for vm in migration.vms
            for d in vm.disks
            if d.transfer_id
        ]
        if self.tty:
            self._erase()
            for _, _, line in lines:
                print(line, file=self.out)
            self._drawn = len(lines)
        else:
            now = time.monotonic()
            for key, state, line in lines:
                changed = self._last_state.get(key) != state
                copying = state not in TRANSFER_DONE
                due = now - self._last_plain.get(key, 0.0) >= PLAIN_PROGRESS_EVERY
                if changed or (copying and due):
                    self._last_plain[key] = now
                    self._last_state[key] = state
                    print(line, file=self.out)
        self.out.flush()

    def finish(self) -> None:
        self._drawn = 0


def summary(migration: controlplane_pb2.Migration) -> list[str]:
    """Where the results are, per VM."""
    out: list[str] = []
    for vm in migration.vms:
        if vm.state != M.MIGRATION_STATE_SUCCEEDED:
            continue
        out.append(f"VM {vm.name} migrated to {vm.vm_directory}")
        out.extend(f"  disk:              {d.target}" for d in vm.disks)
        out.append(f"  qemu command:      {vm.qemu_command_file}")
        out.append(f"  libvirt XML:       {vm.libvirt_xml_file}")
        if vm.report_file:
            out.append(f"  conversion report: {vm.report_file}")
            out.append(f"  boot it with:      {vm.qemu_command_file}")
        else:
            out.append("  conversion report: none (conversion skipped: the guest is as it was)")
        # The converter's warnings ask the operator to act; they must not stay
        # buried in the report file.
        out.extend(f"  warning: {w}" for w in vm.conversion.warnings)
    return out


async def _create_and_start(
    stub: controlplane_pb2_grpc.ControlPlaneStub, plan: controlplane_pb2.Plan
) -> tuple[controlplane_pb2.Plan, controlplane_pb2.Migration]:
    created = await stub.CreatePlan(controlplane_pb2.CreatePlanRequest(plan=plan))
    migration = await stub.StartMigration(
        controlplane_pb2.StartMigrationRequest(plan_id=created.id)
    )
    return created, migration


async def _cancel_once_started(
    stub: controlplane_pb2_grpc.ControlPlaneStub,
    starting: asyncio.Future[tuple[controlplane_pb2.Plan, controlplane_pb2.Migration]],
    out: TextIO,
) -> None:
    """Interrupted during CreatePlan/StartMigration: the control plane may
    already run the migration, so wait for the answer and cancel it."""
    try:
        _, migration = await asyncio.wait_for(starting, timeout=SERVICE_STOP_TIMEOUT)
        print("cancelling the migration...", file=out, flush=True)
        final = await stub.CancelMigration(
            controlplane_pb2.CancelMigrationRequest(migration_id=migration.id),
            timeout=SERVICE_STOP_TIMEOUT,
        )
    except (grpc.aio.AioRpcError, TimeoutError):
        return
    print(f"migration {_state_word(final.state)}: {final.error}", file=out, flush=True)


async def drive_migration(
    controlplane_addr: str,
    plan: controlplane_pb2.Plan,
    out: TextIO,
    tty: bool = False,
    remote: bool = False,
) -> controlplane_pb2.Migration:
    """CreatePlan, StartMigration, WatchMigration to the end with progress on
    `out`. Cancelling the calling task (Ctrl-C) cancels the migration.
    `remote`: the address came from --controlplane, so errors name it."""
    service = f"the control plane at {controlplane_addr}" if remote else "the control plane"
    hint = "check --controlplane" if remote else ""
    async with grpc.aio.insecure_channel(controlplane_addr) as channel:
        stub = controlplane_pb2_grpc.ControlPlaneStub(channel)
        starting = asyncio.ensure_future(_create_and_start(stub, plan))
        try:
            created, migration = await asyncio.shield(starting)
        except grpc.aio.AioRpcError as e:
            raise error_from_rpc(e, service, hint) from e
        except asyncio.CancelledError:
            await _cancel_once_started(stub, starting, out)
            raise
        print(f"migration {migration.id} of plan {created.name} started", file=out)
        view = ProgressView(out, tty)
        migration_id = migration.id
        try:
            async for migration in stub.WatchMigration(
                controlplane_pb2.WatchMigrationRequest(migration_id=migration_id)
            ):
                view.update(migration)
        except asyncio.CancelledError:
            view.finish()
            print("cancelling the migration...", file=out, flush=True)
            final = await stub.CancelMigration(
                controlplane_pb2.CancelMigrationRequest(migration_id=migration_id)
            )
            print(f"migration {_state_word(final.state)}: {final.error}", file=out, flush=True)
            raise
        except grpc.aio.AioRpcError as e:
            raise error_from_rpc(e, service, hint) from e
        view.finish()
        if migration.state not in TERMINAL:
            raise errors.Unavailable(
                f"the control plane stopped reporting on migration {migration.id}; "
                "check its log and GetMigration"
            )
        return migration


def run_migrate(args: argparse.Namespace) -> int:
    if args.controlplane:
        check_address(args.controlplane, "--controlplane")
    disks = parse_source(args.source)
    directory = parse_target(args.target)
    check_state_dir(args.state_dir)
    plan = build_plan(
        disks, directory, args.name, list(args.mac), args.skip_conversion
    )
    for warning in check_plan(plan):
        print(f"ferry: warning: {warning}", file=sys.stderr)
    tty = sys.stdout.isatty()
    with _signals_interrupt():
        if args.controlplane:
            migration = _run_async(
                drive_migration(args.controlplane, plan, sys.stdout, tty, remote=True)
            )
        else:
            with local_services(
                args.state_dir, args.log_level, with_converter=not plan.skip_conversion
            ) as services:
                migration = _run_async(
                    drive_migration(services.address("controlplane"), plan, sys.stdout, tty)
                )
    if migration.state != M.MIGRATION_STATE_SUCCEEDED:
        print(
            f"ferry: error: migration {_state_word(migration.state)}: {migration.error}",
            file=sys.stderr,
        )
        return 1
    for line in summary(migration):
        print(line)
    return 0
