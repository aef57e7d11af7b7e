//! The daemon dies under a running guest, again and again, and the guest
//! never notices: QEMU reconnects (`reconnect-ms`), the inflight region it
//! keeps tells the new daemon which requests were in flight, and they run
//! again. The guest writes and verifies files all along (some with
//! O_DIRECT, not flushed when a kill lands); its kernel log must show no I/O
//! error and no hung task.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::guest::{build_guest, Qemu};
use common::*;
use rand::{Rng, SeedableRng};

const BOOT: Duration = Duration::from_secs(300);
/// Restarts of each kind.
const KILLS: usize = 10;
const TERMS: usize = 10;

/// PID 1 of the guest: rounds of write, sync, drop caches, verify, until a
/// line arrives on the console; then a last check of every file and of the
/// kernel log.
const WORKLOAD: &str = r#"#!/bin/sh
fail() { echo "GUEST-FAIL: $*"; sync; poweroff -f; sleep 10; }
mounted() { grep -q " $1 " /proc/mounts 2>/dev/null; }
mounted /proc || mount -t proc proc /proc || fail "mount /proc"
mounted /sys  || mount -t sysfs sys /sys  || fail "mount /sys"
mounted /dev  || mount -t devtmpfs dev /dev || fail "mount /dev"
mount -t tmpfs tmpfs /run || fail "mount /run"
# Report a task stuck in I/O long before the default two minutes.
echo 30 > /proc/sys/kernel/hung_task_timeout_secs 2>/dev/null
echo GUEST-BOOTED
cd /work || fail "no /work"
# A background job's stdin is /dev/null: keep the console on fd 3 for it.
exec 3<&0
( read -r _line <&3; touch /run/stop ) &
check() {
    for s in *.sum; do
        [ -e "$s" ] || continue
        sha256sum -c -s "$s" || fail "verify $s"
    done
}
i=0
while [ ! -e /run/stop ]; do
    i=$((i + 1))
    kib=$(( (RANDOM % 64 + 1) * 16 ))
    head -c $((kib * 1024)) /dev/urandom > f$i.bin || fail "write f$i.bin"
    sha256sum f$i.bin > f$i.sum || fail "checksum f$i.bin"
    # O_DIRECT: completes without the page cache, no sync behind it yet.
    head -c 262144 /dev/urandom > /run/d.bin
    dd if=/run/d.bin of=d$i.bin bs=65536 oflag=direct status=none || fail "O_DIRECT write d$i.bin"
    sum=$(sha256sum /run/d.bin | cut -d' ' -f1)
    echo "$sum  d$i.bin" > d$i.sum
    got=$(dd if=d$i.bin bs=65536 iflag=direct status=none | sha256sum | cut -d' ' -f1)
    [ "$got" = "$sum" ] || fail "O_DIRECT read back d$i.bin"
    sync || fail "sync"
    echo 3 > /proc/sys/vm/drop_caches
    check
    old=$((i - 6))
    rm -f f$old.bin f$old.sum d$old.bin d$old.sum
    echo "GUEST-ROUND $i"
done
sync
echo 3 > /proc/sys/vm/drop_caches
check
if dmesg | grep -E -i "I/O error|blocked for more than|hung task|not a head|EXT4-fs error|virtio.*(error|broken)"; then
    fail "kernel log shows errors"
fi
echo "GUEST-VERIFIED $i rounds"
cd /
mount -o remount,ro / || echo "warning: remount ro failed"
echo GUEST-DONE
poweroff -f
"#;

/// A root file system of busybox and the workload, `mb` MiB.
fn build_rootfs(dir: &Path, mb: u64) -> PathBuf {
    let root = dir.join("root");
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "run", "work",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static in /bin/busybox");
    let list = Command::new("/bin/busybox").arg("--list-full").output().unwrap();
    for p in String::from_utf8(list.stdout).unwrap().lines() {
        if p != "bin/busybox" && !p.is_empty() {
            let _ = std::os::unix::fs::symlink("/bin/busybox", root.join(p));
        }
    }
    let init = root.join("sbin/init-test");
    let _ = std::fs::remove_file(&init);
    std::fs::write(&init, WORKLOAD).unwrap();
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755)).unwrap();
    let img = dir.join("rootfs.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(mb << 20).unwrap();
    let ok = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "sbk-restart", "-d"])
        .arg(&root)
        .arg(&img)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mkfs.ext4 failed");
    img
}

#[test]
fn guest_io_survives_ten_sigkills_and_ten_sigterms_of_the_daemon() {
    let guest = build_guest();
    let dir = tmpdir();
    let base = build_rootfs(dir.path(), 128);
    let spec = disk_spec("vm", dir.path(), &base, ",queues=2");
    let socket = dir.path().join("vm.sock");

    let mut daemon = Daemon::with_disks(&[&spec]);
    wait_for_socket(&socket);
    let mut qemu = Qemu::boot(&guest, &socket, 2, "");
    qemu.expect("GUEST-BOOTED", BOOT);

    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    for n in 0..KILLS + TERMS {
        // The guest made progress since the last restart; then a random
        // moment within its next round.
        qemu.expect("GUEST-ROUND", BOOT);
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..1500)));
        if n < KILLS {
            eprintln!("restart {}: SIGKILL", n + 1);
            daemon.kill();
        } else {
            eprintln!("restart {}: SIGTERM", n + 1);
            let status = daemon.terminate();
            assert!(status.success(), "daemon exited {status} on SIGTERM");
        }
        daemon = Daemon::with_disks(&[&spec]);
        wait_for_socket(&socket);
    }
    qemu.expect("GUEST-ROUND", BOOT);
    qemu.expect("GUEST-ROUND", BOOT);
    qemu.send_line("stop");
    qemu.expect("GUEST-VERIFIED", BOOT);
    qemu.expect("GUEST-DONE", BOOT);
    assert!(qemu.wait_exit(BOOT).success());
    let rounds = qemu.console.iter().filter(|l| l.contains("GUEST-ROUND")).count();
    eprintln!("{} restarts, {rounds} verified rounds", KILLS + TERMS);
    assert!(daemon.terminate().success());
}
