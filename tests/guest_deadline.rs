//! A guest's read of a chunk the store never delivers fails with an I/O
//! error once the fetch deadline passes: it does not hang, the guest keeps
//! running on the data it has, and the same read works once the store
//! answers again.

mod common;

use std::time::{Duration, Instant};

use common::guest::{build_guest_with, Qemu};
use common::httpstore::{Fault, HttpStore};
use common::*;

const BOOT: Duration = Duration::from_secs(300);
const DEADLINE_SECS: u64 = 5;

#[test]
fn a_read_the_store_never_answers_fails_after_the_deadline_and_the_guest_runs_on() {
    let guest = build_guest_with("guest-bulk", 160, 96);
    let dir = tmpdir();
    let store = dir.path().join("store");
    import(&guest.join("rootfs.img"), &store, "guest", 256 << 10);
    let http = HttpStore::start(store.clone());
    let socket = dir.path().join("g.sock");
    let mut daemon = Daemon::start(&[
        "--store".into(),
        http.url.clone(),
        "--cache-dir".into(),
        dir.path().join("cache").display().to_string(),
        // Only what the guest reads is fetched: the bulk data stays missing.
        "--fill-rate".into(),
        "0".into(),
        "--fetch-deadline".into(),
        DEADLINE_SECS.to_string(),
        "--fetch-timeout".into(),
        "2".into(),
        "--disk".into(),
        format!(
            "name=g,socket={},overlay={},image=guest",
            socket.display(),
            dir.path().join("g.overlay").display()
        ),
    ]);
    wait_for_socket(&socket);
    let mut qemu = Qemu::boot(&guest, &socket, 1, "sbk.readbulk");
    qemu.expect("GUEST-WRITE-OK", BOOT);
    qemu.expect("GUEST-READBULK-READY", BOOT);

    http.set_fault(Fault::Stall);
    let asked = Instant::now();
    qemu.send_line("go");
    qemu.expect("GUEST-READBULK-", BOOT);
    let waited = asked.elapsed();
    assert!(
        qemu.saw("GUEST-READBULK-EIO"),
        "the read of data the store never sent did not fail"
    );
    // The kernel may retry a failed read once; each try waits out the deadline.
    assert!(
        waited >= Duration::from_secs(DEADLINE_SECS) && waited < Duration::from_secs(8 * DEADLINE_SECS + 60),
        "the failed read took {waited:?} with a {DEADLINE_SECS} s deadline"
    );
    qemu.expect("GUEST-ALIVE-OK", BOOT);

    http.set_fault(Fault::None);
    qemu.send_line("go");
    qemu.expect("GUEST-READBULK-RETRY-", BOOT);
    assert!(
        qemu.saw("GUEST-READBULK-RETRY-OK"),
        "the read failed again once the store answered"
    );
    qemu.expect("GUEST-DONE", BOOT);
    assert!(qemu.wait_exit(BOOT).success());
    let console = qemu.console.join("\n");
    assert!(
        !console.contains("blocked for more than"),
        "hung task in the guest:\n{console}"
    );
    let status = daemon.status();
    let failed = status["fetch"]["failed_attempts"].as_u64().unwrap_or(0);
    eprintln!("failed read after {waited:?}; {failed} failed fetch attempts");
    assert!(failed > 0, "no fetch attempt failed: {status}");
    assert!(daemon.terminate().success(), "the daemon did not stop cleanly");
}
