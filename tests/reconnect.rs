//! Frontend connections come and go without the daemon keeping anything of
//! them: a thousand reconnects of a vhost-user client leave its open file
//! descriptors where they were.

mod common;

use common::*;

/// Open file descriptors of a process.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

#[test]
fn a_thousand_reconnects_leave_the_daemon_fd_count_flat() {
    let dir = tmpdir();
    let base = path_of(&dir, "base.raw");
    let data = random_file(&base, 1 << 20, 3);
    let spec = disk_spec("vm", dir.path(), &base, ",queues=2");
    let socket = dir.path().join("vm.sock");
    let daemon = Daemon::with_disks(&[&spec]);
    let pid = daemon.child.id();

    // Each connection does I/O on both queues, so both workers ran. The
    // daemon serves one connection at a time and tears the previous one down
    // before it accepts the next: counting while connection N is up sees
    // what connections before N left behind.
    let mut counts = Vec::new();
    for i in 0..1000u64 {
        let mut c = Client::connect(&socket, 2, 1 << 16);
        let r = c.run(&[
            Op::Read {
                offset: (i % 16) * 4096,
                len: 4096,
                buf: 0,
            },
            Op::Read {
                offset: 65536,
                len: 4096,
                buf: 4096,
            },
        ]);
        assert_eq!(r, [0, 0]);
        let off = ((i % 16) * 4096) as usize;
        assert_eq!(&c.buf()[..4096], &data[off..off + 4096]);
        if i == 10 || i == 999 {
            counts.push(fd_count(pid));
        }
        drop(c);
    }
    eprintln!(
        "daemon fds with one client connected: after 10 connections {}, after 1000 {}",
        counts[0], counts[1]
    );
    assert_eq!(counts[0], counts[1], "file descriptors grew with reconnects");
}
