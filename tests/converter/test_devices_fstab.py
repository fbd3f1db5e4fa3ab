"""Block device references: guest bus names -> appliance names -> UUID=."""

from __future__ import annotations

import pytest

from converter.linux.devices import (
    DeviceMap,
    Filesystem,
    appliance_device,
    index_to_letters,
    is_bus_specific,
    letters_to_index,
    rewrite_cmdline,
)
from converter.linux.fstab import rewrite_resume, rewrite_table

ROOT_UUID = "0b7e9f3c-1111-4a2b-9c3d-2f5e6a7b8c9d"
SWAP_UUID = "5d2c8e4a-2222-4b1c-8d9e-0a1b2c3d4e5f"
DATA_UUID = "7a6b5c4d-3333-4e2f-a1b2-c3d4e5f6a7b8"

DEVICES = DeviceMap([
    Filesystem("/dev/sda1", "ext4", ROOT_UUID),
    Filesystem("/dev/sda5", "swap", SWAP_UUID),
    Filesystem("/dev/sdb", "xfs", DATA_UUID),
    Filesystem("/dev/sdb1", "vfat", ""),
])


@pytest.mark.parametrize(("letters", "index"), [("a", 0), ("z", 25), ("aa", 26), ("ab", 27)])
def test_disk_letters_round_trip(letters, index):
    assert letters_to_index(letters) == index
    assert index_to_letters(index) == letters


@pytest.mark.parametrize(
    ("guest", "appliance"),
    [
        ("/dev/sda1", "/dev/sda1"),
        ("/dev/hda2", "/dev/sda2"),
        ("/dev/hdb", "/dev/sdb"),
        ("/dev/vdc3", "/dev/sdc3"),
        ("/dev/xvda1", "/dev/sda1"),
        ("/dev/nvme0n1p2", "/dev/sda2"),
        ("/dev/nvme1n1", "/dev/sdb"),
        ("/dev/mapper/vg-root", None),
        ("UUID=abc", None),
        ("/dev/disk/by-id/scsi-36000c29", None),
    ],
)
def test_guest_names_map_to_appliance_by_position(guest, appliance):
    assert appliance_device(guest) == appliance


@pytest.mark.parametrize(
    ("spec", "bus"),
    [
        ("/dev/sda1", True), ("/dev/nvme0n1p1", True), ("/dev/disk/by-path/pci-0000", True),
        ("/dev/disk/by-id/wwn-0x5000", True), ("UUID=x", False), ("LABEL=root", False),
        ("/dev/mapper/vg-root", False), ("/dev/vg/root", False), ("/dev/sr0", False),
        ("/dev/disk/by-uuid/x", False), ("tmpfs", False),
    ],
)
def test_bus_specific_names(spec, bus):
    assert is_bus_specific(spec) is bus


def test_resolve_needs_a_filesystem_with_a_uuid():
    assert DEVICES.resolve("/dev/sda1") == f"UUID={ROOT_UUID}"
    assert DEVICES.resolve("/dev/hdb") == f"UUID={DATA_UUID}"
    assert DEVICES.resolve("/dev/sdb1") is None   # no UUID
    assert DEVICES.resolve("/dev/sdc1") is None   # no such disk


UGLY_FSTAB = """\
# /etc/fstab: static file system information.
#
# <file system> <mount point>   <type>  <options>       <dump>  <pass>
/dev/sda1\t/\text4\terrors=remount-ro\t0\t1
  /dev/sda5   none    swap    sw      0       0
UUID=1234-ABCD  /boot/efi  vfat  umask=0077  0  1
/dev/sr0        /media/cdrom0   udf,iso9660 user,noauto     0       0
tmpfs /tmp tmpfs defaults 0 0
/dev/hdb /srv xfs defaults,nofail 0 2
#/dev/sda7 /old ext4 defaults 0 2
/dev/sda1 /mnt/bind none bind 0 0"""


def test_fstab_rewrite_keeps_layout_comments_and_other_entries():
    r = rewrite_table(UGLY_FSTAB, 0, DEVICES.resolve)
    lines = r.text.splitlines()
    assert lines[3] == f"UUID={ROOT_UUID}\t/\text4\terrors=remount-ro\t0\t1"
    assert lines[4] == f"  UUID={SWAP_UUID}   none    swap    sw      0       0"
    assert lines[5:8] == UGLY_FSTAB.splitlines()[5:8]
    assert lines[8] == f"UUID={DATA_UUID} /srv xfs defaults,nofail 0 2"
    assert lines[9] == "#/dev/sda7 /old ext4 defaults 0 2"
    assert r.replaced == [
        ("/dev/sda1", f"UUID={ROOT_UUID}"), ("/dev/sda5", f"UUID={SWAP_UUID}"),
        ("/dev/hdb", f"UUID={DATA_UUID}"), ("/dev/sda1", f"UUID={ROOT_UUID}"),
    ]
    assert not r.unmapped
    assert not r.text.endswith("\n")


def test_fstab_rewrite_is_idempotent():
    once = rewrite_table(UGLY_FSTAB + "\n", 0, DEVICES.resolve)
    twice = rewrite_table(once.text, 0, DEVICES.resolve)
    assert twice.text == once.text
    assert not twice.changed


def test_unmappable_fstab_entries_are_reported_and_optional_ones_apart():
    text = "/dev/sdc1 /data ext4 defaults 0 2\n/dev/sdd1 /scratch ext4 defaults,nofail 0 2\n"
    r = rewrite_table(text, 0, DEVICES.resolve)
    assert r.text == text
    assert r.unmapped == [("/dev/sdc1", "/dev/sdc1 /data ext4 defaults 0 2")]
    assert r.optional_unmapped == [("/dev/sdd1", "/dev/sdd1 /scratch ext4 defaults,nofail 0 2")]


def test_crypttab_rewrites_the_source_column():
    text = "# <target> <source> <key> <options>\ncswap /dev/sda5 /dev/urandom swap,cipher=aes\n"
    r = rewrite_table(text, 1, DEVICES.resolve)
    assert r.text.splitlines()[1] == f"cswap UUID={SWAP_UUID} /dev/urandom swap,cipher=aes"


@pytest.mark.parametrize(
    ("line", "want"),
    [
        ("RESUME=/dev/sda5\n", f"RESUME=UUID={SWAP_UUID}\n"),
        ('RESUME="/dev/sda5"\n', f'RESUME="UUID={SWAP_UUID}"\n'),
        ("RESUME=none\n", "RESUME=none\n"),
        ("#RESUME=/dev/sda5\n", "#RESUME=/dev/sda5\n"),
    ],
)
def test_resume_conf(line, want):
    assert rewrite_resume(line, DEVICES.resolve).text == want


def test_cmdline_root_and_resume_are_mapped_other_arguments_kept():
    line = 'GRUB_CMDLINE_LINUX="root=/dev/sda1 resume=/dev/sda5 console=ttyS0 noresume=/dev/sda1"'
    out, unmapped = rewrite_cmdline(line, DEVICES.resolve)
    assert out == (f'GRUB_CMDLINE_LINUX="root=UUID={ROOT_UUID} resume=UUID={SWAP_UUID} '
                   'console=ttyS0 noresume=/dev/sda1"')
    assert unmapped == []
    _, unmapped = rewrite_cmdline("root=/dev/sdq1", DEVICES.resolve)
    assert unmapped == ["/dev/sdq1"]
