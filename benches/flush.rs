//! FLUSH latency of the overlay as it grows, on the real file system.
//!
//! One disk, the way a guest drives it: a sparse local base (8 GiB, or
//! larger if the marks need it) and its overlay in a temp dir. 4 KiB writes
//! go to distinct every-other blocks in random order, so each write is a run
//! of its own (a maximal range of consecutive written blocks) and the journal
//! and the data file's extent map both grow by one per write; every
//! `FLUSH_BENCH_EVERY` writes a FLUSH, timed. At each mark (a number of
//! runs) the benchmark reports p50, p99 and max of the last
//! `FLUSH_BENCH_WINDOW` flushes before it, the slowest flush and the slowest
//! write since the previous mark (a journal compaction runs inside whichever
//! request tips the journal over, usually a write), the journal's size and
//! how often it was compacted. Run on demand, never in CI:
//!
//! ```text
//! cargo bench --bench flush
//! ```
//!
//! Environment: `FLUSH_BENCH_MARKS` (`10000,100000,1000000`),
//! `FLUSH_BENCH_EVERY` (64 writes per flush), `FLUSH_BENCH_WINDOW` (200
//! flushes), `FLUSH_BENCH_DIR` (where the temp dir goes; default the system
//! temp dir; it needs 4 KiB per run of the largest mark), `FLUSH_BENCH_SEED`.
//!
//! The last line times the removal of the overlay: each run is an extent of
//! the data file, and on a file system mounted with `discard` freeing each is
//! a synchronous discard (about 20 minutes for 1M runs on a virtio disk).
//! With `FLUSH_BENCH_EVERY` 64, the journal grows by 1 + 1/64 slots per run
//! and is first compacted past 2^20 slots, at about 1.03M runs: add a mark
//! such as 1040000 to see a compaction.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use streamblk::engine::{BlockIdx, Disk, IoRange, LocalBase, Status, BLOCK_SIZE};

/// The disk is at least this large: 2 Mi blocks, so 1 Mi possible runs.
const MIN_DISK_SIZE: u64 = 8 << 30;

/// The benchmark's temp dir, removed however the benchmark ends.
static DIR: Mutex<Option<PathBuf>> = Mutex::new(None);

fn remove_dir() {
    if let Some(dir) = DIR.lock().unwrap_or_else(|e| e.into_inner()).take() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

fn fail(msg: &str) -> ! {
    remove_dir();
    eprintln!("flush: {msg}");
    std::process::exit(1);
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| fail(&format!("{name}={v}: not a valid value"))),
        Err(_) => default,
    }
}

/// Removes the temp dir (gigabytes at the larger marks) on SIGINT, SIGTERM
/// or SIGHUP. Call before any other thread starts: they inherit the mask.
fn cleanup_on_signals() {
    // SAFETY: a zeroed sigset_t is a valid argument to sigemptyset, which
    // initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: sigemptyset/sigaddset/pthread_sigmask on a local, initialised
    // set; the old mask is not asked for.
    unsafe {
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    std::thread::spawn(move || {
        let mut sig: libc::c_int = 0;
        // SAFETY: sigwait on the set blocked above, with a valid out pointer.
        if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
            remove_dir();
            eprintln!("flush: interrupted (signal {sig}); temp dir removed");
            std::process::exit(128 + sig);
        }
    });
}

/// xorshift64*, as in the hot-path benchmark.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What one stretch of `every` writes and the flush after it measured.
#[derive(Clone, Copy)]
struct Batch {
    /// Runs in the overlay when the flush started.
    runs: u64,
    flush_ns: u64,
    /// The slowest write of the stretch.
    write_ns: u64,
    /// The journal was replaced (compacted) during the stretch or its flush.
    compacted: bool,
}

/// What the benchmark reports at one mark.
struct MarkReport {
    mark: u64,
    /// Flushes in the window and the runs at the first and last of them.
    window: (usize, u64, u64),
    p50: u64,
    p99: u64,
    max: u64,
    /// Since the previous mark: the slowest flush and write, with the runs
    /// at which they happened.
    phase_flush: (u64, u64),
    phase_write: (u64, u64),
    /// Compactions since the start, and the batches they fell in.
    compactions: Vec<Batch>,
    journal_len: u64,
    journal_alloc: u64,
    data_alloc: u64,
    elapsed: Duration,
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    let n = sorted.len();
    sorted[((n as f64 * p) as usize).min(n - 1)]
}

fn fmt_ns(ns: u64) -> String {
    if ns >= 100_000_000 {
        format!("{:.0} ms", ns as f64 / 1e6)
    } else if ns >= 1_000_000 {
        format!("{:.1} ms", ns as f64 / 1e6)
    } else {
        format!("{:.0} µs", ns as f64 / 1e3)
    }
}

fn fmt_bytes(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    } else if b >= 1 << 20 {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.0} KiB", b as f64 / 1024.0)
    }
}

fn fmt_runs(n: u64) -> String {
    if n >= 1_000_000 && n.is_multiple_of(1_000_000) {
        format!("{}M", n / 1_000_000)
    } else if n >= 1000 && n.is_multiple_of(1000) {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}

/// The file system under `dir`, by name where it is a common one.
fn fs_name(dir: &Path) -> String {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return "?".into();
    };
    // SAFETY: a zeroed statfs is a valid out buffer.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs(2) with a NUL-terminated path and a valid out pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return "?".into();
    }
    match st.f_type as u64 {
        0xef53 => "ext4".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683e => "btrfs".into(),
        0x0102_1994 => "tmpfs".into(),
        0x2fc1_2fc1 => "zfs".into(),
        0x794c_7630 => "overlayfs".into(),
        t => format!("f_type {t:#x}"),
    }
}

/// Size and space allocated of a file.
fn sizes(path: &Path) -> (u64, u64, u64) {
    let m = std::fs::metadata(path).unwrap_or_else(|e| fail(&format!("stat {}: {e}", path.display())));
    (m.len(), m.blocks() * 512, m.ino())
}

fn main() {
    cleanup_on_signals();
    let marks: Vec<u64> = std::env::var("FLUSH_BENCH_MARKS")
        .unwrap_or_else(|_| "10000,100000,1000000".into())
        .split(',')
        .map(|m| {
            m.trim()
                .parse()
                .unwrap_or_else(|_| fail(&format!("FLUSH_BENCH_MARKS: {m:?} is not a number")))
        })
        .collect();
    if marks.is_empty() || marks[0] == 0 || marks.windows(2).any(|w| w[0] >= w[1]) {
        fail("FLUSH_BENCH_MARKS must be increasing positive numbers of runs");
    }
    let every: u64 = env_or("FLUSH_BENCH_EVERY", 64);
    let window: usize = env_or("FLUSH_BENCH_WINDOW", 200);
    let seed: u64 = env_or("FLUSH_BENCH_SEED", 0x5eed);
    if every == 0 || window == 0 {
        fail("FLUSH_BENCH_EVERY and FLUSH_BENCH_WINDOW must be positive");
    }
    let last_mark = *marks.last().unwrap();
    // Every other block is a candidate: writes never touch a neighbour.
    let disk_size = MIN_DISK_SIZE.max(2 * last_mark * BLOCK_SIZE);
    let candidates = disk_size / BLOCK_SIZE / 2;

    let parent = std::env::var_os("FLUSH_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = parent.join(format!("streamblk-flush-{}", std::process::id()));
    std::fs::create_dir(&dir).unwrap_or_else(|e| fail(&format!("create {}: {e}", dir.display())));
    *DIR.lock().unwrap_or_else(|e| e.into_inner()) = Some(dir.clone());
    let base_path = dir.join("base.raw");
    File::create(&base_path)
        .and_then(|f| f.set_len(disk_size))
        .unwrap_or_else(|e| fail(&format!("create {}: {e}", base_path.display())));
    let base = LocalBase::open(&base_path).unwrap_or_else(|e| fail(&format!("open base: {e}")));
    let overlay_dir = dir.join("overlay");
    let disk = Disk::open(Arc::new(base), &overlay_dir, false).unwrap_or_else(|e| fail(&format!("open disk: {e}")));
    let journal = overlay_dir.join("journal");
    let data = overlay_dir.join("data");
    let fs = fs_name(&dir);
    eprintln!(
        "flush: {} disk, overlay in {} ({fs}); marks {marks:?}, a flush every {every} writes",
        fmt_bytes(disk_size),
        dir.display()
    );

    // The first `last_mark` of a random permutation of the candidates
    // (partial Fisher-Yates): distinct, in random order.
    let mut rng = Rng(seed | 1);
    let mut order: Vec<u32> = (0..candidates as u32).collect();
    for i in 0..last_mark as usize {
        let j = i + rng.below(candidates - i as u64) as usize;
        order.swap(i, j);
    }
    order.truncate(last_mark as usize);
    order.shrink_to_fit();

    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    let mut batches: Vec<Batch> = Vec::with_capacity((last_mark / every + 1) as usize);
    let mut reports = Vec::new();
    let mut ino = sizes(&journal).2;
    let mut batch_write_ns = 0u64;
    let mut phase_start_batch = 0usize;
    let progress_step = (last_mark / 20).max(1);
    let start = Instant::now();
    let mut next_mark = 0usize;
    for (i, &cand) in order.iter().enumerate() {
        let runs = i as u64 + 1;
        let block = BlockIdx(2 * cand as u64);
        buf[..8].copy_from_slice(&block.0.to_le_bytes());
        buf[8..16].copy_from_slice(&seed.to_le_bytes());
        let t = Instant::now();
        let status = disk
            .write(block.offset(), IoRange::from_slice(&mut buf))
            .unwrap_or_else(|e| fail(&format!("write: {}", streamblk::DisplayChain(&e))));
        batch_write_ns = batch_write_ns.max(t.elapsed().as_nanos() as u64);
        if status != Status::Done {
            fail("a write over a local base asked for a fetch");
        }

        if runs.is_multiple_of(every) {
            let t = Instant::now();
            disk.flush()
                .unwrap_or_else(|e| fail(&format!("flush: {}", streamblk::DisplayChain(&e))));
            let flush_ns = t.elapsed().as_nanos() as u64;
            // A compaction installs a new journal file: a new inode.
            let now_ino = sizes(&journal).2;
            batches.push(Batch {
                runs,
                flush_ns,
                write_ns: batch_write_ns,
                compacted: now_ino != ino,
            });
            ino = now_ino;
            batch_write_ns = 0;
        }
        if runs.is_multiple_of(progress_step) && marks.get(next_mark) != Some(&runs) {
            let mut recent: Vec<u64> = batches.iter().rev().take(window).map(|b| b.flush_ns).collect();
            recent.sort_unstable();
            eprintln!(
                "flush:   {runs} runs, {:.1}s, recent flush p50 {}",
                start.elapsed().as_secs_f64(),
                if recent.is_empty() {
                    "-".into()
                } else {
                    fmt_ns(pct(&recent, 0.5))
                }
            );
        }

        if marks.get(next_mark) == Some(&runs) {
            let elapsed = start.elapsed();
            // Every write is a run of its own; check that the overlay agrees.
            let map = disk.overlay().map();
            let counted = map.runs(BlockIdx(0), map.blocks()).count() as u64;
            if counted != runs {
                fail(&format!("the overlay has {counted} runs after {runs} writes"));
            }
            if batches.is_empty() {
                fail(&format!(
                    "no flush before the mark of {runs} runs: FLUSH_BENCH_EVERY={every} is larger"
                ));
            }
            let w = &batches[batches.len().saturating_sub(window)..];
            let mut lat: Vec<u64> = w.iter().map(|b| b.flush_ns).collect();
            lat.sort_unstable();
            let phase = &batches[phase_start_batch..];
            let slowest = |f: fn(&Batch) -> u64| {
                phase
                    .iter()
                    .max_by_key(|b| f(b))
                    .map(|b| (f(b), b.runs))
                    .unwrap_or((0, 0))
            };
            let (journal_len, journal_alloc, _) = sizes(&journal);
            let (_, data_alloc, _) = sizes(&data);
            let report = MarkReport {
                mark: runs,
                window: (w.len(), w[0].runs, w[w.len() - 1].runs),
                p50: pct(&lat, 0.50),
                p99: pct(&lat, 0.99),
                max: *lat.last().unwrap(),
                phase_flush: slowest(|b| b.flush_ns),
                phase_write: slowest(|b| b.write_ns),
                compactions: batches.iter().filter(|b| b.compacted).copied().collect(),
                journal_len,
                journal_alloc,
                data_alloc,
                elapsed,
            };
            eprintln!(
                "flush: {} runs after {:.1}s: flush p50 {} p99 {} max {}",
                runs,
                elapsed.as_secs_f64(),
                fmt_ns(report.p50),
                fmt_ns(report.p99),
                fmt_ns(report.max)
            );
            reports.push(report);
            phase_start_batch = batches.len();
            next_mark += 1;
        }
    }
    let total = start.elapsed();
    drop(disk);

    println!();
    println!("## Overlay FLUSH latency as the overlay grows");
    println!();
    println!(
        "`cargo bench --bench flush` (FLUSH_BENCH_MARKS={}, FLUSH_BENCH_EVERY={every}, FLUSH_BENCH_WINDOW={window}); \
         {} sparse local base, overlay on {fs}; 4 KiB writes to distinct random every-other blocks (a run each), \
         a FLUSH every {every} writes. p50, p99, max: the last {window} flushes before the mark (how many, and the \
         runs at the first and the last of them, in brackets). Slowest flush and write: since the previous mark, \
         with the runs at which they happened; a write's time includes its journal append, and a compaction if it \
         tipped the journal over.",
        marks.iter().map(|m| m.to_string()).collect::<Vec<_>>().join(","),
        fmt_bytes(disk_size),
    );
    println!();
    println!(
        "| row | p50 | p99 | max | slowest flush since previous mark | slowest write since previous mark | \
         journal size (allocated) | data allocated | compactions so far | elapsed |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in &reports {
        println!(
            "| flush after {} runs ({} flushes, runs {}..{}) | {} | {} | {} | {} (at {}) | {} (at {}) | {} ({}) | {} | {} | {:.1} s |",
            fmt_runs(r.mark),
            r.window.0,
            r.window.1,
            r.window.2,
            fmt_ns(r.p50),
            fmt_ns(r.p99),
            fmt_ns(r.max),
            fmt_ns(r.phase_flush.0),
            r.phase_flush.1,
            fmt_ns(r.phase_write.0),
            r.phase_write.1,
            fmt_bytes(r.journal_len),
            fmt_bytes(r.journal_alloc),
            fmt_bytes(r.data_alloc),
            r.compactions.len(),
            r.elapsed.as_secs_f64(),
        );
    }
    println!();
    let all = &reports.last().unwrap().compactions;
    if all.is_empty() {
        println!("No journal compaction happened during the run.");
    } else {
        for b in all {
            println!(
                "Journal compacted in the stretch ending at {} runs: slowest write of it {}, its flush {}.",
                b.runs,
                fmt_ns(b.write_ns),
                fmt_ns(b.flush_ns)
            );
        }
    }
    println!(
        "Total: {} writes, {} flushes in {:.1} s.",
        last_mark,
        batches.len(),
        total.as_secs_f64()
    );
    // Freeing a data file of this many extents can take long (on a file
    // system mounted with `discard`, a synchronous discard per extent).
    eprintln!("flush: removing {}", dir.display());
    let t = Instant::now();
    remove_dir();
    println!(
        "Removing the overlay ({} data allocated) took {:.1} s.",
        fmt_bytes(reports.last().unwrap().data_alloc),
        t.elapsed().as_secs_f64()
    );
}
