"""/etc/default/grub edits, the grub.cfg root= check, device.map and debconf."""

from __future__ import annotations

from converter.linux.devices import DeviceMap, Filesystem
from converter.linux.grub import (
    clean_device_map,
    debconf_install_devices,
    edit_default_grub,
    fix_grub_cfg,
    linux_roots,
    root_is_right,
)

UUID = "0b7e9f3c-1111-4a2b-9c3d-2f5e6a7b8c9d"
DEVICES = DeviceMap([Filesystem("/dev/sda1", "ext4", UUID)])

DEFAULT = """\
GRUB_DEFAULT=0
GRUB_TIMEOUT=1
GRUB_CMDLINE_LINUX_DEFAULT="quiet"
GRUB_CMDLINE_LINUX="console=tty0 console=ttyS0,115200n8 root=/dev/sda1"
GRUB_DISABLE_LINUX_UUID=true
#GRUB_DISABLE_LINUX_UUID=true
GRUB_TERMINAL="console serial"
"""


def test_default_grub_drops_disable_uuid_and_maps_cmdline_root():
    edit = edit_default_grub(DEFAULT, DEVICES.resolve)
    lines = edit.text.splitlines()
    assert lines[3] == f'GRUB_CMDLINE_LINUX="console=tty0 console=ttyS0,115200n8 root=UUID={UUID}"'
    assert lines[4].startswith("# GRUB_DISABLE_LINUX_UUID=true")
    assert lines[5] == "#GRUB_DISABLE_LINUX_UUID=true"
    assert [ln for ln in lines if ln.startswith("GRUB_DISABLE_LINUX_UUID")] == []
    assert len(edit.details) == 2
    assert edit_default_grub(edit.text, DEVICES.resolve).text == edit.text


def test_default_grub_quoted_disable_and_false_value():
    assert edit_default_grub('GRUB_DISABLE_LINUX_UUID="true"\n', DEVICES.resolve).details
    assert not edit_default_grub("GRUB_DISABLE_LINUX_UUID=false\n", DEVICES.resolve).details


GRUB_CFG = f"""\
menuentry 'Debian GNU/Linux' --class debian {{
	search --no-floppy --fs-uuid --set=root {UUID}
	echo	'Loading Linux 6.1.0-28-amd64 ...'
	linux	/boot/vmlinuz-6.1.0-28-amd64 root=/dev/sda1 ro  console=ttyS0 quiet
	initrd	/boot/initrd.img-6.1.0-28-amd64
}}
submenu 'Advanced options' {{
	menuentry 'recovery' {{
		linux	/boot/vmlinuz-6.1.0-28-amd64 root=UUID={UUID} ro single
	}}
	menuentry 'old' {{
		linux16	/boot/vmlinuz-5.10 ro single
	}}
}}
"""


def test_linux_roots_lists_each_linux_line():
    assert linux_roots(GRUB_CFG) == ["/dev/sda1", f"UUID={UUID}", ""]


def test_root_checks():
    assert root_is_right(f"UUID={UUID}", UUID)
    assert root_is_right("/dev/mapper/vg-root", UUID)
    assert not root_is_right("/dev/sda1", UUID)
    assert not root_is_right("UUID=ffff", UUID)
    assert not root_is_right("PARTUUID=1234-01", UUID)
    assert not root_is_right("", UUID)


def test_fix_grub_cfg_sets_uuid_on_wrong_and_missing_roots_only():
    text, fixed = fix_grub_cfg(GRUB_CFG, UUID)
    assert fixed == ["/dev/sda1", "(none)"]
    assert linux_roots(text) == [f"UUID={UUID}"] * 3
    assert f"\tlinux\t/boot/vmlinuz-6.1.0-28-amd64 root=UUID={UUID} ro  console=ttyS0 quiet\n" \
        in text
    assert f"\t\tlinux16\t/boot/vmlinuz-5.10 root=UUID={UUID} ro single\n" in text
    assert fix_grub_cfg(text, UUID) == (text, [])


def test_device_map_drops_bus_names():
    text, dropped = clean_device_map("# comment\n(hd0)\t/dev/sda\n(hd1) /dev/disk/by-id/x\n"
                                     "(fd0) /dev/fd0\n")
    assert text == "# comment\n(fd0) /dev/fd0\n"
    assert dropped == ["(hd0)\t/dev/sda", "(hd1) /dev/disk/by-id/x"]


def test_debconf_install_devices():
    dat = ("Name: grub-pc/install_devices\nTemplate: grub-pc/install_devices\n"
           "Value: /dev/sda, /dev/disk/by-id/ata-X\nOwners: grub-pc\nFlags: seen\n\n"
           "Name: grub-pc/other\nValue: /dev/sdb\n")
    assert debconf_install_devices(dat) == ["/dev/sda", "/dev/disk/by-id/ata-X"]
    assert debconf_install_devices("Name: grub-pc/install_devices\nValue: \n") == []
