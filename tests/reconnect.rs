//! Frontend connections come and go without the daemon keeping anything of
//! them: a thousand reconnects of a vhost-user client leave its open file
//! descriptors where they were, and a connection's requests stuck in the
//! engine never hold up the next connection.

mod common;

use std::time::Duration;

use common::httpstore::{Fault, HttpStore};
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

#[test]
fn a_new_connection_is_served_while_the_last_one_left_a_read_waiting_on_a_stalled_store() {
    let dir = tmpdir();
    let image = path_of(&dir, "image.raw");
    let data = random_file(&image, 4 << 20, 5);
    let store = dir.path().join("store");
    import(&image, &store, "img", 256 << 10);
    let http = HttpStore::start(store);
    let socket = dir.path().join("vm.sock");
    let spec = format!(
        "name=vm,socket={},overlay={},image=img,queues=2",
        socket.display(),
        dir.path().join("vm.overlay").display()
    );
    let cache = dir.path().join("cache");
    let mut daemon = Daemon::start(&[
        "--store".to_string(),
        http.url.clone(),
        "--cache-dir".into(),
        cache.display().to_string(),
        "--fill-rate".into(),
        "0".into(),
        "--disk".into(),
        spec,
    ]);
    wait_for_socket(&socket);

    // The store stops answering; a read of a chunk not yet fetched waits on
    // it, and the client goes away with the read outstanding.
    http.set_fault(Fault::Stall);
    let mut c = Client::connect(&socket, 2, 1 << 16);
    let r = c.run_timeout(
        &[Op::Read {
            offset: 0,
            len: 4096,
            buf: 0,
        }],
        Duration::from_millis(300),
    );
    assert_eq!(r, [None], "a read of a chunk the store never sent completed");
    drop(c);

    // The next connection does not wait for it: writes and reads of its own
    // blocks complete while the old read is still stuck on the store.
    let mut c = Client::connect(&socket, 2, 1 << 16);
    let block = random_bytes(4096, 6);
    c.write(1 << 20, &block);
    assert_eq!(c.read(1 << 20, 4096), block);
    // Once the store answers again, that chunk reads back right.
    http.set_fault(Fault::None);
    assert_eq!(c.read(0, 4096), &data[..4096]);
    drop(c);
    assert!(daemon.terminate().success());
}
