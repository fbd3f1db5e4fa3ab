"""The `ferry` command as an operator runs it: bad settings, state
directories and addresses are one clear line and exit 2, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

FERRY = str(Path(sys.executable).parent / "ferry")


def ferry(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FERRY, *args], capture_output=True, text=True, timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_a_bogus_log_level_in_the_environment_is_refused():
    result = ferry("migrate", "--source", "disk:x", "--target", "local:y",
                   env={"FERRY_LOG_LEVEL": "bogus"})
    assert result.returncode == 2
    assert result.stderr.endswith(
        "ferry: error: FERRY_LOG_LEVEL='bogus' is not a log level; "
        "use one of debug, info, warning, error\n"
    )
    assert "Traceback" not in result.stderr


def test_a_state_dir_that_is_a_file_is_refused(tmp_path: Path):
    state = tmp_path / "state"
    state.write_text("not a directory")
    result = ferry("serve", "controlplane", "--listen", f"unix:{tmp_path}/cp.sock",
                   "--state-dir", str(state))
    assert result.returncode == 2
    assert result.stderr == (
        f"ferry: error: the state directory {state} is not a directory; pass a directory "
        "as --state-dir\n"
    )


def test_a_garbage_store_is_refused_and_left_alone(tmp_path: Path):
    (tmp_path / "ferry.db").write_bytes(b"garbage" * 1000)
    result = ferry("serve", "controlplane", "--listen", f"unix:{tmp_path}/cp.sock",
                   "--state-dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr == (
        f"ferry: error: the store {tmp_path / 'ferry.db'} cannot be used (file is not a "
        "database); move the file away or pass another --state-dir\n"
    )
    assert (tmp_path / "ferry.db").read_bytes() == b"garbage" * 1000


@pytest.mark.parametrize("listen", ["127.0.0.1:99999", "localhost", "unix:"])
def test_a_bad_listen_address_is_refused(tmp_path: Path, listen: str):
    result = ferry("serve", "controlplane", "--listen", listen, "--state-dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.startswith(f"ferry: error: --listen {listen!r} ")
    assert "Traceback" not in result.stderr


def test_migrate_with_a_garbage_controlplane_address_exits_2(tmp_path: Path):
    result = ferry("migrate", "--source", f"disk:{tmp_path}/x.raw", "--target",
                   f"local:{tmp_path}", "--controlplane", "garbage")
    assert result.returncode == 2
    assert result.stderr.startswith("ferry: error: --controlplane 'garbage' is not an address")


def test_a_read_only_state_dir_is_refused(tmp_path: Path):
    if os.geteuid() != 0:
        pytest.skip("mounting a read-only tmpfs needs root")
    state = tmp_path / "ro"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1M", "tmpfs", str(state)], check=True)
    try:
        result = ferry("serve", "controlplane", "--listen", f"unix:{tmp_path}/cp.sock",
                       "--state-dir", str(state))
    finally:
        subprocess.run(["umount", "-l", str(state)], check=True)
    assert result.returncode == 2
    assert result.stderr == (
        f"ferry: error: the state directory {state} is not writable; fix its permissions or "
        "pass another --state-dir\n"
    )
