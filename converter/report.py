"""The conversion report: what the converter found in the guest and every
change it made, as the `ConversionReport` message the control plane stores.

Steps add to a `ReportBuilder` as they go, so a failed conversion can still
say what it had changed before it stopped."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from google.protobuf import json_format

from ferry.v1 import converter_pb2


@dataclass
class ReportBuilder:
    """Collects findings, changes, warnings and step timings."""

    report: converter_pb2.ConversionReport = field(
        default_factory=converter_pb2.ConversionReport
    )
    started: float = field(default_factory=time.monotonic)

    def change(self, kind: str, path: str, detail: str) -> None:
        self.report.changes.add(kind=kind, path=path, detail=detail)

    def warn(self, message: str) -> None:
        self.report.warnings.append(message)

    def timing(self, step: str, seconds: float) -> None:
        self.report.timings.add(step=step, seconds=round(seconds, 3))

    @property
    def changed(self) -> bool:
        return len(self.report.changes) > 0

    def changes_of(self, kind: str) -> list[converter_pb2.Change]:
        return [c for c in self.report.changes if c.kind == kind]

    def finish(self, converted: bool) -> converter_pb2.ConversionReport:
        self.report.converted = converted
        self.report.duration_seconds = round(time.monotonic() - self.started, 3)
        return self.report


def to_json(report: converter_pb2.ConversionReport) -> str:
    """JSON with the proto field names, as the control plane stores it."""
    return json_format.MessageToJson(report, preserving_proto_field_name=True, indent=2)


def from_json(text: str) -> converter_pb2.ConversionReport:
    return json_format.Parse(text, converter_pb2.ConversionReport())
