"""The migration runner against the real transferd and real qemu-nbd: disks
copy bit for bit, the source is untouched, qemu-nbd is gone afterwards, and
failure or cancellation removes what the migration created."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from controlplane import plans
from controlplane.migration import (
    MigrationRunner,
    Services,
    new_migration,
    os_error_message,
    run_migration,
)
from controlplane.store import Store
from controlplane.targets.local import LocalTarget, VMSpec
from ferry import errors
from ferry.v1 import controlplane_pb2, transfer_pb2, transfer_pb2_grpc
from tests.controlplane.conftest import make_raw_with_mbr, qemu_img, qemu_nbd_serving
from tests.files import sha256_of

M = controlplane_pb2.MigrationState


@pytest.fixture
def sources(tmp_path: Path) -> list[Path]:
    """A raw disk with an MBR and a qcow2 disk with data written into it."""
    src = tmp_path / "src"
    src.mkdir()
    raw = make_raw_with_mbr(src / "web.raw", size_mib=24)
    qcow = src / "web-data.qcow2"
    qemu_img("create", "-f", "qcow2", str(qcow), "32M")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xab 1M 3M",
                    "-c", "write -P 0x5c 20M 64k", str(qcow)], check=True, capture_output=True)
    return [raw, qcow]


def _plan(sources: list[Path], target: Path) -> controlplane_pb2.Plan:
    plan = controlplane_pb2.Plan(
        name="copy-only",
        disk_images=controlplane_pb2.DiskImageSource(),
        local=controlplane_pb2.LocalTarget(directory=str(target)),
        vms=[controlplane_pb2.PlanVM(name="web", disks=[str(s) for s in sources])],
        skip_conversion=True,  # no guest OS on these disks
    )
    plan.vms[0].nics.add(mac="00:50:56:00:00:07")
    return plan


@pytest.fixture
def target(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    return out


def test_copy_disks_copies_every_disk_exactly_and_leaves_the_source_alone(
    sources: list[Path], target: Path, tmp_path: Path, transferd_addr: str
):
    before = [sha256_of(s) for s in sources]
    store = Store(str(tmp_path / "state"))
    plan = _plan(sources, target)

    mig = asyncio.run(run_migration(plan, store, transferd_addr, "unix:/nonexistent",
                                    str(tmp_path / "state")))

    assert mig.state == M.MIGRATION_STATE_SUCCEEDED, mig.error
    vm_dir = target / "web"
    assert sha256_of(vm_dir / "disk0.raw") == before[0]
    subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(sources[1]),
                    str(vm_dir / "disk1.raw")], check=True, capture_output=True)
    assert [sha256_of(s) for s in sources] == before
    assert [qemu_nbd_serving(s.resolve()) for s in sources] == [[], []]
    assert sorted(p.name for p in vm_dir.iterdir()) == [
        "disk0.raw", "disk1.raw", "web.qemu.sh", "web.xml"
    ]
    assert "mac=00:50:56:00:00:07" in (vm_dir / "web.qemu.sh").read_text()

    stored = store.get_migration(mig.id)
    vm = stored.vms[0]
    assert [(p.name, p.state) for p in vm.phases] == [
        ("CopyDisks", M.MIGRATION_STATE_SUCCEEDED),
        ("CreateVM", M.MIGRATION_STATE_SUCCEEDED),
        ("Completed", M.MIGRATION_STATE_SUCCEEDED),
    ]
    assert all(p.started_at.seconds and p.finished_at.seconds for p in vm.phases)
    assert [d.progress.size_bytes for d in vm.disks] == [24 << 20, 32 << 20]
    assert all(d.transfer_id for d in vm.disks)
    assert vm.qemu_command_file == str(vm_dir / "web.qemu.sh")
    assert vm.libvirt_xml_file == str(vm_dir / "web.xml")
    assert store.get_plan(stored.plan_id).vms[0].name == "web"


def test_a_plan_with_a_blocking_condition_does_not_start(
    sources: list[Path], tmp_path: Path, transferd_addr: str
):
    store = Store(str(tmp_path / "state"))
    missing = tmp_path / "missing"
    with pytest.raises(errors.FailedPrecondition) as e:
        asyncio.run(run_migration(_plan(sources, missing), store, transferd_addr,
                                  "unix:/nonexistent", str(tmp_path / "state")))
    assert str(e.value) == (
        f"plan copy-only cannot start: target directory {missing} does not exist; "
        f"create it (mkdir -p {missing})"
    )
    assert store.list_plans() == []


def test_an_unreachable_transferd_fails_the_vm_and_removes_its_directory(
    sources: list[Path], target: Path, tmp_path: Path
):
    store = Store(str(tmp_path / "state"))
    plan = _plan(sources, target)

    mig = asyncio.run(run_migration(plan, store, f"unix:{tmp_path}/no-transferd.sock",
                                    "unix:/nonexistent", str(tmp_path / "state")))

    assert mig.state == M.MIGRATION_STATE_FAILED
    vm = mig.vms[0]
    assert vm.state == M.MIGRATION_STATE_FAILED
    assert vm.error.startswith("copying disk")
    assert vm.error.endswith(f"; removed {target / 'web'}, which this migration had created")
    assert mig.error == f"VM web: {vm.error}"
    assert vm.phases[0].state == M.MIGRATION_STATE_FAILED
    assert vm.phases[1].state == M.MIGRATION_STATE_PENDING
    assert list(target.iterdir()) == []
    assert [qemu_nbd_serving(s.resolve()) for s in sources] == [[], []]
    assert store.get_migration(mig.id).state == M.MIGRATION_STATE_FAILED


def test_cancel_during_copy_cancels_transfers_and_removes_the_vm_directory(
    sources: list[Path], target: Path, tmp_path: Path, transferd_addr: str
):
    before = [sha256_of(s) for s in sources]
    store = Store(str(tmp_path / "state"))
    plan = plans.prepare_plan(_plan(sources, target))
    assert list(plan.conditions) == []
    plan.id = "p-cancel"
    store.put_plan(plan)

    async def run_and_cancel() -> controlplane_pb2.Migration:
        services = Services(transferd_addr, "unix:/nonexistent")
        task: asyncio.Task[controlplane_pb2.Migration] | None = None

        def cancel_once_a_transfer_runs(m: controlplane_pb2.Migration) -> None:
            # Called inside the runner: the cancel lands at its next await,
            # which is the watch of a started transfer.
            if task is not None and any(d.transfer_id for d in m.vms[0].disks):
                task.cancel()

        runner = MigrationRunner(plan, new_migration(plan), store, services,
                                 str(tmp_path / "state"), cancel_once_a_transfer_runs)
        task = asyncio.create_task(runner.run())
        try:
            return await task
        except asyncio.CancelledError:
            return runner.migration
        finally:
            await services.close()

    mig = asyncio.run(run_and_cancel())

    assert mig.state == M.MIGRATION_STATE_CANCELLED
    vm = mig.vms[0]
    assert vm.error == (
        "cancelled by the operator during phase CopyDisks; "
        f"removed {target / 'web'}, which this migration had created"
    )
    assert vm.phases[0].state == M.MIGRATION_STATE_CANCELLED
    assert list(target.iterdir()) == []
    assert [qemu_nbd_serving(s.resolve()) for s in sources] == [[], []]
    assert [sha256_of(s) for s in sources] == before
    assert store.get_migration(mig.id).state == M.MIGRATION_STATE_CANCELLED
    # transferd holds no transfer of this migration still running.
    with grpc.insecure_channel(transferd_addr) as channel:
        stub = transfer_pb2_grpc.TransferServiceStub(channel)
        states = {t.id: t.state for t in stub.ListTransfers(
            transfer_pb2.ListTransfersRequest()).transfers}
    ours = [states[d.transfer_id] for d in vm.disks if d.transfer_id]
    assert ours and all(
        s in (transfer_pb2.TRANSFER_STATE_CANCELLED, transfer_pb2.TRANSFER_STATE_SUCCEEDED)
        for s in ours
    )


def test_two_migrations_of_the_same_vm_into_one_directory_leave_the_winner_intact(
    sources: list[Path], target: Path, tmp_path: Path, transferd_addr: str
):
    before = sha256_of(sources[0])

    async def both() -> list[controlplane_pb2.Migration | BaseException]:
        return await asyncio.gather(*(
            run_migration(_plan(sources, target), Store(str(tmp_path / f"state{i}")),
                          transferd_addr, "unix:/nonexistent", str(tmp_path / f"state{i}"))
            for i in range(2)
        ), return_exceptions=True)

    results = asyncio.run(both())
    won = [r for r in results if isinstance(r, controlplane_pb2.Migration)
           and r.state == M.MIGRATION_STATE_SUCCEEDED]
    lost = [r for r in results if r not in won]
    assert len(won) == 1 and len(lost) == 1
    message = str(lost[0]) if isinstance(lost[0], BaseException) else lost[0].vms[0].error
    assert f"{target / 'web'} already exists" in message
    assert "removed" not in message
    assert sha256_of(target / "web" / "disk0.raw") == before
    assert sorted(p.name for p in (target / "web").iterdir()) == [
        "disk0.raw", "disk1.raw", "web.qemu.sh", "web.xml"
    ]


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB file system (tmpfs) for running out of space."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_target_says_no_space_where_and_what_not_errno(
    sources: list[Path], small_fs: Path, tmp_path: Path, transferd_addr: str
):
    mig = asyncio.run(run_migration(_plan(sources, small_fs), Store(str(tmp_path / "state")),
                                    transferd_addr, "unix:/nonexistent",
                                    str(tmp_path / "state")))
    assert mig.state == M.MIGRATION_STATE_FAILED
    error = mig.vms[0].error
    assert f"no space left on {small_fs} while writing {small_fs / 'web'}/disk" in error
    assert "; free space there or choose another --target" in error
    assert "Errno" not in error and "internal" not in error
    assert list(small_fs.iterdir()) == []


def test_a_full_target_while_writing_the_vm_files_is_named(small_fs: Path):
    target = LocalTarget(str(small_fs))
    target.prepare("web")
    with open(small_fs / "web" / "filler", "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\xff" * 65536)
            f.flush()
    spec = VMSpec("web", 2048, 2, "bios", ["00:50:56:00:00:01"], target.disk_paths("web", 1))
    with pytest.raises(OSError) as e:
        target.create_vm(spec, controlplane_pb2.VMStatus(name="web"))
    message = os_error_message(e.value, str(small_fs))
    assert message.startswith(f"no space left on {small_fs} while writing {small_fs / 'web'}/")
    assert message.endswith("; free space there or choose another --target")
