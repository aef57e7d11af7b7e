//! A real guest (Debian kernel, busybox root file system) boots under QEMU
//! with its root disk served by streamblk.

mod common;

use std::time::Duration;

use common::guest::{build_guest, Qemu};
use common::*;

const BOOT: Duration = Duration::from_secs(300);

#[test]
fn guest_boots_from_streamblk_writes_survive_restart_and_reconnect() {
    let guest = build_guest();
    let dir = tmpdir();
    let base = dir.path().join("base.raw");
    std::fs::copy(guest.join("rootfs.img"), &base).unwrap();
    let base_digest = file_digest(&base);
    let spec = disk_spec("vm", dir.path(), &base, ",queues=2");
    let socket = dir.path().join("vm.sock");

    // Boot 1: the guest checks its data, writes, syncs and powers off.
    let mut daemon = Daemon::with_disks(&[&spec]);
    wait_for_socket(&socket);
    let mut qemu = Qemu::boot(&guest, &socket, 2, "");
    qemu.expect("GUEST-BOOTED", BOOT);
    qemu.expect("GUEST-CHECK-OK", BOOT);
    qemu.expect("GUEST-WRITE-OK", BOOT);
    qemu.expect("GUEST-DONE", BOOT);
    assert!(qemu.wait_exit(BOOT).success());
    drop(qemu);
    assert!(daemon.terminate().success(), "daemon did not exit 0 on SIGTERM");

    // The writes went to the overlay; the base is untouched.
    assert_eq!(file_digest(&base), base_digest, "the base was written");
    let overlay_data = dir.path().join("vm.overlay/data");
    let allocated = std::fs::metadata(&overlay_data).map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.blocks() * 512
    });
    assert!(
        allocated.unwrap() >= 2 << 20,
        "the guest's 2 MiB write is not in the overlay"
    );

    // Boot 2, on a restarted daemon: the guest sees boot 1's writes. Midway
    // the daemon is restarted under the running guest, which reconnects.
    let mut daemon = Daemon::with_disks(&[&spec]);
    wait_for_socket(&socket);
    let mut qemu = Qemu::boot(&guest, &socket, 2, "sbk.pause");
    qemu.expect("GUEST-SEEN-WRITTEN: boot-1", BOOT);
    qemu.expect("GUEST-PREV-WRITE-OK", BOOT);
    qemu.expect("GUEST-PAUSE", BOOT);
    assert!(daemon.terminate().success());
    let mut daemon = Daemon::with_disks(&[spec]);
    wait_for_socket(&socket);
    // Give QEMU's reconnect timer (1 s) a chance before the guest does I/O.
    std::thread::sleep(Duration::from_secs(3));
    qemu.send_line("go");
    qemu.expect("GUEST-RECHECK-OK", BOOT);
    qemu.expect("GUEST-RECONNECT-WRITE-OK", BOOT);
    qemu.expect("GUEST-DONE", BOOT);
    assert!(qemu.wait_exit(BOOT).success());
    assert!(daemon.terminate().success());
    assert_eq!(file_digest(&base), base_digest, "the base was written");
}
