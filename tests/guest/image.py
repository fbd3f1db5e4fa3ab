"""The cached Debian 12 test guest (an ESXi-era VM disk plus its .vmx).

Built once by ``build-debian-guest.sh`` and kept under
``${FERRY_CACHE_DIR:-~/.cache/ferry}/guests/debian12-<hash of the script>``, so a
change to the script gives a new image and an unchanged script reuses the old one.
Concurrent callers serialise on a lock file: the second one waits and reuses.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BUILD_SCRIPT = Path(__file__).with_name("build-debian-guest.sh")
# Everything the build reads from the repo; the cache key covers all of it.
BUILD_INPUTS = (BUILD_SCRIPT,)
BUILD_MINUTES = 10
RECORD = "build.json"


@dataclass(frozen=True)
class GuestImage:
    """The built guest: its disk and descriptor, and the facts tests compare against."""

    vmdk: Path
    vmx: Path
    name: str
    nic_name: str
    mac: str
    address: str
    gateway: str
    dns: str
    root_device: str
    build_seconds: float | None


def cache_root() -> Path:
    """Where Ferry keeps expensive test fixtures."""
    configured = os.environ.get("FERRY_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "ferry"


def build_key(inputs: tuple[Path, ...] | None = None) -> str:
    """First 16 hex digits of the sha256 over the build inputs."""
    digest = hashlib.sha256()
    for path in BUILD_INPUTS if inputs is None else inputs:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def load_image(directory: Path) -> GuestImage:
    """Read a finished image directory (guest.json and the build record)."""
    facts = json.loads((directory / "guest.json").read_text())
    record_path = directory / RECORD
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    return GuestImage(
        vmdk=directory / "debian12.vmdk",
        vmx=directory / "debian12.vmx",
        name=facts["name"],
        nic_name=facts["nic_name"],
        mac=facts["mac"],
        address=facts["address"],
        gateway=facts["gateway"],
        dns=facts["dns"],
        root_device=facts["root_device"],
        build_seconds=record.get("build_seconds"),
    )


def ensure_guest_image() -> GuestImage:
    """Return the cached test guest, building it first if this script version has none."""
    guests = cache_root() / "guests"
    guests.mkdir(parents=True, exist_ok=True)
    final = guests / f"debian12-{build_key()}"
    with open(guests / f"{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (final / "guest.json").exists():
            _build(final)
        return load_image(final)


def _build(final: Path) -> None:
    """Run the build script into a temporary sibling and rename it into place."""
    print(
        f"building the test guest (about {BUILD_MINUTES} minutes) into {final}...",
        file=sys.stderr,
        flush=True,
    )
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    work.chmod(0o755)  # readable like the rest of the cache, not mkdtemp's 0700
    log_path = final.parent / f"{final.name}.build.log"
    started = time.monotonic()
    try:
        returncode = _run_build(work, log_path)
        if returncode != 0:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
            raise RuntimeError(
                f"building the test guest failed (exit {returncode}); "
                f"full log in {log_path}:\n{tail}"
            )
        seconds = time.monotonic() - started
        (work / RECORD).write_text(json.dumps({"build_seconds": round(seconds, 1)}) + "\n")
        os.rename(work, final)
        log_path.rename(final / "build.log")
    finally:
        _remove_unless_mounted(work)
    print(f"built the test guest in {seconds:.0f} s", file=sys.stderr, flush=True)


def _run_build(work: Path, log_path: Path) -> int:
    """Run the script in its own process group; if we are interrupted (Ctrl-C, a
    pytest timeout), SIGTERM the whole group so the script's trap unmounts the
    chroot's /proc, /sys and /dev before anything is removed."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [str(BUILD_SCRIPT), str(work)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            return proc.wait()
        except BaseException:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            raise


def _remove_unless_mounted(work: Path) -> None:
    """Remove a build's temporary tree, but never through a mount left inside it
    (a bind-mounted /dev would take the host's device nodes with it)."""
    if not work.exists():
        return
    prefix = f"{work}/"
    with open("/proc/mounts") as mounts:
        if any(line.split()[1].startswith(prefix) for line in mounts):
            print(f"leaving {work} in place: something is still mounted in it", file=sys.stderr)
            return
    shutil.rmtree(work, ignore_errors=True)
