#!/bin/bash
# Build a real Debian bookworm guest (systemd) for the boot benchmark:
#   OUTDIR/vmlinuz      the host's Debian kernel (newest /boot/vmlinuz-*)
#   OUTDIR/initrd.img   the host's stock initramfs-tools initrd for it (has virtio_blk, ext4)
#   OUTDIR/debian.raw   raw ext4 disk (2 GiB by default): debootstrap minbase + systemd, kmod, dbus,
#                       systemd-sysv, udev; the kernel's modules; fstab root=/dev/vda
# When systemd reports the boot finished (`systemctl is-system-running --wait`:
# the boot job queue is empty, multi-user.target and everything it pulls in are
# up), the guest prints BOOT-COMPLETE on /dev/ttyS0 and powers off cleanly.
# Boot (no KVM needed):
#   qemu-system-x86_64 -accel tcg -m 1024 -nographic -no-reboot \
#     -kernel OUTDIR/vmlinuz -initrd OUTDIR/initrd.img \
#     -append 'console=ttyS0 root=/dev/vda rw quiet' \
#     -drive file=COPY-OF-debian.raw,format=raw,if=virtio
# Cached: does nothing if OUTDIR already holds a guest built by this script
# with the same inputs. Needs (Debian): debootstrap, e2fsprogs, linux-image-amd64.
# Network: the bookworm mirror of the machine's apt sources (or $DEBIAN_MIRROR). Run as root.
set -euo pipefail

[ $# -eq 1 ] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "$0: run as root" >&2; exit 1; }
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
DISK_MB=${GUEST_DISK_MB:-2048}
. "$(dirname "${BASH_SOURCE[0]}")/../../scripts/apt-mirror.sh"
MIRROR=${DEBIAN_MIRROR:-$(bookworm_mirror | sed -n 1p)}
[ -n "$MIRROR" ] || { echo "$0: no bookworm mirror in /etc/apt; set DEBIAN_MIRROR" >&2; exit 1; }
SUITE=bookworm

KERNEL=$(ls /boot/vmlinuz-* | sort -V | tail -n1)
KVER=${KERNEL#/boot/vmlinuz-}
INITRD=/boot/initrd.img-$KVER
[ -f "$INITRD" ] || { echo "no $INITRD" >&2; exit 1; }
[ -d "/lib/modules/$KVER" ] || { echo "no /lib/modules/$KVER" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "debootstrap missing: apt-get install debootstrap" >&2; exit 1; }

STAMP="$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1) kernel=$KVER disk_mb=$DISK_MB suite=$SUITE"
if [ -f "$OUT/.done" ] && [ "$(cat "$OUT/.done")" = "$STAMP" ] && [ -f "$OUT/debian.raw" ]; then
    echo "debian guest up to date in $OUT"
    exit 0
fi
rm -f "$OUT/.done"

WORK=$(mktemp -d /var/tmp/mkdebian.XXXXXX)
cleanup() {
    # debootstrap may leave proc/sys mounted inside the chroot on failure.
    for m in proc sys dev/pts dev; do umount -l "$WORK/root/$m" 2>/dev/null || true; done
    rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT
R=$WORK/root

# The debootstrap download is cached across builds (it is the slow part).
CACHE=$OUT/debs
mkdir -p "$CACHE"
echo "debootstrap $SUITE from $MIRROR (minbase + systemd, systemd-sysv, udev, kmod, dbus)..."
timeout 1800 debootstrap --variant=minbase --include=systemd,systemd-sysv,udev,kmod,dbus \
    --cache-dir="$CACHE" "$SUITE" "$R" "$MIRROR" > "$WORK/debootstrap.log" 2>&1 \
    || { tail -n 30 "$WORK/debootstrap.log" >&2; exit 1; }
for m in proc sys dev/pts dev; do umount -l "$R/$m" 2>/dev/null || true; done

# The kernel's modules, so udev loads drivers as on a normal install.
mkdir -p "$R/lib/modules"
cp -a "/lib/modules/$KVER" "$R/lib/modules/"

echo streamblk-guest > "$R/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tstreamblk-guest\n' > "$R/etc/hosts"
cat > "$R/etc/fstab" <<'EOF'
# <file system> <mount point> <type> <options> <dump> <pass>
/dev/vda / ext4 rw,errors=remount-ro 0 1
EOF
# No password login is needed (the guest powers itself off); root without password on the console.
sed -i 's/^root:[^:]*:/root::/' "$R/etc/shadow"

# Timers that would start jobs at boot and make it vary between runs.
for t in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer; do
    ln -sf /dev/null "$R/etc/systemd/system/$t"
done

# Boot complete = systemd's boot job queue is empty (state running or degraded).
# Type=simple so this unit is itself active at once and does not hold the queue.
cat > "$R/usr/local/sbin/boot-complete" <<'EOF'
#!/bin/sh
state=$(systemctl is-system-running --wait)
echo "BOOT-COMPLETE state=$state uptime=$(cut -d' ' -f1 /proc/uptime)" > /dev/ttyS0
systemctl poweroff --no-block
EOF
chmod 755 "$R/usr/local/sbin/boot-complete"
cat > "$R/etc/systemd/system/boot-complete.service" <<'EOF'
[Unit]
Description=Report boot complete on ttyS0 and power off (streamblk boot benchmark)
After=multi-user.target

[Service]
Type=simple
ExecStart=/usr/local/sbin/boot-complete

[Install]
WantedBy=multi-user.target
EOF
mkdir -p "$R/etc/systemd/system/multi-user.target.wants"
ln -sf /etc/systemd/system/boot-complete.service \
    "$R/etc/systemd/system/multi-user.target.wants/boot-complete.service"

# Keep the image free of downloaded packages and logs from the build.
rm -rf "$R/var/cache/apt/archives/"*.deb "$R/var/lib/apt/lists/"* "$R/var/log/"*.log 2>/dev/null || true

echo "making a ${DISK_MB} MiB ext4 image..."
rm -f "$OUT/debian.raw.tmp"
truncate -s "${DISK_MB}M" "$OUT/debian.raw.tmp"
mkfs.ext4 -q -F -L debian-root -d "$R" "$OUT/debian.raw.tmp"
mv "$OUT/debian.raw.tmp" "$OUT/debian.raw"
cp "$KERNEL" "$OUT/vmlinuz"
cp "$INITRD" "$OUT/initrd.img"
echo "$STAMP" > "$OUT/.done"
used=$(du -sm "$R" | cut -f1)
echo "debian guest built in $OUT (kernel $KVER, disk ${DISK_MB} MiB, ~${used} MiB of files)"
echo "  kernel: $OUT/vmlinuz"
echo "  initrd: $OUT/initrd.img"
echo "  disk:   $OUT/debian.raw"
