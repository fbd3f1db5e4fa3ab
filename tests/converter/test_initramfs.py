"""Which virtio modules an initramfs lacks, and the modules file edit."""

from __future__ import annotations

from converter.linux.initramfs import (
    REQUIRED,
    add_to_modules_file,
    check_kernel,
    closure,
    has_file,
    has_udev,
    initramfs_modules,
    module_name,
    parse_builtin,
    parse_modules_dep,
)

# modules.dep as Debian 12's 6.1 kernel has it for these drivers (trimmed).
MODULES_DEP = """\
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko \
kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_ring.ko \
kernel/drivers/virtio/virtio.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko \
kernel/drivers/virtio/virtio.ko
kernel/drivers/scsi/virtio_scsi.ko: kernel/drivers/scsi/scsi_mod.ko \
kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/scsi/sd_mod.ko: kernel/drivers/scsi/scsi_common.ko kernel/drivers/scsi/scsi_mod.ko
kernel/drivers/scsi/scsi_mod.ko: kernel/drivers/scsi/scsi_common.ko
kernel/drivers/scsi/scsi_common.ko:
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko \
kernel/net/core/failover.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/drivers/scsi/vmw_pvscsi.ko: kernel/drivers/scsi/scsi_mod.ko
""".replace("\\\n", "")

# lsinitramfs of the VMware-only initramfs the test guest starts with.
LISTING = """\
.
usr/lib/modules/6.1.0-28-amd64/kernel/drivers/scsi/vmw_pvscsi.ko
usr/lib/modules/6.1.0-28-amd64/kernel/drivers/scsi/scsi_mod.ko
usr/lib/modules/6.1.0-28-amd64/kernel/drivers/scsi/scsi_common.ko
usr/lib/modules/6.1.0-28-amd64/kernel/drivers/scsi/sd_mod.ko
usr/lib/modules/6.1.0-28-amd64/kernel/fs/ext4/ext4.ko
usr/lib/systemd/systemd-udevd
usr/lib/systemd/network/99-default.link
"""


def test_module_names_from_paths():
    assert module_name("kernel/drivers/block/virtio_blk.ko") == "virtio_blk"
    assert module_name("kernel/drivers/block/virtio_blk.ko.zst") == "virtio_blk"
    assert module_name("kernel/drivers/hid/hid-generic.ko.xz") == "hid_generic"


def test_closure_puts_dependencies_first():
    deps = parse_modules_dep(MODULES_DEP)
    order = closure(["virtio_pci"], deps)
    assert order[-1] == "virtio_pci"
    assert set(order) == {"virtio_pci", "virtio_pci_legacy_dev", "virtio_pci_modern_dev",
                          "virtio_ring", "virtio"}


def test_vmware_only_initramfs_lacks_virtio_and_its_dependencies():
    deps = parse_modules_dep(MODULES_DEP)
    check = check_kernel("6.1.0-28-amd64", deps, set(), initramfs_modules(LISTING))
    assert set(check.missing) == {
        "virtio", "virtio_ring", "virtio_pci_legacy_dev", "virtio_pci_modern_dev",
        "virtio_pci", "virtio_blk", "virtio_scsi", "failover", "net_failover", "virtio_net",
    }
    assert check.absent == []


def test_builtin_modules_need_not_be_in_the_initramfs():
    deps = parse_modules_dep(MODULES_DEP)
    builtin = parse_builtin(
        "kernel/drivers/virtio/virtio.ko\nkernel/drivers/virtio/virtio_ring.ko\n")
    check = check_kernel("v", deps, builtin, initramfs_modules(LISTING))
    assert "virtio" not in check.missing and "virtio_ring" not in check.missing


def test_complete_initramfs_needs_nothing():
    deps = parse_modules_dep(MODULES_DEP)
    present = set(deps)
    assert check_kernel("v", deps, set(), present).missing == []


def test_kernel_without_virtio_is_reported_absent():
    deps: dict[str, list[str]] = {"sd_mod": [], "scsi_mod": []}
    check = check_kernel("v", deps, set(), {"sd_mod"})
    assert set(check.absent) == {"virtio_pci", "virtio_blk", "virtio_scsi", "virtio_net"}


def test_modules_file_gets_only_what_it_lacks():
    text = "# List of modules\nvmw_pvscsi\nsd_mod\n#virtio_blk\n"
    new, added = add_to_modules_file(text, REQUIRED)
    assert added == ["virtio_pci", "virtio_blk", "virtio_scsi", "virtio_net"]
    assert new.startswith(text)
    assert new.splitlines()[-4:] == added
    assert add_to_modules_file(new, REQUIRED) == (new, [])
    assert add_to_modules_file("ext4", ("ext4", "virtio_blk"))[0] == (
        "ext4\n# virtio drivers for KVM, added by Ferry\nvirtio_blk\n")


def test_udev_and_link_files_in_listing():
    assert has_udev(LISTING)
    assert has_file(LISTING, "/lib/systemd/network/99-default.link")
    assert not has_file(LISTING, "/lib/systemd/network/10-ferry-ens192.link")
    assert not has_udev("bin/busybox\n")
