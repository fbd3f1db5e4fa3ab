#!/bin/bash
# Build the Ferry test guest: a Debian 12 VM as it looks after years on ESXi
# (MBR disk, BIOS GRUB, /dev/sda1 everywhere, an initramfs that only knows the
# VMware paravirtual SCSI path, open-vm-tools, ifupdown with a static address on
# ens192). The converter must make exactly this kind of guest boot on virtio.
#
# Usage (as root): build-debian-guest.sh OUTDIR
# Writes OUTDIR/debian12.vmdk, OUTDIR/debian12.vmx and OUTDIR/guest.json.
#
# The root filesystem is made with debootstrap in a chroot (native speed), packed
# into the ext4 partition with `mke2fs -d` (no loop device needed: loop
# partition scanning is unavailable in containers), and GRUB is installed by the
# guest's own grub-install inside a libguestfs appliance, where the disk really is
# /dev/sda, so grub.cfg is generated the way the guest itself would.
set -euo pipefail

die() { echo "build-debian-guest: $*" >&2; exit 1; }

[[ $# -eq 1 ]] || die "usage: $0 OUTDIR"
[[ $(id -u) -eq 0 ]] || die "must run as root (debootstrap and chroot need it)"
for tool in debootstrap guestfish qemu-img sfdisk mke2fs lsinitramfs; do
    command -v "$tool" >/dev/null || die "$tool not found; run 'make setup'"
done

OUTDIR=$1
CACHE_ROOT=${FERRY_CACHE_DIR:-$HOME/.cache/ferry}
DEB_CACHE=$CACHE_ROOT/debs/debootstrap-bookworm-amd64
export LIBGUESTFS_BACKEND=${LIBGUESTFS_BACKEND:-direct}
export LIBGUESTFS_BACKEND_SETTINGS=${LIBGUESTFS_BACKEND_SETTINGS:-force_tcg}

# The facts of the guest; guest.json carries them to the tests.
VM_NAME=debian12-web01
HOST_NAME=web01
NIC=ens192
MAC=00:50:56:9a:1c:2e
ADDRESS=192.0.2.10/24
GATEWAY=192.0.2.2
DNS=192.0.2.3
ROOT_DEV=/dev/sda1
DISK_SIZE_MIB=3072
PART_START_MIB=1

PACKAGES=(
    systemd-sysv udev kmod dbus linux-image-amd64 initramfs-tools grub-pc
    ifupdown iproute2 iputils-ping open-vm-tools e2fsprogs jq
)

# Use the Debian mirror this machine's apt uses (deb822 or one-line format),
# never a hostname fixed in the repo.
debian_mirror() {
    local f uri
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -r $f ]] || continue
        # A stanza's URIs line; take the first that serves the main archive.
        uri=$(awk '
            /^[[:space:]]*$/ { if (uri != "" && suites ~ /(^| )bookworm( |$)/) { print uri; exit } uri=""; suites="" }
            /^URIs:/ { uri=$2 }
            /^Suites:/ { $1=""; suites=$0 " " }
            END { if (uri != "" && suites ~ /(^| )bookworm( |$)/) print uri }
        ' "$f" | head -n1)
        [[ -n $uri ]] && { echo "$uri"; return; }
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -r $f ]] || continue
        uri=$(awk '$1 == "deb" && $0 !~ /security/ {
                  for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' "$f")
        [[ -n $uri ]] && { echo "$uri"; return; }
    done
    return 1
}
MIRROR=$(debian_mirror) || die "no Debian mirror found in /etc/apt/sources.list{,.d}"

mkdir -p "$OUTDIR" "$DEB_CACHE"
WORK=$(mktemp -d "$OUTDIR/.work.XXXXXX")
ROOT=$WORK/root
RAW=$WORK/disk.raw

cleanup() {
    local m
    # Unmount everything below the chroot (deepest first), then remove the work tree.
    for m in $(awk -v r="$ROOT" 'index($2, r) == 1 { print $2 }' /proc/mounts | sort -r); do
        umount -l "$m" || true
    done
    rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT

echo "build-debian-guest: debootstrap bookworm from $MIRROR" >&2
debootstrap --variant=minbase --arch=amd64 --cache-dir="$DEB_CACHE" \
    --include="$(IFS=,; echo "${PACKAGES[*]}")" bookworm "$ROOT" "$MIRROR" >&2

# --- configuration, as an admin would have left it -----------------------------
echo "$HOST_NAME" >"$ROOT/etc/hostname"
cat >"$ROOT/etc/hosts" <<EOF
127.0.0.1	localhost
${ADDRESS%/*}	$HOST_NAME.example.internal $HOST_NAME
::1	localhost ip6-localhost ip6-loopback
EOF

cat >"$ROOT/etc/fstab" <<EOF
# <file system> <mount point> <type> <options> <dump> <pass>
$ROOT_DEV	/	ext4	errors=remount-ro	0	1
EOF

# Static address as the Debian installer writes it on ESXi. The name ens192
# comes from the vmxnet3 NIC's PCI slot; nothing pins it.
cat >"$ROOT/etc/network/interfaces" <<EOF
source /etc/network/interfaces.d/*

auto lo
iface lo inet loopback

allow-hotplug $NIC
iface $NIC inet static
	address $ADDRESS
	gateway $GATEWAY
	dns-nameservers $DNS
EOF
rm -f "$ROOT/etc/resolv.conf"
printf 'nameserver %s\n' "$DNS" >"$ROOT/etc/resolv.conf"

# GRUB: device names, not UUIDs; serial console; short timeout; quiet boot.
cat >"$ROOT/etc/default/grub" <<'EOF'
GRUB_DEFAULT=0
GRUB_TIMEOUT=1
GRUB_DISTRIBUTOR=`lsb_release -i -s 2> /dev/null || echo Debian`
GRUB_CMDLINE_LINUX_DEFAULT="quiet"
GRUB_CMDLINE_LINUX="console=tty0 console=ttyS0,115200n8"
GRUB_DISABLE_LINUX_UUID=true
GRUB_TERMINAL="console serial"
GRUB_SERIAL_COMMAND="serial --speed=115200 --unit=0 --word=8 --parity=no --stop=1"
EOF
echo "grub-pc grub-pc/install_devices multiselect /dev/sda" >"$WORK/grub.debconf"

# Initramfs for the VMware disk path only. MODULES=dep would look at the build
# host's hardware, so the list is explicit; virtio is deliberately absent.
sed -i 's/^MODULES=.*/MODULES=list/' "$ROOT/etc/initramfs-tools/initramfs.conf"
grep -qx 'MODULES=list' "$ROOT/etc/initramfs-tools/initramfs.conf" \
    || die "could not set MODULES=list in initramfs.conf"
# The root device does not exist at build time, so name its type for the fsck hook
# (otherwise the initramfs lacks e2fsck, unlike an installed system's).
echo 'FSTYPE=ext4' >"$ROOT/etc/initramfs-tools/conf.d/root-fstype"
cat >>"$ROOT/etc/initramfs-tools/modules" <<'EOF'
vmw_pvscsi
scsi_mod
sd_mod
crc32c_generic
ext4
EOF

# Keep the serial console readable so the marker line is not interleaved.
mkdir -p "$ROOT/etc/systemd/system.conf.d"
cat >"$ROOT/etc/systemd/system.conf.d/quiet-console.conf" <<'EOF'
[Manager]
ShowStatus=no
EOF

# The marker: once boot has settled, one JSON line on the serial port that says
# what the guest saw (command line, root, interfaces, gateway, failed units).
cat >"$ROOT/usr/local/sbin/ferry-marker" <<'EOF'
#!/bin/bash
# Report the settled state of this boot on the serial console for Ferry's tests.
set -u
timeout 240 systemctl is-system-running --wait >/dev/null 2>&1
gateway=$(ip -j route show default | jq -r '.[0].gateway // empty')
gateway_ping=false
if [[ -n $gateway ]] && ping -n -c1 -W2 "$gateway" >/dev/null 2>&1; then
    gateway_ping=true
fi
line=$(jq -cn \
    --arg cmdline "$(cat /proc/cmdline)" \
    --arg root "$(findmnt -n -o SOURCE /)" \
    --argjson interfaces "$(ip -j addr)" \
    --arg gateway "$gateway" \
    --argjson gateway_ping "$gateway_ping" \
    --arg state "$(systemctl is-system-running 2>/dev/null)" \
    --arg failed "$(systemctl list-units --state=failed --plain --no-legend | awk '{print $1}')" \
    '{cmdline: $cmdline, root: $root, interfaces: $interfaces, gateway: $gateway,
      gateway_ping: $gateway_ping, system_state: $state,
      failed_units: ($failed | split("\n") | map(select(. != "")))}')
for _ in 1 2; do
    printf '\nFERRY-MARKER %s\n' "$line" >/dev/ttyS0
    sleep 5
done
EOF
chmod 0755 "$ROOT/usr/local/sbin/ferry-marker"
cat >"$ROOT/etc/systemd/system/ferry-marker.service" <<'EOF'
[Unit]
Description=Report boot state on the serial console for Ferry tests
Wants=network-online.target
After=network-online.target

[Service]
# Type=simple so the unit itself never holds up boot; the script waits
# (bounded) for boot to settle and also runs when the network is down.
Type=simple
ExecStart=/usr/local/sbin/ferry-marker
TimeoutStartSec=300

[Install]
WantedBy=multi-user.target
EOF
systemctl --root="$ROOT" enable ferry-marker.service open-vm-tools.service >&2

# --- inside the chroot: debconf answer for grub-pc, initramfs ------------------
mount -t proc proc "$ROOT/proc"
mount -t sysfs sysfs "$ROOT/sys"
mount --bind /dev "$ROOT/dev"
chroot "$ROOT" debconf-set-selections <"$WORK/grub.debconf"
chroot "$ROOT" update-initramfs -u -k all >&2
chroot "$ROOT" apt-get clean
umount "$ROOT/dev" "$ROOT/sys" "$ROOT/proc"
rm -f "$ROOT"/var/lib/apt/lists/*_Packages "$ROOT"/var/log/*.log

INITRD=$(find "$ROOT/boot" -maxdepth 1 -name 'initrd.img-*' | head -n1)
[[ -n $INITRD ]] || die "no initrd was built"
lsinitramfs "$INITRD" >"$WORK/initrd.list"
for mod in virtio_blk virtio_pci virtio_scsi virtio_net; do
    if grep -q "/$mod\.ko" "$WORK/initrd.list"; then
        die "$mod is in the initramfs; it must only carry the VMware disk path"
    fi
done
grep -q '/vmw_pvscsi\.ko' "$WORK/initrd.list" || die "vmw_pvscsi is missing from the initramfs"

# --- disk: MBR, one bootable ext4 partition filled from the tree ---------------
truncate -s "${DISK_SIZE_MIB}M" "$RAW"
printf 'label: dos\nstart=%dMiB, type=83, bootable\n' "$PART_START_MIB" | sfdisk -q "$RAW"
PART_SIZE_KIB=$(( (DISK_SIZE_MIB - PART_START_MIB) * 1024 ))
mke2fs -q -t ext4 -L root -E offset=$((PART_START_MIB * 1024 * 1024)) -d "$ROOT" \
    "$RAW" "${PART_SIZE_KIB}k"

# GRUB by the guest's own tools, in an appliance where the disk is /dev/sda.
echo "build-debian-guest: installing GRUB (libguestfs appliance)" >&2
# device.map pins /dev/sda as the BIOS boot disk; without it grub-install guesses
# among the appliance's disks and sometimes takes /dev/sda for a second disk.
guestfish --rw -a "$RAW" -m "$ROOT_DEV:/" <<EOF >&2
mkdir-p /boot/grub
write /boot/grub/device.map "(hd0) /dev/sda\n"
command "grub-install --target=i386-pc /dev/sda"
command "update-grub"
download /boot/grub/grub.cfg $WORK/grub.cfg
EOF
grep -q "root=$ROOT_DEV " "$WORK/grub.cfg" || die "grub.cfg does not boot with root=$ROOT_DEV"
if grep -Eq 'root=(/dev/loop|UUID=)' "$WORK/grub.cfg"; then
    die "grub.cfg names a loop device or UUID as root"
fi

# monolithicSparse: one self-contained .vmdk file, as exported from a datastore.
qemu-img convert -f raw -O vmdk -o subformat=monolithicSparse,adapter_type=lsilogic \
    "$RAW" "$OUTDIR/debian12.vmdk"

cat >"$OUTDIR/debian12.vmx" <<EOF
.encoding = "UTF-8"
config.version = "8"
virtualHW.version = "19"
displayName = "$VM_NAME"
guestOS = "debian12-64"
memSize = "2048"
numvcpus = "2"
cpuid.coresPerSocket = "1"
firmware = "bios"
uuid.bios = "42 1a 6c 3e 91 d2 4b 07-8c 55 2f 10 e4 7a b3 19"
vc.uuid = "50 1a 2b 3c 4d 5e 6f 70-81 92 a3 b4 c5 d6 e7 f8"
tools.syncTime = "FALSE"
pciBridge0.present = "TRUE"
pciBridge4.present = "TRUE"
pciBridge4.virtualDev = "pcieRootPort"
pciBridge4.functions = "8"
scsi0.present = "TRUE"
scsi0.virtualDev = "pvscsi"
scsi0.pciSlotNumber = "160"
scsi0:0.present = "TRUE"
scsi0:0.deviceType = "scsi-hardDisk"
scsi0:0.fileName = "debian12.vmdk"
ethernet0.present = "TRUE"
ethernet0.virtualDev = "vmxnet3"
ethernet0.networkName = "VM Network"
ethernet0.addressType = "generated"
ethernet0.generatedAddress = "$MAC"
ethernet0.pciSlotNumber = "192"
ethernet0.connectionType = "bridged"
ethernet0.startConnected = "TRUE"
EOF

VIRTUAL_SIZE=$((DISK_SIZE_MIB * 1024 * 1024))
cat >"$OUTDIR/guest.json" <<EOF
{
  "name": "$VM_NAME",
  "nic_name": "$NIC",
  "mac": "$MAC",
  "address": "$ADDRESS",
  "gateway": "$GATEWAY",
  "dns": "$DNS",
  "root_device": "$ROOT_DEV",
  "virtual_size": $VIRTUAL_SIZE
}
EOF
echo "build-debian-guest: wrote $OUTDIR/debian12.vmdk" >&2
