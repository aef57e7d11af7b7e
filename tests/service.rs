//! The systemd unit and the daemon's side of it: the unit verifies, the
//! daemon notifies READY=1 once serving, RELOADING=1 around SIGHUP and
//! STOPPING=1 at SIGTERM.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[test]
fn systemd_unit_verifies() {
    let dir = tmpdir();
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/streamblk.service")).unwrap();
    let unit = unit.replace("/usr/local/bin/streamblk", BIN);
    let path = dir.path().join("streamblk.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian package systemd)");
    let err = String::from_utf8_lossy(&out.stderr);
    // Without systemd as PID 1 the tool may still warn about the host; the
    // unit itself must draw no complaint.
    let complaints: Vec<&str> = err.lines().filter(|l| l.contains("streamblk.service")).collect();
    assert!(complaints.is_empty(), "{err}");
}

#[test]
fn daemon_notifies_ready_reloading_and_stopping() {
    let dir = tmpdir();
    let notify = dir.path().join("notify");
    let sock = UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(&config, "fill-rate = 0\n").unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--control-socket"])
        .arg(dir.path().join("control.sock"))
        .arg("--config")
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let next = || {
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    assert_eq!(next(), "READY=1");
    // Ready means the control socket answers.
    assert!(streamblk::control::read_status(&dir.path().join("control.sock")).is_ok());
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    assert_eq!(next(), "RELOADING=1");
    assert_eq!(next(), "READY=1");
    // SAFETY: as above.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(next(), "STOPPING=1");
    assert!(child.wait().unwrap().success());
}
