//! A hostile frontend over the daemon's real socket: chains the descriptor
//! walk ends early, requests beyond SEG_MAX and SIZE_MAX, an avail index
//! that jumps, a queue size that is not a power of two. Each gets its status
//! (or none, where its end cannot be trusted), nothing outside the buffers
//! given changes, and the disk serves a normal read afterwards: on the same
//! connection where the queue survives, on the next one where it broke.

mod common;

use std::path::Path;
use std::time::Duration;

use common::frontend::{TestFrontend, AVAIL};
use common::*;
use vhost::VhostBackend;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};

const QSIZE: u16 = 128;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const TABLE: u64 = 0x38_0000;
const DISK: usize = 1 << 20;
const UNTOUCHED: u8 = 0xff;
const N: u16 = VRING_DESC_F_NEXT as u16;
const W: u16 = VRING_DESC_F_WRITE as u16;
const SEG: u32 = streamblk::virtio_blk::SIZE_MAX;
const SEG_MAX: u32 = streamblk::virtio_blk::SEG_MAX;

fn header(f: &TestFrontend, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    f.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    f.mem.write_obj(UNTOUCHED, GuestAddress(STATUS)).unwrap();
}

fn status(f: &TestFrontend) -> u8 {
    f.mem.read_obj(GuestAddress(STATUS)).unwrap()
}

/// A normal 4 KiB read of sector 8, checked against the base.
fn good_read(f: &mut TestFrontend, base: &[u8]) {
    header(f, 8);
    f.desc(0, HDR, 16, N, 1);
    f.desc(1, DATA, 4096, W | N, 2);
    f.desc(2, STATUS, 1, W, 0);
    f.publish(0);
    let (id, len) = f.wait_used(Duration::from_secs(10)).expect("a good read completed");
    assert_eq!((id, len, status(f)), (0, 4097, VIRTIO_BLK_S_OK as u8));
    let mut got = vec![0u8; 4096];
    f.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert!(got == base[4096..8192], "read returned the wrong data");
}

fn setup() -> (tempfile::TempDir, Daemon, Vec<u8>, std::path::PathBuf) {
    let dir = tmpdir();
    let base_path = path_of(&dir, "base.raw");
    let base = random_file(&base_path, DISK, 11);
    let spec = disk_spec("vm", dir.path(), &base_path, "");
    let daemon = Daemon::with_disks(&[&spec]);
    let socket = dir.path().join("vm.sock");
    wait_for_socket(&socket);
    (dir, daemon, base, socket)
}

fn connect(socket: &Path) -> TestFrontend {
    let mut f = TestFrontend::connect(socket);
    f.start_queue(QSIZE).unwrap();
    f
}

/// The daemon's CPU time so far, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
    // utime and stime: fields 14 and 15, 12 and 13 after the command.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn chains_the_walk_ends_early_get_no_status_and_the_queue_keeps_serving() {
    let (_dir, _daemon, base, socket) = setup();
    let mut f = connect(&socket);
    good_read(&mut f, &base);

    // Each case: descriptors in the ring's table (or an indirect table), head 0.
    type Case = (&'static str, Vec<(u64, u64, u32, u16, u16)>);
    let cases: Vec<Case> = vec![
        (
            "a loop",
            vec![(0, HDR, 16, N, 1), (1, DATA, 512, W | N, 2), (2, STATUS, 1, W | N, 1)],
        ),
        (
            "a next index outside the table",
            vec![
                (0, HDR, 16, N, 1),
                (1, DATA, 512, W | N, 2),
                (2, STATUS, 1, W | N, QSIZE + 7),
            ],
        ),
        (
            "more than 4 GiB in all",
            vec![
                (0, HDR, 16, N, 1),
                (1, DATA, 512, W | N, 2),
                (2, DATA + 4096, u32::MAX - 256, W | N, 3),
                (3, STATUS, 1, W, 0),
            ],
        ),
        (
            "an indirect table whose last entry points past it",
            vec![
                (0, TABLE, 3 * 16, VRING_DESC_F_INDIRECT as u16, 0),
                (TABLE << 16, HDR, 16, N, 1),
                ((TABLE << 16) + 1, DATA, 512, W | N, 2),
                ((TABLE << 16) + 2, STATUS, 1, W | N, 3),
            ],
        ),
    ];
    for (what, descs) in cases {
        header(&f, 0);
        for &(at, addr, len, flags, next) in &descs {
            if at >= 1 << 16 {
                f.desc_at(at >> 16, (at & 0xffff) as u16, addr, len, flags, next);
            } else {
                f.desc(at as u16, addr, len, flags, next);
            }
        }
        let before = f.snapshot();
        f.publish(0);
        let used = f.wait_used(Duration::from_secs(10));
        assert_eq!(used, Some((0, 0)), "{what}: used entry");
        assert_eq!(status(&f), UNTOUCHED, "{what}: a status was written");
        let changed = f.changed_outside(&before, &[(AVAIL, 4 + 2 * QSIZE as usize)]);
        assert!(
            changed.is_empty(),
            "{what}: bytes changed at {:x?}",
            &changed[..changed.len().min(8)]
        );
    }
    good_read(&mut f, &base);
}

#[test]
fn requests_beyond_seg_max_or_size_max_get_ioerr_and_the_queue_keeps_serving() {
    let (_dir, _daemon, base, socket) = setup();
    let mut f = connect(&socket);

    // SEG_MAX data segments of 512 bytes (in an indirect table: more than
    // the ring holds) is the most; one more is refused.
    for (segments, ok) in [(SEG_MAX, true), (SEG_MAX + 1, false)] {
        header(&f, 0);
        let n = segments as u16 + 2;
        f.desc_at(TABLE, 0, HDR, 16, N, 1);
        for i in 0..segments as u16 {
            f.desc_at(TABLE, i + 1, DATA + 512 * u64::from(i), 512, W | N, i + 2);
        }
        f.desc_at(TABLE, n - 1, STATUS, 1, W, 0);
        f.desc(0, TABLE, 16 * u32::from(n), VRING_DESC_F_INDIRECT as u16, 0);
        f.mem
            .write_slice(&vec![0xeeu8; 512 * segments as usize], GuestAddress(DATA))
            .unwrap();
        let before = f.snapshot();
        f.publish(0);
        let used = f.wait_used(Duration::from_secs(10));
        let data_len = 512 * segments as usize;
        if ok {
            assert_eq!(used, Some((0, data_len as u32 + 1)));
            assert_eq!(status(&f), VIRTIO_BLK_S_OK as u8);
            let mut got = vec![0u8; data_len];
            f.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
            assert!(got == base[..data_len]);
        } else {
            assert_eq!(used, Some((0, 1)), "{segments} segments");
            assert_eq!(status(&f), VIRTIO_BLK_S_IOERR as u8);
        }
        let allowed: &[(u64, usize)] = if ok {
            &[(AVAIL, 260), (DATA, data_len), (STATUS, 1)]
        } else {
            &[(AVAIL, 260), (STATUS, 1)]
        };
        let changed = f.changed_outside(&before, allowed);
        assert!(
            changed.is_empty(),
            "{segments} segments: bytes changed at {:x?}",
            &changed[..changed.len().min(8)]
        );
    }

    // One segment of SIZE_MAX is fine, one byte-sector more is refused.
    for (len, ok) in [(SEG, true), (SEG + 512, false)] {
        header(&f, 0);
        f.desc(0, HDR, 16, N, 1);
        f.desc(1, DATA, len, W | N, 2);
        f.desc(2, STATUS, 1, W, 0);
        f.mem
            .write_slice(&vec![0xeeu8; len as usize], GuestAddress(DATA))
            .unwrap();
        let before = f.snapshot();
        f.publish(0);
        let used = f.wait_used(Duration::from_secs(10));
        if ok {
            assert_eq!((used, status(&f)), (Some((0, len + 1)), VIRTIO_BLK_S_OK as u8));
        } else {
            assert_eq!(
                (used, status(&f)),
                (Some((0, 1)), VIRTIO_BLK_S_IOERR as u8),
                "a {len}-byte segment"
            );
            let changed = f.changed_outside(&before, &[(AVAIL, 260), (STATUS, 1)]);
            assert!(
                changed.is_empty(),
                "bytes changed at {:x?}",
                &changed[..changed.len().min(8)]
            );
        }
    }
    good_read(&mut f, &base);
}

#[test]
fn an_avail_index_that_jumps_breaks_the_queue_without_spinning_and_the_next_connection_is_served() {
    let (_dir, daemon, base, socket) = setup();
    let pid = daemon.child.id();
    // Forwards past the queue size, and backwards.
    for (what, jump) in [("forwards", QSIZE + 1), ("backwards", u16::MAX)] {
        let mut f = connect(&socket);
        good_read(&mut f, &base);
        header(&f, 0);
        let before = f.snapshot();
        let used_before = f.used_idx();
        f.set_avail_idx(1u16.wrapping_add(jump));
        assert!(
            f.wait_err(Duration::from_secs(10)),
            "{what}: the error eventfd was not signalled"
        );
        assert!(
            f.wait_disconnected(Duration::from_secs(10)),
            "{what}: the connection was not dropped"
        );
        assert_eq!(f.used_idx(), used_before, "{what}: used entries added");
        let changed = f.changed_outside(&before, &[(AVAIL, 4)]);
        assert!(
            changed.is_empty(),
            "{what}: bytes changed at {:x?}",
            &changed[..changed.len().min(8)]
        );
        // The worker does not spin on the broken queue.
        let t0 = cpu_ticks(pid);
        std::thread::sleep(Duration::from_secs(1));
        let spent = cpu_ticks(pid) - t0;
        assert!(
            spent < 30,
            "{what}: the daemon used {spent} ticks in a second after the break"
        );
        drop(f);
        let mut next = connect(&socket);
        good_read(&mut next, &base);
    }
}

#[test]
fn a_queue_size_not_a_power_of_two_is_refused_and_the_next_connection_is_served() {
    let (_dir, _daemon, base, socket) = setup();
    let f = TestFrontend::connect(&socket);
    assert!(
        f.fe.set_vring_num(0, 100).is_err(),
        "a queue of 100 entries was accepted"
    );
    drop(f);
    let mut f = TestFrontend::connect(&socket);
    assert!(f.start_queue(0).is_err(), "a queue of 0 entries was accepted");
    drop(f);
    let mut next = connect(&socket);
    good_read(&mut next, &base);
}
