"""The ControlPlane gRPC servicer: plans (validated on creation and again at
start), migrations run as asyncio tasks, and a watch stream fed by every
change the runner persists."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc

from controlplane import plans
from controlplane.migration import TERMINAL, MigrationRunner, Services, new_migration
from controlplane.store import Store
from ferry import errors
from ferry.rpc import check_strings
from ferry.v1 import controlplane_pb2, controlplane_pb2_grpc

log = logging.getLogger(__name__)
M = controlplane_pb2.MigrationState
SERVICE_NAME = "ferry.v1.ControlPlane"
Context = grpc.aio.ServicerContext[Any, Any]


class ControlPlaneService(controlplane_pb2_grpc.ControlPlaneServicer):  # type: ignore[misc]
    def __init__(self, store: Store, services: Services, state_dir: str) -> None:
        self.store = store
        self.services = services
        self.state_dir = state_dir
        self._runners: dict[str, tuple[MigrationRunner, asyncio.Task[controlplane_pb2.Migration]]]
        self._runners = {}
        self._changed: dict[str, asyncio.Event] = {}

    # Plans

    async def CreatePlan(
        self, request: controlplane_pb2.CreatePlanRequest, context: Context
    ) -> controlplane_pb2.Plan:
        check_strings(request)
        plan = controlplane_pb2.Plan()
        plan.CopyFrom(request.plan)
        plan.id = uuid.uuid4().hex
        plan.name = plan.name or f"plan-{plan.id[:8]}"
        plan.created_at.GetCurrentTime()
        prepared = await asyncio.to_thread(plans.prepare_plan, plan)
        self.store.put_plan(prepared)
        log.info("plan created with %d VM(s)", len(prepared.vms), extra={"plan": prepared.id})
        return prepared

    async def GetPlan(
        self, request: controlplane_pb2.GetPlanRequest, context: Context
    ) -> controlplane_pb2.Plan:
        check_strings(request)
        return self.store.get_plan(request.plan_id)

    async def ListPlans(
        self, request: controlplane_pb2.ListPlansRequest, context: Context
    ) -> controlplane_pb2.ListPlansResponse:
        return controlplane_pb2.ListPlansResponse(plans=self.store.list_plans())

    # Migrations

    async def StartMigration(
        self, request: controlplane_pb2.StartMigrationRequest, context: Context
    ) -> controlplane_pb2.Migration:
        check_strings(request)
        plan = self.store.get_plan(request.plan_id)
        # Files change between plan and start: validate again.
        fresh = await asyncio.to_thread(plans.prepare_plan, plan)
        blockers = plans.blocking(fresh)
        if blockers:
            raise errors.FailedPrecondition(
                f"plan {plan.name} cannot start: "
                + "; ".join(c.message for c in blockers)
            )
        for runner, _ in self._runners.values():
            if runner.plan.id == plan.id:
                raise errors.FailedPrecondition(
                    f"plan {plan.name} is already being migrated by {runner.migration.id}; "
                    "wait for it or cancel it"
                )
        migration = new_migration(plan)
        runner = MigrationRunner(
            plan, migration, self.store, self.services, self.state_dir, self._notify
        )
        self.store.put_migration(migration)
        task = asyncio.create_task(self._run(runner))
        self._runners[migration.id] = (runner, task)
        log.info("migration %s started", migration.id, extra={"plan": plan.id})
        return _copy(migration)

    async def _run(self, runner: MigrationRunner) -> controlplane_pb2.Migration:
        try:
            return await runner.run()
        finally:
            self._runners.pop(runner.migration.id, None)
            self._notify(runner.migration)

    def _notify(self, migration: controlplane_pb2.Migration) -> None:
        event = self._changed.pop(migration.id, None)
        if event:
            event.set()

    def _current(self, migration_id: str) -> controlplane_pb2.Migration:
        entry = self._runners.get(migration_id)
        return _copy(entry[0].migration) if entry else self.store.get_migration(migration_id)

    async def GetMigration(
        self, request: controlplane_pb2.GetMigrationRequest, context: Context
    ) -> controlplane_pb2.Migration:
        check_strings(request)
        return self._current(request.migration_id)

    async def WatchMigration(
        self, request: controlplane_pb2.WatchMigrationRequest, context: Context
    ) -> AsyncIterator[controlplane_pb2.Migration]:
        check_strings(request)
        migration_id = request.migration_id
        while True:
            # Take the event before reading, so no change slips in between.
            event = self._changed.setdefault(migration_id, asyncio.Event())
            running = migration_id in self._runners
            migration = self._current(migration_id)
            yield migration
            if migration.state in TERMINAL or not running:
                return
            await event.wait()

    async def CancelMigration(
        self, request: controlplane_pb2.CancelMigrationRequest, context: Context
    ) -> controlplane_pb2.Migration:
        check_strings(request)
        entry = self._runners.get(request.migration_id)
        if entry is None:
            # Unknown ids raise NotFound; finished ones are returned as they are.
            return self.store.get_migration(request.migration_id)
        _, task = entry
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(task)
        return self.store.get_migration(request.migration_id)

    async def shutdown(self) -> None:
        """Stops every running migration (transfers cancelled, qemu-nbd
        stopped, target cleaned) and records why, before the server exits."""
        tasks = []
        for runner, task in list(self._runners.values()):
            runner.cancel_state = M.MIGRATION_STATE_FAILED
            runner.cancel_reason = (
                "control plane stopped during phase {phase}; start the migration again"
            )
            task.cancel()
            tasks.append(task)
        await asyncio.gather(*tasks, return_exceptions=True)


def _copy(migration: controlplane_pb2.Migration) -> controlplane_pb2.Migration:
    out = controlplane_pb2.Migration()
    out.CopyFrom(migration)
    return out
