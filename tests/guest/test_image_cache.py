"""The guest image cache builds once, shares the result, and leaves no debris.

The real build takes minutes, so these tests run the cache logic around a small
stand-in build script (a real process writing real files); the guest-marked
tests exercise the real script.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tests.guest import image
from tests.guest.image import GuestImage, ensure_guest_image

STAND_IN = """#!/bin/bash
set -e
echo built >>"{count}"
sleep 1
mkdir -p "$1"
touch "$1/debian12.vmdk" "$1/debian12.vmx"
cat >"$1/guest.json" <<EOF
{{"name": "debian12-web01", "nic_name": "ens192", "mac": "00:50:56:9a:1c:2e",
 "address": "192.0.2.10/24", "gateway": "192.0.2.2", "dns": "192.0.2.3",
 "root_device": "/dev/sda1"}}
EOF
"""


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FERRY_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def use_script(monkeypatch: pytest.MonkeyPatch, script: Path, text: str) -> None:
    script.write_text(text)
    script.chmod(0o755)
    monkeypatch.setattr(image, "BUILD_SCRIPT", script)
    monkeypatch.setattr(image, "BUILD_INPUTS", (script,))


def test_concurrent_callers_build_once_and_share(cache, tmp_path, monkeypatch):
    count = tmp_path / "builds"
    use_script(monkeypatch, tmp_path / "build.sh", STAND_IN.format(count=count))
    results: list[GuestImage] = []
    callers = [
        threading.Thread(target=lambda: results.append(ensure_guest_image())) for _ in range(2)
    ]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()

    assert count.read_text() == "built\n"
    assert len(results) == 2 and results[0] == results[1]
    built = results[0]
    assert built.vmdk.parent.name == f"debian12-{image.build_key()}"
    assert built.nic_name == "ens192" and built.root_device == "/dev/sda1"
    assert built.build_seconds is not None
    leftovers = {p.name for p in (cache / "guests").iterdir()}
    assert leftovers == {built.vmdk.parent.name, f"{built.vmdk.parent.name}.lock"}


def test_changed_build_script_gives_a_new_image(cache, tmp_path, monkeypatch):
    count = tmp_path / "builds"
    script = tmp_path / "build.sh"
    use_script(monkeypatch, script, STAND_IN.format(count=count))
    first = ensure_guest_image()
    assert ensure_guest_image() == first
    use_script(monkeypatch, script, STAND_IN.format(count=count) + "# changed\n")
    second = ensure_guest_image()
    assert second.vmdk.parent != first.vmdk.parent
    assert count.read_text() == "built\nbuilt\n"


def test_failed_build_names_its_log_and_leaves_no_image(cache, tmp_path, monkeypatch):
    script = tmp_path / "build.sh"
    use_script(monkeypatch, script, "#!/bin/bash\necho 'debootstrap: mirror unreachable' >&2\n"
               "exit 3\n")  # fmt: skip
    with pytest.raises(RuntimeError) as failure:
        ensure_guest_image()
    message = str(failure.value)
    assert "building the test guest failed (exit 3)" in message
    assert "debootstrap: mirror unreachable" in message
    key = image.build_key()
    assert {p.name for p in (cache / "guests").iterdir()} == {
        f"debian12-{key}.lock",
        f"debian12-{key}.build.log",
    }
