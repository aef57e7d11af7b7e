//! The host's chunk store: every chunk any image on the host has fetched,
//! kept once by digest, so two images that share a chunk share its bytes,
//! its fetch and its place under the size cap.
//!
//! Layout, under `<cache dir>/chunks/`:
//! - `slab.<size>`: one file per slot size (a power of two, 64 KiB to
//!   4 MiB); slot `i` holds one chunk at `i * size`. A chunk goes in the
//!   smallest slot size that holds it.
//! - `index`: a journal of 64-byte records, `add` (digest, length, slot)
//!   and `free` (slot), each with a checksum; replayed at open.
//! - `lock`: held by the one daemon that uses the directory.
//!
//! Crash safety: the index may under-report, never over-report.
//! - A chunk's `add` record is written only after its slot's data is
//!   synced, so a record never names bytes that are not on disk.
//! - A slot is reused (or its bytes released) only after the `free`
//!   record that ends its last chunk is synced, so a replay never finds an
//!   `add` whose slot holds something else.
//! - The index is synced when it is opened: what a previous process wrote
//!   is durable before a slot it freed is reused.
//! - After a failed sync, a retry may "succeed" without the lost pages
//!   (fsyncgate): the store stops recording chunks until it is reopened.
//!
//! Eviction is per chunk, least recently used first, whatever image uses
//! it. A slot's state word holds its generation, a live bit and a count of
//! readers: a reader pins a slot before it reads and checks the generation
//! it expects; eviction takes only slots with no readers, by bumping the
//! generation, which makes every image's view of the slot stale at once.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use super::Error;
use crate::storage::sched::Mutex;
use crate::storage::{IoRange, LockGuard, RealStorage, Storage, StorageFile};
use crate::store::Digest;

/// The directory under the cache root.
pub(crate) const DIR: &str = "chunks";
const INDEX: &str = "index";
const INDEX_TMP: &str = "index.tmp";
const LOCK: &str = "lock";
const SLAB_PREFIX: &str = "slab.";

const MAGIC: &[u8; 8] = b"SBLKCHS1";
const RECORD: usize = 64;
const ADD: u8 = 1;
const FREE: u8 = 2;

/// Slot sizes are 2^16 (64 KiB) to 2^22 (4 MiB): one slab each.
const MIN_SLOT_LOG2: u32 = 16;
const SLABS: usize = 7;
/// Slot metadata is allocated a segment at a time, as slabs grow.
const SEG_LOG2: u32 = 14;
const SEGS: usize = 1 << 14;
/// Slots per slab: what a [`SlotRef`] can name.
const MAX_SLOTS: u64 = (SEGS as u64) << SEG_LOG2;

/// In a slot's state word: set while the slot holds a readable chunk.
const LIVE: u64 = 1 << 31;
/// The low bits of the state word: readers reading the slot now.
const PINS: u64 = LIVE - 1;
const GEN: u64 = 1 << 32;

/// Names one chunk in one slot at one generation: slab (4 bits), slot
/// (28 bits), generation (32 bits). Stale once the slot's generation moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SlotRef(u64);

impl SlotRef {
    /// Stored in views for "no slot known"; its slab does not exist.
    pub(crate) const NONE: u64 = u64::MAX;

    fn new(slab: usize, slot: u32, generation: u32) -> Self {
        SlotRef((slab as u64) << 60 | (slot as u64) << 32 | generation as u64)
    }

    pub(crate) fn from_raw(raw: u64) -> Option<Self> {
        (raw != Self::NONE).then_some(SlotRef(raw))
    }

    pub(crate) fn raw(self) -> u64 {
        self.0
    }

    fn slab(self) -> usize {
        (self.0 >> 60) as usize
    }

    fn slot(self) -> u32 {
        ((self.0 >> 32) & (MAX_SLOTS - 1)) as u32
    }

    fn generation(self) -> u32 {
        self.0 as u32
    }
}

#[derive(Default)]
struct Slot {
    /// Generation (high 32 bits), [`LIVE`], readers ([`PINS`]).
    state: AtomicU64,
    /// The store's clock when the slot was last written or read: LRU order.
    used: AtomicU64,
}

struct Slab {
    file: Arc<dyn StorageFile>,
    slot_size: u64,
    segs: Box<[OnceLock<Box<[Slot]>>]>,
}

impl Slab {
    fn new(file: Arc<dyn StorageFile>, slot_size: u64) -> Self {
        Slab {
            file,
            slot_size,
            segs: (0..SEGS).map(|_| OnceLock::new()).collect(),
        }
    }

    /// The slot's metadata, if its segment exists (every slot a ref names does).
    fn slot(&self, i: u32) -> Option<&Slot> {
        let seg = self.segs[(i >> SEG_LOG2) as usize].get()?;
        Some(&seg[(i as usize) & ((1 << SEG_LOG2) - 1)])
    }

    /// The slot's metadata, making its segment if needed.
    fn slot_made(&self, i: u32) -> &Slot {
        let seg = self.segs[(i >> SEG_LOG2) as usize]
            .get_or_init(|| (0..1usize << SEG_LOG2).map(|_| Slot::default()).collect());
        &seg[(i as usize) & ((1 << SEG_LOG2) - 1)]
    }
}

/// What a slot holds, as the index knows it.
#[derive(Clone, Copy)]
struct Held {
    digest: Digest,
    len: u32,
    /// Its `add` record is synced: it may be evicted (a `free` record can follow).
    durable: bool,
}

/// State changed only under the store's lock.
struct Inner {
    /// Chunks readable now, durable or not.
    map: HashMap<Digest, SlotRef>,
    /// Per slab, per slot: what it holds. None: free or being written.
    held: [Vec<Option<Held>>; SLABS],
    /// Per slab: slots free to reuse (no record names them).
    free: [Vec<u32>; SLABS],
    /// Chunks written whose `add` record is not synced yet.
    unsynced: Vec<SlotRef>,
    /// Per slab: written since its last sync.
    dirty: [bool; SLABS],
    /// Bytes of slots that hold or are being written with a chunk.
    used_bytes: u64,
    index: Arc<dyn StorageFile>,
    /// Records in the index after its header.
    records: u64,
    /// A sync failed: nothing may be recorded again by this instance.
    stopped: bool,
}

impl Inner {
    /// Appends `records` to the index durably. A refused write (ENOSPC)
    /// changed nothing and leaves the store working; any other failure, or
    /// a failed sync, stops it.
    fn append(&mut self, records: &[[u8; RECORD]]) -> Result<(), Error> {
        let at = header_len() + self.records * RECORD as u64;
        if let Err(e) = self.index.write_all_at(&records.concat(), at) {
            if e.raw_os_error() != Some(libc::ENOSPC) {
                self.stopped = true;
            }
            return Err(Error::WriteCacheFile(e));
        }
        if let Err(e) = self.index.sync_data() {
            self.stopped = true;
            return Err(Error::SyncCacheFile(e));
        }
        self.records += records.len() as u64;
        Ok(())
    }
}

/// Counts for `status` and metrics.
#[derive(Debug, Default)]
pub struct StoreCounters {
    /// Chunks written to the store.
    pub inserted: AtomicU64,
    /// Chunks evicted to stay under the size cap.
    pub evicted: AtomicU64,
}

/// The store's size and use, for `status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub chunks: u64,
    pub bytes: u64,
    pub limit: Option<u64>,
}

pub struct ChunkStore {
    storage: Arc<dyn Storage>,
    /// The cache root (legacy per-image directories live here).
    root: PathBuf,
    dir: PathBuf,
    limit: Option<u64>,
    slabs: [OnceLock<Slab>; SLABS],
    /// Ticks once per chunk written: the LRU clock.
    clock: AtomicU64,
    inner: Mutex<Inner>,
    pub counters: StoreCounters,
    _lock: LockGuard,
}

/// A slot pinned for reading: not evicted while this lives.
pub(crate) struct Pinned<'a> {
    slot: &'a Slot,
    slab: &'a Slab,
    index: u32,
}

impl Pinned<'_> {
    /// Reads the chunk's bytes at `at..at + dst.len()`.
    pub(crate) fn read(&self, dst: IoRange, at: u64) -> io::Result<()> {
        self.slab
            .file
            .read_at(dst, self.index as u64 * self.slab.slot_size + at)
    }
}

impl Drop for Pinned<'_> {
    fn drop(&mut self) {
        self.slot.state.fetch_sub(1, Ordering::Release);
    }
}

impl ChunkStore {
    /// Opens (creating if needed) the chunk store under cache root `root`
    /// on the real file system; `limit` caps its bytes.
    pub fn open(root: &Path, limit: Option<u64>) -> Result<Arc<Self>, Error> {
        Self::open_in(RealStorage::shared(), root, limit)
    }

    pub fn open_in(storage: Arc<dyn Storage>, root: &Path, limit: Option<u64>) -> Result<Arc<Self>, Error> {
        let dir = root.join(DIR);
        storage
            .create_dir_all(&dir)
            .map_err(|e| Error::CreateDir(dir.clone(), e))?;
        let lock = match storage.try_lock(&dir.join(LOCK)) {
            Ok(Some(lock)) => lock,
            Ok(None) => return Err(Error::Locked(dir)),
            Err(e) => return Err(Error::Lock(dir, e)),
        };
        let slabs: [OnceLock<Slab>; SLABS] = Default::default();
        let mut held: [Vec<Option<Held>>; SLABS] = Default::default();
        for name in storage.read_dir(&dir).map_err(|e| Error::Open(dir.clone(), e))? {
            let Some(k) = name.strip_prefix(SLAB_PREFIX).and_then(slab_of_name) else {
                continue;
            };
            let path = dir.join(&name);
            let file = storage.open(&path, false).map_err(|e| Error::Open(path, e))?;
            let slots = file.len().map_err(Error::ReadCacheFile)?.div_ceil(slot_size(k));
            held[k] = vec![None; slots.min(MAX_SLOTS) as usize];
            let _ = slabs[k].set(Slab::new(file, slot_size(k)));
        }

        let replayed = replay(&*storage, &dir, &mut held)?;
        let index = match replayed {
            Replayed::Clean { file, records } if records <= 2 * live(&held) + 1024 => (file, records),
            _ => {
                let file = rewrite_index(&*storage, &dir, &held).map_err(|e| Error::Reset(dir.clone(), e))?;
                (file, live(&held))
            }
        };
        // What a previous process wrote may be in the page cache only: a
        // slot it freed must not be reused before its `free` record is durable.
        index.0.sync_data().map_err(Error::SyncCacheFile)?;

        let mut map = HashMap::new();
        let mut free: [Vec<u32>; SLABS] = Default::default();
        let mut used_bytes = 0;
        for k in 0..SLABS {
            for (i, h) in held[k].iter().enumerate().rev() {
                let slab = slabs[k].get().expect("a slab with slots has a file");
                let slot = slab.slot_made(i as u32);
                match h {
                    Some(h) => {
                        slot.state.store(LIVE, Ordering::Relaxed);
                        map.insert(h.digest, SlotRef::new(k, i as u32, 0));
                        used_bytes += slot_size(k);
                    }
                    None => free[k].push(i as u32),
                }
            }
        }
        Ok(Arc::new(ChunkStore {
            storage,
            root: root.to_path_buf(),
            dir,
            limit,
            slabs,
            clock: AtomicU64::new(1),
            inner: Mutex::new(Inner {
                map,
                held,
                free,
                unsynced: Vec::new(),
                dirty: [false; SLABS],
                used_bytes,
                index: index.0,
                records: index.1,
                stopped: false,
            }),
            counters: StoreCounters::default(),
            _lock: lock,
        }))
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    pub fn usage(&self) -> Usage {
        let g = self.inner.lock();
        Usage {
            chunks: g.map.len() as u64,
            bytes: g.used_bytes,
            limit: self.limit,
        }
    }

    /// The slot that holds `digest` now, if any.
    pub(crate) fn lookup(&self, digest: &Digest) -> Option<SlotRef> {
        self.inner.lock().map.get(digest).copied()
    }

    /// The bytes of the chunk with `digest`, if the store holds it: any
    /// chunk on the host, whether or not an open image names it.
    pub fn get(&self, digest: &Digest) -> Result<Option<Vec<u8>>, Error> {
        let (r, len) = {
            let g = self.inner.lock();
            let Some(&r) = g.map.get(digest) else { return Ok(None) };
            let Some(h) = g.held[r.slab()][r.slot() as usize] else {
                return Ok(None);
            };
            (r, h.len)
        };
        let Some(pinned) = self.pin(r) else { return Ok(None) };
        let mut buf = vec![0u8; len as usize];
        pinned
            .read(IoRange::from_slice(&mut buf), 0)
            .map_err(Error::ReadCacheFile)?;
        Ok(Some(buf))
    }

    /// True if `r` still names a readable chunk.
    pub(crate) fn is_live(&self, r: SlotRef) -> bool {
        self.slot(r)
            .is_some_and(|s| state_matches(s.state.load(Ordering::Acquire), r))
    }

    /// Pins the slot of `r` for reading, if it still holds that chunk.
    pub(crate) fn pin(&self, r: SlotRef) -> Option<Pinned<'_>> {
        let slab = self.slabs.get(r.slab())?.get()?;
        let slot = slab.slot(r.slot())?;
        let was = slot.state.fetch_add(1, Ordering::Acquire);
        let pinned = Pinned {
            slot,
            slab,
            index: r.slot(),
        };
        if !state_matches(was, r) {
            return None; // the drop unpins
        }
        slot.used.store(self.clock.load(Ordering::Relaxed), Ordering::Relaxed);
        Some(pinned)
    }

    fn slot(&self, r: SlotRef) -> Option<&Slot> {
        self.slabs.get(r.slab())?.get()?.slot(r.slot())
    }

    /// True if a chunk of `len` bytes can be stored without evicting one.
    pub(crate) fn has_room(&self, len: u64) -> bool {
        let Some(limit) = self.limit else { return true };
        let Some(k) = slab_for(len) else { return false };
        self.inner.lock().used_bytes + slot_size(k) <= limit
    }

    /// Stores a verified chunk (or finds it stored) and returns its slot.
    /// Makes room under the cap by evicting the least recently used
    /// chunks no one is reading. Durable at the next [`persist`](Self::persist).
    pub(crate) fn insert(&self, digest: Digest, data: &[u8]) -> Result<SlotRef, Error> {
        let k = slab_for(data.len() as u64).ok_or(Error::TooLarge(data.len() as u64))?;
        let slot = {
            let mut g = self.inner.lock();
            if g.stopped {
                return Err(Error::Stopped);
            }
            if let Some(&r) = g.map.get(&digest) {
                return Ok(r);
            }
            self.reserve(&mut g, k)?
        };
        let slab = self.slabs[k].get().expect("reserve makes the slab");
        let written = slab.file.write_all_at(data, slot as u64 * slab.slot_size);
        let mut g = self.inner.lock();
        let refuse = |g: &mut Inner| {
            g.free[k].push(slot);
            g.used_bytes -= slab.slot_size;
        };
        if let Err(e) = written {
            refuse(&mut g);
            return Err(Error::WriteCacheFile(e));
        }
        if g.stopped {
            refuse(&mut g);
            return Err(Error::Stopped);
        }
        if let Some(&r) = g.map.get(&digest) {
            // Another image stored it meanwhile.
            refuse(&mut g);
            return Ok(r);
        }
        let s = slab.slot_made(slot);
        let generation = (s.state.fetch_or(LIVE, Ordering::Release) >> 32) as u32;
        s.used
            .store(self.clock.fetch_add(1, Ordering::Relaxed) + 1, Ordering::Relaxed);
        let r = SlotRef::new(k, slot, generation);
        g.map.insert(digest, r);
        g.held[k][slot as usize] = Some(Held {
            digest,
            len: data.len() as u32,
            durable: false,
        });
        g.unsynced.push(r);
        g.dirty[k] = true;
        self.counters.inserted.fetch_add(1, Ordering::Relaxed);
        Ok(r)
    }

    /// Takes a free slot of slab `k`, evicting if the cap requires.
    fn reserve(&self, g: &mut Inner, k: usize) -> Result<u32, Error> {
        let size = slot_size(k);
        if let Some(limit) = self.limit {
            if g.used_bytes + size > limit {
                // Evict a little more than needed: each eviction costs a sync.
                let want = (g.used_bytes + size - limit).max(limit / 64);
                self.evict(g, want)?;
                if g.used_bytes + size > limit {
                    return Err(Error::Full);
                }
            }
        }
        let slab = match self.slabs[k].get() {
            Some(slab) => slab,
            None => {
                let path = self.dir.join(format!("{SLAB_PREFIX}{size}"));
                let file = self.storage.open(&path, true).map_err(|e| Error::Open(path, e))?;
                // Its name is durable before any record names its slots.
                self.storage.sync_dir(&self.dir).map_err(Error::SyncCacheFile)?;
                let _ = self.slabs[k].set(Slab::new(file, size));
                self.slabs[k].get().expect("just set")
            }
        };
        let slot = match g.free[k].pop() {
            Some(slot) => slot,
            None => {
                let next = g.held[k].len() as u64;
                if next >= MAX_SLOTS {
                    return Err(Error::Full);
                }
                g.held[k].push(None);
                next as u32
            }
        };
        slab.slot_made(slot);
        g.used_bytes += size;
        Ok(slot)
    }

    /// Evicts least recently used chunks no one reads until `want` bytes
    /// are free. Their `free` records are durable before their slots are
    /// reused or their bytes released.
    fn evict(&self, g: &mut Inner, want: u64) -> Result<(), Error> {
        if g.stopped {
            return Err(Error::Stopped);
        }
        if !g.unsynced.is_empty() {
            // Only durable chunks can be evicted: a `free` record must follow an `add`.
            self.persist_locked(g)?;
        }
        let mut oldest: Vec<(u64, usize, u32)> = Vec::new();
        for (k, slots) in g.held.iter().enumerate() {
            let Some(slab) = self.slabs[k].get() else { continue };
            for (i, h) in slots.iter().enumerate() {
                if h.is_some_and(|h| h.durable) {
                    let used = slab.slot(i as u32).map_or(0, |s| s.used.load(Ordering::Relaxed));
                    oldest.push((used, k, i as u32));
                }
            }
        }
        oldest.sort_unstable();
        let mut freed = 0;
        let mut gone = Vec::new();
        let mut records = Vec::new();
        for (_, k, i) in oldest {
            if freed >= want {
                break;
            }
            let slot = self.slabs[k].get().expect("listed above").slot_made(i);
            let now = slot.state.load(Ordering::Acquire);
            // Only an unpinned live slot: a reader that pins it after this
            // finds the generation moved and misses.
            if now & PINS != 0
                || slot
                    .state
                    .compare_exchange(now, (now & !(LIVE | PINS)) + GEN, Ordering::AcqRel, Ordering::Relaxed)
                    .is_err()
            {
                continue;
            }
            let h = g.held[k][i as usize].take().expect("listed as held");
            g.map.remove(&h.digest);
            records.push(record(FREE, k, i, 0, &Digest([0; 32])));
            gone.push((k, i));
            freed += slot_size(k);
        }
        if gone.is_empty() {
            return Ok(());
        }
        // Until the records are durable the slots stay out of use: their
        // chunks are gone from the map, and a replay still finds them intact.
        g.append(&records)?;
        for (k, i) in gone {
            let slab = self.slabs[k].get().expect("listed above");
            // Releases the disk blocks; a failure only keeps them.
            let _ = slab.file.punch_hole(i as u64 * slab.slot_size, slab.slot_size);
            g.free[k].push(i);
            g.used_bytes -= slab.slot_size;
            self.counters.evicted.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Makes every chunk written so far durable: data first, then its
    /// `add` record. After a failed sync every call fails.
    pub fn persist(&self) -> Result<(), Error> {
        let mut g = self.inner.lock();
        if g.stopped {
            return Err(Error::Stopped);
        }
        self.persist_locked(&mut g)
    }

    fn persist_locked(&self, g: &mut Inner) -> Result<(), Error> {
        if g.unsynced.is_empty() {
            return Ok(());
        }
        for k in 0..SLABS {
            if !g.dirty[k] {
                continue;
            }
            let slab = self.slabs[k].get().expect("a dirty slab exists");
            if let Err(e) = slab.file.sync_data() {
                // The kernel may have dropped these pages: the chunks are
                // not local any more, and a later sync proves nothing.
                g.stopped = true;
                for r in std::mem::take(&mut g.unsynced) {
                    let slot = slab_slot(&self.slabs, r);
                    slot.state.fetch_and(!LIVE, Ordering::AcqRel);
                    if let Some(h) = g.held[r.slab()][r.slot() as usize] {
                        g.map.remove(&h.digest);
                    }
                }
                return Err(Error::SyncCacheFile(e));
            }
            g.dirty[k] = false;
        }
        let records: Vec<[u8; RECORD]> = g
            .unsynced
            .iter()
            .map(|r| {
                let h = g.held[r.slab()][r.slot() as usize].expect("an unsynced chunk is held");
                record(ADD, r.slab(), r.slot(), h.len, &h.digest)
            })
            .collect();
        // On a refused write (ENOSPC) the data is synced: the records can
        // wait for the next persist.
        g.append(&records)?;
        for r in std::mem::take(&mut g.unsynced) {
            if let Some(h) = &mut g.held[r.slab()][r.slot() as usize] {
                h.durable = true;
            }
        }
        Ok(())
    }

    /// Chunks written but not durable yet.
    pub fn unsynced(&self) -> usize {
        self.inner.lock().unsynced.len()
    }
}

fn slab_slot(slabs: &[OnceLock<Slab>; SLABS], r: SlotRef) -> &Slot {
    slabs[r.slab()].get().expect("a ref's slab exists").slot_made(r.slot())
}

/// True if a slot's state word says it holds the chunk `r` names.
fn state_matches(state: u64, r: SlotRef) -> bool {
    state & LIVE != 0 && (state >> 32) as u32 == r.generation()
}

fn slot_size(k: usize) -> u64 {
    1 << (MIN_SLOT_LOG2 + k as u32)
}

/// The slab of the smallest slots that hold `len` bytes.
fn slab_for(len: u64) -> Option<usize> {
    (0..SLABS).find(|&k| slot_size(k) >= len)
}

fn slab_of_name(size: &str) -> Option<usize> {
    let size: u64 = size.parse().ok()?;
    (0..SLABS).find(|&k| slot_size(k) == size)
}

fn live(held: &[Vec<Option<Held>>; SLABS]) -> u64 {
    held.iter().flatten().filter(|h| h.is_some()).count() as u64
}

fn header_len() -> u64 {
    RECORD as u64
}

fn header() -> [u8; RECORD] {
    let mut b = [0u8; RECORD];
    b[..8].copy_from_slice(MAGIC);
    seal(&mut b);
    b
}

fn record(kind: u8, slab: usize, slot: u32, len: u32, digest: &Digest) -> [u8; RECORD] {
    let mut b = [0u8; RECORD];
    b[0] = kind;
    b[1] = slab as u8;
    b[4..8].copy_from_slice(&slot.to_le_bytes());
    b[8..12].copy_from_slice(&len.to_le_bytes());
    b[16..48].copy_from_slice(&digest.0);
    seal(&mut b);
    b
}

/// Writes the record's checksum: a torn or never-written record fails it.
fn seal(b: &mut [u8; RECORD]) {
    let sum = blake3::hash(&b[..RECORD - 8]);
    b[RECORD - 8..].copy_from_slice(&sum.as_bytes()[..8]);
}

fn sealed(b: &[u8]) -> bool {
    blake3::hash(&b[..RECORD - 8]).as_bytes()[..8] == b[RECORD - 8..]
}

enum Replayed {
    /// Every record valid to the end of the file.
    Clean { file: Arc<dyn StorageFile>, records: u64 },
    /// No index, or a torn tail, or records naming what is not there:
    /// what was valid is in `held`; the index must be rewritten.
    Rewrite,
}

/// Replays the index into `held` (per slab: slot -> chunk).
fn replay(storage: &dyn Storage, dir: &Path, held: &mut [Vec<Option<Held>>; SLABS]) -> Result<Replayed, Error> {
    let path = dir.join(INDEX);
    let file = match storage.open(&path, false) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Replayed::Rewrite),
        Err(e) => return Err(Error::Open(path, e)),
    };
    let len = file.len().map_err(Error::ReadCacheFile)?;
    let mut bytes = vec![0u8; len as usize];
    file.read_exact_at(&mut bytes, 0).map_err(Error::ReadCacheFile)?;
    if bytes.len() < RECORD || bytes[..RECORD] != header() {
        if bytes.len() >= 8 && &bytes[..8] != MAGIC {
            return Err(Error::NotAnIndex(path));
        }
        return Ok(Replayed::Rewrite);
    }
    let mut clean = true;
    let mut records = 0;
    let mut by_digest: HashMap<Digest, (usize, u32)> = HashMap::new();
    for rec in bytes[RECORD..].chunks(RECORD) {
        if rec.len() < RECORD || !sealed(rec) {
            clean = false;
            break;
        }
        records += 1;
        let (k, slot) = (rec[1] as usize, u32::from_le_bytes(rec[4..8].try_into().unwrap()));
        // A record for a slot beyond its slab file, or of an unknown kind,
        // cannot come from this program's writes: trust nothing after it.
        let Some(h) = held.get_mut(k).and_then(|s| s.get_mut(slot as usize)) else {
            clean = false;
            break;
        };
        match rec[0] {
            ADD => {
                let digest = Digest(rec[16..48].try_into().unwrap());
                if let Some((k0, s0)) = by_digest.insert(digest, (k, slot)) {
                    held[k0][s0 as usize] = None;
                    clean = false;
                }
                let h = &mut held[k][slot as usize];
                if let Some(old) = h {
                    by_digest.remove(&old.digest);
                }
                *h = Some(Held {
                    digest,
                    len: u32::from_le_bytes(rec[8..12].try_into().unwrap()),
                    durable: true,
                });
            }
            FREE => {
                if let Some(old) = h.take() {
                    by_digest.remove(&old.digest);
                }
            }
            _ => {
                clean = false;
                break;
            }
        }
    }
    Ok(if clean {
        Replayed::Clean { file, records }
    } else {
        Replayed::Rewrite
    })
}

/// Writes a fresh index that holds only the live chunks' `add` records,
/// durably, then puts it in place atomically: a crash leaves the old index
/// or the new one, which say the same.
fn rewrite_index(
    storage: &dyn Storage,
    dir: &Path,
    held: &[Vec<Option<Held>>; SLABS],
) -> io::Result<Arc<dyn StorageFile>> {
    let mut bytes = header().to_vec();
    for (k, slots) in held.iter().enumerate() {
        for (i, h) in slots.iter().enumerate() {
            if let Some(h) = h {
                bytes.extend_from_slice(&record(ADD, k, i as u32, h.len, &h.digest));
            }
        }
    }
    let tmp = dir.join(INDEX_TMP);
    if storage.exists(&tmp)? {
        storage.remove_file(&tmp)?;
    }
    let file = storage.open(&tmp, true)?;
    file.write_all_at(&bytes, 0)?;
    file.sync_data()?;
    storage.rename(&tmp, &dir.join(INDEX))?;
    storage.sync_dir(dir)?;
    Ok(file)
}
