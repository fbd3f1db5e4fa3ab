from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from controlplane import store as store_module
from controlplane.store import Store
from ferry import errors
from ferry.v1 import controlplane_pb2

M = controlplane_pb2.MigrationState


def _plan() -> controlplane_pb2.Plan:
    plan = controlplane_pb2.Plan(
        id="p1", name="web", disk_images=controlplane_pb2.DiskImageSource(),
        local=controlplane_pb2.LocalTarget(directory="/srv/vms"),
    )
    plan.created_at.GetCurrentTime()
    vm = plan.vms.add(name="web", disks=["/vms/web.vmdk"], memory_mib=1024)
    vm.nics.add(mac="00:50:56:00:00:01", addresses=["10.0.0.5/24"])
    plan.conditions.add(vm="web", category="Warning", type="NoNicMac", message="m")
    return plan


def test_plans_and_migrations_round_trip(tmp_path: Path):
    s = Store(str(tmp_path))
    s.put_plan(_plan())
    mig = controlplane_pb2.Migration(id="m1", plan_id="p1", state=M.MIGRATION_STATE_RUNNING)
    vm = mig.vms.add(name="web", state=M.MIGRATION_STATE_RUNNING, phase="CopyDisks")
    vm.disks.add(name="disk0").progress.bytes_read = 12345
    s.put_migration(mig)
    mig.state = M.MIGRATION_STATE_SUCCEEDED
    s.put_migration(mig)
    s.close()

    again = Store(str(tmp_path))
    assert again.get_plan("p1") == _plan_with_same_time(again.get_plan("p1"))
    assert [p.id for p in again.list_plans()] == ["p1"]
    assert again.get_migration("m1") == mig
    assert again.migrations_in_state(M.MIGRATION_STATE_SUCCEEDED) == [mig]


def _plan_with_same_time(stored: controlplane_pb2.Plan) -> controlplane_pb2.Plan:
    expected = _plan()
    expected.created_at.CopyFrom(stored.created_at)
    return expected


def test_store_is_one_wal_file_with_the_schema_version(tmp_path: Path):
    s = Store(str(tmp_path))
    assert s.schema_version() == store_module.SCHEMA_VERSION == 1
    s.close()
    db = sqlite3.connect(tmp_path / "ferry.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
    db.close()
    assert Store(str(tmp_path)).schema_version() == 1  # reopening migrates nothing twice


def test_a_newer_schema_is_refused(tmp_path: Path):
    Store(str(tmp_path)).close()
    db = sqlite3.connect(tmp_path / "ferry.db")
    db.execute("UPDATE schema_version SET version = 99")
    db.commit()
    db.close()
    with pytest.raises(errors.FailedPrecondition, match="schema version 99, newer"):
        Store(str(tmp_path))


def test_unknown_ids_are_not_found(tmp_path: Path):
    s = Store(str(tmp_path))
    with pytest.raises(errors.NotFound, match="plan nope does not exist"):
        s.get_plan("nope")
    with pytest.raises(errors.NotFound, match="migration nope does not exist"):
        s.get_migration("nope")


def test_a_migration_running_at_start_up_becomes_failed_with_its_phase(tmp_path: Path):
    s = Store(str(tmp_path))
    s.put_plan(_plan())
    mig = controlplane_pb2.Migration(id="m1", plan_id="p1", state=M.MIGRATION_STATE_RUNNING)
    vm = mig.vms.add(name="web", state=M.MIGRATION_STATE_RUNNING, phase="CopyDisks")
    vm.phases.add(name="CopyDisks", state=M.MIGRATION_STATE_RUNNING)
    vm.phases.add(name="CreateVM", state=M.MIGRATION_STATE_PENDING)
    done = mig.vms.add(name="db", state=M.MIGRATION_STATE_SUCCEEDED, phase="Completed")
    s.put_migration(mig)
    finished = controlplane_pb2.Migration(id="m2", plan_id="p1",
                                          state=M.MIGRATION_STATE_SUCCEEDED)
    s.put_migration(finished)
    s.close()

    again = Store(str(tmp_path))
    assert [m.id for m in again.fail_interrupted()] == ["m1"]
    got = again.get_migration("m1")
    message = "control plane restarted during phase CopyDisks; start the migration again"
    assert got.state == M.MIGRATION_STATE_FAILED
    assert got.error == f"VM web: {message}"
    assert got.vms[0].state == M.MIGRATION_STATE_FAILED and got.vms[0].error == message
    assert got.vms[0].phases[0].state == M.MIGRATION_STATE_FAILED
    assert got.vms[0].phases[1].state == M.MIGRATION_STATE_PENDING
    assert got.vms[1] == done
    assert again.get_migration("m2") == finished
    assert again.fail_interrupted() == []
