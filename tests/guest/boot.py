"""Boot a guest disk under qemu (TCG) and read back what the guest saw.

The test guest writes one ``FERRY-MARKER {json}`` line on its serial port once boot
has settled; this module starts qemu with hardware that looks like ESXi or like
KubeVirt, waits for that line (or for the initramfs to give up), and always stops
qemu. The network is qemu's user-mode stack with ``restrict=on``: the guest can
talk to the virtual gateway and DNS addresses only, nothing leaves this machine.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Hardware = Literal["esxi", "virtio"]

MARKER_PREFIX = "FERRY-MARKER "

# What Debian's initramfs prints when it cannot find the root device.
GAVE_UP_SIGNS = ("Gave up waiting for root", "ALERT!", "(initramfs)")

# One isolated network for every boot: the guest's static address lives in
# TEST-NET-1; the slirp gateway answers ICMP echo itself (even with restrict=on),
# and restrict=on drops everything addressed elsewhere.
NETDEV = "user,id=n0,net=192.0.2.0/24,host=192.0.2.2,dns=192.0.2.3,restrict=on"


@dataclass(frozen=True)
class BootResult:
    """What one boot showed: the parsed marker (None if it never came) and the log."""

    marker: dict[str, Any] | None
    serial_log: str
    seconds: float
    gave_up: bool

    def interfaces(self) -> dict[str, dict[str, Any]]:
        """Interfaces the guest reported, by name; empty if there was no marker."""
        return interfaces_from_marker(self.marker) if self.marker else {}


def parse_marker(serial_log: str) -> dict[str, Any] | None:
    """Return the first complete marker's JSON object from a serial log.

    Only newline-terminated lines count, so a line still being written is never
    taken for a truncated one; lines that do not parse (garbled by interleaved
    console output) are skipped in favour of the next copy.
    """
    *complete, _unfinished = serial_log.split("\n")
    for line in complete:
        at = line.find(MARKER_PREFIX)
        if at < 0:
            continue
        try:
            value = json.loads(line[at + len(MARKER_PREFIX) :].strip())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


def initramfs_gave_up(serial_log: str) -> bool:
    """True when the log shows the initramfs failed to find the root device."""
    return any(sign in serial_log for sign in GAVE_UP_SIGNS)


def interfaces_from_marker(marker: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Map ``ip -j addr`` output from the marker to name -> {mac, addresses (CIDR)}."""
    result: dict[str, dict[str, Any]] = {}
    for link in marker.get("interfaces", []):
        addresses = [
            f"{info['local']}/{info['prefixlen']}"
            for info in link.get("addr_info", [])
            if "local" in info and "prefixlen" in info
        ]
        result[link["ifname"]] = {"mac": link.get("address", ""), "addresses": addresses}
    return result


def qemu_command(
    disk: Path, fmt: str, hardware: Hardware, mac: str, serial_path: Path, snapshot: bool
) -> list[str]:
    """The qemu command line for one boot of ``disk`` on the given hardware profile."""
    # Writes of a snapshot boot are thrown away, so they need not reach the disk.
    cache = "unsafe" if snapshot else "writeback"
    drive = f"file={disk},if=none,id=disk0,format={fmt},cache={cache}"
    command = [
        "qemu-system-x86_64",
        "-accel", "tcg",
        "-machine", "q35",
        "-m", "2048",
        "-nographic",
        "-monitor", "none",
        "-serial", f"file:{serial_path}",
        "-no-reboot",
        "-drive", drive,
        "-netdev", NETDEV,
    ]  # fmt: skip
    if hardware == "esxi":
        # ACPI hotplug off so the root port's slot number reaches the guest through
        # native PCIe hotplug, and systemd names the vmxnet3 NIC ens192 as on ESXi.
        command += [
            "-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
            "-device", "pvscsi,id=scsi0",
            "-device", "scsi-hd,drive=disk0,bus=scsi0.0,bootindex=0",
            "-device", "pcie-root-port,id=rp192,bus=pcie.0,chassis=1,slot=192",
            "-device", f"vmxnet3,netdev=n0,mac={mac},bus=rp192",
        ]  # fmt: skip
    elif hardware == "virtio":
        # Devices behind their own root ports, as libvirt lays out a KubeVirt VM.
        command += [
            "-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=1",
            "-device", "pcie-root-port,id=rp2,bus=pcie.0,chassis=2",
            "-device", "virtio-net-pci,netdev=n0,mac=" + mac + ",bus=rp1",
            "-device", "virtio-blk-pci,drive=disk0,bus=rp2,bootindex=0",
        ]  # fmt: skip
    else:
        raise ValueError(f"unknown hardware profile {hardware!r}; use 'esxi' or 'virtio'")
    if snapshot:
        command.append("-snapshot")
    return command


def probe_format(disk: Path) -> str:
    """The disk's image format as qemu-img sees it (vmdk, qcow2, raw...)."""
    out = subprocess.run(
        ["qemu-img", "info", "--output=json", str(disk)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    fmt = json.loads(out)["format"]
    assert isinstance(fmt, str)
    return fmt


def boot_guest(
    disk: Path,
    hardware: Hardware,
    mac: str,
    *,
    fmt: str | None = None,
    timeout: float = 600,
    snapshot: bool = True,
    log_path: Path | None = None,
) -> BootResult:
    """Boot ``disk`` until the marker is complete, the initramfs gives up, or timeout.

    ``snapshot=True`` keeps every write in a throw-away overlay so the image on
    disk is never modified. qemu is stopped in every case.
    """
    if not disk.is_file():
        raise FileNotFoundError(f"guest disk {disk} does not exist")
    fmt = fmt or probe_format(disk)
    with tempfile.TemporaryDirectory(prefix="ferry-boot-") as tmp:
        serial_path = log_path or Path(tmp) / "serial.log"
        serial_path.write_bytes(b"")
        # A file, not a pipe: nobody drains qemu's stderr while the guest boots.
        stderr_path = Path(tmp) / "qemu.stderr"
        command = qemu_command(disk, fmt, hardware, mac, serial_path, snapshot)
        started = time.monotonic()
        with open(stderr_path, "wb") as stderr_file:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr_file,
                start_new_session=True,
            )
        marker: dict[str, Any] | None = None
        gave_up = False
        try:
            while time.monotonic() - started < timeout:
                log = serial_path.read_bytes().decode("utf-8", "replace")
                marker = parse_marker(log)
                gave_up = initramfs_gave_up(log)
                if marker is not None or gave_up or proc.poll() is not None:
                    break
                time.sleep(0.5)
        finally:
            seconds = time.monotonic() - started
            _stop(proc)
        log = serial_path.read_bytes().decode("utf-8", "replace")
        stderr = stderr_path.read_text(errors="replace")
    if (
        proc.returncode not in (0, -signal.SIGTERM, -signal.SIGKILL)
        and marker is None
        and not gave_up
    ):
        raise RuntimeError(f"qemu failed to boot {disk}: {stderr.strip()}")
    return BootResult(
        marker=marker or parse_marker(log),
        serial_log=log,
        seconds=seconds,
        gave_up=gave_up or initramfs_gave_up(log),
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop qemu: SIGTERM first so a writable image gets flushed and closed, then kill."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def main(argv: list[str] | None = None) -> int:
    """Debugging aid: boot a disk and print the marker (or the log tail)."""
    parser = argparse.ArgumentParser(prog="python -m tests.guest.boot", description=__doc__)
    parser.add_argument("disk", type=Path)
    parser.add_argument("--hardware", choices=["esxi", "virtio"], default="virtio")
    parser.add_argument("--mac", required=True)
    parser.add_argument("--format", dest="fmt")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--log", type=Path, help="keep the serial log here")
    parser.add_argument(
        "--write", action="store_true", help="let the boot modify the disk (no -snapshot)"
    )
    args = parser.parse_args(argv)
    if not args.disk.is_file():
        parser.error(f"disk {args.disk} does not exist; pass the path of a guest image")
    try:
        result = boot_guest(
            args.disk,
            args.hardware,
            args.mac,
            fmt=args.fmt,
            timeout=args.timeout,
            snapshot=not args.write,
            log_path=args.log,
        )
    except (RuntimeError, subprocess.CalledProcessError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"booted in {result.seconds:.0f} s, initramfs gave up: {result.gave_up}", file=sys.stderr)
    if result.marker is None:
        print("no marker; last lines of the serial log:", file=sys.stderr)
        print("\n".join(result.serial_log.splitlines()[-30:]), file=sys.stderr)
        return 1
    print(json.dumps(result.marker, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
