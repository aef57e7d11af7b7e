//! The durability promise on real file systems, against the real daemon and
//! the libblkio client: a full ext4 (ENOSPC) and power cuts through a FUSE
//! file system that drops unsynced data. Root only; nothing is skipped: a
//! missing prerequisite fails the test with the reason.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::mem::MaybeUninit;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkio::{Completion, ReqFlags};
use common::powercutfs::{Cut, PowerCutMount};
use common::*;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;
const SECTOR: u64 = 512;

// ---------------------------------------------------------------------------
// Shared helpers

/// Content of write `tag` at unit (block or sector) `unit`: the tag, the
/// unit's index, then bytes derived from both, so a unit read back names the
/// write it came from and a misplaced or torn one matches nothing. Tag 0 is
/// the base.
fn fill_pattern(buf: &mut [u8], tag: u64, unit: u64) {
    buf[..8].copy_from_slice(&tag.to_le_bytes());
    buf[8..16].copy_from_slice(&unit.to_le_bytes());
    let mut x = (tag.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ unit.wrapping_mul(0xd6e8_feb8_6659_fd93)) | 1;
    for w in buf[16..].chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
}

/// The tag whose pattern `buf` is at `unit`, if it is one.
fn decode(buf: &[u8], unit: u64, scratch: &mut Vec<u8>) -> Option<u64> {
    let tag = u64::from_le_bytes(buf[..8].try_into().unwrap());
    if u64::from_le_bytes(buf[8..16].try_into().unwrap()) != unit {
        return None;
    }
    scratch.resize(buf.len(), 0);
    fill_pattern(scratch, tag, unit);
    (scratch[..] == *buf).then_some(tag)
}

/// A base file of `len` bytes whose every `unit`-sized piece is pattern 0.
fn pattern_base(path: &Path, len: u64, unit: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut buf = vec![0u8; unit as usize];
    for u in 0..len / unit {
        fill_pattern(&mut buf, 0, u);
        f.write_all(&buf).unwrap();
    }
    f.into_inner().unwrap().sync_all().unwrap();
}

fn require_root() {
    // SAFETY: geteuid(2) has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(uid, 0, "these tests mount file systems: run them as root");
}

/// Runs a command, panicking with its output if it cannot run or fails.
fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd} (is it installed?): {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Bytes free for new data (the ext4 here has no reserve for root).
fn free_bytes(path: &Path) -> u64 {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut st = MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: statvfs(3) with a valid path and a buffer of the right type.
    let r = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    assert_eq!(r, 0, "statvfs {}: {}", path.display(), std::io::Error::last_os_error());
    // SAFETY: statvfs succeeded, so it filled the buffer.
    let st = unsafe { st.assume_init() };
    st.f_bavail * st.f_frsize
}

/// The last lines of a daemon's log, for failure messages.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(20)..].join("\n");
    format!("daemon log {} (last lines):\n{tail}", log.display())
}

/// Starts `streamblk serve ARGS` with its log in `log`. With `boot_id`, the
/// daemon runs in a mount namespace of its own where that file stands in for
/// /proc/sys/kernel/random/boot_id: a simulated power cut is a new boot, and
/// the daemon must see it as one (it trusts unsynced data only within a boot).
fn start_daemon(args: &[String], log: &Path, boot_id: Option<&Path>) -> Daemon {
    static N: AtomicU32 = AtomicU32::new(0);
    let control = std::env::temp_dir().join(format!(
        "streamblk-dfs-ctl-{}-{}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let mut cmd = Command::new(BIN);
    cmd.arg("serve")
        .arg("--control-socket")
        .arg(&control)
        .args(args)
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    if let Some(boot_id) = boot_id {
        in_boot(&mut cmd, boot_id);
    }
    let child = cmd.spawn().expect("spawn streamblk serve");
    Daemon {
        child,
        args: args.to_vec(),
        control,
        // The test reads its own log file.
        log: None,
    }
}

/// Makes `cmd` run in a mount namespace of its own where the file `boot_id`
/// stands in for /proc/sys/kernel/random/boot_id.
fn in_boot<'a>(cmd: &'a mut Command, boot_id: &Path) -> &'a mut Command {
    let src = std::ffi::CString::new(boot_id.as_os_str().as_bytes()).unwrap();
    let dst = std::ffi::CString::new("/proc/sys/kernel/random/boot_id").unwrap();
    let root = std::ffi::CString::new("/").unwrap();
    let setup = move || -> std::io::Result<()> {
        let (null, no_data) = (std::ptr::null(), std::ptr::null());
        // SAFETY: raw system calls on NUL-terminated strings made before the
        // fork; nothing here allocates or takes a lock.
        unsafe {
            if libc::unshare(libc::CLONE_NEWNS) != 0
                || libc::mount(null, root.as_ptr(), null, libc::MS_REC | libc::MS_PRIVATE, no_data) != 0
                || libc::mount(src.as_ptr(), dst.as_ptr(), null, libc::MS_BIND, no_data) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // SAFETY: the closure runs in the child between fork and exec and only
    // makes async-signal-safe system calls (see above).
    unsafe { cmd.pre_exec(setup) }
}

/// Connects to a daemon's disk, failing at once (with its log) if the
/// daemon exits instead of serving.
fn connect(daemon: &mut Daemon, socket: &Path, queues: usize, region: usize, log: &Path) -> Client {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = daemon.child.try_wait().unwrap() {
            panic!("daemon exited ({status}) instead of serving\n{}", log_tail(log));
        }
        match Client::try_connect(socket, queues, region) {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => panic!("connect to {}: {e}\n{}", socket.display(), log_tail(log)),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

// ---------------------------------------------------------------------------
// 1. ENOSPC on a real ext4

/// A small ext4 file system in a file, loop-mounted; unmounted and removed
/// when dropped, panic or not.
struct Ext4Mount {
    image: PathBuf,
    dir: PathBuf,
}

impl Ext4Mount {
    fn new(image: &Path, dir: &Path, size: u64) -> Ext4Mount {
        std::fs::File::create(image).unwrap().set_len(size).unwrap();
        std::fs::create_dir_all(dir).unwrap();
        // No root reserve (the daemon is root and would get it), 4 KiB
        // blocks like a real disk, everything initialised now so no lazy
        // init thread takes space behind the test's back.
        run(
            "mkfs.ext4",
            &[
                "-q",
                "-F",
                "-m",
                "0",
                "-b",
                "4096",
                "-E",
                "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
                image.to_str().unwrap(),
            ],
        );
        run("mount", &["-o", "loop", image.to_str().unwrap(), dir.to_str().unwrap()]);
        Ext4Mount {
            image: image.to_path_buf(),
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for Ext4Mount {
    fn drop(&mut self) {
        let c = std::ffi::CString::new(self.dir.as_os_str().as_bytes()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // SAFETY: umount2(2) with a valid NUL-terminated path.
            if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EBUSY) || Instant::now() > deadline {
                // Detach it at least; the loop device goes with its last user.
                // SAFETY: as above.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = std::fs::remove_file(&self.image);
    }
}

/// What the disk holds, block by block, as the client saw its requests end.
struct BlockModel {
    /// The tag of the last write that completed (0: the base).
    current: Vec<u64>,
    /// The tag each block had at the last completed flush.
    durable: Vec<u64>,
    /// Writes that failed after `current`: the block may hold any of them.
    failed_since: HashMap<u64, Vec<u64>>,
}

impl BlockModel {
    /// Checks every block of the disk; `durable_only` compares with the
    /// flushed state instead of the last completed writes.
    fn check(&self, c: &mut Client, what: &str, durable_only: bool) {
        const CHUNK: u64 = MIB;
        let expect = if durable_only { &self.durable } else { &self.current };
        let mut bad = Vec::new();
        let mut scratch = Vec::new();
        for chunk in 0..c.capacity / CHUNK {
            let r = c.run(&[Op::Read {
                offset: chunk * CHUNK,
                len: CHUNK as usize,
                buf: 0,
            }]);
            assert_eq!(r[0], 0, "{what}: read at {} failed ({})", chunk * CHUNK, r[0]);
            let data = c.buf()[..CHUNK as usize].to_vec();
            for (i, got) in data.chunks_exact(BLOCK as usize).enumerate() {
                let b = chunk * (CHUNK / BLOCK) + i as u64;
                let found = decode(got, b, &mut scratch);
                let maybe = self.failed_since.get(&b).map(Vec::as_slice).unwrap_or(&[]);
                if found != Some(expect[b as usize]) && !found.is_some_and(|t| maybe.contains(&t)) {
                    bad.push(format!(
                        "block {b}: want write {} (or a failed one {maybe:?}), found {}",
                        expect[b as usize],
                        found.map_or("bytes no write put there".to_string(), |t| format!("write {t}"))
                    ));
                }
            }
        }
        assert!(
            bad.is_empty(),
            "{what}: {} blocks read wrong, e.g.:\n{}",
            bad.len(),
            bad[..bad.len().min(10)].join("\n")
        );
    }
}

/// Writes 64 KiB extents (one tag each, 8 in flight); returns each
/// extent's tag and result (0 or -errno) and updates the model.
fn write_extents(c: &mut Client, m: &mut BlockModel, extents: &[u64], next_tag: &mut u64) -> Vec<(u64, u64, i32)> {
    const EXTENT: u64 = 64 * KIB;
    let mut ops = Vec::new();
    let mut tags = Vec::new();
    for (i, &e) in extents.iter().enumerate() {
        let tag = *next_tag;
        *next_tag += 1;
        tags.push(tag);
        let buf_at = MIB as usize + i * EXTENT as usize;
        for j in 0..EXTENT / BLOCK {
            let b = e * (EXTENT / BLOCK) + j;
            let at = buf_at + (j * BLOCK) as usize;
            fill_pattern(&mut c.buf()[at..at + BLOCK as usize], tag, b);
        }
        ops.push(Op::Write {
            offset: e * EXTENT,
            len: EXTENT as usize,
            buf: buf_at,
        });
    }
    let results = c.run_timeout(&ops, Duration::from_secs(60));
    let mut out = Vec::new();
    for ((&e, &tag), r) in extents.iter().zip(&tags).zip(results) {
        let r = r.unwrap_or_else(|| panic!("write of extent {e} did not complete within 60 s"));
        for j in 0..EXTENT / BLOCK {
            let b = e * (EXTENT / BLOCK) + j;
            if r == 0 {
                m.current[b as usize] = tag;
                m.failed_since.remove(&b);
            } else {
                m.failed_since.entry(b).or_default().push(tag);
            }
        }
        out.push((e, tag, r));
    }
    out
}

fn flush(c: &mut Client) -> i32 {
    c.run_timeout(&[Op::Flush], Duration::from_secs(60))[0].expect("flush did not complete within 60 s")
}

/// A guest fills the host's file system: the writes that find no space fail
/// with IOERR (-EIO at the client), the disk goes on serving everything it
/// had, writes work again once space is freed, and after a restart every
/// write that completed before a completed flush reads back exactly.
#[test]
fn full_disk_fails_writes_with_ioerr_and_recovers() {
    require_root();
    const DISK: u64 = 256 * MIB;
    const FS: u64 = 80 * MIB;
    const BALLAST: u64 = 8 * MIB;
    // Flushes stop once free space falls below this, so what meets ENOSPC
    // is a data write, never a flush's journal append: DESIGN.md makes a
    // failed journal append fail-stop (IOERR until a restart), and this test
    // wants the disk to recover in place.
    const MARGIN: u64 = 4 * MIB;
    const EXTENT: u64 = 64 * KIB;
    const BATCH: usize = 8;
    let started = Instant::now();

    let dir = tmpdir();
    let base = path_of(&dir, "base.raw");
    pattern_base(&base, DISK, BLOCK);
    let mnt = Ext4Mount::new(&path_of(&dir, "fs.img"), &path_of(&dir, "mnt"), FS);
    // Ballast to free later: real blocks, durable before the daemon starts.
    let ballast = mnt.dir.join("ballast");
    {
        let mut f = std::fs::File::create(&ballast).unwrap();
        let chunk = vec![0x5au8; MIB as usize];
        for _ in 0..BALLAST / MIB {
            f.write_all(&chunk).unwrap();
        }
        f.sync_all().unwrap();
    }
    let overlay = mnt.dir.join("vm.overlay");
    let socket = path_of(&dir, "vm.sock");
    let spec = format!(
        "name=vm,socket={},overlay={},base={},queues=2",
        socket.display(),
        overlay.display(),
        base.display()
    );
    let args = vec!["--disk".to_string(), spec];
    let log = path_of(&dir, "daemon.log");
    let mut daemon = start_daemon(&args, &log, None);
    let region = (MIB + BATCH as u64 * EXTENT) as usize;
    let mut c = connect(&mut daemon, &socket, 2, region, &log);
    assert_eq!(c.capacity, DISK);

    let blocks = (DISK / BLOCK) as usize;
    let mut m = BlockModel {
        current: vec![0; blocks],
        durable: vec![0; blocks],
        failed_since: HashMap::new(),
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x000e_059c);
    let mut order: Vec<u64> = (0..DISK / EXTENT).collect();
    order.shuffle(&mut rng);
    let mut order = order.into_iter();
    let mut next_tag = 1u64;

    // Fill until writes fail.
    let (mut ok_writes, mut flushes) = (0usize, 0usize);
    let mut failed: Vec<(u64, u64, i32)> = Vec::new();
    let mut near_full = false;
    let mut batches_failing = 0;
    let mut free_at_first_failure = None;
    while failed.len() < 24 && batches_failing < 3 {
        let extents: Vec<u64> = order.by_ref().take(BATCH).collect();
        assert!(
            extents.len() == BATCH,
            "wrote the whole {} MiB disk into an {} MiB file system and no write failed",
            DISK / MIB,
            FS / MIB
        );
        let results = write_extents(&mut c, &mut m, &extents, &mut next_tag);
        let fails: Vec<_> = results.iter().filter(|r| r.2 != 0).copied().collect();
        ok_writes += results.len() - fails.len();
        if !fails.is_empty() {
            free_at_first_failure.get_or_insert_with(|| free_bytes(&mnt.dir));
            batches_failing += 1;
            failed.extend(fails);
        }
        if !near_full {
            if free_bytes(&mnt.dir) < MARGIN {
                near_full = true;
            } else {
                let r = flush(&mut c);
                assert_eq!(r, 0, "flush with {} MiB free failed ({r})", free_bytes(&mnt.dir) / MIB);
                m.durable.copy_from_slice(&m.current);
                flushes += 1;
            }
        }
    }
    let free = free_at_first_failure.unwrap();
    println!(
        "full: {ok_writes} writes of 64 KiB completed ({flushes} flushes), then {} failed; {} KiB free at the first failure",
        failed.len(),
        free / KIB
    );
    assert!(
        free < MARGIN + BATCH as u64 * EXTENT,
        "writes failed with {} MiB still free: not for lack of space",
        free / MIB
    );
    for &(e, tag, r) in &failed {
        assert_eq!(
            r,
            -libc::EIO,
            "write {tag} (extent {e}) on a full file system ended with {r}, not IOERR (-EIO)"
        );
    }

    // Full, the disk still serves: the daemon runs and everything reads back.
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "daemon died on ENOSPC\n{}",
        log_tail(&log)
    );
    m.check(&mut c, "while full", false);

    // Free space: writes work again, including the ones that failed.
    std::fs::remove_file(&ballast).unwrap();
    let fd = std::fs::File::open(&mnt.dir).unwrap();
    // SAFETY: syncfs(2) on an open descriptor; commits the freed blocks.
    assert_eq!(unsafe { libc::syncfs(std::os::unix::io::AsRawFd::as_raw_fd(&fd)) }, 0);
    drop(fd);
    assert!(
        free_bytes(&mnt.dir) > BALLAST / 2,
        "deleting the ballast freed no space"
    );
    let retry: Vec<u64> = failed
        .iter()
        .map(|f| f.0)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let fresh: Vec<u64> = order.by_ref().take(16).collect();
    let mut after = Vec::new();
    for batch in retry.chunks(BATCH).chain(fresh.chunks(BATCH)) {
        after.extend(write_extents(&mut c, &mut m, batch, &mut next_tag));
    }
    let still_failing: Vec<_> = after.iter().filter(|r| r.2 != 0).collect();
    assert!(
        still_failing.is_empty(),
        "with {} MiB free again, {} of {} writes still failed (e.g. extent {} with {}): the disk did not recover \
         from ENOSPC",
        free_bytes(&mnt.dir) / MIB,
        still_failing.len(),
        after.len(),
        still_failing[0].0,
        still_failing[0].2
    );
    let r = flush(&mut c);
    assert_eq!(r, 0, "flush after space was freed failed ({r})");
    m.durable.copy_from_slice(&m.current);
    m.check(&mut c, "after space was freed", false);

    // Restart: every write completed before the last flush is there.
    drop(c);
    assert!(
        daemon.terminate().success(),
        "daemon did not exit 0 on SIGTERM\n{}",
        log_tail(&log)
    );
    let log2 = path_of(&dir, "daemon2.log");
    let mut daemon = start_daemon(&args, &log2, None);
    let mut c = connect(&mut daemon, &socket, 2, region, &log2);
    m.check(&mut c, "after restart", true);
    let w = write_extents(&mut c, &mut m, &[order.next().unwrap()], &mut next_tag);
    assert_eq!(w[0].2, 0, "write after restart failed");
    assert_eq!(flush(&mut c), 0, "flush after restart failed");
    drop(c);
    drop(daemon);
    println!(
        "recovered: {} writes after freeing space, all flushed and read back after a restart ({:.1} s)",
        after.len(),
        started.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------
// 2. Power cuts through a FUSE file system that drops unsynced data

const PC_SECTORS: u64 = 8192; // a 4 MiB disk
const PC_CUTS: usize = 30;
const MAX_DEPTH: usize = 16;
const SLOT: u64 = 32 * KIB; // the largest write: 8 blocks
const READ_AT: usize = (MAX_DEPTH as u64 * SLOT) as usize;
/// The floor of a sector a cut already damaged: anything may be there until
/// a write to it is flushed (each damage is counted once).
const UNKNOWN: u64 = u64::MAX;

/// The client's knowledge of each sector across cuts.
struct SectorModel {
    /// The tag a completed flush guarantees (0: the base).
    floor: Vec<u64>,
    /// Tags of writes submitted after the floor's write, any of which the
    /// sector may hold instead.
    since: Vec<Vec<u64>>,
    inflight: Vec<bool>,
    /// (first sector, sectors) of write `tag`, at index `tag - 1`.
    writes: Vec<(u64, u64)>,
    /// Completions seen so far (a clock for "completed before the flush").
    seq: u64,
    /// Completed writes no completed flush covers yet: (seq, tag).
    completed: Vec<(u64, u64)>,
    flushed_writes: u64,
}

impl SectorModel {
    fn new() -> Self {
        SectorModel {
            floor: vec![0; PC_SECTORS as usize],
            since: vec![Vec::new(); PC_SECTORS as usize],
            inflight: vec![false; PC_SECTORS as usize],
            writes: Vec::new(),
            seq: 0,
            completed: Vec::new(),
            flushed_writes: 0,
        }
    }

    /// A random write on sectors no request in flight touches: whole
    /// blocks, runs of blocks, or 512-byte pieces that may straddle blocks.
    fn pick(&self, rng: &mut impl Rng) -> Option<(u64, u64)> {
        for _ in 0..32 {
            let (start, n) = match rng.gen_range(0..10) {
                0..5 => (rng.gen_range(0..PC_SECTORS / 8) * 8, 8),
                5..7 => {
                    let blocks = rng.gen_range(2..=8);
                    (rng.gen_range(0..=PC_SECTORS / 8 - blocks) * 8, blocks * 8)
                }
                _ => {
                    let n = rng.gen_range(1..=8);
                    (rng.gen_range(0..=PC_SECTORS - n), n)
                }
            };
            if !self.inflight[start as usize..(start + n) as usize].iter().any(|&b| b) {
                return Some((start, n));
            }
        }
        None
    }

    fn submitted(&mut self, start: u64, n: u64) -> u64 {
        self.writes.push((start, n));
        let tag = self.writes.len() as u64;
        for s in start..start + n {
            self.since[s as usize].push(tag);
            self.inflight[s as usize] = true;
        }
        tag
    }

    fn ended(&mut self, tag: u64, ok: bool) {
        let (start, n) = self.writes[tag as usize - 1];
        for s in start..start + n {
            self.inflight[s as usize] = false;
        }
        if ok {
            self.seq += 1;
            self.completed.push((self.seq, tag));
        }
    }

    /// A flush submitted when `covers` completions had been seen completed:
    /// those writes are durable now.
    fn flushed(&mut self, covers: u64) {
        let (done, rest): (Vec<_>, Vec<_>) = self.completed.iter().partition(|&&(seq, _)| seq <= covers);
        self.completed = rest;
        for (_, tag) in done {
            self.flushed_writes += 1;
            let (start, n) = self.writes[tag as usize - 1];
            for s in start..start + n {
                let since = &mut self.since[s as usize];
                if let Some(p) = since.iter().position(|&t| t == tag) {
                    self.floor[s as usize] = tag;
                    since.drain(..=p);
                }
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Pending {
    Write(u64),
    Flush { covers: u64 },
}

#[derive(Default)]
struct RoundStats {
    writes: u64,
    flushes: u64,
    errors: Vec<String>,
}

/// Keeps `depth` requests in flight over the client's queues (writes on
/// free sectors, and flushes while writes are outstanding) until `killed`
/// is set and the queues have gone quiet.
fn drive(c: &mut Client, m: &mut SectorModel, rng: &mut impl Rng, depth: usize, killed: &AtomicBool) -> RoundStats {
    let nq = c.queues.len();
    let base = c.region.addr;
    let mut slots: Vec<Option<(Pending, usize)>> = vec![None; depth];
    let mut outstanding = vec![0usize; nq];
    let mut completions: Vec<MaybeUninit<Completion>> = (0..64).map(|_| MaybeUninit::uninit()).collect();
    let mut stats = RoundStats::default();
    let mut next_q = 0;
    let mut quiet_since: Option<Instant> = None;
    loop {
        let dead = killed.load(Ordering::Acquire);
        if !dead {
            let mut writes_out = slots
                .iter()
                .flatten()
                .filter(|(p, _)| matches!(p, Pending::Write(_)))
                .count();
            let mut flushes_out = slots.iter().flatten().count() - writes_out;
            for (i, slot) in slots.iter_mut().enumerate() {
                if slot.is_some() {
                    continue;
                }
                let q = next_q % nq;
                if writes_out > 0 && flushes_out < 2 && rng.gen_bool(0.12) {
                    c.queues[q].flush(i, ReqFlags::empty());
                    *slot = Some((Pending::Flush { covers: m.seq }, q));
                    flushes_out += 1;
                } else if let Some((start, n)) = m.pick(rng) {
                    let tag = m.submitted(start, n);
                    let at = i * SLOT as usize;
                    for k in 0..n {
                        let o = at + (k * SECTOR) as usize;
                        fill_pattern(&mut c.buf()[o..o + SECTOR as usize], tag, start + k);
                    }
                    c.queues[q].write(
                        start * SECTOR,
                        (base + at) as *const u8,
                        (n * SECTOR) as usize,
                        i,
                        ReqFlags::empty(),
                    );
                    *slot = Some((Pending::Write(tag), q));
                    writes_out += 1;
                } else {
                    continue;
                }
                outstanding[q] += 1;
                next_q += 1;
            }
        }
        let mut got = Vec::new();
        for (q, queue) in c.queues.iter_mut().enumerate() {
            if outstanding[q] == 0 {
                continue;
            }
            if let Ok(n) = queue.do_io(&mut completions, 0, None, None) {
                for comp in &completions[..n] {
                    // SAFETY: do_io initialised the first n completions.
                    got.push(unsafe { comp.assume_init_read() });
                }
            }
        }
        if got.is_empty() {
            if let Some(q) = (0..nq).find(|&q| outstanding[q] > 0) {
                let mut t = Duration::from_millis(2);
                if let Ok(n) = c.queues[q].do_io(&mut completions, 1, Some(&mut t), None) {
                    for comp in &completions[..n] {
                        // SAFETY: as above.
                        got.push(unsafe { comp.assume_init_read() });
                    }
                }
            } else if dead {
                break;
            }
        }
        if dead && got.is_empty() {
            // A dead daemon completes nothing more; take what it posted.
            let since = *quiet_since.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_millis(200) {
                break;
            }
            continue;
        }
        for comp in got {
            let (pending, q) = slots[comp.user_data].take().expect("completion for a free slot");
            outstanding[q] -= 1;
            match pending {
                Pending::Write(tag) => {
                    m.ended(tag, comp.ret == 0);
                    if comp.ret == 0 {
                        stats.writes += 1;
                    } else {
                        let (s, n) = m.writes[tag as usize - 1];
                        stats
                            .errors
                            .push(format!("write {tag} ({n} sectors at {s}) failed: {}", comp.ret));
                    }
                }
                Pending::Flush { covers } => {
                    if comp.ret == 0 {
                        stats.flushes += 1;
                        m.flushed(covers);
                    } else {
                        stats.errors.push(format!("flush failed: {}", comp.ret));
                    }
                }
            }
        }
    }
    stats
}

/// What reading the disk after a cut found.
#[derive(Default)]
struct Verdict {
    /// Writes some sector of which read older data than a flush guaranteed.
    lost_writes: BTreeSet<u64>,
    lost_sectors: u64,
    /// Sectors holding bytes no write put there (and not the base's).
    garbage_sectors: u64,
    /// Unflushed writes found on the disk (allowed, not required).
    unflushed_found: u64,
    examples: Vec<String>,
}

fn describe(tag: u64) -> String {
    if tag == 0 {
        "base data".into()
    } else {
        format!("write {tag}")
    }
}

/// Reads the whole disk and checks each sector against the model; then
/// takes what it read as the new floor (the caller flushes right after).
fn verify(c: &mut Client, m: &mut SectorModel) -> Verdict {
    let len = (PC_SECTORS * SECTOR) as usize;
    let r = c.run(&[Op::Read {
        offset: 0,
        len,
        buf: READ_AT,
    }]);
    assert_eq!(r[0], 0, "reading the disk failed ({})", r[0]);
    let data = c.buf()[READ_AT..READ_AT + len].to_vec();
    let mut v = Verdict::default();
    let mut scratch = Vec::new();
    let mut unflushed = BTreeSet::new();
    for s in 0..PC_SECTORS {
        let got = &data[(s * SECTOR) as usize..((s + 1) * SECTOR) as usize];
        let floor = m.floor[s as usize];
        // The base (tag 0) or a write that covered this sector.
        let found = decode(got, s, &mut scratch).filter(|&t| {
            t == 0
                || m.writes
                    .get(t as usize - 1)
                    .is_some_and(|&(start, n)| start <= s && s < start + n)
        });
        match found {
            _ if floor == UNKNOWN => {}
            Some(t) if t == floor => {}
            Some(t) if m.since[s as usize].contains(&t) => {
                unflushed.insert(t);
            }
            Some(t) => {
                v.lost_writes.insert(floor);
                v.lost_sectors += 1;
                if v.examples.len() < 3 {
                    v.examples.push(format!(
                        "sector {s}: flushed {} lost, found the older {}",
                        describe(floor),
                        describe(t)
                    ));
                }
            }
            None => {
                v.garbage_sectors += 1;
                if v.examples.len() < 3 {
                    v.examples.push(format!(
                        "sector {s}: bytes no write put there ({} expected)",
                        describe(floor)
                    ));
                }
            }
        }
        // What is there now is what the next cut must keep once the caller's
        // flush completes; a sector of garbage keeps its floor.
        m.floor[s as usize] = found.unwrap_or(UNKNOWN);
        m.since[s as usize].clear();
    }
    v.unflushed_found = unflushed.len() as u64;
    m.completed.clear();
    v
}

/// The daemon's overlay lives on a file system that loses every unsynced
/// byte (and unsynced directory change) at a power cut. A client keeps 8-16
/// writes (whole blocks, runs of blocks, single sectors) and flushes in
/// flight; at a random moment the daemon is SIGKILLed and the power cut;
/// the next daemon (a new boot) must read back every write that completed
/// before a completed flush, or a later write of the same sectors, and
/// never bytes no write put there.
#[test]
fn no_flushed_write_lost_across_power_cuts_on_fuse() {
    require_root();
    let started = Instant::now();
    let dir = tmpdir();
    let base = path_of(&dir, "base.raw");
    pattern_base(&base, PC_SECTORS * SECTOR, SECTOR);
    let mnt_dir = path_of(&dir, "fuse");
    std::fs::create_dir(&mnt_dir).unwrap();
    let fuse = PowerCutMount::mount(&mnt_dir);
    let overlay = fuse.path().join("vm.overlay");
    let socket = path_of(&dir, "vm.sock");
    let spec = format!(
        "name=vm,socket={},overlay={},base={},queues=2",
        socket.display(),
        overlay.display(),
        base.display()
    );
    let args = vec!["--disk".to_string(), spec];
    let region = READ_AT + (PC_SECTORS * SECTOR) as usize;

    // Each power cut starts a new boot; the stand-in must really be seen.
    let new_boot = |boot: u32| {
        let p = path_of(&dir, &format!("boot-{boot}"));
        std::fs::write(&p, format!("00000000-0000-4000-8000-{boot:012x}\n")).unwrap();
        p
    };
    let mut boot = 0u32;
    let mut boot_file = new_boot(boot);
    let seen = in_boot(Command::new("cat").arg("/proc/sys/kernel/random/boot_id"), &boot_file)
        .output()
        .expect("run cat in a mount namespace");
    assert_eq!(
        String::from_utf8_lossy(&seen.stdout),
        std::fs::read_to_string(&boot_file).unwrap(),
        "could not stand in for the boot id in a mount namespace: {}",
        String::from_utf8_lossy(&seen.stderr)
    );

    let mut rng = rand::rngs::StdRng::seed_from_u64(0x9c07);
    let mut m = SectorModel::new();
    let mut failures: Vec<String> = Vec::new();
    let (mut total_lost, mut total_garbage, mut total_at_stake) = (0u64, 0u64, 0u64);
    let (mut total_writes, mut total_flushes) = (0u64, 0u64);
    let mut after_cut = String::new();
    let mut startup_cuts = 0;

    for cut in 0..=PC_CUTS {
        let log = path_of(&dir, &format!("daemon-{cut}.log"));
        let mut daemon = start_daemon(&args, &log, Some(&boot_file));
        let mut c = connect(&mut daemon, &socket, 2, region, &log);
        assert_eq!(c.capacity, PC_SECTORS * SECTOR);

        // Flushed writes whose data some sector must still show.
        let at_stake: BTreeSet<u64> = m.floor.iter().copied().filter(|&t| t != 0 && t != UNKNOWN).collect();
        let v = verify(&mut c, &mut m);
        if cut > 0 {
            total_at_stake += at_stake.len() as u64;
            total_lost += v.lost_writes.len() as u64;
            total_garbage += v.garbage_sectors;
            println!(
                "cut {cut}: {} flushed writes at stake, {} lost ({} sectors), {} sectors of garbage, {} unflushed \
                 writes survived",
                at_stake.len(),
                v.lost_writes.len(),
                v.lost_sectors,
                v.garbage_sectors,
                v.unflushed_found
            );
            if !v.lost_writes.is_empty() || v.garbage_sectors > 0 {
                failures.push(format!(
                    "cut {cut}: {} of {} flushed writes lost ({} sectors), {} sectors of garbage; after the cut {after_cut}; \
                     e.g. {}",
                    v.lost_writes.len(),
                    at_stake.len(),
                    v.lost_sectors,
                    v.garbage_sectors,
                    v.examples.join("; ")
                ));
            }
        }
        let r = c.run(&[Op::Flush])[0];
        assert_eq!(r, 0, "flush after restart failed ({r})\n{}", log_tail(&log));
        if cut == PC_CUTS {
            break;
        }

        // I/O until the kill.
        let pid = daemon.child.id() as i32;
        let killed = Arc::new(AtomicBool::new(false));
        let delay = Duration::from_millis(rng.gen_range(20..300));
        let killer = {
            let killed = killed.clone();
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                // SAFETY: kill(2) on our own child's pid (not yet reaped).
                unsafe { libc::kill(pid, libc::SIGKILL) };
                killed.store(true, Ordering::Release);
            })
        };
        let depth = rng.gen_range(8..=MAX_DEPTH);
        let stats = drive(&mut c, &mut m, &mut rng, depth, &killed);
        killer.join().unwrap();
        let _ = daemon.child.wait();
        drop(c);
        drop(daemon);
        assert!(
            stats.errors.is_empty(),
            "requests failed before the kill: {}\n{}",
            stats.errors.join("; "),
            log_tail(&log)
        );
        total_writes += stats.writes;
        total_flushes += stats.flushes;

        // The power cut: alternately nothing unsynced survives, or a random
        // part of it does (a device that wrote some of its cache back).
        let mode = if cut % 2 == 0 {
            Cut::DropAll
        } else {
            Cut::RandomWriteback(rng.gen())
        };
        let report = fuse.fs.cut_power(mode);
        after_cut = match std::fs::read_dir(&overlay) {
            Ok(entries) => {
                let mut names: Vec<String> = entries
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect();
                names.sort();
                format!("the overlay directory held {names:?}")
            }
            Err(e) => format!(
                "the overlay directory was gone ({e}): its name in the root directory was never made durable (no fsync of the root after the mkdir)"
            ),
        };
        println!(
            "cut {}: after {} ms at depth {depth}: {} writes and {} flushes completed; {mode:?} dropped {} pages, \
             kept {}, undid {} directories; {after_cut}",
            cut + 1,
            delay.as_millis(),
            stats.writes,
            stats.flushes,
            report.pages_dropped,
            report.pages_kept,
            report.dirs_reverted
        );
        boot += 1;
        boot_file = new_boot(boot);

        // Every third time, the power also goes while the next daemon is
        // starting (opening, replaying or rewriting its overlay).
        if cut % 3 == 2 {
            let log = path_of(&dir, &format!("daemon-{cut}-start.log"));
            let mut daemon = start_daemon(&args, &log, Some(&boot_file));
            let delay = Duration::from_micros(rng.gen_range(0..20_000));
            std::thread::sleep(delay);
            daemon.kill();
            drop(daemon);
            let report = fuse.fs.cut_power(Cut::DropAll);
            startup_cuts += 1;
            println!(
                "cut {}: also during the next start, {} us in: dropped {} pages, undid {} directories",
                cut + 1,
                delay.as_micros(),
                report.pages_dropped,
                report.dirs_reverted
            );
            boot += 1;
            boot_file = new_boot(boot);
        }
    }
    drop(fuse);
    println!(
        "{PC_CUTS} power cuts during I/O and {startup_cuts} during a start: {total_writes} writes and {total_flushes} flushes completed, {} writes covered by a \
         flush, {total_at_stake} flushed writes checked after cuts; {total_lost} lost, {total_garbage} sectors of \
         garbage ({:.1} s)",
        m.flushed_writes,
        started.elapsed().as_secs_f64()
    );
    let shown = failures.len().min(5);
    assert!(
        failures.is_empty(),
        "{} of {PC_CUTS} power cuts lost flushed data ({total_lost} of {total_at_stake} flushed writes checked, \
         {total_garbage} sectors of garbage); the first {shown}:\n{}",
        failures.len(),
        failures[..shown].join("\n")
    );
    assert!(
        m.flushed_writes >= 1000,
        "only {} writes were covered by a flush: the test exercised too little",
        m.flushed_writes
    );
}
