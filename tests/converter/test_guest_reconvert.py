"""Converting an already converted copy again changes nothing (and so does
not rebuild the initramfs)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.converter.conftest import Converted, convert_disk

pytestmark = pytest.mark.guest


def test_second_conversion_changes_nothing(converted_guest: Converted, tmp_path: Path):
    again = tmp_path / "again.raw"
    subprocess.run(["cp", "--sparse=always", str(converted_guest.disk), str(again)], check=True)
    events, _ = convert_disk(again, "debian12-web01", tmp_path)
    report = events[-1].report
    assert report.converted
    assert [(c.kind, c.path, c.detail) for c in report.changes] == []
    assert not [t for t in report.timings if t.step.startswith("update-initramfs")]
