//! SIGKILL the daemon at random points while a client writes and flushes;
//! after each restart every flushed write must be there.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use rand::{Rng, SeedableRng};

const BLOCK: usize = 4096;
const BLOCKS: usize = 1024; // a 4 MiB disk
const KILLS: usize = 60;

/// A block's content for write number `tag`: the tag repeated.
fn pattern(tag: u64) -> Vec<u8> {
    tag.to_le_bytes().iter().copied().cycle().take(BLOCK).collect()
}

#[test]
fn no_flushed_write_is_lost_across_sigkills() {
    let dir = tmpdir();
    let base = path_of(&dir, "base.raw");
    let base_data = random_file(&base, BLOCKS * BLOCK, 9);
    let spec = disk_spec("vm", dir.path(), &base, ",queues=2");
    let socket = dir.path().join("vm.sock");
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);

    // Per block: the content a flush made durable (None: the base), and the
    // tags written since, any of which may also be what a crash left.
    let mut durable: HashMap<usize, u64> = HashMap::new();
    let mut since: HashMap<usize, Vec<u64>> = HashMap::new();
    let mut next_tag = 1u64;
    let mut flushed_writes = 0usize;

    for kill in 0..=KILLS {
        let mut daemon = Daemon::with_disks(&[&spec]);
        let mut c = Client::connect(&socket, 2, BLOCKS * BLOCK);

        // Check the whole disk against what may be there.
        let disk = c.read(0, BLOCKS * BLOCK);
        for b in 0..BLOCKS {
            let got = &disk[b * BLOCK..(b + 1) * BLOCK];
            let durable_ok = match durable.get(&b) {
                Some(&tag) => got == pattern(tag),
                None => got == &base_data[b * BLOCK..(b + 1) * BLOCK],
            };
            let later = since.get(&b).into_iter().flatten().find(|&&t| got == pattern(t));
            assert!(
                durable_ok || later.is_some(),
                "after kill {kill}: block {b} lost its flushed content (durable {:?})",
                durable.get(&b)
            );
            // Whatever is there now is the new durable state once flushed;
            // record it as such: we flush right below.
            if let Some(&t) = later {
                durable.insert(b, t);
            }
        }
        since.clear();
        c.flush();
        if kill == KILLS {
            break;
        }

        // Kill at a random moment while writes and flushes run.
        let pid = daemon.child.id() as i32;
        let delay = Duration::from_millis(rng.gen_range(5..120));
        let killer = std::thread::spawn(move || {
            std::thread::sleep(delay);
            // SAFETY: kill(2) on our child's pid.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        });
        let mut completed: Vec<(usize, u64)> = Vec::new();
        'io: loop {
            let mut ops = Vec::new();
            let mut blocks = Vec::new();
            for i in 0..8 {
                let b = rng.gen_range(0..BLOCKS);
                if blocks.iter().any(|&(x, _)| x == b) {
                    continue;
                }
                let tag = next_tag;
                next_tag += 1;
                c.buf()[i * BLOCK..(i + 1) * BLOCK].copy_from_slice(&pattern(tag));
                since.entry(b).or_default().push(tag);
                blocks.push((b, tag));
                ops.push(Op::Write {
                    offset: (b * BLOCK) as u64,
                    len: BLOCK,
                    buf: i * BLOCK,
                });
            }
            let results = c.run_timeout(&ops, Duration::from_millis(300));
            for (r, &(b, tag)) in results.iter().zip(&blocks) {
                match r {
                    Some(0) => completed.push((b, tag)),
                    Some(e) => panic!("write failed: {e}"),
                    None => break 'io,
                }
            }
            if results.iter().any(|r| r.is_none()) {
                break;
            }
            if rng.gen_bool(0.3) {
                match c.run_timeout(&[Op::Flush], Duration::from_millis(300))[0] {
                    Some(0) => {
                        // Everything completed before the flush is durable.
                        for (b, tag) in completed.drain(..) {
                            durable.insert(b, tag);
                            since.insert(b, Vec::new());
                            flushed_writes += 1;
                        }
                    }
                    Some(e) => panic!("flush failed: {e}"),
                    None => break,
                }
            }
        }
        killer.join().unwrap();
        let _ = daemon.child.wait();
        drop(c);
        // Tags completed since the last flush stay in `since`: allowed, not required.
    }
    assert!(
        flushed_writes > 500,
        "only {flushed_writes} flushed writes were checked"
    );
}

/// A daemon crash is not a power cut: the guest keeps running, so every
/// write it saw complete must still be there after a restart, flushed or
/// not (writes, partial writes and write-zeroes; SIGKILL, no flush ever).
#[test]
fn completed_writes_survive_sigkill_without_a_flush() {
    let dir = tmpdir();
    let base = path_of(&dir, "base.raw");
    let base_data = random_file(&base, BLOCKS * BLOCK, 21);
    let spec = disk_spec("vm", dir.path(), &base, ",queues=2");
    let socket = dir.path().join("vm.sock");
    let mut rng = rand::rngs::StdRng::seed_from_u64(23);
    let mut model = base_data.clone();
    let mut checked = 0;
    for round in 0..5 {
        let mut daemon = Daemon::with_disks(&[&spec]);
        let mut c = Client::connect(&socket, 2, BLOCKS * BLOCK);
        assert!(
            c.read(0, BLOCKS * BLOCK) == model,
            "round {round}: a completed write is gone"
        );
        checked += BLOCKS;
        for _ in 0..40 {
            let mut ops = Vec::new();
            let mut touched: Vec<(usize, usize)> = Vec::new();
            let mut at = 0;
            for _ in 0..8 {
                // Sector-aligned pieces, some of a block, some across blocks.
                let start = rng.gen_range(0..BLOCKS * 8) * 512;
                let len = (rng.gen_range(1..=16) * 512).min(BLOCKS * BLOCK - start);
                if touched.iter().any(|&(s, l)| start < s + l && s < start + len) {
                    continue;
                }
                touched.push((start, len));
                if rng.gen_bool(0.2) {
                    ops.push(Op::WriteZeroes {
                        offset: start as u64,
                        len: len as u64,
                    });
                    model[start..start + len].fill(0);
                } else {
                    let data = random_bytes(len, rng.gen());
                    c.buf()[at..at + len].copy_from_slice(&data);
                    model[start..start + len].copy_from_slice(&data);
                    ops.push(Op::Write {
                        offset: start as u64,
                        len,
                        buf: at,
                    });
                    at += len;
                }
            }
            assert!(c.run(&ops).iter().all(|&r| r == 0), "a write failed");
        }
        daemon.kill();
        drop(c);
    }
    let daemon = Daemon::with_disks(&[&spec]);
    let mut c = Client::connect(&socket, 2, BLOCKS * BLOCK);
    assert!(
        c.read(0, BLOCKS * BLOCK) == model,
        "after the last kill: a completed write is gone"
    );
    drop(daemon);
    assert!(checked > 0);
}
