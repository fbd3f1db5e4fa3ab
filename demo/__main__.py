"""`make demo`: migrate the VMware-style test guest to a local target through
the control plane's gRPC API, then boot the converted disk on virtio and show
what the guest itself reports about its network."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from ferry.cli import main as ferry_main
from tests.guest.boot import MARKER_PREFIX, boot_guest
from tests.guest.image import ensure_guest_image

OUTPUT = Path("demo-output")


def main() -> int:
    image = ensure_guest_image()
    print(
        f"source: {image.vmdk} (+ {image.vmx.name}), "
        f"NIC {image.nic_name} {image.mac}, static {image.address}"
    )

    output = OUTPUT.resolve()
    vm_dir = output / image.name
    if vm_dir.exists():
        print(f"removing the previous demo result {vm_dir}")
        shutil.rmtree(vm_dir)
    output.mkdir(exist_ok=True)

    status = ferry_main(
        ["migrate", "--source", f"disk:{image.vmdk}", "--target", f"local:{output}"]
    )
    if status != 0:
        return status

    disk = vm_dir / "disk0.raw"
    print(f"\nbooting {disk} on virtio-blk + virtio-net (MAC {image.mac}) under qemu TCG...")
    boot = boot_guest(disk, "virtio", image.mac, fmt="raw", snapshot=True)
    if boot.marker is None:
        print(f"the converted guest did not report its state within {boot.seconds:.0f} s; "
              f"last serial output:\n{boot.serial_log[-2000:]}", file=sys.stderr)
        return 1
    print(f"booted in {boot.seconds:.0f} s; the guest's own marker line:")
    print(MARKER_PREFIX + json.dumps(boot.marker))
    print()
    for name, nic in boot.interfaces().items():
        if name != "lo":
            print(f"  interface {name}  mac {nic['mac']}  addresses {', '.join(nic['addresses'])}")
    failed = boot.marker.get("failed_units") or []
    print(f"  failed units: {', '.join(failed) if failed else 'none'}")
    print(f"\nresult in {vm_dir}:")
    for path in sorted(vm_dir.iterdir()):
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
