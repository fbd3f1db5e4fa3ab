"""The test guest boots on ESXi-like hardware exactly as it would on ESXi.

This is the baseline the converter tests stand on: before conversion, on the
hardware it was built for, the guest has its static address on ens192, root on
/dev/sda1 and no failed units, and booting it leaves the cached VMDK untouched.
The parser tests at the end are fast and need no qemu.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.files import sha256_of
from tests.guest.boot import (
    BootResult,
    boot_guest,
    initramfs_gave_up,
    interfaces_from_marker,
    parse_marker,
    qemu_command,
)
from tests.guest.image import GuestImage, build_key, ensure_guest_image


@pytest.fixture(scope="module")
def guest() -> GuestImage:
    return ensure_guest_image()


@pytest.fixture(scope="module")
def esxi_boot(guest: GuestImage) -> tuple[BootResult, str, str]:
    """One ESXi-like boot of the cached VMDK, with its hash before and after."""
    before = sha256_of(guest.vmdk)
    result = boot_guest(guest.vmdk, "esxi", guest.mac)
    after = sha256_of(guest.vmdk)
    return result, before, after


def marker_of(result: BootResult) -> dict[str, object]:
    assert result.marker is not None, (
        "the guest never printed its marker; serial log tail:\n"
        + "\n".join(result.serial_log.splitlines()[-40:])
    )
    return result.marker


@pytest.mark.guest
def test_guest_reaches_the_marker_on_esxi_hardware(esxi_boot):
    result, _, _ = esxi_boot
    assert not result.gave_up
    marker_of(result)


@pytest.mark.guest
def test_ens192_has_its_mac_and_static_address(guest, esxi_boot):
    result, _, _ = esxi_boot
    marker_of(result)
    interfaces = result.interfaces()
    assert guest.nic_name == "ens192"
    assert guest.nic_name in interfaces, f"interfaces seen: {sorted(interfaces)}"
    assert interfaces[guest.nic_name]["mac"] == guest.mac
    assert guest.address in interfaces[guest.nic_name]["addresses"]


@pytest.mark.guest
def test_gateway_is_default_route_and_answers(guest, esxi_boot):
    result, _, _ = esxi_boot
    marker = marker_of(result)
    assert marker["gateway"] == guest.gateway
    assert marker["gateway_ping"] is True


@pytest.mark.guest
def test_root_is_sda1_on_mount_and_command_line(guest, esxi_boot):
    result, _, _ = esxi_boot
    marker = marker_of(result)
    assert marker["root"] == guest.root_device == "/dev/sda1"
    assert f"root={guest.root_device}" in str(marker["cmdline"]).split()


@pytest.mark.guest
def test_no_failed_units(esxi_boot):
    result, _, _ = esxi_boot
    marker = marker_of(result)
    assert marker["failed_units"] == []
    assert marker["system_state"] == "running"


@pytest.mark.guest
def test_booting_leaves_the_cached_vmdk_unchanged(esxi_boot):
    _, before, after = esxi_boot
    assert before == after


# --- fast tests of the pure parts ----------------------------------------------

IP_ADDR = [
    {"ifindex": 1, "ifname": "lo", "address": "00:00:00:00:00:00",
     "addr_info": [{"family": "inet", "local": "127.0.0.1", "prefixlen": 8}]},
    {"ifindex": 2, "ifname": "ens192", "address": "00:50:56:9a:1c:2e",
     "addr_info": [
         {"family": "inet", "local": "192.0.2.10", "prefixlen": 24, "scope": "global"},
         {"family": "inet6", "local": "fe80::250:56ff:fe9a:1c2e", "prefixlen": 64},
     ]},
    {"ifindex": 3, "ifname": "enp1s0", "address": "52:54:00:12:34:56", "addr_info": []},
]  # fmt: skip
MARKER = {"cmdline": "root=/dev/sda1 ro quiet", "root": "/dev/sda1", "interfaces": IP_ADDR}


def serial(*lines: str) -> str:
    return "\r\n".join(lines) + "\r\n"


def test_parse_marker_finds_line_among_console_noise():
    log = serial(
        "SeaBIOS (version 1.16.2)",
        "[    2.1] random: crng init done",
        "web01 login: FERRY-MARKER " + json.dumps(MARKER),
    )
    assert parse_marker(log) == MARKER


def test_parse_marker_ignores_a_line_still_being_written():
    line = "FERRY-MARKER " + json.dumps(MARKER)
    assert parse_marker(line) is None
    assert parse_marker(line[:40] + "\n") is None


def test_parse_marker_takes_the_first_complete_copy():
    garbled = "FERRY-MARKER " + json.dumps(MARKER)[:30] + "[  5.0] eth0: link up"
    second = dict(MARKER, root="/dev/sdb1")
    log = serial(
        garbled, "FERRY-MARKER " + json.dumps(MARKER), "FERRY-MARKER " + json.dumps(second)
    )
    assert parse_marker(log) == MARKER


def test_parse_marker_none_without_marker():
    assert parse_marker(serial("Debian GNU/Linux 12 web01 ttyS0", "web01 login:")) is None


def test_initramfs_gave_up_on_debian_messages():
    log = serial(
        "Gave up waiting for root file system device.  Common problems:",
        "ALERT!  /dev/sda1 does not exist.  Dropping to a shell!",
        "(initramfs) ",
    )
    assert initramfs_gave_up(log)
    assert not initramfs_gave_up(serial("Begin: Loading essential drivers ... done."))


def test_interfaces_from_marker_gives_mac_and_cidr_addresses():
    assert interfaces_from_marker(MARKER) == {
        "lo": {"mac": "00:00:00:00:00:00", "addresses": ["127.0.0.1/8"]},
        "ens192": {
            "mac": "00:50:56:9a:1c:2e",
            "addresses": ["192.0.2.10/24", "fe80::250:56ff:fe9a:1c2e/64"],
        },
        "enp1s0": {"mac": "52:54:00:12:34:56", "addresses": []},
    }


def test_esxi_profile_puts_vmxnet3_in_slot_192_and_disk_on_pvscsi():
    cmd = " ".join(
        qemu_command(
            Path("d.vmdk"), "vmdk", "esxi", "00:50:56:9a:1c:2e", Path("s.log"), snapshot=True
        )
    )
    assert "-device pvscsi" in cmd
    assert "pcie-root-port,id=rp192,bus=pcie.0,chassis=1,slot=192" in cmd
    assert "vmxnet3,netdev=n0,mac=00:50:56:9a:1c:2e,bus=rp192" in cmd
    assert "virtio" not in cmd
    assert "restrict=on" in cmd
    assert cmd.endswith("-snapshot")


def test_virtio_profile_has_no_vmware_devices_and_can_write():
    cmd = qemu_command(
        Path("d.qcow2"), "qcow2", "virtio", "00:50:56:9a:1c:2e", Path("s.log"), snapshot=False
    )
    joined = " ".join(cmd)
    assert "virtio-blk-pci" in joined and "virtio-net-pci" in joined
    assert "pvscsi" not in joined and "vmxnet3" not in joined
    assert "-snapshot" not in cmd


def test_unknown_hardware_profile_is_refused():
    with pytest.raises(ValueError, match="unknown hardware profile 'hyperv'"):
        qemu_command(Path("d"), "raw", "hyperv", "m", Path("s"), snapshot=True)  # type: ignore[arg-type]


def test_cache_key_follows_the_build_script(tmp_path):
    script = tmp_path / "build-debian-guest.sh"
    script.write_text("echo one\n")
    first = build_key((script,))
    script.write_text("echo two\n")
    assert build_key((script,)) != first
    assert len(first) == 16
