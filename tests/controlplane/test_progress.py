"""What `ferry migrate` prints while a migration runs."""

from __future__ import annotations

import io

from controlplane.migrate import ProgressView, format_disk_line, summary
from ferry.v1 import controlplane_pb2 as pb
from ferry.v1 import transfer_pb2

M = pb.MigrationState
MiB = 1 << 20


def _migration(read: int, state: int = transfer_pb2.TRANSFER_STATE_RUNNING) -> pb.Migration:
    mig = pb.Migration(id="m", state=M.MIGRATION_STATE_RUNNING)
    vm = mig.vms.add(name="web", state=M.MIGRATION_STATE_RUNNING, phase="CopyDisks")
    vm.phases.add(name="CopyDisks", state=M.MIGRATION_STATE_RUNNING, message="copying 1 disk(s)")
    vm.phases.add(name="CreateVM", state=M.MIGRATION_STATE_PENDING)
    disk = vm.disks.add(name="disk0", transfer_id="t0", state=state)
    disk.progress.size_bytes = 1024 * MiB
    disk.progress.bytes_read = read
    disk.progress.bytes_zeroed = 0
    disk.progress.bytes_skipped = 256 * MiB
    disk.progress.rate_bytes_per_second = 95.5 * MiB
    return mig


def test_disk_line_counts_read_zeroed_and_skipped_bytes_as_done():
    disk = _migration(256 * MiB).vms[0].disks[0]
    assert format_disk_line("web", "CopyDisks", disk) == (
        "web disk0 [CopyDisks]  50.0% of 1,024 MiB,   95.5 MiB/s"
    )


def test_disk_line_of_an_unknown_size_says_so():
    assert "0.0% of size unknown" in format_disk_line("web", "CopyDisks", pb.DiskStatus(name="d"))


def test_plain_output_prints_phase_changes_once_and_disk_lines_on_state_changes():
    out = io.StringIO()
    view = ProgressView(out, tty=False)
    view.update(_migration(0))
    view.update(_migration(10 * MiB))  # same state, too soon: nothing new
    done = _migration(768 * MiB, transfer_pb2.TRANSFER_STATE_SUCCEEDED)
    done.vms[0].phases[0].state = M.MIGRATION_STATE_SUCCEEDED
    done.vms[0].phases[0].message = "copied 1 disk(s)"
    view.update(done)
    assert out.getvalue().splitlines() == [
        "web: CopyDisks running: copying 1 disk(s)",
        "web disk0 [CopyDisks]  25.0% of 1,024 MiB,   95.5 MiB/s",
        "web: CopyDisks succeeded: copied 1 disk(s)",
        "web disk0 [CopyDisks] 100.0% of 1,024 MiB,   95.5 MiB/s",
    ]
    assert "\x1b" not in out.getvalue()


def test_terminal_output_redraws_the_disk_lines_in_place():
    out = io.StringIO()
    view = ProgressView(out, tty=True)
    view.update(_migration(0))
    view.update(_migration(512 * MiB))
    text = out.getvalue()
    first, _, second = text.partition("\x1b[1F\x1b[J")
    assert first.endswith("web disk0 [CopyDisks]  25.0% of 1,024 MiB,   95.5 MiB/s\n")
    assert second == "web disk0 [CopyDisks]  75.0% of 1,024 MiB,   95.5 MiB/s\n"


def test_summary_names_every_file_of_a_migrated_vm():
    mig = pb.Migration(id="m", state=M.MIGRATION_STATE_SUCCEEDED)
    vm = mig.vms.add(
        name="web", state=M.MIGRATION_STATE_SUCCEEDED, vm_directory="/o/web",
        qemu_command_file="/o/web/web.qemu.sh", libvirt_xml_file="/o/web/web.xml",
        report_file="/o/web/conversion-report.json",
    )
    vm.disks.add(name="disk0", target="/o/web/disk0.raw")
    assert summary(mig) == [
        "VM web migrated to /o/web",
        "  disk:              /o/web/disk0.raw",
        "  qemu command:      /o/web/web.qemu.sh",
        "  libvirt XML:       /o/web/web.xml",
        "  conversion report: /o/web/conversion-report.json",
        "  boot it with:      /o/web/web.qemu.sh",
    ]


def test_summary_shows_the_converters_warnings():
    mig = pb.Migration(id="m", state=M.MIGRATION_STATE_SUCCEEDED)
    vm = mig.vms.add(
        name="web", state=M.MIGRATION_STATE_SUCCEEDED, vm_directory="/o/web",
        qemu_command_file="/o/web/web.qemu.sh", libvirt_xml_file="/o/web/web.xml",
        report_file="/o/web/conversion-report.json",
    )
    vm.conversion.warnings.append("grub-pc installs to /dev/sda; run dpkg-reconfigure grub-pc")
    assert summary(mig)[-1] == (
        "  warning: grub-pc installs to /dev/sda; run dpkg-reconfigure grub-pc"
    )
