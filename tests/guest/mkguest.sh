#!/bin/bash
# Build a tiny Linux guest for streamblk end-to-end tests:
#   OUTDIR/vmlinuz     Debian kernel (newest /boot/vmlinuz-*)
#   OUTDIR/initrd.img  busybox initramfs: loads virtio/ext4 modules, mounts /dev/vda, switch_root
#   OUTDIR/rootfs.img  raw ext4 disk: busybox, /sbin/init-test, /data with SHA256SUMS
# Boot (no KVM needed):
#   qemu-system-x86_64 -accel tcg -m 512 -nographic -no-reboot \
#     -kernel OUTDIR/vmlinuz -initrd OUTDIR/initrd.img -append 'console=ttyS0 quiet panic=-1' \
#     -drive file=OUTDIR/rootfs.img,format=raw,if=virtio
# Console markers: GUEST-BOOTED, GUEST-CHECK-OK|FAIL, GUEST-SEEN-WRITTEN: boot-N,
#   GUEST-PREV-WRITE-OK|FAIL, GUEST-WRITE-OK, GUEST-DONE; any error: "GUEST-FAIL: reason".
#   With sbk.pause on the kernel command line: GUEST-PAUSE, then after a console
#   line GUEST-RECHECK-OK|FAIL and GUEST-RECONNECT-WRITE-OK. With sbk.readbulk:
#   GUEST-READBULK-READY, then after a line GUEST-READBULK-OK|EIO and
#   GUEST-ALIVE-OK|FAIL, then after another GUEST-READBULK-RETRY-OK|EIO.
# Needs (Debian): linux-image-amd64, busybox-static, cpio, e2fsprogs, kmod, gzip. Run as root.
set -euo pipefail

[ $# -eq 1 ] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
DISK_MB=${GUEST_DISK_MB:-64}
# Data the guest never reads at boot: makes a streamed boot's share visible.
BULK_MB=${GUEST_BULK_MB:-0}
BUSYBOX=/bin/busybox            # busybox-static: no shared libs to copy

# Newest kernel by version sort; its modules must be installed alongside.
KERNEL=$(ls /boot/vmlinuz-* | sort -V | tail -n1)
KVER=${KERNEL#/boot/vmlinuz-}
[ -d "/lib/modules/$KVER" ] || { echo "no /lib/modules/$KVER" >&2; exit 1; }

# Cache key: this script's content + inputs that change the output.
STAMP="$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1) kernel=$KVER disk_mb=$DISK_MB bulk_mb=$BULK_MB"
if [ -f "$OUT/.done" ] && [ "$(cat "$OUT/.done")" = "$STAMP" ]; then
    echo "guest up to date in $OUT"
    exit 0
fi
rm -f "$OUT/.done"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# Create dirs + busybox applet symlinks (paths like usr/bin/sha256sum) under $1.
install_busybox() {
    mkdir -p "$1/bin" "$1/sbin" "$1/usr/bin" "$1/usr/sbin"
    cp "$BUSYBOX" "$1/bin/busybox"
    "$BUSYBOX" --list-full | while read -r p; do
        [ "$p" = bin/busybox ] || ln -sf /bin/busybox "$1/$p"
    done
}

# ---------------------------------------------------------------- initrd
I=$WORK/initrd
install_busybox "$I"
mkdir -p "$I/proc" "$I/sys" "$I/dev" "$I/newroot" "$I/lib/modules"
# The kernel opens /dev/console for init's stdio before our /init can mount devtmpfs.
mknod -m 600 "$I/dev/console" c 5 1

# Resolve deps in load order. crc32c-intel is a soft dep of ext4 but needs SSE4.2,
# which TCG's default CPU lacks (insmod would fail); crc32c_generic covers it.
MODS=$(for m in virtio_pci virtio_blk crc32c_generic ext4; do
           modprobe --show-depends -S "$KVER" "$m"
       done | awk '$1 == "insmod" && $2 !~ /crc32c-intel/ && !seen[$2]++ { print $2 }')
: > "$I/modules.list"
for src in $MODS; do
    name=$(basename "$src")
    # busybox insmod can't read compressed modules: store them plain.
    case "$name" in
        *.ko.xz)  xz -dc "$src" > "$I/lib/modules/${name%.xz}";   name=${name%.xz} ;;
        *.ko.zst) zstd -qdc "$src" > "$I/lib/modules/${name%.zst}"; name=${name%.zst} ;;
        *)        cp "$src" "$I/lib/modules/$name" ;;
    esac
    echo "$name" >> "$I/modules.list"
done

cat > "$I/init" <<'EOF'
#!/bin/sh
fail() { echo "GUEST-FAIL: initrd: $*"; sync; poweroff -f; sleep 10; }
mount -t proc proc /proc && mount -t sysfs sys /sys && mount -t devtmpfs dev /dev \
    || fail "mounting proc/sys/dev"
exec </dev/console >/dev/console 2>&1
for m in $(cat /modules.list); do
    insmod "/lib/modules/$m" || fail "insmod $m"
done
i=0
while [ ! -b /dev/vda ]; do          # virtio probe is async; bound the wait (~10 s)
    i=$((i + 1)); [ $i -le 100 ] || fail "no /dev/vda after 10s"
    usleep 100000
done
mount -t ext4 -o rw /dev/vda /newroot || fail "mount /dev/vda"
[ -x /newroot/sbin/init-test ] || fail "no /sbin/init-test on /dev/vda"
# Hand the already-mounted pseudo-fs over so console fds stay valid.
for d in dev proc sys; do mount --move /$d /newroot/$d || fail "move /$d"; done
exec switch_root /newroot /sbin/init-test
fail "switch_root"
EOF
chmod 755 "$I/init"
(cd "$I" && find . | cpio -o -H newc --quiet) | gzip -9 > "$OUT/initrd.img"

# ---------------------------------------------------------------- rootfs
R=$WORK/rootfs
install_busybox "$R"
mkdir -p "$R/proc" "$R/sys" "$R/dev" "$R/tmp" "$R/data"
head -c 1M  /dev/urandom > "$R/data/rand-1M.bin"
head -c 5M  /dev/urandom > "$R/data/rand-5M.bin"
head -c 17K /dev/urandom > "$R/data/rand-17K.bin"
head -c 3M  /dev/zero    > "$R/data/zero-3M.bin"
if [ "$BULK_MB" -gt 0 ]; then
    mkdir -p "$R/bulk"
    head -c "${BULK_MB}M" /dev/urandom > "$R/bulk/unread.bin"
fi
(cd "$R/data" && sha256sum rand-1M.bin rand-5M.bin rand-17K.bin zero-3M.bin > SHA256SUMS)

cat > "$R/sbin/init-test" <<'EOF'
#!/bin/sh
# PID 1 of the test guest: verify seeded data, write new data, power off.
fail() { echo "GUEST-FAIL: $*"; sync; poweroff -f; sleep 10; }
mounted() { grep -q " $1 " /proc/mounts 2>/dev/null; }
mounted /proc || mount -t proc proc /proc || fail "mount /proc"
mounted /sys  || mount -t sysfs sys /sys  || fail "mount /sys"
mounted /dev  || mount -t devtmpfs dev /dev || fail "mount /dev"
echo GUEST-BOOTED
cd /data || fail "no /data"
if sha256sum -c SHA256SUMS; then echo GUEST-CHECK-OK; else echo GUEST-CHECK-FAIL; fi
n=1
if [ -f written.txt ]; then
    prev=$(cat written.txt)
    echo "GUEST-SEEN-WRITTEN: $prev"
    case "$prev" in boot-[0-9]*) n=$(( ${prev#boot-} + 1 )) ;; *) fail "bad written.txt: $prev" ;; esac
fi
# The last line of guest-written.sha256 describes the file written by the previous boot.
if [ -f guest-written.bin ] && [ -f guest-written.sha256 ]; then
    if tail -n 1 guest-written.sha256 | sha256sum -c -s; then
        echo GUEST-PREV-WRITE-OK; else echo GUEST-PREV-WRITE-FAIL; fi
fi
echo "boot-$n" > written.txt || fail "write written.txt"
head -c 2097152 /dev/urandom > guest-written.bin || fail "write guest-written.bin"
sha256sum guest-written.bin >> guest-written.sha256 || fail "append guest-written.sha256"
sync || fail "sync"
echo GUEST-WRITE-OK
# With "sbk.pause" on the command line, wait for a line on the console (the
# host restarts the disk's daemon meanwhile), then read and write again.
if grep -q sbk.pause /proc/cmdline; then
    echo GUEST-PAUSE
    read -r _go
    echo 3 > /proc/sys/vm/drop_caches
    if sha256sum -c -s SHA256SUMS && tail -n 1 guest-written.sha256 | sha256sum -c -s; then
        echo GUEST-RECHECK-OK; else echo GUEST-RECHECK-FAIL; fi
    head -c 1048576 /dev/urandom > after-reconnect.bin && sync && echo GUEST-RECONNECT-WRITE-OK
fi
# With "sbk.readbulk": wait for a console line (the host makes the store
# stop answering meanwhile), read the never-read bulk data, say whether the
# read failed, show that cached data still reads, then wait for another line
# (the store answers again) and read the bulk data once more.
if grep -q sbk.readbulk /proc/cmdline; then
    echo GUEST-READBULK-READY
    read -r _go
    if dd if=/bulk/unread.bin of=/dev/null bs=1M 2>/dev/null; then
        echo GUEST-READBULK-OK; else echo GUEST-READBULK-EIO; fi
    echo 3 > /proc/sys/vm/drop_caches
    if sha256sum -c -s SHA256SUMS; then echo GUEST-ALIVE-OK; else echo GUEST-ALIVE-FAIL; fi
    read -r _go
    echo 3 > /proc/sys/vm/drop_caches
    if dd if=/bulk/unread.bin of=/dev/null bs=1M 2>/dev/null; then
        echo GUEST-READBULK-RETRY-OK; else echo GUEST-READBULK-RETRY-EIO; fi
fi
cd /
mount -o remount,ro / || echo "warning: remount ro failed"   # leave ext4 clean
echo GUEST-DONE
poweroff -f
EOF
chmod 755 "$R/sbin/init-test"

rm -f "$OUT/rootfs.img"
truncate -s "${DISK_MB}M" "$OUT/rootfs.img"
# 4 KiB blocks keep a large file's extents in its inode (with 1 KiB blocks
# the bulk file's extent tree lies in the never-read area, and the guest
# re-reads that block for each page of the file). No lazy init: a guest
# thread zeroing inode tables in the background would read and write the
# disk behind the tests' backs, and retry forever while the store is down.
mkfs.ext4 -q -F -b 4096 -L streamblk-guest -E lazy_itable_init=0,lazy_journal_init=0 -d "$R" "$OUT/rootfs.img"

cp "$KERNEL" "$OUT/vmlinuz"
echo "$STAMP" > "$OUT/.done"
echo "guest built in $OUT (kernel $KVER, disk ${DISK_MB} MiB)"
echo "  kernel:  $OUT/vmlinuz"
echo "  initrd:  $OUT/initrd.img  (modules: $(tr '\n' ' ' < "$I/modules.list"))"
echo "  rootfs:  $OUT/rootfs.img"
