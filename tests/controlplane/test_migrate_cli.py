"""`ferry migrate` as an operator runs it: bad input is one clear line and
exit 2 with nothing created; a good run starts the services, copies, writes
the VM files, says where they are and leaves no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.controlplane.conftest import make_raw_with_mbr, qemu_nbd_serving, sha256_of

FERRY = str(Path(sys.executable).parent / "ferry")


def ferry(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FERRY, "migrate", *args], capture_output=True, text=True, timeout=600,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def target(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    return out


def _refused(result: subprocess.CompletedProcess[str], message: str, target: Path) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"ferry: error: {message}\n"
    assert "Traceback" not in result.stdout + result.stderr
    assert not target.exists() or list(target.iterdir()) == []


def test_a_missing_disk_file(tmp_path: Path, target: Path):
    missing = tmp_path / "web.vmdk"
    _refused(
        ferry("--source", f"disk:{missing}", "--target", f"local:{target}", "--mac",
              "00:50:56:00:00:01"),
        f"VM web: disk image {missing} does not exist; check the path", target,
    )


def test_a_file_that_is_not_a_disk_image(tmp_path: Path, target: Path):
    text = tmp_path / "notes.txt"
    text.write_text("just some notes\n")
    _refused(
        ferry("--source", f"disk:{text}", "--target", f"local:{target}", "--mac",
              "00:50:56:00:00:01"),
        f"VM notes: {text} is not a disk image: it has no MBR or GPT partition table; pass a "
        "raw disk image with an MBR or GPT partition table, a qcow2 or a vmdk image",
        target,
    )


@pytest.mark.parametrize("source", ["qcow2:/vms/web.qcow2", "disk:", "/vms/web.vmdk"])
def test_bad_source_syntax(source: str, target: Path):
    _refused(
        ferry("--source", source, "--target", f"local:{target}"),
        f"--source {source!r} is not understood; write disk:PATH[,PATH...], "
        "e.g. --source disk:/vms/web.vmdk",
        target,
    )


@pytest.mark.parametrize("spec", ["kubevirt:ns", "local:", "out"])
def test_bad_target_syntax(spec: str, raw_disk: Path, target: Path):
    _refused(
        ferry("--source", f"disk:{raw_disk}", "--target", spec),
        f"--target {spec!r} is not understood; write local:DIR, e.g. --target local:/srv/vms",
        target,
    )


def test_a_missing_target_directory(raw_disk: Path, tmp_path: Path):
    missing = tmp_path / "not-there"
    _refused(
        ferry("--source", f"disk:{raw_disk}", "--target", f"local:{missing}", "--mac",
              "00:50:56:00:00:01"),
        f"target directory {missing} does not exist; create it (mkdir -p {missing})",
        missing,
    )
    assert not missing.exists()


def test_an_existing_non_empty_vm_directory_is_left_alone(raw_disk: Path, target: Path):
    (target / "disk").mkdir()
    keep = target / "disk" / "disk0.raw"
    keep.write_text("an earlier migration")
    result = ferry("--source", f"disk:{raw_disk}", "--target", f"local:{target}", "--mac",
                   "00:50:56:00:00:01")
    assert result.returncode == 2
    assert result.stderr == (
        f"ferry: error: VM disk: {target / 'disk'} already exists and is not empty; remove it "
        "or pick another target directory or VM name (--name)\n"
    )
    assert [p.name for p in (target / "disk").iterdir()] == ["disk0.raw"]
    assert keep.read_text() == "an earlier migration"


def test_a_bad_mac(raw_disk: Path, target: Path):
    _refused(
        ferry("--source", f"disk:{raw_disk}", "--target", f"local:{target}", "--mac", "nope"),
        "--mac 'nope' is not a MAC address; write it as 00:50:56:aa:bb:cc", target,
    )


def test_several_problems_are_listed_one_per_line(tmp_path: Path, target: Path):
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    result = ferry("--source", f"disk:{a},{b}", "--target", f"local:{target}", "--mac",
                   "00:50:56:00:00:01")
    assert result.returncode == 2
    assert result.stderr == (
        "ferry: error: the migration cannot start:\n"
        f"  VM a: disk image {a} does not exist; check the path\n"
        f"  VM a: disk image {b} does not exist; check the path\n"
    )


def _processes_with_marker(marker: str) -> list[int]:
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if f"FERRY_TEST_MARK={marker}".encode() in environ.split(b"\0"):
            pids.append(int(pid))
    return pids


def test_migrate_copies_a_vm_described_by_a_vmx_and_says_where_it_is(
    tmp_path: Path, target: Path
):
    src = tmp_path / "src"
    src.mkdir()
    disk = make_raw_with_mbr(src / "web.vmdk", size_mib=40)  # raw despite the name
    (src / "web.vmx").write_text(
        'displayName = "web01"\nmemSize = "1536"\nnumvcpus = "1"\n'
        'scsi0:0.fileName = "web.vmdk"\nethernet0.present = "TRUE"\n'
        'ethernet0.virtualDev = "vmxnet3"\nethernet0.generatedAddress = "00:0c:29:3a:4b:5c"\n'
    )
    before = sha256_of(disk)
    marker = uuid.uuid4().hex

    result = ferry("--source", f"disk:{disk}", "--target", f"local:{target}",
                   "--skip-conversion", env={"FERRY_TEST_MARK": marker})

    assert result.returncode == 0, result.stderr
    vm_dir = target / "web01"
    assert result.stdout.endswith(
        f"VM web01 migrated to {vm_dir}\n"
        f"  disk:              {vm_dir / 'disk0.raw'}\n"
        f"  qemu command:      {vm_dir / 'web01.qemu.sh'}\n"
        f"  libvirt XML:       {vm_dir / 'web01.xml'}\n"
        "  conversion report: none (conversion skipped)\n"
        f"  boot it with:      {vm_dir / 'web01.qemu.sh'}\n"
    )
    assert "web01 disk0 [CopyDisks] 100.0% of 40 MiB" in result.stdout
    assert "web01: CopyDisks succeeded" in result.stdout
    assert "ferry: warning" not in result.stderr
    assert sha256_of(vm_dir / "disk0.raw") == before == sha256_of(disk)
    script = (vm_dir / "web01.qemu.sh").read_text()
    assert "-m 1536" in script and "mac=00:0c:29:3a:4b:5c" in script
    assert "00:0c:29:3a:4b:5c" in (vm_dir / "web01.xml").read_text()
    assert qemu_nbd_serving(disk) == []
    assert _processes_with_marker(marker) == []


def test_ctrl_c_cancels_the_copy_removes_the_vm_directory_and_stops_everything(
    big_disk: Path, target: Path
):
    disk = big_disk
    before = sha256_of(disk)
    marker = uuid.uuid4().hex
    proc = subprocess.Popen(
        [FERRY, "migrate", "--source", f"disk:{disk}", "--target", f"local:{target}",
         "--skip-conversion", "--mac", "00:50:56:00:00:01"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "FERRY_TEST_MARK": marker},
    )
    assert proc.stdout is not None
    first = ""
    while "[CopyDisks]" not in first:
        line = proc.stdout.readline()
        assert line, "ferry migrate ended before the copy showed progress"
        first = line
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)

    assert proc.returncode == 130, out + err
    assert err.endswith("ferry: interrupted\n") and "Traceback" not in err
    assert (
        "migration cancelled: VM big: cancelled by the operator during phase CopyDisks; "
        f"removed {target / 'big'}, which this migration had created"
    ) in out
    assert list(target.iterdir()) == []
    assert qemu_nbd_serving(disk) == []
    assert _processes_with_marker(marker) == []
    assert sha256_of(disk) == before


@pytest.mark.e2e
def test_a_disk_without_an_os_fails_in_conversion_and_leaves_nothing(
    tmp_path: Path, target: Path
):
    """The real converter on a copied disk with no guest: ConvertGuest fails
    with its reason, and the copied disk is removed again."""
    disk = make_raw_with_mbr(tmp_path / "data.raw", size_mib=32)
    before = sha256_of(disk)
    marker = uuid.uuid4().hex

    result = ferry("--source", f"disk:{disk}", "--target", f"local:{target}", "--mac",
                   "00:50:56:00:00:01", env={"FERRY_TEST_MARK": marker})

    assert result.returncode == 1, result.stderr
    assert "data: CopyDisks succeeded" in result.stdout
    assert "data: ConvertGuest running: launch" in result.stdout
    [line] = result.stderr.splitlines()
    assert line.startswith("ferry: error: migration failed: VM data: converting the guest "
                           "failed: ")
    assert line.endswith(f"; removed {target / 'data'}, which this migration had created")
    assert list(target.iterdir()) == []
    assert sha256_of(disk) == before
    assert qemu_nbd_serving(disk) == []
    assert _processes_with_marker(marker) == []
