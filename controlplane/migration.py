"""Walks each VM of a migration through its itinerary (phases.py), persisting
the migration before and after every phase. CopyDisks serves each source disk
read-only with qemu-nbd and has transferd copy them in parallel; ConvertGuest
calls the converter on the target copies; CreateVM has the target describe
the VM. Failures and cancellation record the reason and remove what the
migration created."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from controlplane import phases, plans
from controlplane.providers import disk_images
from controlplane.store import Store
from controlplane.targets.local import LocalTarget, VMSpec
from ferry import errors
from ferry.logs import context_logger
from ferry.rpc import error_from_rpc
from ferry.v1 import (
    controlplane_pb2,
    converter_pb2,
    converter_pb2_grpc,
    transfer_pb2,
    transfer_pb2_grpc,
)

log = logging.getLogger(__name__)

M = controlplane_pb2.MigrationState
T = transfer_pb2.TransferState
TERMINAL = (M.MIGRATION_STATE_SUCCEEDED, M.MIGRATION_STATE_FAILED, M.MIGRATION_STATE_CANCELLED)
TRANSFER_DONE = (
    T.TRANSFER_STATE_SUCCEEDED, T.TRANSFER_STATE_FAILED, T.TRANSFER_STATE_CANCELLED
)
WATCH_INTERVAL_MS = 1000
# Unix socket paths are limited to 108 bytes; keep a margin for the name.
MAX_SOCKET_DIR = 80


def new_migration(plan: controlplane_pb2.Plan) -> controlplane_pb2.Migration:
    """A PENDING migration with each VM's itinerary and disks laid out, so a
    watcher sees the whole route from the first message."""
    route = phases.itinerary(phases.situation_of(plan))
    target = LocalTarget(plan.local.directory)
    mig = controlplane_pb2.Migration(
        id=uuid.uuid4().hex, plan_id=plan.id, state=M.MIGRATION_STATE_PENDING
    )
    for vm in plan.vms:
        status = mig.vms.add(name=vm.name, state=M.MIGRATION_STATE_PENDING)
        for name in route:
            status.phases.add(name=name, state=M.MIGRATION_STATE_PENDING)
        for i, (src, dst) in enumerate(
            zip(vm.disks, target.disk_paths(vm.name, len(vm.disks)), strict=True)
        ):
            status.disks.add(name=f"disk{i}", source=src, target=dst)
    return mig


class Services:
    """Clients of transferd and the converter (addresses may be unix:/path)."""

    def __init__(self, transferd_addr: str, converter_addr: str) -> None:
        self._channels = [
            grpc.aio.insecure_channel(transferd_addr),
            grpc.aio.insecure_channel(converter_addr),
        ]
        self.transfer = transfer_pb2_grpc.TransferServiceStub(self._channels[0])
        self.converter = converter_pb2_grpc.ConverterServiceStub(self._channels[1])

    async def close(self) -> None:
        for ch in self._channels:
            await ch.close(None)


def _mount_point(path: str) -> str:
    """The mount point of the file system holding `path` (or its nearest
    existing parent)."""
    p = Path(path).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    dev = p.stat().st_dev
    while p != p.parent and p.parent.stat().st_dev == dev:
        p = p.parent
    return str(p)


def no_space_message(written: str, target_dir: str) -> str:
    where = _mount_point(written or target_dir)
    return (
        f"no space left on {where} while writing {written}; free space there or choose "
        "another --target"
    )


def os_error_message(err: OSError, target_dir: str) -> str:
    """An operator's message for a file error on the target: what, where and
    the fix, never "internal error: [Errno 28] ..."."""
    written = str(err.filename or target_dir)
    if err.errno == errno.ENOSPC:
        return no_space_message(written, target_dir)
    return (
        f"cannot write {written}: {err.strerror or err}; check the target directory "
        f"{target_dir} (space, permissions) or choose another --target"
    )


class MigrationRunner:
    def __init__(
        self,
        plan: controlplane_pb2.Plan,
        migration: controlplane_pb2.Migration,
        store: Store,
        services: Services,
        state_dir: str,
        on_change: Callable[[controlplane_pb2.Migration], None] = lambda m: None,
    ) -> None:
        self.plan = plan
        self.migration = migration
        self.store = store
        self.services = services
        self.state_dir = state_dir
        self.on_change = on_change
        self.target = LocalTarget(plan.local.directory)
        # Set by whoever cancels the task: what the VMs' status should say.
        self.cancel_reason = "cancelled by the operator during phase {phase}"
        self.cancel_state: controlplane_pb2.MigrationState = (
            M.MIGRATION_STATE_CANCELLED
        )
        self._socket_base = ""
        self._handlers: dict[
            str, Callable[[controlplane_pb2.PlanVM, controlplane_pb2.VMStatus], Awaitable[None]]
        ] = {
            "CopyDisks": self._copy_disks,
            "ConvertGuest": self._convert_guest,
            "CreateVM": self._create_vm,
            "Completed": self._completed,
        }

    def save(self) -> None:
        self.store.put_migration(self.migration)
        self.on_change(self.migration)

    async def run(self) -> controlplane_pb2.Migration:
        """Runs every VM (in parallel) to the end and returns the final
        migration. Cancelling the task cancels transfers and cleans up; the
        migration then ends in `cancel_state`."""
        mig = self.migration
        mig.state = M.MIGRATION_STATE_RUNNING
        mig.started_at.GetCurrentTime()
        self.save()
        socket_dir = self._socket_base = self._socket_dir()
        try:
            vms = {vm.name: vm for vm in self.plan.vms}
            await asyncio.gather(
                *(self._run_vm(vms[s.name], s) for s in mig.vms),
                return_exceptions=True,
            )
        except asyncio.CancelledError:
            # gather was cancelled; each VM recorded its own end already.
            pass
        finally:
            shutil.rmtree(socket_dir, ignore_errors=True)
        states = [vm.state for vm in mig.vms]
        failed = [f"VM {vm.name}: {vm.error}" for vm in mig.vms if vm.error]
        if all(s == M.MIGRATION_STATE_SUCCEEDED for s in states):
            mig.state = M.MIGRATION_STATE_SUCCEEDED
        elif M.MIGRATION_STATE_FAILED in states:
            mig.state = M.MIGRATION_STATE_FAILED
        else:
            mig.state = self.cancel_state
        mig.error = "; ".join(failed)
        mig.finished_at.GetCurrentTime()
        self.save()
        return mig

    def _socket_dir(self) -> str:
        base = Path(self.state_dir) / "nbd"
        if len(str(base.resolve())) <= MAX_SOCKET_DIR:
            base.mkdir(parents=True, exist_ok=True)
            return tempfile.mkdtemp(prefix=self.migration.id[:8] + "-", dir=base)
        return tempfile.mkdtemp(prefix="ferry-nbd-")

    async def _run_vm(
        self, vm: controlplane_pb2.PlanVM, status: controlplane_pb2.VMStatus
    ) -> None:
        vlog = context_logger(log, {"plan": self.plan.id, "vm": vm.name})
        status.state = M.MIGRATION_STATE_RUNNING
        created_dir = False
        current: controlplane_pb2.PhaseStatus | None = None
        try:
            self.target.prepare(vm.name)
            created_dir = True
            status.vm_directory = str(self.target.vm_dir(vm.name))
            for phase in status.phases:
                current = phase
                status.phase = phase.name
                phase.state = M.MIGRATION_STATE_RUNNING
                phase.started_at.GetCurrentTime()
                self.save()
                vlog.info("phase %s started", phase.name)
                await self._handlers[phase.name](vm, status)
                phase.state = M.MIGRATION_STATE_SUCCEEDED
                phase.finished_at.GetCurrentTime()
                self.save()
                vlog.info("phase %s finished", phase.name)
        except asyncio.CancelledError:
            reason = self.cancel_reason.format(phase=status.phase or "(before the first)")
            self._end_vm(vm, status, current, self.cancel_state, reason, created_dir)
            vlog.warning("%s", status.error)
            raise
        except errors.FerryError as e:
            self._end_vm(vm, status, current, M.MIGRATION_STATE_FAILED, str(e), created_dir)
            vlog.error("failed: %s", status.error)
        except OSError as e:
            message = os_error_message(e, self.plan.local.directory)
            self._end_vm(vm, status, current, M.MIGRATION_STATE_FAILED, message, created_dir)
            vlog.error("failed: %s", status.error)
        except Exception as e:
            vlog.exception("unexpected error")
            self._end_vm(
                vm, status, current, M.MIGRATION_STATE_FAILED, f"internal error: {e}", created_dir
            )

    def _end_vm(
        self,
        vm: controlplane_pb2.PlanVM,
        status: controlplane_pb2.VMStatus,
        phase: controlplane_pb2.PhaseStatus | None,
        state: controlplane_pb2.MigrationState,
        reason: str,
        created_dir: bool,
    ) -> None:
        if phase is not None and phase.state == M.MIGRATION_STATE_RUNNING:
            phase.state = state
            phase.message = reason
            phase.finished_at.GetCurrentTime()
        removed = ""
        if state != M.MIGRATION_STATE_SUCCEEDED and created_dir:
            removed = self.target.remove(vm.name)
            status.vm_directory = status.qemu_command_file = ""
            status.libvirt_xml_file = status.report_file = ""
        status.state = state
        status.error = f"{reason}; {removed}" if removed else reason
        self.save()

    # Phases

    async def _copy_disks(
        self, vm: controlplane_pb2.PlanVM, status: controlplane_pb2.VMStatus
    ) -> None:
        current = status.phases[[p.name for p in status.phases].index("CopyDisks")]
        current.message = f"copying {len(status.disks)} disk(s)"
        try:
            async with asyncio.TaskGroup() as tg:
                for index, disk in enumerate(status.disks):
                    tg.create_task(self._copy_disk(vm, index, disk))
        except ExceptionGroup as group:
            # The first disk that failed says why; its siblings were cancelled.
            raise _first_error(group) from None
        current.message = f"copied {len(status.disks)} disk(s)"

    async def _copy_disk(
        self, vm: controlplane_pb2.PlanVM, index: int, disk: controlplane_pb2.DiskStatus
    ) -> None:
        dlog = context_logger(log, {"plan": self.plan.id, "vm": vm.name, "disk": disk.name})
        # Checked again: the file may have changed since the plan was made.
        image = await asyncio.to_thread(disk_images.inspect_image, disk.source)
        vm_index = [v.name for v in self.plan.vms].index(vm.name)
        sock = os.path.join(self._socket_base, f"{vm_index}-{index}.sock")
        transfer_id = f"{self.migration.id}-{vm.name}-{disk.name}"
        started = False
        async with disk_images.serve_image(image, sock) as uri:
            try:
                try:
                    t = await self.services.transfer.StartTransfer(
                        transfer_pb2.StartTransferRequest(
                            transfer_id=transfer_id,
                            source_uri=uri,
                            target_path=disk.target,
                            labels=transfer_pb2.TransferLabels(
                                plan=self.plan.id, vm=vm.name, disk=disk.name
                            ),
                        )
                    )
                    started = True
                    disk.transfer_id = t.id
                    dlog.info("transfer %s started from %s", t.id, image.path)
                    final = t
                    async for final in self.services.transfer.WatchTransfer(
                        transfer_pb2.WatchTransferRequest(
                            transfer_id=t.id, interval_ms=WATCH_INTERVAL_MS
                        )
                    ):
                        disk.state = final.state
                        disk.progress.CopyFrom(final.progress)
                        self.save()
                        if final.state in TRANSFER_DONE:
                            break
                except grpc.aio.AioRpcError as e:
                    raise self._disk_error(disk, error_from_rpc(e, "transferd")) from e
            except asyncio.CancelledError:
                if started:
                    await self._cancel_transfer(transfer_id, dlog)
                raise
        if final.state != T.TRANSFER_STATE_SUCCEEDED:
            why = final.error or (
                "transferd stopped reporting before the transfer ended"
                if final.state not in TRANSFER_DONE
                else transfer_pb2.TransferState.Name(final.state)
            )
            if "No space left on device" in why or "[Errno 28]" in why:
                why = no_space_message(disk.target, self.plan.local.directory)
            raise errors.OperationFailed(f"copying {disk.name} ({disk.source}) failed: {why}")

    @staticmethod
    def _disk_error(
        disk: controlplane_pb2.DiskStatus, err: errors.FerryError
    ) -> errors.FerryError:
        return type(err)(f"copying {disk.name} ({disk.source}) failed: transferd: {err}")

    async def _cancel_transfer(self, transfer_id: str, dlog: logging.LoggerAdapter) -> None:  # type: ignore[type-arg]
        try:
            await asyncio.shield(asyncio.wait_for(
                self.services.transfer.CancelTransfer(
                    transfer_pb2.CancelTransferRequest(transfer_id=transfer_id)
                ),
                timeout=10,
            ))
            dlog.info("transfer %s cancelled", transfer_id)
        except (grpc.aio.AioRpcError, TimeoutError) as e:
            dlog.warning("could not cancel transfer %s: %s", transfer_id, e)

    async def _convert_guest(
        self, vm: controlplane_pb2.PlanVM, status: controlplane_pb2.VMStatus
    ) -> None:
        phase = status.phases[[p.name for p in status.phases].index("ConvertGuest")]
        request = converter_pb2.ConvertRequest(
            disk_paths=[d.target for d in status.disks],
            bus=converter_pb2.DISK_BUS_VIRTIO_BLK,
            nics=[
                converter_pb2.TargetNic(mac=n.mac, addresses=list(n.addresses)) for n in vm.nics
            ],
            plan=self.plan.id,
            vm=vm.name,
        )
        report: converter_pb2.ConversionReport | None = None
        try:
            async for event in self.services.converter.Convert(request):
                phase.message = f"{event.step}: {event.message}" if event.message else event.step
                if event.HasField("report"):
                    report = event.report
                self.save()
        except grpc.aio.AioRpcError as e:
            err = error_from_rpc(e, "converter")
            raise type(err)(f"converting the guest failed: {err}") from e
        if report is None:
            raise errors.OperationFailed(
                "converting the guest failed: the converter ended without a report; "
                "see the converter's log"
            )
        status.conversion.CopyFrom(report)
        status.report_file = self.target.write_report(vm.name, report)
        phase.message = f"converted {report.distro or report.os_type} {report.version}".strip()

    async def _create_vm(
        self, vm: controlplane_pb2.PlanVM, status: controlplane_pb2.VMStatus
    ) -> None:
        spec = VMSpec(
            name=vm.name,
            memory_mib=vm.memory_mib,
            cpus=vm.cpus,
            firmware=vm.firmware or "bios",
            macs=[n.mac for n in vm.nics],
            disks=[d.target for d in status.disks],
        )
        self.target.create_vm(spec, status)

    async def _completed(
        self, vm: controlplane_pb2.PlanVM, status: controlplane_pb2.VMStatus
    ) -> None:
        status.state = M.MIGRATION_STATE_SUCCEEDED


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    for e in group.exceptions:
        if isinstance(e, BaseExceptionGroup):
            return _first_error(e)
        if isinstance(e, errors.FerryError):
            return e
    return group.exceptions[0]


async def run_migration(
    plan: controlplane_pb2.Plan,
    store: Store,
    transferd_addr: str,
    converter_addr: str,
    state_dir: str,
) -> controlplane_pb2.Migration:
    """Validates and stores `plan`, then runs one migration of it to its end
    in the calling event loop: what CreatePlan + StartMigration do, without
    the gRPC service. A plan with a blocking condition raises
    FailedPrecondition before anything is created."""
    prepared = await asyncio.to_thread(plans.prepare_plan, plan)
    blockers = plans.blocking(prepared)
    if blockers:
        raise errors.FailedPrecondition(
            f"plan {plan.name} cannot start: " + "; ".join(c.message for c in blockers)
        )
    prepared.id = prepared.id or uuid.uuid4().hex
    prepared.name = prepared.name or f"plan-{prepared.id[:8]}"
    if not prepared.HasField("created_at"):
        prepared.created_at.GetCurrentTime()
    store.put_plan(prepared)
    services = Services(transferd_addr, converter_addr)
    try:
        runner = MigrationRunner(prepared, new_migration(prepared), store, services, state_dir)
        return await runner.run()
    finally:
        with contextlib.suppress(Exception):
            await services.close()
