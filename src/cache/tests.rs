//! Cache tests: the basics on the real file system, then crash and fault
//! tests on the simulated disk. Chunk contents are real: every chunk read
//! is checked against its manifest digest, so stale, torn or another
//! chunk's bytes never pass.

use std::collections::BTreeSet;
use std::path::Path;

use super::*;
use crate::storage::sched::{self, Sched};
use crate::storage::sim::{OpKind, SimStorage};
use crate::storage::{RealStorage, Storage};
use crate::store::{ChunkEntry, Digest};

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `len` bytes made from `key`: every 8 bytes differ between any two keys.
fn bytes_of(key: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    for (w, word) in out.chunks_exact_mut(8).enumerate() {
        word.copy_from_slice(&mix(key << 24 | w as u64).to_le_bytes());
    }
    out
}

/// An image of `keys.len()` chunks of `chunk_size`: chunk `i` holds
/// `bytes_of(keys[i])`, or zeros where the key is 0. Two images with a key
/// in common share that chunk.
fn image(keys: &[u64], chunk_size: u32) -> Arc<Manifest> {
    Arc::new(Manifest {
        version: 1,
        size: keys.len() as u64 * chunk_size as u64,
        chunk_size,
        chunks: keys
            .iter()
            .map(|&k| {
                (k != 0).then(|| ChunkEntry {
                    digest: Digest::of(&bytes_of(k, chunk_size as usize)),
                    stored_len: chunk_size,
                    zstd: false,
                })
            })
            .collect(),
    })
}

fn chunk_bytes(keys: &[u64], chunk_size: u32, c: u32) -> Vec<u8> {
    bytes_of(keys[c as usize], chunk_size as usize)
}

/// The bytes of chunk `c`, if the cache says it is local.
fn try_read_chunk(cache: &ImageCache, c: u32) -> Result<Option<Vec<u8>>, Error> {
    let m = cache.manifest();
    let mut buf = vec![0u8; m.chunk_len(ChunkIdx(c)) as usize];
    let hit = cache.read(m.chunk_offset(ChunkIdx(c)), IoRange::from_slice(&mut buf))?;
    Ok(hit.then_some(buf))
}

fn read_chunk(cache: &ImageCache, c: u32) -> Option<Vec<u8>> {
    try_read_chunk(cache, c).unwrap()
}

fn ready_chunks(cache: &ImageCache) -> BTreeSet<u32> {
    let m = cache.manifest();
    (0..m.chunk_count())
        .filter(|&c| m.chunks[c as usize].is_some() && cache.is_ready(ChunkIdx(c)))
        .collect()
}

/// Every chunk the cache calls local reads as bytes of the manifest's digest.
fn check_no_over_report(cache: &ImageCache, at: &str) {
    for c in ready_chunks(cache) {
        let bytes = try_read_chunk(cache, c)
            .unwrap_or_else(|e| panic!("{at}: chunk {c}: {e:?}"))
            .unwrap_or_else(|| panic!("{at}: chunk {c} ready but not readable"));
        let want = cache.manifest().chunks[c as usize].as_ref().unwrap().digest;
        assert!(
            Digest::of(&bytes) == want,
            "{at}: chunk {c} reads bytes that are not its own"
        );
    }
}

const K: u32 = 65536;

#[test]
fn presence_survives_reopen_only_once_persisted() {
    let dir = tempfile::tempdir().unwrap();
    let keys: Vec<u64> = (0..40).map(|i| if i % 5 == 4 { 0 } else { i + 1 }).collect();
    let m = image(&keys, K);
    let id = Digest::of(b"image");
    let store = ChunkStore::open(dir.path(), None).unwrap();
    let c = ImageCache::open(&store, id, m.clone()).unwrap();
    assert!(!c.is_ready(ChunkIdx(0)));
    assert!(c.is_ready(ChunkIdx(4)), "zero chunks are always ready");
    for k in [0, 17] {
        c.write_chunk(ChunkIdx(k), &chunk_bytes(&keys, K, k)).unwrap();
    }
    c.persist().unwrap();
    c.write_chunk(ChunkIdx(30), &chunk_bytes(&keys, K, 30)).unwrap();
    assert!(c.is_ready(ChunkIdx(30)));
    // A second process cannot open the store meanwhile.
    assert!(matches!(ChunkStore::open(dir.path(), None), Err(Error::Locked(_))));
    drop((c, store)); // as a crash would: chunk 30 was never persisted

    let store = ChunkStore::open(dir.path(), None).unwrap();
    let c = ImageCache::open(&store, id, m).unwrap();
    assert_eq!(ready_chunks(&c), [0, 17].into(), "a chunk was recorded before its data");
    assert_eq!(c.fill(), (2, 32));
    assert_eq!(read_chunk(&c, 17), Some(chunk_bytes(&keys, K, 17)));
    // A read over a present and a missing chunk misses; one over a present
    // chunk and a zero chunk hits, zeros and all.
    let mut buf = vec![1u8; K as usize * 2];
    assert!(!c.read(16 * K as u64, IoRange::from_slice(&mut buf)).unwrap());
    c.write_chunk(ChunkIdx(3), &chunk_bytes(&keys, K, 3)).unwrap();
    let mut buf = vec![1u8; K as usize * 2 - 100];
    assert!(c.read(3 * K as u64 + 100, IoRange::from_slice(&mut buf)).unwrap());
    assert_eq!(buf[..K as usize - 100], chunk_bytes(&keys, K, 3)[100..]);
    assert!(buf[K as usize - 100..].iter().all(|&b| b == 0));
}

/// The two-image case at unit scale: a second image that shares
/// most chunks with the first finds them local, and the store holds each
/// shared chunk once.
#[test]
fn two_images_share_their_common_chunks_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let a_keys: Vec<u64> = (1..=20).collect();
    // b: the same image with chunks 5 and 12 changed and one appended.
    let mut b_keys = a_keys.clone();
    b_keys[5] = 105;
    b_keys[12] = 112;
    b_keys.push(121);
    let store = ChunkStore::open(dir.path(), None).unwrap();
    let a = ImageCache::open(&store, Digest::of(b"a"), image(&a_keys, K)).unwrap();
    for c in 0..20 {
        a.write_chunk(ChunkIdx(c), &chunk_bytes(&a_keys, K, c)).unwrap();
    }
    a.persist().unwrap();
    let b = ImageCache::open(&store, Digest::of(b"b"), image(&b_keys, K)).unwrap();
    let missing: Vec<u32> = (0..21).filter(|&c| !b.is_ready(ChunkIdx(c))).collect();
    assert_eq!(missing, vec![5, 12, 20], "b must fetch exactly the chunks a lacks");
    for c in missing {
        b.write_chunk(ChunkIdx(c), &chunk_bytes(&b_keys, K, c)).unwrap();
    }
    check_no_over_report(&a, "a");
    check_no_over_report(&b, "b");
    let u = store.usage();
    assert_eq!(
        (u.chunks, u.bytes),
        (23, 23 * K as u64),
        "a shared chunk was stored twice"
    );
    // Writing a shared chunk again through the other image stores nothing.
    b.write_chunk(ChunkIdx(0), &chunk_bytes(&b_keys, K, 0)).unwrap();
    assert_eq!(store.counters.inserted.load(Ordering::Relaxed), 23);
}

#[test]
fn eviction_keeps_the_store_under_its_cap_least_recently_used_first() {
    let dir = tempfile::tempdir().unwrap();
    let keys: Vec<u64> = (1..=64).collect();
    let cap = 16 * K as u64;
    let store = ChunkStore::open(dir.path(), Some(cap)).unwrap();
    let c = ImageCache::open(&store, Digest::of(b"big"), image(&keys, K)).unwrap();
    for k in 0..16 {
        c.write_chunk(ChunkIdx(k), &chunk_bytes(&keys, K, k)).unwrap();
    }
    assert!(!c.has_room(), "a full store said it had room for fill");
    // Chunk 0 is read: it is the most recently used now.
    assert!(read_chunk(&c, 0).is_some());
    for k in 16..64 {
        c.write_chunk(ChunkIdx(k), &chunk_bytes(&keys, K, k)).unwrap();
        assert!(store.usage().bytes <= cap, "over the cap after chunk {k}");
        assert!(c.is_ready(ChunkIdx(k)), "the chunk just written was evicted");
        // Keep chunk 0 in use.
        assert!(
            read_chunk(&c, 0).is_some(),
            "the chunk read after every write was evicted"
        );
    }
    assert!(!c.is_ready(ChunkIdx(1)), "the least recently used chunk stayed");
    check_no_over_report(&c, "after the writes");
    assert!(store.counters.evicted.load(Ordering::Relaxed) >= 48);
    // An evicted chunk can be stored again, and reads correctly.
    c.write_chunk(ChunkIdx(1), &chunk_bytes(&keys, K, 1)).unwrap();
    assert_eq!(read_chunk(&c, 1), Some(chunk_bytes(&keys, K, 1)));
    // The disk holds no more than the cap's worth of chunk bytes: evicted
    // slots' blocks were released.
    let slab = dir.path().join("chunks").join(format!("slab.{K}"));
    let used = crate::storage::RealStorage.usage(&slab).unwrap();
    assert!(used <= cap + K as u64, "{used} bytes on disk for a {cap}-byte cap");

    // Reopened, the store keeps what was persisted and the cap.
    c.persist().unwrap();
    let before = ready_chunks(&c);
    drop((c, store));
    let store = ChunkStore::open(dir.path(), Some(cap)).unwrap();
    let c = ImageCache::open(&store, Digest::of(b"big"), image(&keys, K)).unwrap();
    assert_eq!(ready_chunks(&c), before);
    check_no_over_report(&c, "reopened");
}

#[test]
fn a_chunk_being_read_is_never_evicted() {
    let dir = tempfile::tempdir().unwrap();
    let keys: Vec<u64> = (1..=12).collect();
    let store = ChunkStore::open(dir.path(), Some(4 * K as u64)).unwrap();
    let c = ImageCache::open(&store, Digest::of(b"img"), image(&keys, K)).unwrap();
    for k in 0..4 {
        c.write_chunk(ChunkIdx(k), &chunk_bytes(&keys, K, k)).unwrap();
    }
    c.persist().unwrap();
    // Chunk 0 is the least recently used, and a reader holds it.
    let pinned = c.pin(0).unwrap();
    for k in 4..8 {
        c.write_chunk(ChunkIdx(k), &chunk_bytes(&keys, K, k)).unwrap();
    }
    let mut buf = vec![0u8; K as usize];
    pinned.read(IoRange::from_slice(&mut buf), 0).unwrap();
    assert_eq!(
        buf,
        chunk_bytes(&keys, K, 0),
        "a pinned slot was reused under its reader"
    );
    assert!(c.is_ready(ChunkIdx(0)), "a pinned chunk was evicted");
    drop(pinned);
    // Unpinned, it goes like any other.
    for k in 8..12 {
        c.write_chunk(ChunkIdx(k), &chunk_bytes(&keys, K, k)).unwrap();
    }
    assert!(!c.is_ready(ChunkIdx(0)));
    check_no_over_report(&c, "end");
}

#[test]
fn every_slot_pinned_means_full_not_a_wrong_eviction() {
    let dir = tempfile::tempdir().unwrap();
    let keys: Vec<u64> = (1..=3).collect();
    let store = ChunkStore::open(dir.path(), Some(2 * K as u64)).unwrap();
    let c = ImageCache::open(&store, Digest::of(b"img"), image(&keys, K)).unwrap();
    for k in 0..2 {
        c.write_chunk(ChunkIdx(k), &chunk_bytes(&keys, K, k)).unwrap();
    }
    let pins = (c.pin(0).unwrap(), c.pin(1).unwrap());
    assert!(matches!(
        c.write_chunk(ChunkIdx(2), &chunk_bytes(&keys, K, 2)),
        Err(Error::Full)
    ));
    drop(pins);
    c.write_chunk(ChunkIdx(2), &chunk_bytes(&keys, K, 2)).unwrap();
    check_no_over_report(&c, "end");
}

#[test]
fn an_old_per_image_cache_directory_is_moved_into_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let keys: Vec<u64> = (1..=8).collect();
    let m = image(&keys, K);
    let id = Digest::of(b"old");
    // The old layout: <root>/<id>/bitmap (header, bits) and data.<gen> at image offsets.
    let old = dir.path().join(id.to_hex());
    std::fs::create_dir_all(&old).unwrap();
    let mut header = [0u8; 64];
    header[..8].copy_from_slice(b"SBLKBMP2");
    header[8..12].copy_from_slice(&8u32.to_le_bytes());
    header[16..48].copy_from_slice(&id.0);
    header[48..56].copy_from_slice(&3u64.to_le_bytes());
    let mut bitmap = header.to_vec();
    bitmap.push(0b0010_0101); // chunks 0, 2, 5
    std::fs::write(old.join("bitmap"), &bitmap).unwrap();
    let mut data = vec![0u8; 8 * K as usize];
    for c in [0u32, 2, 5] {
        data[(c * K) as usize..((c + 1) * K) as usize].copy_from_slice(&chunk_bytes(&keys, K, c));
    }
    // Chunk 5's bytes rotted: the move checks digests.
    data[5 * K as usize] ^= 1;
    std::fs::write(old.join("data.3"), &data).unwrap();

    let store = ChunkStore::open(dir.path(), None).unwrap();
    assert_eq!(old_images(&RealStorage, dir.path()), vec![id]);
    let c = ImageCache::open(&store, id, m.clone()).unwrap();
    assert_eq!(ready_chunks(&c), [0, 2].into(), "a bad chunk was moved in");
    check_no_over_report(&c, "moved");
    assert!(!old.exists(), "the old directory stayed");
    drop((c, store));
    let store = ChunkStore::open(dir.path(), None).unwrap();
    let c = ImageCache::open(&store, id, m).unwrap();
    assert_eq!(ready_chunks(&c), [0, 2].into(), "the moved chunks were not durable");
}

#[test]
fn an_index_that_is_not_ours_is_refused_not_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("chunks")).unwrap();
    std::fs::write(
        dir.path().join("chunks/index"),
        b"something else entirely, not an index",
    )
    .unwrap();
    let e = ChunkStore::open(dir.path(), None).err().expect("opened");
    assert!(matches!(e, Error::NotAnIndex(_)), "{e}");
    assert_eq!(
        std::fs::read(dir.path().join("chunks/index")).unwrap(),
        b"something else entirely, not an index"
    );
}

// ---- On the simulated disk ----

const ROOT: &str = "/cache";
/// Small chunks (in 64 KiB slots): quick, and still torn by sectors.
const SMALL: u32 = 1024;

/// Two images on one store: b shares half of a's chunks.
struct World {
    sim: SimStorage,
    limit: Option<u64>,
    keys: [Vec<u64>; 2],
    store: Option<Arc<ChunkStore>>,
    caches: [Option<ImageCache>; 2],
    /// Digests written since the last successful persist, and persisted.
    written: BTreeSet<Digest>,
    must: BTreeSet<Digest>,
    stopped: bool,
}

impl World {
    fn new(seed: u64, limit_slots: Option<u64>) -> Self {
        let a: Vec<u64> = (0..10).map(|i| if i == 7 { 0 } else { i + 1 }).collect();
        let b: Vec<u64> = (0..10)
            .map(|i| if i % 2 == 0 { a[i as usize] } else { 100 + i })
            .collect();
        World {
            sim: SimStorage::new(mix(seed)),
            limit: limit_slots.map(|n| n * 65536),
            keys: [a, b],
            store: None,
            caches: [None, None],
            written: BTreeSet::new(),
            must: BTreeSet::new(),
            stopped: false,
        }
    }

    fn manifest(&self, i: usize) -> Arc<Manifest> {
        image(&self.keys[i], SMALL)
    }

    fn open(&mut self) -> Result<(), Error> {
        let store = ChunkStore::open_in(Arc::new(self.sim.clone()), Path::new(ROOT), self.limit)?;
        for i in 0..2 {
            self.caches[i] = Some(ImageCache::open(&store, Digest::of(&[i as u8]), self.manifest(i))?);
        }
        self.store = Some(store);
        self.stopped = false;
        Ok(())
    }

    fn close(&mut self) {
        self.caches = [None, None];
        self.store = None;
    }

    fn digest(&self, i: usize, c: u32) -> Option<Digest> {
        Some(image(&self.keys[i], SMALL).chunks[c as usize].as_ref()?.digest)
    }

    /// What must hold whatever happened: every ready chunk reads its own
    /// bytes; with no cap, every persisted chunk is there; the cap holds.
    /// False if the power failed during the check (its reads count).
    fn check(&self, at: &str) -> bool {
        let mut present = BTreeSet::new();
        for i in 0..2 {
            let cache = self.caches[i].as_ref().unwrap();
            for c in ready_chunks(cache) {
                let bytes = match try_read_chunk(cache, c) {
                    Err(_) if self.sim.is_dead() => return false,
                    r => r.unwrap_or_else(|e| panic!("{at}: chunk {c}: {e}")),
                };
                let bytes = bytes.unwrap_or_else(|| panic!("{at}: chunk {c} ready but not readable"));
                let want = self.digest(i, c).unwrap();
                assert!(
                    Digest::of(&bytes) == want,
                    "{at}: image {i} chunk {c} reads bytes that are not its own"
                );
                present.insert(want);
            }
        }
        let store = self.store.as_ref().unwrap();
        if let Some(limit) = self.limit {
            assert!(store.usage().bytes <= limit, "{at}: over the cap");
        } else {
            let lost = self.must.difference(&present).count();
            assert!(lost == 0, "{at}: lost {lost} persisted chunks");
        }
        true
    }
}

#[derive(Clone, Copy, Debug)]
enum Step {
    Write(usize, u32),
    Read(usize, u32),
    Persist,
    Reopen,
    SyncFails,
    Full(usize, u32),
}

fn pick(rng: &mut u64) -> Step {
    *rng = mix(*rng);
    let (i, c) = ((*rng >> 8) as usize % 2, (*rng >> 16) as u32 % 10);
    match *rng % 100 {
        0..=49 => Step::Write(i, c),
        50..=64 => Step::Read(i, c),
        65..=84 => Step::Persist,
        85..=89 => Step::Reopen,
        90..=94 => Step::SyncFails,
        _ => Step::Full(i, c),
    }
}

/// Runs `steps` steps of script `seed`; the power fails at operation
/// `cut`, if given, and then the machine restarts and everything is
/// checked. Returns the operations the script performed.
fn crash_run(seed: u64, limit_slots: Option<u64>, steps: usize, cut: Option<u64>) -> u64 {
    let mut w = World::new(seed, limit_slots);
    w.open().unwrap();
    if let Some(k) = cut {
        w.sim.power_fails_at(w.sim.ops() + k);
    }
    let start = w.sim.ops();
    let mut rng = seed;
    for n in 0..steps {
        let step = pick(&mut rng);
        let at = format!("seed {seed} cap {limit_slots:?} cut {cut:?} step {n} {step:?}");
        match step {
            Step::Write(i, c) | Step::Full(i, c) => {
                let full = matches!(step, Step::Full(..));
                w.sim.set_full(full);
                let r = w.caches[i]
                    .as_ref()
                    .unwrap()
                    .write_chunk(ChunkIdx(c), &chunk_bytes(&w.keys[i], SMALL, c));
                w.sim.set_full(false);
                if w.sim.is_dead() {
                    break;
                }
                match r {
                    Ok(()) => {
                        if let Some(d) = w.digest(i, c) {
                            w.written.insert(d);
                        }
                    }
                    Err(Error::Stopped) => assert!(w.stopped, "{at}: stopped for no reason"),
                    Err(Error::WriteCacheFile(_) | Error::SyncCacheFile(_)) if full => {}
                    Err(e) => panic!("{at}: {e}"),
                }
            }
            Step::Read(i, c) => {
                let _ = try_read_chunk(w.caches[i].as_ref().unwrap(), c);
            }
            Step::Persist => {
                let r = w.store.as_ref().unwrap().persist();
                if w.sim.is_dead() {
                    break;
                }
                match r {
                    Ok(()) => w.must.append(&mut w.written),
                    Err(e) => assert!(w.stopped, "{at}: {e}"),
                }
            }
            Step::SyncFails => {
                w.sim.fail_always(OpKind::Sync, "slab", libc::EIO);
                let r = w.store.as_ref().unwrap().persist();
                w.sim.clear_faults();
                if w.sim.is_dead() {
                    break;
                }
                match r {
                    Ok(()) => w.must.append(&mut w.written),
                    Err(_) => {
                        w.stopped = true;
                        w.written.clear();
                    }
                }
            }
            Step::Reopen => {
                w.close();
                w.sim.process_crash();
                w.written.clear();
                w.open().unwrap();
                if let Some(k) = cut {
                    // A process crash clears the power failure: set it again.
                    w.sim.power_fails_at(start + k);
                    if w.sim.ops() > start + k {
                        break;
                    }
                }
            }
        }
        if w.sim.is_dead() || !w.check(&at) {
            break;
        }
    }
    let ops = w.sim.ops() - start;
    if cut.is_some() {
        w.close();
        w.sim.power_cut();
        let at = format!("seed {seed} cap {limit_slots:?} after a power cut at {cut:?}");
        w.open().unwrap_or_else(|e| panic!("{at}: reopen: {e}"));
        assert!(w.check(&at));
    }
    ops
}

/// A power cut at any operation of random scripts (writes of chunks two
/// images share, reads, persists, evictions under a cap, EIO on sync, a
/// full disk, process crashes) never leaves a chunk that reads wrong
/// bytes, never loses a persisted chunk when nothing evicts, never goes
/// over the cap, and the store always reopens.
#[test]
fn a_power_cut_at_any_operation_never_over_reports_or_loses_persisted_chunks() {
    let mut points = 0;
    for seed in 0..6 {
        for limit in [None, Some(6)] {
            let ops = crash_run(seed, limit, 40, None);
            for k in 0..=ops {
                crash_run(seed, limit, 40, Some(k));
            }
            points += ops + 1;
        }
    }
    println!("crash points checked: {points}");
}

/// Run under the deterministic scheduler: two writers (of two images that
/// share chunks), a reader and a persister on one capped store, the power
/// failing at operation `cut`. Returns the operations performed.
fn scheduled_crash_run(seed: u64, cut: Option<u64>) -> u64 {
    let mut w = World::new(seed, Some(5));
    w.open().unwrap();
    let store = w.store.clone().unwrap();
    let caches: Vec<Arc<ImageCache>> = (0..2)
        .map(|i| Arc::new(ImageCache::open(&store, Digest::of(&[i as u8]), w.manifest(i)).unwrap()))
        .collect();
    let start = w.sim.ops();
    if let Some(k) = cut {
        w.sim.power_fails_at(start + k);
    }
    let s = Sched::new(seed);
    let mut threads = Vec::new();
    for (i, cache) in caches.iter().enumerate() {
        let (cache, keys) = (cache.clone(), w.keys[i].clone());
        threads.push(s.spawn(move || {
            for c in 0..10 {
                let _ = cache.write_chunk(ChunkIdx(c), &chunk_bytes(&keys, SMALL, c));
            }
        }));
    }
    let reader = caches[1].clone();
    threads.push(s.spawn(move || {
        for c in 0..10 {
            if let Ok(Some(bytes)) = try_read_chunk(&reader, c) {
                let want = reader.manifest().chunks[c as usize].as_ref().map(|e| e.digest);
                assert!(
                    want.is_none_or(|d| d == Digest::of(&bytes)),
                    "a read got another chunk's bytes"
                );
            }
            sched::yield_now();
        }
    }));
    let persister = store.clone();
    threads.push(s.spawn(move || {
        for _ in 0..4 {
            let _ = persister.persist();
            sched::yield_now();
        }
    }));
    s.run();
    for t in threads {
        t.join().unwrap();
    }
    drop(caches);
    let ops = w.sim.ops() - start;
    if cut.is_some() {
        w.close();
        w.sim.power_cut();
        w.open().unwrap();
        assert!(w.check(&format!("seed {seed} scheduled, power cut at {cut:?}")));
    } else {
        assert!(w.check(&format!("seed {seed} scheduled")));
    }
    ops
}

/// Concurrent writers, readers and persists on a capped store,
/// interleaved by the scheduler, keep the same promise at every crash
/// point (and do not deadlock it).
#[test]
fn concurrent_writes_evictions_and_persists_survive_a_power_cut_at_any_operation() {
    let mut points = 0;
    for seed in 0..6 {
        let ops = scheduled_crash_run(seed, None);
        for k in 0..=ops {
            scheduled_crash_run(seed, Some(k));
        }
        points += ops + 1;
    }
    println!("scheduled crash points checked: {points}");
}
