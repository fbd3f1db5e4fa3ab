"""SQLite store for plans and migrations: one file in the state directory,
WAL, a schema_version table and migrations by version. Messages are kept as
protobuf JSON with the fields we query on in their own indexed columns."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from google.protobuf import json_format

from ferry import errors
from ferry.v1 import controlplane_pb2

DB_FILE = "ferry.db"
M = controlplane_pb2.MigrationState

# Schema migrations by version; each entry brings the schema from version
# (index) to version (index + 1). Never edit an entry, append a new one.
SCHEMA: list[list[str]] = [
    [
        """CREATE TABLE plans (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            created_at REAL NOT NULL,
            body TEXT NOT NULL)""",
        "CREATE INDEX plans_name ON plans(name)",
        """CREATE TABLE migrations (
            id TEXT PRIMARY KEY,
            plan_id TEXT NOT NULL REFERENCES plans(id),
            state INTEGER NOT NULL,
            phase TEXT NOT NULL DEFAULT '',
            updated_at REAL NOT NULL,
            body TEXT NOT NULL)""",
        "CREATE INDEX migrations_plan ON migrations(plan_id)",
        "CREATE INDEX migrations_state ON migrations(state)",
    ],
]
SCHEMA_VERSION = len(SCHEMA)
ACTIVE = (M.MIGRATION_STATE_PENDING, M.MIGRATION_STATE_RUNNING)


def _to_json(msg: controlplane_pb2.Plan | controlplane_pb2.Migration) -> str:
    return json_format.MessageToJson(msg, preserving_proto_field_name=True, indent=None)


class Store:
    def __init__(self, state_dir: str) -> None:
        if Path(state_dir).exists() and not Path(state_dir).is_dir():
            raise errors.InvalidInput(
                f"the state directory {state_dir} is not a directory; pass a directory "
                "as --state-dir"
            )
        try:
            Path(state_dir).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise errors.InvalidInput(
                f"cannot create the state directory {state_dir}: {e.strerror}; "
                "pass a writable --state-dir"
            ) from e
        if not os.access(state_dir, os.W_OK | os.X_OK):
            raise errors.InvalidInput(
                f"the state directory {state_dir} is not writable; fix its permissions or "
                "pass another --state-dir"
            )
        self.path = str(Path(state_dir) / DB_FILE)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate_schema()
        except sqlite3.Error as e:
            self._db.close()
            raise errors.InvalidInput(
                f"the store {self.path} cannot be used ({e}); move the file away or pass "
                "another --state-dir"
            ) from e

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def schema_version(self) -> int:
        row = self._db.execute("SELECT version FROM schema_version").fetchone()
        return int(row[0]) if row else 0

    def _migrate_schema(self) -> None:
        with self._tx() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                db.execute("INSERT INTO schema_version (version) VALUES (0)")
                version = 0
            else:
                version = int(row[0])
            if version > SCHEMA_VERSION:
                raise errors.FailedPrecondition(
                    f"the store {self.path} has schema version {version}, newer than this "
                    f"Ferry ({SCHEMA_VERSION}); run a newer Ferry or another --state-dir"
                )
            for v in range(version, SCHEMA_VERSION):
                for statement in SCHEMA[v]:
                    db.execute(statement)
            db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))

    # Plans

    def put_plan(self, plan: controlplane_pb2.Plan) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO plans (id, name, created_at, body) VALUES (?, ?, ?, ?)",
                (plan.id, plan.name, plan.created_at.ToNanoseconds() / 1e9, _to_json(plan)),
            )

    def get_plan(self, plan_id: str) -> controlplane_pb2.Plan:
        row = self._db.execute("SELECT body FROM plans WHERE id = ?", (plan_id,)).fetchone()
        if row is None:
            raise errors.NotFound(f"plan {plan_id} does not exist; list plans with ListPlans")
        return json_format.Parse(row[0], controlplane_pb2.Plan())

    def list_plans(self) -> list[controlplane_pb2.Plan]:
        rows = self._db.execute("SELECT body FROM plans ORDER BY created_at, id").fetchall()
        return [json_format.Parse(r[0], controlplane_pb2.Plan()) for r in rows]

    # Migrations

    def put_migration(self, migration: controlplane_pb2.Migration) -> None:
        """Inserts or replaces; called before and after every phase."""
        phase = ",".join(vm.phase for vm in migration.vms if vm.phase)
        with self._tx() as db:
            db.execute(
                """INSERT INTO migrations (id, plan_id, state, phase, updated_at, body)
                   VALUES (?, ?, ?, ?, ?, ?)
                   ON CONFLICT(id) DO UPDATE SET state = excluded.state,
                     phase = excluded.phase, updated_at = excluded.updated_at,
                     body = excluded.body""",
                (migration.id, migration.plan_id, int(migration.state), phase, time.time(),
                 _to_json(migration)),
            )

    def get_migration(self, migration_id: str) -> controlplane_pb2.Migration:
        row = self._db.execute(
            "SELECT body FROM migrations WHERE id = ?", (migration_id,)
        ).fetchone()
        if row is None:
            raise errors.NotFound(f"migration {migration_id} does not exist; check the id")
        return json_format.Parse(row[0], controlplane_pb2.Migration())

    def migrations_in_state(self, *states: int) -> list[controlplane_pb2.Migration]:
        marks = ",".join("?" for _ in states)
        rows = self._db.execute(
            f"SELECT body FROM migrations WHERE state IN ({marks}) ORDER BY updated_at", states
        ).fetchall()
        return [json_format.Parse(r[0], controlplane_pb2.Migration()) for r in rows]

    def fail_interrupted(self) -> list[controlplane_pb2.Migration]:
        """At start-up: a migration still PENDING or RUNNING was cut off by a
        restart. Mark it and its running VMs and phases FAILED with the phase
        it stopped in, so nobody waits on it forever."""
        failed = []
        for mig in self.migrations_in_state(*ACTIVE):
            reasons = []
            for vm in mig.vms:
                if vm.state not in ACTIVE:
                    continue
                phase = vm.phase or "(before the first phase)"
                vm.error = (
                    f"control plane restarted during phase {phase}; start the migration again"
                )
                vm.state = M.MIGRATION_STATE_FAILED
                for ph in vm.phases:
                    if ph.state == M.MIGRATION_STATE_RUNNING:
                        ph.state = M.MIGRATION_STATE_FAILED
                        ph.message = vm.error
                        ph.finished_at.GetCurrentTime()
                reasons.append(f"VM {vm.name}: {vm.error}")
            mig.state = M.MIGRATION_STATE_FAILED
            mig.error = "; ".join(reasons) or (
                "control plane restarted before the migration began; start the migration again"
            )
            mig.finished_at.GetCurrentTime()
            self.put_migration(mig)
            failed.append(mig)
        return failed
