//! Cache tests: the basics on the real file system, then crash and fault
//! tests on the simulated disk against a model of what must and may be
//! there.

use std::collections::BTreeSet;
use std::path::PathBuf;

use super::*;
use crate::storage::sched::{self, Sched};
use crate::storage::sim::{OpKind, SimStorage};
use crate::store::ChunkEntry;

fn manifest(chunks: usize) -> Arc<Manifest> {
    manifest_of(chunks, 65536)
}

/// Every fifth chunk is all zeros (absent from the manifest's data).
fn manifest_of(chunks: usize, chunk_size: u32) -> Arc<Manifest> {
    Arc::new(Manifest {
        version: 1,
        size: chunks as u64 * chunk_size as u64,
        chunk_size,
        chunks: (0..chunks)
            .map(|i| {
                (i % 5 != 4).then(|| ChunkEntry {
                    digest: Digest::of(&[i as u8]),
                    stored_len: chunk_size,
                    zstd: false,
                })
            })
            .collect(),
    })
}

/// The bytes of chunk `c`, if the cache says it is local.
fn read_chunk(cache: &ImageCache, c: u32) -> Result<Option<Vec<u8>>, Error> {
    let m = cache.manifest();
    let mut buf = vec![0u8; m.chunk_len(ChunkIdx(c)) as usize];
    let hit = cache.read(m.chunk_offset(ChunkIdx(c)), IoRange::from_slice(&mut buf))?;
    Ok(hit.then_some(buf))
}

fn ready_chunks(cache: &ImageCache) -> BTreeSet<u32> {
    let m = cache.manifest();
    (0..m.chunk_count())
        .filter(|&c| m.chunks[c as usize].is_some() && cache.is_ready(ChunkIdx(c)))
        .collect()
}

#[test]
fn presence_survives_reopen_only_once_persisted() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(40);
    let id = Digest::of(b"image");
    let c = ImageCache::open(dir.path(), id, m.clone()).unwrap();
    assert!(!c.is_ready(ChunkIdx(0)));
    assert!(c.is_ready(ChunkIdx(4)), "zero chunks are always ready");
    c.write_chunk(ChunkIdx(0), &[1u8; 65536]).unwrap();
    c.write_chunk(ChunkIdx(17), &[2u8; 65536]).unwrap();
    c.persist().unwrap();
    c.write_chunk(ChunkIdx(30), &[3u8; 65536]).unwrap();
    assert!(c.is_ready(ChunkIdx(30)));
    // A second process cannot open it meanwhile.
    assert!(matches!(
        ImageCache::open(dir.path(), id, m.clone()),
        Err(Error::Locked(_))
    ));
    drop(c); // as a crash would: chunk 30 was never persisted

    let c = ImageCache::open(dir.path(), id, m).unwrap();
    assert!(c.is_ready(ChunkIdx(0)) && c.is_ready(ChunkIdx(17)));
    assert!(!c.is_ready(ChunkIdx(30)), "a bit was persisted before its data");
    assert_eq!(c.fill(), (2, 32));
    assert_eq!(read_chunk(&c, 17).unwrap(), Some(vec![2u8; 65536]));
    let mut buf = vec![0u8; 65536 * 2];
    assert!(!c.read(16 * 65536, IoRange::from_slice(&mut buf)).unwrap());
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

    /// Across crashes (drop without persist, then reopen), the bitmap
    /// keeps every chunk persisted before the crash and never claims a
    /// chunk that was not written.
    #[test]
    fn bitmap_never_over_reports_across_crashes(
        ops in proptest::collection::vec((0u32..40, 0u8..4), 1..80)
    ) {
        let dir = tempfile::tempdir().unwrap();
        let m = manifest(40);
        let id = Digest::of(b"image");
        let mut c = ImageCache::open(dir.path(), id, m.clone()).unwrap();
        let mut written = std::collections::HashSet::new();
        let mut durable = std::collections::HashSet::new();
        for (chunk, action) in ops {
            match action {
                0 | 1 => {
                    if m.chunks[chunk as usize].is_some() {
                        c.write_chunk(ChunkIdx(chunk), &[chunk as u8; 65536]).unwrap();
                        written.insert(chunk);
                    }
                }
                2 => {
                    c.persist().unwrap();
                    durable.extend(written.iter().copied());
                }
                _ => {
                    drop(c);
                    c = ImageCache::open(dir.path(), id, m.clone()).unwrap();
                    for i in 0..40u32 {
                        let present = m.chunks[i as usize].is_some() && c.is_ready(ChunkIdx(i));
                        proptest::prop_assert!(!present || written.contains(&i), "chunk {} invented", i);
                        proptest::prop_assert!(!durable.contains(&i) || present, "chunk {} lost", i);
                    }
                    written = durable.clone();
                }
            }
        }
    }
}

#[test]
fn eviction_removes_unused_images_oldest_first() {
    let root = tempfile::tempdir().unwrap();
    let m = manifest(16);
    let ids: Vec<_> = (0..3u8).map(|i| Digest::of(&[i])).collect();
    // Opened in order: the open stamps the bitmap for LRU.
    for id in &ids {
        let c = ImageCache::open(root.path(), *id, m.clone()).unwrap();
        for k in 0..4 {
            c.write_chunk(ChunkIdx(k), &[1u8; 65536]).unwrap();
        }
        c.persist().unwrap();
    }
    let in_use: HashSet<_> = [ids[0]].into_iter().collect();
    let one = RealStorage.usage(&root.path().join(ids[2].to_hex())).unwrap();
    let removed = evict(root.path(), one + one / 2, &in_use);
    // ids[0] is oldest but in use; ids[1] goes; then ids[2] is needed too.
    assert_eq!(removed, vec![ids[1].to_hex(), ids[2].to_hex()]);
    assert!(root.path().join(ids[0].to_hex()).exists());
    assert!(!root.path().join(ids[1].to_hex()).exists());
}

// ---- On the simulated disk ----

const ROOT: &str = "/cache";
/// Two sectors: small enough to be quick, large enough to tear.
const SMALL_CHUNK: u32 = 1024;
const SMALL_CHUNKS: usize = 12;

fn small_manifest() -> Arc<Manifest> {
    manifest_of(SMALL_CHUNKS, SMALL_CHUNK)
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The bytes of chunk `c` of image `img` as written in `epoch` (an epoch
/// ends when the image is evicted): every 8 bytes differ between any two
/// (image, chunk, epoch), so zeros, stale or torn data never pass for them.
fn content(img: usize, c: u32, epoch: u32) -> Vec<u8> {
    let key = (img as u64) << 56 | (c as u64) << 40 | (epoch as u64) << 24;
    let mut out = vec![0u8; SMALL_CHUNK as usize];
    for (w, word) in out.chunks_exact_mut(8).enumerate() {
        word.copy_from_slice(&mix(key | w as u64).to_le_bytes());
    }
    out
}

fn nonzero_chunks(m: &Manifest) -> Vec<u32> {
    (0..m.chunk_count())
        .filter(|&c| m.chunks[c as usize].is_some())
        .collect()
}

fn image_dir(id: ImageId) -> PathBuf {
    Path::new(ROOT).join(id.to_hex())
}

fn data_files(sim: &SimStorage, id: ImageId) -> Vec<String> {
    sim.read_dir(&image_dir(id))
        .unwrap()
        .into_iter()
        .filter(|n| n.starts_with(DATA_PREFIX))
        .collect()
}

/// Opens image `id` on `sim` and writes and persists `chunks` (epoch 0).
fn filled_cache(sim: &SimStorage, id: ImageId, chunks: &[u32]) -> ImageCache {
    let c = ImageCache::open_in(sim, Path::new(ROOT), id, small_manifest()).unwrap();
    for &k in chunks {
        c.write_chunk(ChunkIdx(k), &content(0, k, 0)).unwrap();
    }
    c.persist().unwrap();
    c
}

#[test]
fn a_bitmap_is_used_only_with_the_data_file_of_its_generation() {
    let sim = SimStorage::new(1);
    let id = Digest::of(b"gen");
    drop(filled_cache(&sim, id, &[0, 1]));
    let old = data_files(&sim, id);
    assert_eq!(old, ["data.1"]);

    // The data file is gone (as a crash in a real remove_dir_all can leave).
    sim.remove_file(&image_dir(id).join(&old[0])).unwrap();
    let c = ImageCache::open_in(&sim, Path::new(ROOT), id, small_manifest()).unwrap();
    assert!(ready_chunks(&c).is_empty(), "bits for a missing data file");
    assert_eq!(data_files(&sim, id), ["data.2"]);
    c.write_chunk(ChunkIdx(3), &content(0, 3, 0)).unwrap();
    c.persist().unwrap();
    drop(c);

    // A data file of another generation does not count either.
    sim.rename(&image_dir(id).join("data.2"), &image_dir(id).join("data.7"))
        .unwrap();
    let c = ImageCache::open_in(&sim, Path::new(ROOT), id, small_manifest()).unwrap();
    assert!(ready_chunks(&c).is_empty());
    assert_eq!(data_files(&sim, id), ["data.8"]);
    drop(c);

    // Nor does a bitmap of another image, or of an older format.
    let other = Digest::of(b"other");
    drop(filled_cache(&sim, other, &[0]));
    sim.remove_file(&image_dir(id).join(BITMAP)).unwrap();
    sim.rename(&image_dir(other).join(BITMAP), &image_dir(id).join(BITMAP))
        .unwrap();
    let c = ImageCache::open_in(&sim, Path::new(ROOT), id, small_manifest()).unwrap();
    assert!(ready_chunks(&c).is_empty());
    drop(c);
    let f = sim.open(&image_dir(id).join(BITMAP), false).unwrap();
    f.write_all_at(b"SBLKBMP1", 0).unwrap();
    let c = ImageCache::open_in(&sim, Path::new(ROOT), id, small_manifest()).unwrap();
    assert!(ready_chunks(&c).is_empty());
}

#[test]
fn an_interrupted_eviction_leaves_nothing_usable_and_is_cleaned_up() {
    let sim = SimStorage::new(2);
    let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
    drop(filled_cache(&sim, a, &[0, 1]));
    drop(filled_cache(&sim, b, &[0, 1]));
    // Both stopped just after the tombstone.
    for id in [a, b] {
        sim.rename(&image_dir(id).join(BITMAP), &image_dir(id).join(TOMBSTONE))
            .unwrap();
    }
    // Open starts afresh; the scan removes the other whatever the limit.
    let c = ImageCache::open_in(&sim, Path::new(ROOT), a, small_manifest()).unwrap();
    assert!(ready_chunks(&c).is_empty());
    assert!(!sim.exists(&image_dir(a).join(TOMBSTONE)).unwrap());
    let in_use: HashSet<_> = [a].into_iter().collect();
    assert!(evict_in(&sim, Path::new(ROOT), u64::MAX, &in_use).is_empty());
    assert!(!sim.exists(&image_dir(b)).unwrap());
    assert!(sim.exists(&image_dir(a)).unwrap());
}

#[test]
fn a_failed_data_sync_stops_the_cache_and_a_restart_recovers() {
    for power_cut in [false, true] {
        let sim = SimStorage::new(3);
        let id = Digest::of(b"eio");
        let c = filled_cache(&sim, id, &[0, 1]);
        c.write_chunk(ChunkIdx(2), &content(0, 2, 0)).unwrap();
        c.write_chunk(ChunkIdx(3), &content(0, 3, 0)).unwrap();
        sim.fail_always(OpKind::Sync, DATA_PREFIX, libc::EIO);
        assert!(matches!(c.persist(), Err(Error::SyncCacheFile(_))));
        sim.clear_faults();
        // The pages of 2 and 3 may be gone: not local any more.
        assert_eq!(ready_chunks(&c), BTreeSet::from([0, 1]));
        assert_eq!(c.fill().0, 2);
        // Nothing new is stored or persisted, however often asked.
        assert!(matches!(
            c.write_chunk(ChunkIdx(2), &content(0, 2, 0)),
            Err(Error::Stopped)
        ));
        assert!(matches!(
            c.write_chunk(ChunkIdx(5), &content(0, 5, 0)),
            Err(Error::Stopped)
        ));
        assert!(matches!(c.persist(), Err(Error::Stopped)));
        assert!(matches!(c.persist(), Err(Error::Stopped)));
        assert_eq!(c.unsynced(), 0);
        // What was durable still reads.
        assert_eq!(read_chunk(&c, 1).unwrap(), Some(content(0, 1, 0)));

        drop(c);
        if power_cut {
            sim.power_cut();
        } else {
            sim.process_crash();
        }
        let c = ImageCache::open_in(&sim, Path::new(ROOT), id, small_manifest()).unwrap();
        assert_eq!(ready_chunks(&c), BTreeSet::from([0, 1]));
        c.write_chunk(ChunkIdx(2), &content(0, 2, 0)).unwrap();
        c.persist().unwrap();
        assert_eq!(read_chunk(&c, 2).unwrap(), Some(content(0, 2, 0)));
    }
}

#[test]
fn a_failed_bitmap_sync_stops_the_cache() {
    let sim = SimStorage::new(4);
    let id = Digest::of(b"eio-bitmap");
    let c = filled_cache(&sim, id, &[0, 1]);
    c.write_chunk(ChunkIdx(2), &content(0, 2, 0)).unwrap();
    sim.fail_always(OpKind::Sync, BITMAP, libc::EIO);
    assert!(matches!(c.persist(), Err(Error::SyncCacheFile(_))));
    sim.clear_faults();
    // Chunk 2's data was synced: it stays local, but nothing more is stored.
    assert_eq!(ready_chunks(&c), BTreeSet::from([0, 1, 2]));
    assert!(matches!(
        c.write_chunk(ChunkIdx(3), &content(0, 3, 0)),
        Err(Error::Stopped)
    ));
    assert!(matches!(c.persist(), Err(Error::Stopped)));
    drop(c);
    sim.power_cut();
    let c = ImageCache::open_in(&sim, Path::new(ROOT), id, small_manifest()).unwrap();
    let ready = ready_chunks(&c);
    assert!(ready.is_superset(&BTreeSet::from([0, 1])) && ready.is_subset(&BTreeSet::from([0, 1, 2])));
    for k in ready {
        assert_eq!(read_chunk(&c, k).unwrap(), Some(content(0, k, 0)));
    }
}

#[test]
fn a_full_disk_fails_the_chunk_and_the_cache_recovers() {
    let sim = SimStorage::new(5);
    let id = Digest::of(b"enospc");
    let c = filled_cache(&sim, id, &[0]);
    c.write_chunk(ChunkIdx(1), &content(0, 1, 0)).unwrap();
    sim.set_full(true);
    // Chunk 8 needs space the sparse data file does not have yet.
    let e = c.write_chunk(ChunkIdx(8), &content(0, 8, 0)).unwrap_err();
    assert!(matches!(&e, Error::WriteCacheFile(io) if io.raw_os_error() == Some(libc::ENOSPC)));
    assert!(!c.is_ready(ChunkIdx(8)));
    sim.set_full(false);
    // A bitmap write refused for space does not stop the cache either: the
    // bits wait for the next persist.
    sim.fail_always(OpKind::Write, BITMAP, libc::ENOSPC);
    assert!(matches!(c.persist(), Err(Error::WriteCacheFile(_))));
    assert_eq!(c.unsynced(), 1);
    sim.clear_faults();
    c.write_chunk(ChunkIdx(8), &content(0, 8, 0)).unwrap();
    c.persist().unwrap();
    drop(c);
    sim.power_cut();
    let c = ImageCache::open_in(&sim, Path::new(ROOT), id, small_manifest()).unwrap();
    assert_eq!(ready_chunks(&c), BTreeSet::from([0, 1, 8]));
    for k in [0, 1, 8] {
        assert_eq!(read_chunk(&c, k).unwrap(), Some(content(0, k, 0)));
    }
}

// ---- The model-based crash test ----

/// A splitmix64 stream: the scripts are the same everywhere.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0) % n
    }
}

#[derive(Clone, Copy, Debug)]
enum Step {
    Write(usize, u32),
    Persist(usize),
    /// Persist while every sync of the image's data file (`true`) or of
    /// its bitmap (`false`) fails with EIO.
    SyncFails(usize, bool),
    /// Write while the disk is full.
    WriteFull(usize, u32),
    /// Persist while writes to the image's bitmap fail with ENOSPC.
    PersistNoSpace(usize),
    Close(usize),
    Open(usize),
    /// The daemon dies; the machine stays up.
    ProcessCrash,
    /// Evicts the (closed) image; the others are in use.
    Evict(usize),
}

/// One image as the model sees it.
struct Image {
    id: ImageId,
    cache: Option<ImageCache>,
    /// Its directory exists (opened since the last eviction).
    on_disk: bool,
    epoch: u32,
    /// Per chunk, the epochs whose bytes a present chunk may hold.
    written: Vec<BTreeSet<u32>>,
    /// What the open cache must call present.
    present: BTreeSet<u32>,
    /// Present but not yet persisted.
    unsynced: BTreeSet<u32>,
    /// Persisted by a successful persist (or found at open, which syncs the
    /// bitmap): must survive anything but eviction.
    must: BTreeSet<u32>,
    stopped: bool,
}

struct World {
    sim: SimStorage,
    manifest: Arc<Manifest>,
    chunks: Vec<u32>,
    images: Vec<Image>,
    crash_at: Option<u64>,
    /// For failure messages: how to replay.
    seed: u64,
}

/// The power failed during the step.
struct Dead;

/// `r`, unless the power failed while producing it.
fn alive<T>(sim: &SimStorage, r: T) -> Result<T, Dead> {
    if sim.is_dead() {
        Err(Dead)
    } else {
        Ok(r)
    }
}

impl World {
    fn new(seed: u64, crash_at: Option<u64>) -> Self {
        let sim = SimStorage::new(mix(seed ^ (crash_at.unwrap_or(0) << 20)));
        if let Some(k) = crash_at {
            sim.power_fails_at(k);
        }
        let manifest = small_manifest();
        World {
            sim,
            chunks: nonzero_chunks(&manifest),
            manifest,
            images: (0..2u8)
                .map(|i| Image {
                    id: Digest::of(&[b'i', i]),
                    cache: None,
                    on_disk: false,
                    epoch: 0,
                    written: vec![BTreeSet::new(); SMALL_CHUNKS],
                    present: BTreeSet::new(),
                    unsynced: BTreeSet::new(),
                    must: BTreeSet::new(),
                    stopped: false,
                })
                .collect(),
            crash_at,
            seed,
        }
    }

    fn pick(&self, rng: &mut Rng) -> Step {
        let i = rng.below(self.images.len() as u64) as usize;
        let chunk = self.chunks[rng.below(self.chunks.len() as u64) as usize];
        let img = &self.images[i];
        if img.cache.is_none() {
            return if img.on_disk && rng.below(3) == 0 {
                Step::Evict(i)
            } else {
                Step::Open(i)
            };
        }
        match rng.below(100) {
            0..=44 => Step::Write(i, chunk),
            45..=66 => Step::Persist(i),
            67..=78 => Step::Close(i),
            79..=83 => Step::ProcessCrash,
            84..=86 => Step::SyncFails(i, true),
            87..=89 => Step::SyncFails(i, false),
            90..=94 => Step::WriteFull(i, chunk),
            _ => Step::PersistNoSpace(i),
        }
    }

    /// Runs a step and checks its result against the model.
    fn apply(&mut self, step: Step) -> Result<(), Dead> {
        let sim = self.sim.clone();
        let at = self.at();
        match step {
            Step::Write(i, c) => {
                let img = &mut self.images[i];
                let r = alive(
                    &sim,
                    img.cache
                        .as_ref()
                        .unwrap()
                        .write_chunk(ChunkIdx(c), &content(i, c, img.epoch)),
                )?;
                if img.stopped && !img.present.contains(&c) {
                    assert!(matches!(r, Err(Error::Stopped)), "{}: stored after a stop", at);
                } else {
                    r.unwrap();
                    if img.present.insert(c) {
                        img.unsynced.insert(c);
                        img.written[c as usize].insert(img.epoch);
                    }
                }
            }
            Step::Persist(i) => {
                let img = &mut self.images[i];
                let r = alive(&sim, img.cache.as_ref().unwrap().persist())?;
                if img.stopped {
                    assert!(matches!(r, Err(Error::Stopped)), "{}: persisted after a stop", at);
                } else {
                    r.unwrap();
                    img.must.clone_from(&img.present);
                    img.unsynced.clear();
                }
            }
            Step::SyncFails(i, data) => {
                let img = &mut self.images[i];
                let file = if data { DATA_PREFIX } else { BITMAP };
                sim.fail_always(OpKind::Sync, &format!("{}/{file}", img.id.to_hex()), libc::EIO);
                let r = img.cache.as_ref().unwrap().persist();
                sim.clear_faults();
                let r = alive(&sim, r)?;
                if img.stopped {
                    assert!(matches!(r, Err(Error::Stopped)), "{}", at);
                } else if img.unsynced.is_empty() {
                    r.unwrap();
                } else {
                    assert!(matches!(r, Err(Error::SyncCacheFile(_))), "{}", at);
                    img.stopped = true;
                    if data {
                        // Those pages may be gone.
                        img.present.retain(|c| !img.unsynced.contains(c));
                    }
                    img.unsynced.clear();
                }
            }
            Step::PersistNoSpace(i) => {
                let img = &mut self.images[i];
                sim.fail_always(OpKind::Write, &format!("{}/{BITMAP}", img.id.to_hex()), libc::ENOSPC);
                let r = img.cache.as_ref().unwrap().persist();
                sim.clear_faults();
                let r = alive(&sim, r)?;
                if img.stopped {
                    assert!(matches!(r, Err(Error::Stopped)), "{}", at);
                } else if img.unsynced.is_empty() {
                    r.unwrap();
                } else {
                    // The bits wait for the next persist.
                    assert!(matches!(r, Err(Error::WriteCacheFile(_))), "{}", at);
                }
            }
            Step::WriteFull(i, c) => {
                let img = &mut self.images[i];
                sim.set_full(true);
                let r = img
                    .cache
                    .as_ref()
                    .unwrap()
                    .write_chunk(ChunkIdx(c), &content(i, c, img.epoch));
                sim.set_full(false);
                match alive(&sim, r)? {
                    // It fit in space the data file already had.
                    Ok(()) if !img.stopped || img.present.contains(&c) => {
                        if img.present.insert(c) {
                            img.unsynced.insert(c);
                            img.written[c as usize].insert(img.epoch);
                        }
                    }
                    Err(Error::WriteCacheFile(e)) if e.raw_os_error() == Some(libc::ENOSPC) => {
                        assert!(!img.present.contains(&c), "{}", at);
                    }
                    Err(Error::Stopped) if img.stopped => {}
                    r => panic!("{at}: {r:?}"),
                }
            }
            Step::Close(i) => self.close(i),
            Step::Open(i) => self.open(i)?,
            Step::ProcessCrash => {
                sim.process_crash();
                if let Some(k) = self.crash_at {
                    // A process crash disarms the power failure.
                    sim.power_fails_at(k);
                }
                let open: Vec<usize> = (0..self.images.len())
                    .filter(|&i| self.images[i].cache.is_some())
                    .collect();
                for &i in &open {
                    self.close(i);
                }
                for i in open {
                    self.open(i)?;
                }
            }
            Step::Evict(i) => {
                let in_use: HashSet<ImageId> = self
                    .images
                    .iter()
                    .enumerate()
                    .filter(|&(j, _)| j != i)
                    .map(|(_, img)| img.id)
                    .collect();
                let removed = alive(&sim, evict_in(&sim, Path::new(ROOT), 0, &in_use))?;
                let img = &mut self.images[i];
                assert_eq!(removed, [img.id.to_hex()], "{}", at);
                img.on_disk = false;
                img.epoch += 1;
                img.written.iter_mut().for_each(BTreeSet::clear);
                img.must.clear();
            }
        }
        Ok(())
    }

    fn close(&mut self, i: usize) {
        let img = &mut self.images[i];
        img.cache = None;
        img.present.clear();
        img.unsynced.clear();
        img.stopped = false;
    }

    fn open(&mut self, i: usize) -> Result<(), Dead> {
        let r = ImageCache::open_in(&self.sim, Path::new(ROOT), self.images[i].id, self.manifest.clone());
        if self.sim.is_dead() {
            return Err(Dead);
        }
        let cache = r.unwrap_or_else(|e| panic!("{}: the cache did not open: {e}", self.at()));
        let found = self.check_bits(i, &cache)?;
        let img = &mut self.images[i];
        img.cache = Some(cache);
        img.on_disk = true;
        img.present.clone_from(&found);
        img.must = found;
        Ok(())
    }

    /// Every chunk the cache calls present holds bytes written for it, and
    /// every chunk that must be there is.
    fn check_bits(&self, i: usize, cache: &ImageCache) -> Result<BTreeSet<u32>, Dead> {
        let img = &self.images[i];
        let found = ready_chunks(cache);
        for &c in &found {
            let bytes = match read_chunk(cache, c) {
                Err(_) if self.sim.is_dead() => return Err(Dead),
                r => r.unwrap().unwrap(),
            };
            assert!(
                img.written[c as usize].iter().any(|&e| bytes == content(i, c, e)),
                "{}: image {i} chunk {c} is present but holds {} (written in epochs {:?})",
                self.at(),
                describe(&bytes, i, c),
                img.written[c as usize],
            );
        }
        let lost: Vec<_> = img.must.difference(&found).collect();
        assert!(
            lost.is_empty(),
            "{}: image {i} lost persisted chunks {lost:?}",
            self.at()
        );
        Ok(found)
    }

    /// The open caches agree with the model.
    fn check_open(&self) {
        for img in &self.images {
            if let Some(c) = &img.cache {
                assert_eq!(ready_chunks(c), img.present, "{}", self.at());
                assert_eq!(c.fill().0, img.present.len() as u64, "{}", self.at());
            }
        }
    }

    fn at(&self) -> String {
        format!("seed {} crash at op {:?}", self.seed, self.crash_at)
    }
}

fn describe(bytes: &[u8], i: usize, c: u32) -> String {
    if bytes.iter().all(|&b| b == 0) {
        return "zeros".into();
    }
    let epochs: Vec<u32> = (0..8).filter(|&e| content(i, c, e) == bytes).collect();
    if epochs.is_empty() {
        "other bytes".into()
    } else {
        format!("the bytes of epoch {epochs:?}")
    }
}

const STEPS: usize = 40;

/// What a run without a power failure did: the operation count before
/// each step and at the end. A run with one must repeat it up to the cut.
struct Trace {
    starts: Vec<u64>,
    ops: u64,
}

/// Runs script `seed`; with `cut = Some((k, trace))`, the power fails at
/// operation `k` and the machine restarts, and every image is checked.
/// Returns the trace, and the number of chunks present after the cut.
fn crash_run(seed: u64, cut: Option<(u64, &Trace)>) -> (Trace, usize) {
    let mut w = World::new(seed, cut.map(|c| c.0));
    let mut rng = Rng(seed);
    let mut trace = Trace {
        starts: Vec::new(),
        ops: 0,
    };
    let mut dying = None;
    for n in 0..STEPS {
        let step = w.pick(&mut rng);
        trace.starts.push(w.sim.ops());
        if let Some((_, dry)) = cut {
            assert_eq!(trace.starts[n], dry.starts[n], "{}: step {n} not deterministic", w.at());
        }
        if w.apply(step).is_err() {
            dying = Some(step);
            break;
        }
        w.check_open();
    }
    trace.ops = w.sim.ops();
    if cut.is_none() {
        return (trace, 0);
    }
    let Some(dying) = dying else {
        panic!("{}: the power never failed; the script is not deterministic", w.at());
    };
    for i in 0..w.images.len() {
        w.close(i);
    }
    if let Step::Evict(i) = dying {
        // It may or may not have gone.
        w.images[i].must.clear();
    }
    w.sim.power_cut();
    for i in 0..w.images.len() {
        if w.open(i).is_err() {
            panic!("{}: the power failed again", w.at());
        }
    }
    (trace, w.images.iter().map(|img| img.present.len()).sum())
}

/// A power cut at any operation of random scripts (writes, persists,
/// injected EIO and ENOSPC, reopens, process crashes, evictions) never
/// leaves a present chunk without its bytes, never loses a persisted chunk,
/// and the cache always reopens.
#[test]
fn a_power_cut_at_any_operation_never_over_reports_or_loses_persisted_chunks() {
    let (mut points, mut seed, mut found) = (0, 0, 0);
    while points < 5000 {
        let (dry, _) = crash_run(seed, None);
        for k in 1..=dry.ops {
            found += crash_run(seed, Some((k, &dry))).1;
        }
        points += dry.ops;
        seed += 1;
    }
    println!("crash points checked: {points} over {seed} scripts; {found} chunks present and checked after the cuts");
}

/// Run under the deterministic scheduler: two writers and a persister on
/// one cache, the power failing at operation `crash_at`. Returns the
/// operations before the threads start and at the end.
fn scheduled_crash_run(seed: u64, crash_at: Option<u64>) -> (u64, u64) {
    let sim = SimStorage::new(mix(seed));
    let id = Digest::of(b"scheduled");
    let m = small_manifest();
    let cache = Arc::new(ImageCache::open_in(&sim, Path::new(ROOT), id, m.clone()).unwrap());
    let start = sim.ops();
    if let Some(k) = crash_at {
        sim.power_fails_at(k);
    }
    let written = Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let must = Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let s = Sched::new(seed);
    let chunks = nonzero_chunks(&m);
    let mut threads = Vec::new();
    for half in chunks.chunks(chunks.len().div_ceil(2)) {
        let (cache, written, half) = (cache.clone(), written.clone(), half.to_vec());
        threads.push(s.spawn(move || {
            for c in half {
                if cache.write_chunk(ChunkIdx(c), &content(0, c, 0)).is_ok() {
                    written.lock().unwrap().insert(c);
                }
            }
        }));
    }
    let (c2, w2, m2) = (cache.clone(), written.clone(), must.clone());
    threads.push(s.spawn(move || {
        for _ in 0..4 {
            let before = w2.lock().unwrap().clone();
            if c2.persist().is_ok() {
                m2.lock().unwrap().extend(before);
            }
            sched::yield_now();
        }
    }));
    s.run();
    for t in threads {
        t.join().unwrap();
    }
    drop(cache);
    if crash_at.is_none() {
        return (start, sim.ops());
    }
    assert!(sim.is_dead(), "seed {seed} crash at {crash_at:?}: not deterministic");
    sim.power_cut();
    let cache = ImageCache::open_in(&sim, Path::new(ROOT), id, m).unwrap();
    let written = written.lock().unwrap();
    for c in ready_chunks(&cache) {
        assert!(
            written.contains(&c),
            "seed {seed} crash at {crash_at:?}: chunk {c} invented"
        );
        let bytes = read_chunk(&cache, c).unwrap().unwrap();
        assert!(
            bytes == content(0, c, 0),
            "seed {seed} crash at {crash_at:?}: chunk {c} holds {}",
            describe(&bytes, 0, c)
        );
    }
    let lost: Vec<_> = must
        .lock()
        .unwrap()
        .difference(&ready_chunks(&cache))
        .copied()
        .collect();
    assert!(lost.is_empty(), "seed {seed} crash at {crash_at:?}: lost {lost:?}");
    (start, sim.ops())
}

/// Concurrent writers and persists, interleaved by the scheduler, keep the
/// same promise at every crash point (and do not deadlock it).
#[test]
fn concurrent_writes_and_persists_survive_a_power_cut_at_any_operation() {
    let mut points = 0;
    for seed in 0..8 {
        let (start, end) = scheduled_crash_run(seed, None);
        for k in start + 1..=end {
            scheduled_crash_run(seed, Some(k));
        }
        points += end - start;
    }
    println!("scheduled crash points checked: {points}");
}
