from controlplane.providers.vmx import VmxNic, parse_vmx, parse_vmx_pairs

VMX = """\
.encoding = "UTF-8"
config.version = "8"
# a comment = "not a key"
displayName = "web server 01"
memSize = "4096"
numvcpus = "4"
firmware = "efi"
guestOS = "debian12-64"
scsi0.present = "TRUE"
scsi0.virtualDev = "pvscsi"
scsi0:1.present = "TRUE"
scsi0:1.fileName = "web-data.vmdk"
scsi0:0.present = "TRUE"
scsi0:0.fileName = "web.vmdk"
scsi1:0.fileName = "web-logs.vmdk"
scsi1.present = "TRUE"
sata0:0.present = "TRUE"
sata0:0.deviceType = "cdrom-image"
sata0:0.fileName = "/isos/debian.iso"
scsi0:2.present = "FALSE"
scsi0:2.fileName = "detached.vmdk"
ethernet0.present = "TRUE"
ethernet0.virtualDev = "vmxnet3"
ethernet0.networkName = "VM Network"
ethernet0.addressType = "generated"
ethernet0.generatedAddress = "00:0C:29:AA:BB:01"
ethernet1.present = "TRUE"
ethernet1.virtualDev = "e1000"
ethernet1.networkName = "backup"
ethernet1.addressType = "static"
ethernet1.address = "00:50:56:00:00:02"
ethernet1.generatedAddress = "00:0c:29:ff:ff:ff"
ethernet2.present = "FALSE"
ethernet2.generatedAddress = "00:0c:29:00:00:03"
"""


def test_vmx_gives_name_memory_cpus_firmware_and_guest_os():
    d = parse_vmx(VMX)
    assert d.display_name == "web server 01"
    assert (d.memory_mib, d.cpus, d.firmware, d.guest_os) == (4096, 4, "uefi", "debian12-64")


def test_vmx_disks_in_controller_order_without_cdroms_or_absent_disks():
    assert parse_vmx(VMX).disks == ["web.vmdk", "web-data.vmdk", "web-logs.vmdk"]


def test_vmx_nics_use_static_address_when_static_and_skip_absent_ones():
    assert parse_vmx(VMX).nics == [
        VmxNic(0, "00:0c:29:aa:bb:01", "VM Network", "vmxnet3", "ethernet0.generatedAddress"),
        VmxNic(1, "00:50:56:00:00:02", "backup", "e1000", "ethernet1.address"),
    ]


def test_vmx_keys_are_case_insensitive_and_bad_lines_skipped():
    pairs = parse_vmx_pairs('MemSize = "512"\nthis is not a pair\nnumVCPUs="1"\n')
    assert pairs == {"memsize": "512", "numvcpus": "1"}


def test_vmx_bios_and_missing_values_fall_back_to_empty():
    d = parse_vmx('firmware = "bios"\nmemSize = "lots"\n')
    assert (d.firmware, d.memory_mib, d.cpus, d.disks, d.nics) == ("bios", 0, 0, [], [])
    assert parse_vmx("").firmware == ""
