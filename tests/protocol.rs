//! The daemon driven by a real vhost-user-blk client (libblkio), no VM.

mod common;

use common::*;
use rand::{Rng, SeedableRng};

const MIB: usize = 1 << 20;

/// The model's view of discard: whole 4 KiB blocks inside the range read as
/// zeros afterwards; partial blocks at the edges keep their data.
fn model_discard(model: &mut [u8], offset: u64, len: u64) {
    let first = offset.div_ceil(4096) * 4096;
    let end = (offset + len) / 4096 * 4096;
    if end > first {
        model[first as usize..end as usize].fill(0);
    }
}

#[test]
fn random_io_over_two_queues_matches_a_model_and_survives_restart() {
    let dir = tmpdir();
    let base = path_of(&dir, "base.raw");
    let size = 16 * MIB;
    let mut model = random_file(&base, size, 1);
    let base_digest = file_digest(&base);
    let spec = disk_spec("vm", dir.path(), &base, ",queues=2");
    let socket = dir.path().join("vm.sock");
    let mut daemon = Daemon::with_disks(&[&spec]);
    let mut c = Client::connect(&socket, 2, 16 * MIB);
    assert_eq!(c.capacity, size as u64);

    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let (mut reads, mut writes, mut others) = (0, 0, 0);
    for _batch in 0..150 {
        // Up to 8 requests on disjoint ranges, so their order does not matter.
        let mut ops = Vec::new();
        let mut taken: Vec<(u64, u64)> = Vec::new();
        let mut buf_at = 0usize;
        for _ in 0..rng.gen_range(1..=8) {
            let sectors = rng.gen_range(1..=256u64);
            let len = sectors * 512;
            let offset = rng.gen_range(0..(size as u64 - len) / 512) * 512;
            if taken.iter().any(|&(o, l)| offset < o + l && o < offset + len) {
                continue;
            }
            taken.push((offset, len));
            let op = match rng.gen_range(0..100) {
                0..45 => Op::Read {
                    offset,
                    len: len as usize,
                    buf: buf_at,
                },
                45..85 => {
                    let data = random_bytes(len as usize, rng.gen());
                    c.buf()[buf_at..buf_at + len as usize].copy_from_slice(&data);
                    Op::Write {
                        offset,
                        len: len as usize,
                        buf: buf_at,
                    }
                }
                85..92 => Op::Discard { offset, len },
                92..97 => Op::WriteZeroes { offset, len },
                _ => Op::Flush,
            };
            buf_at += len as usize;
            ops.push(op);
        }
        let results = c.run(&ops);
        for (op, r) in ops.iter().zip(&results) {
            assert_eq!(*r, 0, "{op:?}");
            match *op {
                Op::Read { offset, len, buf } => {
                    reads += 1;
                    let got = &c.buf()[buf..buf + len];
                    assert!(
                        got == &model[offset as usize..offset as usize + len],
                        "read {offset}+{len} differs from the model"
                    );
                }
                Op::Write { offset, len, buf } => {
                    writes += 1;
                    let data = c.buf()[buf..buf + len].to_vec();
                    model[offset as usize..offset as usize + len].copy_from_slice(&data);
                }
                Op::Discard { offset, len } => {
                    others += 1;
                    model_discard(&mut model, offset, len)
                }
                Op::WriteZeroes { offset, len } => {
                    others += 1;
                    model[offset as usize..(offset + len) as usize].fill(0)
                }
                Op::Flush => others += 1,
            }
        }
    }
    assert!(reads > 100 && writes > 100 && others > 50, "{reads} {writes} {others}");
    assert!(c.read(0, size) == model, "whole disk differs from the model");
    drop(c);

    // SIGTERM: exits 0 with everything durable; a new daemon sees it all.
    assert!(daemon.terminate().success());
    let mut daemon = Daemon::with_disks(&[spec]);
    let mut c = Client::connect(&socket, 1, 16 * MIB);
    assert!(c.read(0, size) == model, "disk differs from the model after restart");
    drop(c);
    daemon.kill();
    assert_eq!(file_digest(&base), base_digest, "the base was written");
}

#[test]
fn two_disks_sharing_a_base_stay_isolated() {
    let dir = tmpdir();
    let base = path_of(&dir, "base.raw");
    let original = random_file(&base, 4 * MIB, 2);
    let a = disk_spec("a", dir.path(), &base, "");
    let b = disk_spec("b", dir.path(), &base, ",serial=disk-b");
    let _daemon = Daemon::with_disks(&[a, b]);
    let mut ca = Client::connect(&dir.path().join("a.sock"), 1, 4 * MIB);
    let mut cb = Client::connect(&dir.path().join("b.sock"), 1, 4 * MIB);

    let ours = random_bytes(64 * 1024, 3);
    ca.write(4096 * 10 + 512, &ours);
    cb.run(&[Op::WriteZeroes {
        offset: 0,
        len: 1 << 20,
    }]);
    let mut expect_a = original.clone();
    expect_a[4096 * 10 + 512..4096 * 10 + 512 + ours.len()].copy_from_slice(&ours);
    let mut expect_b = original.clone();
    expect_b[..1 << 20].fill(0);
    assert!(ca.read(0, 4 * MIB) == expect_a);
    assert!(cb.read(0, 4 * MIB) == expect_b);
    assert!(std::fs::read(&base).unwrap() == original, "the shared base was written");
}

#[test]
fn a_disconnected_client_can_reconnect_and_sees_its_data() {
    let dir = tmpdir();
    let base = path_of(&dir, "base.raw");
    random_file(&base, 2 * MIB, 4);
    let _daemon = Daemon::with_disks(&[disk_spec("vm", dir.path(), &base, ",queues=2")]);
    let socket = dir.path().join("vm.sock");
    let data = random_bytes(8192, 5);
    for round in 0..3 {
        let mut c = Client::connect(&socket, 2, MIB);
        if round > 0 {
            assert!(c.read(65536, 8192) == data, "round {round}");
        }
        c.write(65536, &data);
    }
}

#[test]
fn readonly_disk_refuses_writes_and_serves_reads() {
    let dir = tmpdir();
    let base = path_of(&dir, "base.raw");
    let original = random_file(&base, MIB, 6);
    let _daemon = Daemon::with_disks(&[disk_spec("ro", dir.path(), &base, ",readonly")]);
    let socket = dir.path().join("ro.sock");
    wait_for_socket(&socket);
    // libblkio refuses to start on a read-only device unless told so: the
    // device did advertise VIRTIO_BLK_F_RO.
    let err = Client::try_connect(&socket, 1, MIB)
        .err()
        .expect("read-only device accepted as writable");
    assert!(err.to_lowercase().contains("read-only"), "{err}");
    let mut b = blkio::Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", socket.to_str().unwrap()).unwrap();
    b.set_bool("read-only", true).unwrap();
    b.connect().unwrap();
    let mut started = b.start().unwrap();
    let region = b.alloc_mem_region(MIB).unwrap();
    b.map_mem_region(&region).unwrap();
    let q = &mut started.queues[0];
    // As a driver would: segments no longer than the device's size_max.
    let seg = streamblk::virtio_blk::SIZE_MAX as usize;
    let iov: Vec<libc::iovec> = (0..MIB / seg)
        .map(|k| libc::iovec {
            iov_base: (region.addr + k * seg) as *mut libc::c_void,
            iov_len: seg,
        })
        .collect();
    q.readv(0, iov.as_ptr(), iov.len() as u32, 0, blkio::ReqFlags::empty());
    let mut comps = [std::mem::MaybeUninit::<blkio::Completion>::uninit()];
    assert_eq!(q.do_io(&mut comps, 1, None, None).unwrap(), 1);
    // SAFETY: do_io filled one completion.
    assert_eq!(unsafe { comps[0].assume_init_read() }.ret, 0);
    // SAFETY: the region is mapped and idle.
    let got = unsafe { std::slice::from_raw_parts(region.addr as *const u8, MIB) };
    assert!(got == &original[..]);
}
