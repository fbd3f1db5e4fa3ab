"""The transfer benchmark at small sizes, to keep it working:
`.venv/bin/python -m pytest -m bench bench/` (never part of `make test`)."""

from __future__ import annotations

import pytest

from bench.transfer import main

pytestmark = pytest.mark.bench


def test_benchmark_runs_every_workload_and_reports_ratios():
    report = main(["--dense-size", "64M", "--sparse-size", "1G", "--parallel-size", "32M",
                   "--repeat", "1"])
    for workload in ("dense", "sparse", "vddk", "parallel"):
        assert f"| {workload} | transferd" in report
    assert "transferd/nbdcopy" in report
