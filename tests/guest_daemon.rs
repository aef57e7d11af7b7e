//! A daemon started with no disks serves guests on disks added through the
//! control API: adding and removing other disks never disturbs a running
//! guest, and an attached disk is not removed without --force.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::guest::{build_guest, Qemu};
use common::*;

const BOOT: Duration = Duration::from_secs(300);

fn state(d: &Daemon, name: &str) -> Option<String> {
    d.status()["disks"]
        .as_array()?
        .iter()
        .find(|x| x["name"] == name)
        .map(|x| x["state"].as_str().unwrap_or("").to_string())
}

#[test]
fn guests_boot_on_disks_added_live_and_never_see_the_others_come_and_go() {
    let guest = build_guest();
    let dir = tmpdir();
    let base = dir.path().join("base.raw");
    std::fs::copy(guest.join("rootfs.img"), &base).unwrap();
    let mut daemon = Daemon::start(&[]);
    let c = daemon.control.display().to_string();
    assert!(daemon.status()["disks"].as_array().unwrap().is_empty());

    // Guest 1 boots on a disk added at run time, then waits, paused.
    let vm1 = disk_spec("vm1", dir.path(), &base, ",queues=2");
    let out = streamblk(&["disk", "add", &vm1, "--control-socket", &c]);
    assert!(out.contains("disk vm1 ready"), "{out}");
    let mut g1 = Qemu::boot(&guest, &dir.path().join("vm1.sock"), 2, "sbk.pause");
    g1.expect("GUEST-CHECK-OK", BOOT);
    g1.expect("GUEST-WRITE-OK", BOOT);
    g1.expect("GUEST-PAUSE", BOOT);
    assert_eq!(state(&daemon, "vm1").as_deref(), Some("attached"));

    // A second disk is added and removed while guest 1 runs.
    let vm2 = disk_spec("vm2", dir.path(), &base, "");
    streamblk(&["disk", "add", &vm2, "--control-socket", &c]);
    assert_eq!(state(&daemon, "vm2").as_deref(), Some("waiting"));
    streamblk(&["disk", "remove", "vm2", "--control-socket", &c]);
    assert!(state(&daemon, "vm2").is_none());
    assert!(!dir.path().join("vm2.sock").exists());

    // A third guest boots on its own new disk, runs to the end, powers off.
    let vm3 = disk_spec("vm3", dir.path(), &base, "");
    streamblk(&["disk", "add", &vm3, "--control-socket", &c]);
    let mut g3 = Qemu::boot(&guest, &dir.path().join("vm3.sock"), 1, "");
    g3.expect("GUEST-CHECK-OK", BOOT);
    g3.expect("GUEST-DONE", BOOT);
    assert!(g3.wait_exit(BOOT).success());
    drop(g3);

    // Guest 1's disk is attached: removing it needs --force.
    let out = Command::new(BIN)
        .args(["disk", "remove", "vm1", "--control-socket", &c])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("attached"), "{err}");

    // Guest 1 re-reads everything from its disk and writes: no error.
    g1.send_line("go");
    g1.expect("GUEST-RECHECK-OK", BOOT);
    g1.expect("GUEST-RECONNECT-WRITE-OK", BOOT);
    g1.expect("GUEST-DONE", BOOT);
    assert!(g1.wait_exit(BOOT).success());
    drop(g1);

    // Once the guest is gone its disk is removed without --force.
    let deadline = Instant::now() + Duration::from_secs(20);
    while state(&daemon, "vm1").as_deref() != Some("waiting") {
        assert!(Instant::now() < deadline, "vm1 never detached");
        std::thread::sleep(Duration::from_millis(50));
    }
    streamblk(&["disk", "remove", "vm1", "--control-socket", &c]);
    streamblk(&["disk", "remove", "vm3", "--control-socket", &c]);
    assert!(daemon.status()["disks"].as_array().unwrap().is_empty());
    assert!(daemon.terminate().success());
}
