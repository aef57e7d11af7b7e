//! Model-based crash tests of the overlay on the simulated disk.
//!
//! Each case runs several writers (full and partial blocks, write-zeroes,
//! discards) and a flusher concurrently under the deterministic scheduler,
//! cuts the power (or kills the process) at a random storage operation,
//! reopens the disk and checks every 512-byte sector against a model: it
//! holds what the last write before the last completed flush left there, or
//! what a later write put there, and never anything else.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use streamblk::engine::{Base, Disk, FetchFuture, IoRange, Status};
use streamblk::storage::sched::Sched;
use streamblk::storage::sim::{OpKind, SimStorage};
use streamblk::storage::Storage;

const BLOCK: u64 = 4096;
const SECTOR: u64 = 512;
const WRITERS: u64 = 3;
const BLOCKS_PER_WRITER: u64 = 6;
const BLOCKS: u64 = WRITERS * BLOCKS_PER_WRITER;
const SIZE: u64 = BLOCKS * BLOCK;
const SECTORS: u64 = SIZE / SECTOR;
const OPS_PER_WRITER: usize = 12;
const FLUSHES: usize = 5;

/// A base held in memory: every sector reads as tag 0.
struct MemBase(Vec<u8>);

impl Base for MemBase {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn id(&self) -> String {
        "mem".into()
    }
    fn read_local(&self, offset: u64, dst: IoRange) -> Result<bool, streamblk::engine::Error> {
        dst.copy_from(&self.0[offset as usize..offset as usize + dst.len()]);
        Ok(true)
    }
    fn fetch(&self, _: u64, _: u64, _: std::time::Instant) -> FetchFuture {
        Box::pin(std::future::ready(Ok(())))
    }
}

/// What a sector may hold: the write (tag) that produced it, or zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Value {
    Tag(u32),
    Zero,
}

/// A sector's content for write `tag` (tag 0 is the base).
fn sector_bytes(tag: u32, sector: u64) -> [u8; SECTOR as usize] {
    let mut b = [0u8; SECTOR as usize];
    for (i, w) in b.chunks_mut(8).enumerate() {
        w[..4].copy_from_slice(&(tag | 0x8000_0000).to_le_bytes());
        w[4..].copy_from_slice(&((sector as u32) ^ (i as u32) << 24).to_le_bytes());
    }
    b
}

fn decode(bytes: &[u8], sector: u64) -> Option<Value> {
    if bytes.iter().all(|&b| b == 0) {
        return Some(Value::Zero);
    }
    let tag = u32::from_le_bytes(bytes[..4].try_into().unwrap()) & 0x7fff_ffff;
    (bytes == sector_bytes(tag, sector)).then_some(Value::Tag(tag))
}

#[derive(Clone, Debug)]
enum Op {
    Write { sector: u64, sectors: u64, tag: u32 },
    Zeroes { sector: u64, sectors: u64 },
    Discard { sector: u64, sectors: u64 },
}

impl Op {
    /// The sectors the op sets, and to what.
    fn effects(&self) -> Vec<(u64, Value)> {
        match *self {
            Op::Write { sector, sectors, tag } => (sector..sector + sectors).map(|s| (s, Value::Tag(tag))).collect(),
            Op::Zeroes { sector, sectors } => (sector..sector + sectors).map(|s| (s, Value::Zero)).collect(),
            Op::Discard { sector, sectors } => {
                // Whole blocks only; partial blocks at the edges stay.
                let per = BLOCK / SECTOR;
                let (first, end) = (sector.div_ceil(per) * per, (sector + sectors) / per * per);
                (first..end.max(first)).map(|s| (s, Value::Zero)).collect()
            }
        }
    }
}

#[derive(Clone, Debug)]
enum Event {
    Start,
    Done(usize, bool),
    FlushStart,
    FlushDone(bool),
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The ops of writer `w`: within its own blocks, so no two writers share a
/// block (a guest's concurrent writes to one block have no defined order).
fn plan(rng: &mut Rng, w: u64, next_tag: &mut u32) -> Vec<Op> {
    let per = BLOCK / SECTOR;
    let lo = w * BLOCKS_PER_WRITER * per;
    let span = BLOCKS_PER_WRITER * per;
    (0..OPS_PER_WRITER)
        .map(|_| {
            let (sector, sectors) = match rng.below(3) {
                // Whole blocks, one to three.
                0 => {
                    let n = 1 + rng.below(3);
                    (lo + rng.below(BLOCKS_PER_WRITER - n + 1) * per, n * per)
                }
                // A piece of a block.
                1 => {
                    let b = rng.below(BLOCKS_PER_WRITER);
                    let s = rng.below(per);
                    (lo + b * per + s, 1 + rng.below(per - s))
                }
                // Anything, across blocks.
                _ => {
                    let s = rng.below(span);
                    (lo + s, 1 + rng.below((span - s).min(2 * per)))
                }
            };
            match rng.below(8) {
                0 => Op::Zeroes { sector, sectors },
                1 => Op::Discard { sector, sectors },
                _ => {
                    *next_tag += 1;
                    Op::Write {
                        sector,
                        sectors,
                        tag: *next_tag,
                    }
                }
            }
        })
        .collect()
}

fn run_op(disk: &Disk, op: &Op) -> bool {
    let r = match *op {
        Op::Write { sector, sectors, tag } => {
            let mut data: Vec<u8> = (sector..sector + sectors).flat_map(|s| sector_bytes(tag, s)).collect();
            disk.write(sector * SECTOR, IoRange::from_slice(&mut data))
        }
        Op::Zeroes { sector, sectors } => disk.write_zeroes(sector * SECTOR, sectors * SECTOR),
        Op::Discard { sector, sectors } => disk.discard(sector * SECTOR, sectors * SECTOR).map(|()| Status::Done),
    };
    match r {
        Ok(Status::Done) => true,
        Ok(Status::Miss { .. }) => panic!("a memory base never misses"),
        Err(_) => false,
    }
}

fn base() -> Arc<MemBase> {
    Arc::new(MemBase((0..SECTORS).flat_map(|s| sector_bytes(0, s)).collect()))
}

fn open(storage: &Arc<dyn Storage>) -> Result<Disk, streamblk::engine::Error> {
    Disk::open_on(storage.clone(), base(), Path::new("/vm/overlay"), false)
}

/// How a case ends.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Crash {
    PowerCut,
    ProcessDies,
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    None,
    /// This storage operation fails with this errno (before the crash).
    At(u64, i32),
}

struct Outcome {
    ops: Vec<Vec<Op>>,
    /// (writer, index) of each op id.
    ids: Vec<(usize, usize)>,
    events: Vec<Event>,
}

/// Runs one case: writers and a flusher on a fresh overlay, the power failing
/// at storage operation `fail_at` (if any).
fn run_case(seed: u64, fail_at: Option<u64>, fault: Fault) -> (SimStorage, Outcome, u64) {
    let sim = SimStorage::new(seed);
    let storage: Arc<dyn Storage> = Arc::new(sim.clone());
    storage.create_dir_all(Path::new("/vm")).unwrap();
    let disk = Arc::new(open(&storage).expect("a new overlay opens"));
    let start_ops = sim.ops();
    if let Some(n) = fail_at {
        sim.power_fails_at(start_ops + n);
    }
    if let Fault::At(n, errno) = fault {
        sim.fail_op(start_ops + n, None, errno);
    }
    let mut rng = Rng(seed.wrapping_mul(31) + 7);
    let mut next_tag = 0;
    let ops: Vec<Vec<Op>> = (0..WRITERS).map(|w| plan(&mut rng, w, &mut next_tag)).collect();
    let mut ids = Vec::new();
    let mut id_of = BTreeMap::new();
    for (w, list) in ops.iter().enumerate() {
        for i in 0..list.len() {
            id_of.insert((w, i), ids.len());
            ids.push((w, i));
        }
    }
    let events = Arc::new(Mutex::new(Vec::new()));
    let sched = Sched::new(seed);
    let mut handles = Vec::new();
    for (w, list) in ops.iter().enumerate() {
        let (disk, events, list) = (disk.clone(), events.clone(), list.clone());
        let id_of = id_of.clone();
        handles.push(sched.spawn(move || {
            for (i, op) in list.iter().enumerate() {
                let id = id_of[&(w, i)];
                events.lock().unwrap().push(Event::Start);
                let ok = run_op(&disk, op);
                events.lock().unwrap().push(Event::Done(id, ok));
            }
        }));
    }
    {
        let (disk, events) = (disk.clone(), events.clone());
        handles.push(sched.spawn(move || {
            for _ in 0..FLUSHES {
                streamblk::storage::sched::yield_now();
                events.lock().unwrap().push(Event::FlushStart);
                let ok = disk.flush().is_ok();
                events.lock().unwrap().push(Event::FlushDone(ok));
            }
        }));
    }
    sched.run();
    for h in handles {
        h.join().expect("an actor panicked");
    }
    drop(disk);
    let total = sim.ops() - start_ops;
    let events = Arc::try_unwrap(events).unwrap().into_inner().unwrap();
    (sim, Outcome { ops, ids, events }, total)
}

/// Per sector, the values it may hold after the crash.
fn allowed(out: &Outcome, crash: Crash) -> Vec<Vec<Value>> {
    // The point before which completed ops are promised: the start of the
    // last flush that completed, or (the process died, the machine did not)
    // the crash itself.
    let mut promised_before = 0;
    let mut flush_start = None;
    for (t, e) in out.events.iter().enumerate() {
        match e {
            Event::FlushStart => flush_start = Some(t),
            Event::FlushDone(true) => promised_before = flush_start.unwrap(),
            _ => {}
        }
    }
    if crash == Crash::ProcessDies {
        promised_before = out.events.len();
    }
    let mut done_at = vec![None; out.ids.len()];
    let mut ok = vec![false; out.ids.len()];
    for (t, e) in out.events.iter().enumerate() {
        if let Event::Done(id, success) = *e {
            done_at[id] = Some(t);
            ok[id] = success;
        }
    }
    let mut sets = Vec::new();
    for s in 0..SECTORS {
        // The ops that set this sector, in order (each sector has one writer).
        let mut seq: Vec<(usize, Value)> = Vec::new();
        for (id, &(w, i)) in out.ids.iter().enumerate() {
            if let Some(&(_, v)) = out.ops[w][i].effects().iter().find(|(x, _)| *x == s) {
                seq.push((id, v));
            }
        }
        seq.sort_by_key(|&(id, _)| out.ids[id]);
        let promised = seq
            .iter()
            .rposition(|&(id, _)| ok[id] && done_at[id].is_some_and(|t| t < promised_before));
        let mut set = vec![match promised {
            Some(p) => seq[p].1,
            None => Value::Tag(0),
        }];
        // Anything after the promised value: it may or may not have landed.
        let from = promised.map_or(0, |p| p + 1);
        // Every later op, completed, failed or still running at the crash.
        set.extend(seq[from..].iter().map(|&(_, v)| v));
        set.sort();
        set.dedup();
        sets.push(set);
    }
    sets
}

fn check(seed: u64, storage: &Arc<dyn Storage>, out: &Outcome, crash: Crash) -> Result<(), String> {
    let allowed = allowed(out, crash);
    for round in 0..2 {
        let disk = open(storage).map_err(|e| format!("reopen {round} failed: {}", streamblk::DisplayChain(&e)))?;
        let mut buf = vec![0u8; SIZE as usize];
        let status = disk
            .read(0, IoRange::from_slice(&mut buf))
            .map_err(|e| format!("read: {e}"))?;
        assert_eq!(status, Status::Done);
        for s in 0..SECTORS {
            let bytes = &buf[(s * SECTOR) as usize..((s + 1) * SECTOR) as usize];
            match decode(bytes, s) {
                Some(v) if allowed[s as usize].contains(&v) => {}
                got => {
                    return Err(format!(
                        "seed {seed} {crash:?}, reopen {round}: sector {s} (block {}) holds {got:?}, allowed {:?}",
                        s * SECTOR / BLOCK,
                        allowed[s as usize]
                    ))
                }
            }
        }
    }
    Ok(())
}

/// Runs `cases` crash points; returns the number checked.
fn crash_cases(first_seed: u64, cases: u64, faults: bool) -> u64 {
    let mut checked = 0;
    for seed in first_seed..first_seed + cases {
        // A dry run tells how many storage operations the case makes; the
        // same seed replays the same interleaving with the power failing at
        // one of them.
        let (_, _, total) = run_case(seed, None, Fault::None);
        let mut rng = Rng(seed ^ 0xdead_beef);
        let fail_at = 1 + rng.below(total + 1);
        let fault = if faults && rng.below(3) == 0 {
            let errno = if rng.below(2) == 0 { libc::EIO } else { libc::ENOSPC };
            Fault::At(1 + rng.below(fail_at), errno)
        } else {
            Fault::None
        };
        let crash = if rng.below(4) == 0 {
            Crash::ProcessDies
        } else {
            Crash::PowerCut
        };
        let (sim, out, _) = run_case(seed, Some(fail_at), fault);
        match crash {
            Crash::PowerCut => sim.power_cut(),
            Crash::ProcessDies => sim.process_crash(),
        }
        let storage: Arc<dyn Storage> = Arc::new(sim);
        if let Err(e) = check(seed, &storage, &out, crash) {
            panic!("{e} (fault {fault:?}, power failed at op {fail_at} of {total})");
        }
        checked += 1;
    }
    checked
}

/// `n`, or what STREAMBLK_SIM_CASES says (to run longer, or shorter while
/// developing).
fn cases(n: u64) -> u64 {
    std::env::var("STREAMBLK_SIM_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(n)
}

#[test]
fn no_flushed_write_lost_at_any_crash_point() {
    let n = crash_cases(0, cases(4000), false);
    println!("overlay: {n} crash points checked, 0 violations");
}

#[test]
fn no_flushed_write_lost_with_eio_and_enospc_injected() {
    let n = crash_cases(1_000_000, cases(2500), true);
    println!("overlay with faults: {n} crash points checked, 0 violations");
}

/// A failed data sync stops the overlay: that flush and later writes and
/// flushes fail, reads of durable data go on, and a restart finds every
/// flushed write.
#[test]
fn failed_sync_makes_the_overlay_fail_stop() {
    let sim = SimStorage::new(5);
    let storage: Arc<dyn Storage> = Arc::new(sim.clone());
    storage.create_dir_all(Path::new("/vm")).unwrap();
    let disk = open(&storage).unwrap();
    let write = |disk: &Disk, sector: u64, tag: u32| {
        run_op(
            disk,
            &Op::Write {
                sector,
                sectors: 8,
                tag,
            },
        )
    };
    assert!(write(&disk, 0, 1));
    disk.flush().unwrap();
    assert!(write(&disk, 8, 2));
    sim.fail_always(OpKind::Sync, "data", libc::EIO);
    assert!(disk.flush().is_err());
    sim.clear_faults();
    assert!(disk.flush().is_err(), "a flush after a failed sync must fail too");
    assert!(!write(&disk, 16, 3), "a write after a failed sync must fail");
    let mut buf = vec![0u8; 4096];
    assert_eq!(disk.read(0, IoRange::from_slice(&mut buf)).unwrap(), Status::Done);
    assert_eq!(decode(&buf[..512], 0), Some(Value::Tag(1)));
    drop(disk);
    sim.power_cut();
    let disk = open(&storage).unwrap();
    assert_eq!(disk.read(0, IoRange::from_slice(&mut buf)).unwrap(), Status::Done);
    assert_eq!(decode(&buf[..512], 0), Some(Value::Tag(1)));
    assert!(write(&disk, 16, 4));
    disk.flush().unwrap();
}

/// ENOSPC fails the write that met it and nothing else: once space is
/// free, writes and flushes work again.
#[test]
fn full_device_fails_writes_and_recovers() {
    let sim = SimStorage::new(6);
    let storage: Arc<dyn Storage> = Arc::new(sim.clone());
    storage.create_dir_all(Path::new("/vm")).unwrap();
    let disk = open(&storage).unwrap();
    let write = |sector: u64, tag: u32| {
        run_op(
            &disk,
            &Op::Write {
                sector,
                sectors: 8,
                tag,
            },
        )
    };
    assert!(write(0, 1));
    sim.set_full(true);
    assert!(!write(8, 2), "a write to a full device must fail");
    assert!(!write(12, 3), "a partial write to a full device must fail");
    disk.flush().expect("a flush with nothing to write needs no space");
    sim.set_full(false);
    assert!(write(8, 4));
    disk.flush().unwrap();
    drop(disk);
    sim.power_cut();
    let disk = open(&storage).unwrap();
    let mut buf = vec![0u8; 8192];
    assert_eq!(disk.read(0, IoRange::from_slice(&mut buf)).unwrap(), Status::Done);
    assert_eq!(decode(&buf[..512], 0), Some(Value::Tag(1)));
    assert_eq!(decode(&buf[4096..4608], 8), Some(Value::Tag(4)));
}
