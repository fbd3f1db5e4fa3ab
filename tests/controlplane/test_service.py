"""The ControlPlane gRPC API, served for real on a Unix socket and driven
with a gRPC client, against the real transferd."""

from __future__ import annotations

import asyncio
import io
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from controlplane.migrate import drive_migration
from controlplane.server import start
from controlplane.store import Store
from ferry.v1 import controlplane_pb2 as pb
from ferry.v1 import controlplane_pb2_grpc as pb_grpc
from tests.controlplane.conftest import make_raw_with_mbr, qemu_nbd_serving
from tests.files import sha256_of
from tests.threadloop import serving

M = pb.MigrationState


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def controlplane_address(state_dir: Path, transferd_addr: str) -> Iterator[str]:
    """The real control plane on its own event loop thread, on a Unix socket."""
    workdir = tempfile.mkdtemp(prefix="ferry-cp-")
    address = f"unix:{workdir}/cp.sock"
    try:
        with serving(lambda: start(address, str(state_dir), transferd_addr, "unix:/nonexistent")):
            yield address
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def controlplane(controlplane_address: str) -> Iterator[pb_grpc.ControlPlaneStub]:
    channel = grpc.insecure_channel(controlplane_address)
    try:
        yield pb_grpc.ControlPlaneStub(channel)
    finally:
        channel.close()


def _plan(disks: list[Path], target: Path, name: str = "web") -> pb.Plan:
    return pb.Plan(
        name=name,
        disk_images=pb.DiskImageSource(),
        local=pb.LocalTarget(directory=str(target)),
        vms=[pb.PlanVM(name=name, disks=[str(d) for d in disks],
                       nics=[pb.SourceNic(mac="00:50:56:00:00:09")])],
        skip_conversion=True,
    )


def test_a_plan_with_blocking_conditions_is_stored_but_cannot_start(
    controlplane: pb_grpc.ControlPlaneStub, tmp_path: Path
):
    plan = controlplane.CreatePlan(pb.CreatePlanRequest(
        plan=_plan([tmp_path / "missing.vmdk"], tmp_path / "no-target")
    ))
    assert plan.id and plan.created_at.seconds
    assert [(c.category, c.type) for c in plan.conditions] == [
        ("Blocking", "TargetDirectoryMissing"), ("Blocking", "DiskNotFound"),
    ]
    assert controlplane.GetPlan(pb.GetPlanRequest(plan_id=plan.id)) == plan
    assert [p.id for p in controlplane.ListPlans(pb.ListPlansRequest()).plans] == [plan.id]

    with pytest.raises(grpc.RpcError) as e:
        controlplane.StartMigration(pb.StartMigrationRequest(plan_id=plan.id))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert e.value.details() == (
        f"plan web cannot start: target directory {tmp_path / 'no-target'} does not exist; "
        f"create it (mkdir -p {tmp_path / 'no-target'}); VM web: disk image "
        f"{tmp_path / 'missing.vmdk'} does not exist; check the path"
    )


def test_unknown_ids_are_not_found(controlplane: pb_grpc.ControlPlaneStub):
    for call, request in [
        (controlplane.GetPlan, pb.GetPlanRequest(plan_id="nope")),
        (controlplane.StartMigration, pb.StartMigrationRequest(plan_id="nope")),
        (controlplane.GetMigration, pb.GetMigrationRequest(migration_id="nope")),
        (controlplane.CancelMigration, pb.CancelMigrationRequest(migration_id="nope")),
        (lambda r: list(controlplane.WatchMigration(r)),
         pb.WatchMigrationRequest(migration_id="nope")),
    ]:
        with pytest.raises(grpc.RpcError) as e:
            call(request)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert "nope does not exist" in (e.value.details() or "")


def test_watch_streams_a_migration_from_start_to_success(
    controlplane: pb_grpc.ControlPlaneStub, tmp_path: Path
):
    disk = make_raw_with_mbr(tmp_path / "web.raw", size_mib=32)
    before = sha256_of(disk)
    target = tmp_path / "out"
    target.mkdir()
    plan = controlplane.CreatePlan(pb.CreatePlanRequest(plan=_plan([disk], target)))
    assert list(plan.conditions) == []

    started = controlplane.StartMigration(pb.StartMigrationRequest(plan_id=plan.id))
    seen = list(controlplane.WatchMigration(
        pb.WatchMigrationRequest(migration_id=started.id), timeout=300
    ))

    assert started.state == M.MIGRATION_STATE_PENDING
    assert [p.name for p in started.vms[0].phases] == ["CopyDisks", "CreateVM", "Completed"]
    last = seen[-1]
    assert last.state == M.MIGRATION_STATE_SUCCEEDED, last.error
    assert all(m.state != M.MIGRATION_STATE_SUCCEEDED for m in seen[:-1])
    assert "CopyDisks" in {m.vms[0].phase for m in seen}
    assert last.vms[0].disks[0].progress.size_bytes == 32 << 20
    assert controlplane.GetMigration(pb.GetMigrationRequest(migration_id=started.id)) == last
    # Cancelling a finished migration changes nothing.
    assert controlplane.CancelMigration(
        pb.CancelMigrationRequest(migration_id=started.id)
    ) == last
    assert sha256_of(target / "web" / "disk0.raw") == before == sha256_of(disk)


def test_a_restarted_control_plane_fails_the_migration_it_was_running(
    tmp_path: Path, state_dir: Path
):
    store = Store(str(state_dir))
    store.put_plan(pb.Plan(id="p1", name="web"))
    mig = pb.Migration(id="m1", plan_id="p1", state=M.MIGRATION_STATE_RUNNING)
    vm = mig.vms.add(name="web", state=M.MIGRATION_STATE_RUNNING, phase="ConvertGuest")
    vm.phases.add(name="ConvertGuest", state=M.MIGRATION_STATE_RUNNING)
    store.put_migration(mig)
    store.close()

    workdir = tempfile.mkdtemp(prefix="ferry-cp-")
    address = f"unix:{workdir}/cp.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ferry.cli", "serve", "controlplane", "--listen", address,
         "--state-dir", str(state_dir), "--transferd", "unix:/nonexistent",
         "--converter", "unix:/nonexistent"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        with grpc.insecure_channel(address) as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
            got = pb_grpc.ControlPlaneStub(channel).GetMigration(
                pb.GetMigrationRequest(migration_id="m1")
            )
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
        shutil.rmtree(workdir, ignore_errors=True)
    assert got.state == M.MIGRATION_STATE_FAILED
    assert got.vms[0].error == (
        "control plane restarted during phase ConvertGuest; start the migration again"
    )
    assert proc.returncode == 0, stderr.decode()
    assert b"control plane restarted during phase ConvertGuest" in stderr




def test_stopping_the_control_plane_mid_copy_fails_the_migration_and_cleans_up(
    big_disk: Path, tmp_path: Path, state_dir: Path, transferd_addr: str
):
    target = tmp_path / "out"
    target.mkdir()
    workdir = tempfile.mkdtemp(prefix="ferry-cp-")
    address = f"unix:{workdir}/cp.sock"
    try:
        with serving(lambda: start(address, str(state_dir), transferd_addr,
                                   "unix:/nonexistent")) as served:
            with grpc.insecure_channel(address) as channel:
                stub = pb_grpc.ControlPlaneStub(channel)
                plan = stub.CreatePlan(
                    pb.CreatePlanRequest(plan=_plan([big_disk], target, "big"))
                )
                started = stub.StartMigration(pb.StartMigrationRequest(plan_id=plan.id))
                for m in stub.WatchMigration(
                    pb.WatchMigrationRequest(migration_id=started.id)
                ):
                    if m.vms[0].disks[0].transfer_id:
                        break
            served.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    got = Store(str(state_dir)).get_migration(started.id)
    assert got.state == M.MIGRATION_STATE_FAILED
    assert got.vms[0].error == (
        "control plane stopped during phase CopyDisks; start the migration again; "
        f"removed {target / 'big'}, which this migration had created"
    )
    assert list(target.iterdir()) == []
    assert qemu_nbd_serving(big_disk) == []


@pytest.mark.parametrize("field, value", [
    ("vms[0].disks", "/tmp/a\0b.raw"),
    ("vms[0].disks", "/" + "d" * 100000),
    ("local.directory", "/srv\0x"),
    ("vms[0].name", "w" * 100000),
])
def test_nul_bytes_and_absurdly_long_strings_are_invalid_argument(
    controlplane: pb_grpc.ControlPlaneStub, tmp_path: Path, field: str, value: str
):
    plan = _plan([tmp_path / "web.raw"], tmp_path)
    if field == "vms[0].disks":
        plan.vms[0].disks[0] = value
    elif field == "local.directory":
        plan.local.directory = value
    else:
        plan.vms[0].name = value
    with pytest.raises(grpc.RpcError) as e:
        controlplane.CreatePlan(pb.CreatePlanRequest(plan=plan))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = e.value.details() or ""
    name = field.replace("[0]", "")
    assert details.startswith(f"plan.{name} ")
    assert "NUL byte" in details or "characters long (at most 4096)" in details
    assert len(details) < 400
    with pytest.raises(grpc.RpcError) as e:
        controlplane.GetPlan(pb.GetPlanRequest(plan_id="x\0y"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_absurd_memory_in_the_vmx_is_a_blocking_condition_not_an_internal_error(
    controlplane: pb_grpc.ControlPlaneStub, tmp_path: Path
):
    disk = make_raw_with_mbr(tmp_path / "web.raw", data=False)
    (tmp_path / "web.vmx").write_text('memsize = "99999999999"\nscsi0:0.fileName = "web.raw"\n')
    plan = controlplane.CreatePlan(pb.CreatePlanRequest(plan=_plan([disk], tmp_path)))
    assert [(c.category, c.type, c.message) for c in plan.conditions] == [(
        "Blocking", "InvalidHardware",
        "VM web: web.vmx memsize: 99999999999 MiB of memory is outside 64 MiB..4 TiB; "
        f"fix memsize in {tmp_path / 'web.vmx'}",
    )]


def test_ctrl_c_during_create_and_start_cancels_the_migration_it_started(
    controlplane_address: str, big_disk: Path, tmp_path: Path
):
    target = tmp_path / "out"
    target.mkdir()
    out = io.StringIO()

    async def interrupted() -> None:
        task = asyncio.create_task(
            drive_migration(controlplane_address, _plan([big_disk], target, "big"), out)
        )
        await asyncio.sleep(0)  # CreatePlan is on its way
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(interrupted())
    assert "migration cancelled: VM big: cancelled by the operator" in out.getvalue()
    channel = grpc.insecure_channel(controlplane_address)
    stub = pb_grpc.ControlPlaneStub(channel)
    [plan] = stub.ListPlans(pb.ListPlansRequest()).plans
    assert plan.name == "big"
    channel.close()
    assert list(target.iterdir()) == []
    assert qemu_nbd_serving(big_disk) == []
