"""The itinerary of one VM as data: every phase of design.md in order, each
with the condition under which it applies. The migration runner walks the
phases that apply; adding a source or target means new conditions here, not
new branches in the runner."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ferry.v1 import controlplane_pb2


@dataclass(frozen=True)
class Situation:
    """What decides which phases a VM goes through."""

    source: str          # disk_images, vsphere, ...
    target: str          # local, kubevirt
    convert: bool        # convert the guest
    power_on: bool       # target power state on
    has_hooks: bool = False


@dataclass(frozen=True)
class Phase:
    name: str
    applies: Callable[[Situation], bool]


def _source_has_power_state(s: Situation) -> bool:
    return s.source not in ("disk_images",)


def _target_needs_disks_created(s: Situation) -> bool:
    return s.target not in ("local",)


def _target_can_power_on(s: Situation) -> bool:
    return s.power_on and s.target not in ("local",)


ITINERARY: list[Phase] = [
    Phase("PreHook", lambda s: s.has_hooks),
    Phase("StorePowerState", _source_has_power_state),
    Phase("PowerOffSource", _source_has_power_state),
    Phase("CreateTargetDisks", _target_needs_disks_created),
    Phase("CopyDisks", lambda s: True),
    Phase("ConvertGuest", lambda s: s.convert),
    Phase("CreateVM", lambda s: True),
    Phase("PowerOn", _target_can_power_on),
    Phase("PostHook", lambda s: s.has_hooks),
    Phase("Completed", lambda s: True),
]


def situation_of(plan: controlplane_pb2.Plan) -> Situation:
    return Situation(
        source=plan.WhichOneof("source") or "",
        target=plan.WhichOneof("target") or "",
        convert=not plan.skip_conversion,
        power_on=False,
    )


def itinerary(situation: Situation) -> list[str]:
    """Names of the phases that apply, in order."""
    return [p.name for p in ITINERARY if p.applies(situation)]
