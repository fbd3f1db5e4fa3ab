"""`ferry migrate` as an operator runs it: bad input is one clear line and
exit 2 with nothing created; a good run starts the services, copies, writes
the VM files, says where they are and leaves no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.controlplane.conftest import make_raw_with_mbr, qemu_nbd_serving
from tests.files import sha256_of

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
        "  conversion report: none (conversion skipped: the guest is as it was)\n"
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


def _start_copy(disk: Path, target: Path, marker: str, tmp: Path) -> subprocess.Popen[str]:
    """ferry migrate of `disk`, returned once the copy shows progress."""
    tmp.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        [FERRY, "migrate", "--source", f"disk:{disk}", "--target", f"local:{target}",
         "--skip-conversion", "--mac", "00:50:56:00:00:01"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "FERRY_TEST_MARK": marker, "TMPDIR": str(tmp)},
    )
    assert proc.stdout is not None
    line = ""
    while "[CopyDisks]" not in line:
        line = proc.stdout.readline()
        assert line, "ferry migrate ended before the copy showed progress"
    return proc


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_ctrl_c_or_kill_cancels_the_copy_removes_the_vm_directory_and_stops_everything(
    big_disk: Path, target: Path, tmp_path: Path, sig: signal.Signals
):
    disk = big_disk
    before = sha256_of(disk)
    marker = uuid.uuid4().hex
    proc = _start_copy(disk, target, marker, tmp_path / "tmp")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)

    assert proc.returncode == 130, out + err
    assert err.endswith("ferry: interrupted\n") and "Traceback" not in err
    assert (
        "migration cancelled: VM big: cancelled by the operator during phase CopyDisks; "
        f"removed {target / 'big'}, which this migration had created"
    ) in out
    assert list(target.iterdir()) == []
    assert list((tmp_path / "tmp").iterdir()) == []
    assert qemu_nbd_serving(disk) == []
    assert _processes_with_marker(marker) == []
    assert sha256_of(disk) == before


def test_ctrl_c_twice_still_stops_the_services_and_removes_the_work_directory(
    big_disk: Path, target: Path, tmp_path: Path
):
    marker = uuid.uuid4().hex
    proc = _start_copy(big_disk, target, marker, tmp_path / "tmp")
    assert proc.stdout is not None
    proc.send_signal(signal.SIGINT)
    while "cancelling the migration" not in proc.stdout.readline():
        pass
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)

    assert proc.returncode == 130, out + err
    assert "Traceback" not in err
    assert list((tmp_path / "tmp").iterdir()) == []
    assert qemu_nbd_serving(big_disk) == []
    assert _processes_with_marker(marker) == []


def test_services_die_with_a_killed_ferry_migrate(
    big_disk: Path, target: Path, tmp_path: Path
):
    marker = uuid.uuid4().hex
    proc = _start_copy(big_disk, target, marker, tmp_path / "tmp")
    proc.kill()
    proc.communicate(timeout=60)
    for _ in range(1200):  # the services stop their work first; allow them 2 minutes
        if _processes_with_marker(marker) == [] and qemu_nbd_serving(big_disk) == []:
            break
        time.sleep(0.1)
    assert _processes_with_marker(marker) == []
    assert qemu_nbd_serving(big_disk) == []


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


def test_a_state_dir_that_is_a_file_is_refused_up_front(raw_disk: Path, target: Path):
    state = target.parent / "state"
    state.write_text("a file")
    result = ferry("--source", f"disk:{raw_disk}", "--target", f"local:{target}",
                   "--mac", "00:50:56:00:00:01", "--state-dir", str(state))
    _refused(result, f"--state-dir {state} is not a directory; pass a directory", target)


def test_a_dangling_symlink_at_the_vm_directory_is_refused_up_front(
    raw_disk: Path, target: Path
):
    (target / "disk").symlink_to(target / "gone")
    result = ferry("--source", f"disk:{raw_disk}", "--target", f"local:{target}",
                   "--mac", "00:50:56:00:00:01")
    assert result.returncode == 2
    assert result.stderr == (
        f"ferry: error: VM disk: {target / 'disk'} is a dangling symlink; remove it "
        f"(rm {target / 'disk'}) or pick another target directory or VM name (--name)\n"
    )
    assert (target / "disk").is_symlink()


def test_the_same_disk_twice_is_refused_up_front(raw_disk: Path, target: Path):
    alias = raw_disk.parent / "alias.raw"
    alias.symlink_to(raw_disk)
    result = ferry("--source", f"disk:{raw_disk},{alias}", "--target", f"local:{target}",
                   "--mac", "00:50:56:00:00:01")
    _refused(result, f"VM disk: the disk {alias} (the same file as {raw_disk}) is given "
             "twice; give each disk once", target)


def test_a_bad_mac_in_the_vmx_names_the_file_and_key_and_suggests_mac(
    tmp_path: Path, target: Path
):
    src = tmp_path / "src"
    src.mkdir()
    disk = make_raw_with_mbr(src / "web.raw", data=False)
    (src / "web.vmx").write_text('scsi0:0.fileName = "web.raw"\n'
                                 'ethernet0.generatedAddress = "ff:ff:ff:ff:ff:ff"\n')
    result = ferry("--source", f"disk:{disk}", "--target", f"local:{target}")
    _refused(result, "VM web: web.vmx ethernet0.generatedAddress 'ff:ff:ff:ff:ff:ff' is the "
             "broadcast address, which no NIC can have; pass the NIC's MAC with --mac, "
             "written as 00:50:56:aa:bb:cc", target)


def test_an_unreachable_controlplane_is_named_with_the_flag(raw_disk: Path, target: Path):
    address = f"unix:{target.parent}/nothing.sock"
    result = ferry("--source", f"disk:{raw_disk}", "--target", f"local:{target}",
                   "--mac", "00:50:56:00:00:01", "--controlplane", address)
    assert result.returncode == 1
    assert result.stderr.startswith(
        f"ferry: error: the control plane at {address} is not reachable: "
    )
    assert result.stderr.endswith("; check --controlplane\n")
    assert "Traceback" not in result.stderr


def test_a_long_tmpdir_still_works_and_is_left_clean(
    tmp_path: Path, target: Path
):
    """Unix socket paths are limited to 107 bytes; a long TMPDIR must not matter."""
    disk = make_raw_with_mbr(tmp_path / "web.raw", size_mib=8)
    tmp = tmp_path / ("t" * 90)
    tmp.mkdir()
    marker = uuid.uuid4().hex
    result = ferry("--source", f" disk: ~/{os.path.relpath(disk, Path.home())}",
                   "--target", f"local: {target}", "--mac", "00:50:56:00:00:01",
                   "--skip-conversion",
                   env={"TMPDIR": str(tmp), "FERRY_TEST_MARK": marker})
    assert result.returncode == 0, result.stderr
    assert "--listen" not in result.stdout + result.stderr
    assert sha256_of(target / "web" / "disk0.raw") == sha256_of(disk)
    assert _processes_with_marker(marker) == []


def test_a_fifo_or_directory_named_like_the_vmx_neither_hangs_nor_blocks(
    tmp_path: Path, target: Path
):
    src = tmp_path / "src"
    src.mkdir()
    disk = make_raw_with_mbr(src / "web.raw", size_mib=8)
    os.mkfifo(src / "web.vmx")
    (src / "other.vmx").mkdir()
    result = ferry("--source", f"disk:{disk}", "--target", f"local:{target}",
                   "--mac", "00:50:56:00:00:01", "--skip-conversion")
    assert result.returncode == 0, result.stderr
    assert (
        f"ferry: warning: VM web: {src / 'web.vmx'} is not a regular file and was ignored; "
        "rename it if it is not the VM's descriptor\n"
    ) in result.stderr
