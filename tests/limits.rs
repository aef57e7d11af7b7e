//! A hostile client against the per-disk bounds: thousands of reads that
//! miss, outstanding at once against a slow store, do not grow the daemon
//! past the memory bound the README documents, the disk never has more
//! requests waiting off its workers than its cap, and another disk's client
//! keeps its read latency meanwhile (measured both ways and printed; only a
//! generous bound is asserted, the machine is shared).

mod common;

use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkio::{Completion, ReqFlags};
use common::httpstore::HttpStore;
use common::*;

const MIB: usize = 1 << 20;
const CHUNK: u64 = 256 << 10;
const IMAGE: usize = 32 * MIB;
const QUEUES: usize = 4;
const QUEUE_SIZE: usize = 1024;
const READS: usize = QUEUES * QUEUE_SIZE;
/// The README's bound on what one disk under a hostile client adds to the
/// daemon's own (anonymous) memory: see "Limits a guest cannot break".
const DOCUMENTED_BOUND: u64 = 32 * MIB as u64;

/// (VmRSS, RssAnon, RssShmem) of a process, in bytes.
fn rss(pid: u32) -> (u64, u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .map_or(0, |v| v.parse::<u64>().unwrap() * 1024)
    };
    (field("VmRSS:"), field("RssAnon:"), field("RssShmem:"))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[test]
fn thousands_of_outstanding_misses_stay_under_the_memory_bound_and_another_disk_keeps_its_latency() {
    let dir = tmpdir();
    let image_path = path_of(&dir, "image.raw");
    let image = random_file(&image_path, IMAGE, 21);
    let store = dir.path().join("store");
    import(&image_path, &store, "img", CHUNK);
    let http = HttpStore::start(store);
    let calm_base = path_of(&dir, "calm.raw");
    let calm_data = random_file(&calm_base, 16 * MIB, 22);
    let hog_socket = dir.path().join("hog.sock");
    let hog = format!(
        "name=hog,socket={},overlay={},image=img,queues={QUEUES}",
        hog_socket.display(),
        dir.path().join("hog.overlay").display()
    );
    let calm = disk_spec("calm", dir.path(), &calm_base, "");
    let daemon = Daemon::start(&[
        "--store".into(),
        http.url.clone(),
        "--cache-dir".into(),
        dir.path().join("cache").display().to_string(),
        "--fill-rate".into(),
        "0".into(),
        "--disk".into(),
        hog,
        "--disk".into(),
        calm,
    ]);
    let pid = daemon.child.id();
    wait_for_socket(&hog_socket);
    let mut c = loop {
        match Client::try_connect_sized(&hog_socket, QUEUES, READS * 4096, Some(QUEUE_SIZE as i32)) {
            Ok(c) => break c,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };

    // The other disk's client reads 4 KiB at random, one at a time, the whole while.
    let stop = Arc::new(AtomicBool::new(false));
    let epoch = Instant::now();
    let calm_thread = {
        let (stop, socket) = (stop.clone(), dir.path().join("calm.sock"));
        std::thread::spawn(move || {
            let mut c = Client::connect(&socket, 1, 4096);
            let mut lat = Vec::new();
            let mut x = 0x9e37_79b9u64;
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let offset = (x % (16 * MIB as u64 / 4096)) * 4096;
                let t = Instant::now();
                let r = c.run(&[Op::Read {
                    offset,
                    len: 4096,
                    buf: 0,
                }]);
                lat.push((t - epoch, t.elapsed(), r[0], offset));
                assert!(c.buf()[..4096] == calm_data[offset as usize..offset as usize + 4096]);
                std::thread::sleep(Duration::from_millis(2));
            }
            lat
        })
    };
    std::thread::sleep(Duration::from_secs(3));
    let (base_rss, base_anon, base_shmem) = rss(pid);

    // Every read on its own chunk in turn, so the waiting ones want as many
    // chunks as they can; the store takes 300 ms per chunk.
    http.set_delay(Duration::from_millis(300));
    let chunks = IMAGE as u64 / CHUNK;
    let offset_of = |i: usize| (i as u64 % chunks) * CHUNK + (i as u64 / chunks) * 4096;
    let base = c.region.addr;
    let hog_start = Instant::now();
    for i in 0..READS {
        let q = &mut c.queues[i % QUEUES];
        q.read(offset_of(i), (base + i * 4096) as *mut u8, 4096, i, ReqFlags::empty());
    }
    let mut results = vec![None; READS];
    let mut done = 0;
    let mut comps: Vec<MaybeUninit<Completion>> = (0..256).map(|_| MaybeUninit::uninit()).collect();
    let (mut max_rss, mut max_anon, mut max_shmem, mut max_inflight, mut samples) = (0u64, 0u64, 0u64, 0u64, 0);
    let mut last_sample = Instant::now() - Duration::from_secs(1);
    while done < READS {
        assert!(
            hog_start.elapsed() < Duration::from_secs(180),
            "only {done} of {READS} reads completed"
        );
        for q in c.queues.iter_mut() {
            let n = q.do_io(&mut comps, 0, None, None).unwrap();
            for cm in &comps[..n] {
                // SAFETY: do_io initialised the first n completions.
                let cm = unsafe { cm.assume_init_read() };
                results[cm.user_data] = Some(cm.ret);
                done += 1;
            }
        }
        if last_sample.elapsed() >= Duration::from_millis(100) {
            last_sample = Instant::now();
            let (r, a, s) = rss(pid);
            max_rss = max_rss.max(r);
            max_anon = max_anon.max(a);
            max_shmem = max_shmem.max(s);
            let status = daemon.status();
            let inflight = status["disks"]
                .as_array()
                .unwrap()
                .iter()
                .find(|d| d["name"] == "hog")
                .map_or(0, |d| d["inflight"].as_u64().unwrap_or(0));
            max_inflight = max_inflight.max(inflight);
            samples += 1;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let hog_secs = hog_start.elapsed();
    let hog_window = (hog_start - epoch, hog_start - epoch + hog_secs);
    stop.store(true, Ordering::Relaxed);
    let lat = calm_thread.join().unwrap();

    assert!(results.iter().all(|r| *r == Some(0)), "a hog read failed");
    for i in 0..READS {
        let o = offset_of(i) as usize;
        assert!(c.buf()[i * 4096..(i + 1) * 4096] == image[o..o + 4096], "hog read {i}");
    }
    assert!(lat.iter().all(|l| l.2 == 0), "a calm read failed");

    let split = |during: bool| {
        let mut v: Vec<Duration> = lat
            .iter()
            .filter(|l| (l.0 >= hog_window.0 && l.0 < hog_window.1) == during)
            .map(|l| l.1)
            .collect();
        v.sort();
        v
    };
    let (idle, busy) = (split(false), split(true));
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mb = |b: u64| b as f64 / MIB as f64;
    eprintln!(
        "hog: {READS} reads of 4 KiB on {chunks} chunks, {QUEUES} queues of {QUEUE_SIZE}, done in {:.1} s; \
         at most {max_inflight} waiting off the workers (cap {}), {samples} samples",
        hog_secs.as_secs_f64(),
        streamblk::vhost::MAX_WAITING_REQUESTS
    );
    eprintln!(
        "daemon VmRSS {:.1} MiB before, max {:.1} MiB during (+{:.1}); RssAnon {:.1} -> max {:.1} MiB (+{:.1}, bound {:.0}); \
         RssShmem (guest memory mapped) {:.1} -> max {:.1} MiB",
        mb(base_rss),
        mb(max_rss),
        mb(max_rss.saturating_sub(base_rss)),
        mb(base_anon),
        mb(max_anon),
        mb(max_anon.saturating_sub(base_anon)),
        mb(DOCUMENTED_BOUND),
        mb(base_shmem),
        mb(max_shmem),
    );
    eprintln!(
        "other disk's 4 KiB reads: idle p50 {:.3} ms p99 {:.3} ms ({} reads); under the hog p50 {:.3} ms p99 {:.3} ms ({} reads)",
        ms(percentile(&idle, 0.5)),
        ms(percentile(&idle, 0.99)),
        idle.len(),
        ms(percentile(&busy, 0.5)),
        ms(percentile(&busy, 0.99)),
        busy.len()
    );

    assert!(samples > 3, "the hog was too quick to measure");
    // Each queue looks at the cap before it pops: queues popping at once
    // may pass it by one request each.
    assert!(
        max_inflight <= (streamblk::vhost::MAX_WAITING_REQUESTS + QUEUES - 1) as u64,
        "{max_inflight} requests waiting, over the cap"
    );
    assert!(
        max_anon.saturating_sub(base_anon) <= DOCUMENTED_BOUND,
        "the daemon's own memory grew by {:.1} MiB",
        mb(max_anon - base_anon)
    );
    // Guest memory the daemon maps (the client's rings and buffers) shows in
    // VmRSS too: at most the client's region and rings on top of the bound.
    assert!(max_rss.saturating_sub(base_rss) <= DOCUMENTED_BOUND + (READS * 4096 + 4 * MIB) as u64);
    assert!(!busy.is_empty(), "no reads of the other disk during the hog");
    assert!(
        percentile(&busy, 0.99) < Duration::from_millis(250),
        "the other disk's p99 read latency under the hog is {:.1} ms",
        ms(percentile(&busy, 0.99))
    );
}
