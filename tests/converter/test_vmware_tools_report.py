"""dpkg status parsing for VMware Tools removal, and the report's JSON form."""

from __future__ import annotations

import pytest

from converter.context import normalise_mac
from converter.linux.vmware_tools import package_states, to_purge
from converter.report import ReportBuilder, from_json, to_json
from ferry import errors

STATUS = """\
Package: open-vm-tools
Status: install ok installed
Priority: extra
Version: 2:12.2.0-1+deb12u1
Description: Open VMware Tools
 for virtual machines hosted on VMware (CLI)

Package: open-vm-tools-desktop
Status: deinstall ok config-files
Version: 2:12.2.0-1+deb12u1

Package: openssh-server
Status: install ok installed

Package: open-vm-tools-dev
Status: install ok installed
"""


def test_dpkg_status_states():
    states = package_states(STATUS)
    assert states["open-vm-tools"] == "installed"
    assert states["open-vm-tools-desktop"] == "config-files"
    assert states["openssh-server"] == "installed"


def test_purge_list_has_vmware_packages_dependants_first():
    assert to_purge(package_states(STATUS)) == ["open-vm-tools-desktop", "open-vm-tools"]
    assert to_purge(package_states("Package: bash\nStatus: install ok installed\n")) == []


def test_report_json_round_trip():
    b = ReportBuilder()
    b.report.distro = "debian"
    b.change("rewrite-block-device", "/etc/fstab", "/dev/sda1 -> UUID=x")
    b.warn("w")
    b.timing("launch", 31.23456)
    report = b.finish(converted=True)
    text = to_json(report)
    assert '"rewrite-block-device"' in text and '"converted": true' in text
    back = from_json(text)
    assert back == report
    assert back.timings[0].seconds == pytest.approx(31.235)


@pytest.mark.parametrize(("mac", "want"), [
    ("52:54:00:AB:cd:01", "52:54:00:ab:cd:01"), ("52-54-00-ab-cd-01", "52:54:00:ab:cd:01")])
def test_macs_are_normalised(mac, want):
    assert normalise_mac(mac, "vm1") == want


def test_bad_mac_is_invalid_input_naming_the_vm():
    with pytest.raises(errors.InvalidInput, match="VM vm1: target NIC MAC 'nope'"):
        normalise_mac("nope", "vm1")
