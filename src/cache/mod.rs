//! The Local Cache: per host and image, a sparse data file at image offsets
//! and a presence bitmap with one bit per chunk. Shared by every disk of the
//! image on the host; read-only to guests (only verified chunks are written).
//!
//! Crash safety: a chunk's data is synced before its bit is persisted, so
//! after a crash the bitmap may under-report, never over-report.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bitvec::prelude::*;

use crate::engine::IoRange;
use crate::store::{ChunkIdx, ImageId, Manifest};

const MAGIC: &[u8; 8] = b"SBLKBMP1";
const HEADER_LEN: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("create cache directory {0}")]
    CreateDir(PathBuf, #[source] io::Error),
    #[error("cache {0} is in use by another streamblk process")]
    Locked(PathBuf),
    #[error("open cache file {0}")]
    Open(PathBuf, #[source] io::Error),
    #[error("read cache file")]
    ReadCacheFile(#[source] io::Error),
    #[error("write cache file")]
    WriteCacheFile(#[source] io::Error),
    #[error("sync cache file")]
    SyncCacheFile(#[source] io::Error),
}

/// What the cache has seen; read by `status` and the logs.
#[derive(Debug, Default)]
pub struct CacheCounters {
    /// Guest reads served from the cache.
    pub hits: AtomicU64,
    /// Guest reads that had to wait for a fetch.
    pub misses: AtomicU64,
}

struct Persist {
    bitmap: File,
    /// Bits whose data is synced, as on disk.
    durable: BitVec<u8, Lsb0>,
    /// Chunks written but not yet synced.
    unsynced: Vec<ChunkIdx>,
}

pub struct ImageCache {
    id: ImageId,
    manifest: Arc<Manifest>,
    data: File,
    present: BitVec<AtomicU64, Lsb0>,
    /// Non-zero chunks present; the fill progress.
    filled: AtomicU64,
    persist: Mutex<Persist>,
    pub counters: CacheCounters,
    _lock: File,
}

impl ImageCache {
    /// Opens (creating if needed) the cache of image `id` under `root`.
    pub fn open(root: &Path, id: ImageId, manifest: Arc<Manifest>) -> Result<Self, Error> {
        let dir = root.join(id.to_hex());
        std::fs::create_dir_all(&dir).map_err(|e| Error::CreateDir(dir.clone(), e))?;
        let lock = lock_dir(&dir)?;
        let open = |name: &str| {
            let p = dir.join(name);
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&p)
                .map_err(|e| Error::Open(p, e))
        };
        let data = open("data")?;
        let bitmap = open("bitmap")?;
        // Touch for LRU eviction.
        let _ = bitmap.set_modified(SystemTime::now());
        let n = manifest.chunk_count() as usize;
        let mut durable = bitvec![u8, Lsb0; 0; n];
        let mut header = [0u8; HEADER_LEN];
        let ok = bitmap.read_exact_at(&mut header, 0).is_ok()
            && &header[..8] == MAGIC
            && u32::from_le_bytes(header[8..12].try_into().unwrap()) as usize == n
            && header[16..48] == id.0
            && bitmap
                .read_exact_at(durable.as_raw_mut_slice(), HEADER_LEN as u64)
                .is_ok();
        if !ok {
            // New, or not ours: start empty.
            durable.fill(false);
            header = [0u8; HEADER_LEN];
            header[..8].copy_from_slice(MAGIC);
            header[8..12].copy_from_slice(&(n as u32).to_le_bytes());
            header[16..48].copy_from_slice(&id.0);
            bitmap.set_len(0).map_err(Error::WriteCacheFile)?;
            data.set_len(0).map_err(Error::WriteCacheFile)?;
            bitmap.write_all_at(&header, 0).map_err(Error::WriteCacheFile)?;
            bitmap
                .write_all_at(durable.as_raw_slice(), HEADER_LEN as u64)
                .map_err(Error::WriteCacheFile)?;
            bitmap.sync_all().map_err(Error::SyncCacheFile)?;
        }
        data.set_len(manifest.size).map_err(Error::WriteCacheFile)?;
        let present: BitVec<AtomicU64, Lsb0> = durable.iter().by_vals().collect();
        let filled = (0..n).filter(|&i| durable[i] && manifest.chunks[i].is_some()).count() as u64;
        Ok(ImageCache {
            id,
            manifest,
            data,
            present,
            filled: AtomicU64::new(filled),
            persist: Mutex::new(Persist {
                bitmap,
                durable,
                unsynced: Vec::new(),
            }),
            counters: CacheCounters::default(),
            _lock: lock,
        })
    }

    pub fn id(&self) -> &ImageId {
        &self.id
    }

    pub fn manifest(&self) -> &Arc<Manifest> {
        &self.manifest
    }

    /// True if the chunk's data is local: present, or all zeros.
    pub fn is_ready(&self, c: ChunkIdx) -> bool {
        self.manifest.chunks[c.0 as usize].is_none() || self.present[c.0 as usize]
    }

    /// (non-zero chunks present, non-zero chunks in all).
    pub fn fill(&self) -> (u64, u64) {
        let total = self.manifest.chunks.iter().filter(|c| c.is_some()).count() as u64;
        (self.filled.load(Ordering::Relaxed), total)
    }

    /// Reads `offset..offset+dst.len()` if every chunk of it is local.
    pub fn read(&self, offset: u64, dst: IoRange) -> Result<bool, Error> {
        let chunks = self.manifest.chunks_of(offset, dst.len() as u64);
        if !chunks.clone().all(|c| self.is_ready(ChunkIdx(c))) {
            self.counters.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(false);
        }
        self.counters.hits.fetch_add(1, Ordering::Relaxed);
        // Zero chunks are holes in the sparse file: they read as zeros.
        dst.read_from(&self.data, offset).map_err(Error::ReadCacheFile)?;
        Ok(true)
    }

    /// Stores a verified chunk and marks it present (durable at the next persist).
    pub fn write_chunk(&self, c: ChunkIdx, data: &[u8]) -> Result<(), Error> {
        debug_assert_eq!(data.len() as u64, self.manifest.chunk_len(c));
        self.data
            .write_all_at(data, self.manifest.chunk_offset(c))
            .map_err(Error::WriteCacheFile)?;
        let mut p = self.persist.lock().unwrap_or_else(|e| e.into_inner());
        if !self.present[c.0 as usize] {
            self.present.set_aliased(c.0 as usize, true);
            self.filled.fetch_add(1, Ordering::Relaxed);
            p.unsynced.push(c);
        }
        Ok(())
    }

    /// Makes the presence of every chunk written so far durable: data
    /// first, then the bits.
    pub fn persist(&self) -> Result<(), Error> {
        let mut p = self.persist.lock().unwrap_or_else(|e| e.into_inner());
        if p.unsynced.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut p.unsynced);
        if let Err(e) = self.data.sync_data() {
            p.unsynced = batch;
            return Err(Error::SyncCacheFile(e));
        }
        let (mut lo, mut hi) = (usize::MAX, 0);
        for c in &batch {
            p.durable.set(c.0 as usize, true);
            lo = lo.min(c.0 as usize / 8);
            hi = hi.max(c.0 as usize / 8 + 1);
        }
        let bytes = &p.durable.as_raw_slice()[lo..hi];
        p.bitmap
            .write_all_at(bytes, (HEADER_LEN + lo) as u64)
            .map_err(Error::WriteCacheFile)?;
        p.bitmap.sync_data().map_err(Error::SyncCacheFile)
    }

    pub fn unsynced(&self) -> usize {
        self.persist.lock().unwrap_or_else(|e| e.into_inner()).unsynced.len()
    }
}

fn lock_dir(dir: &Path) -> Result<File, Error> {
    let p = dir.join("lock");
    let f = File::create(&p).map_err(|e| Error::Open(p.clone(), e))?;
    // SAFETY: flock(2) on a file descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(Error::Locked(dir.to_path_buf()));
    }
    Ok(f)
}

/// Bytes a cache directory holds on disk.
fn dir_usage(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// Removes the least recently used image caches that no disk uses (not in
/// `in_use`, not locked by another process) until `root` holds at most
/// `limit` bytes. Returns the images removed.
pub fn evict(root: &Path, limit: u64, in_use: &HashSet<ImageId>) -> Vec<String> {
    let mut images: Vec<(SystemTime, u64, PathBuf, String)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let used = std::fs::metadata(e.path().join("bitmap"))
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            (used, dir_usage(&e.path()), e.path(), name)
        })
        .collect();
    let mut total: u64 = images.iter().map(|i| i.1).sum();
    images.sort();
    let mut removed = Vec::new();
    for (_, size, path, name) in images {
        if total <= limit {
            break;
        }
        if in_use.iter().any(|id| id.to_hex() == name) {
            continue;
        }
        // Another daemon may be using it: its lock says so.
        let Ok(_lock) = lock_dir(&path) else { continue };
        if std::fs::remove_dir_all(&path).is_ok() {
            total = total.saturating_sub(size);
            removed.push(name);
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ChunkEntry, Digest};

    fn manifest(chunks: usize) -> Arc<Manifest> {
        Arc::new(Manifest {
            version: 1,
            size: chunks as u64 * 65536,
            chunk_size: 65536,
            chunks: (0..chunks)
                .map(|i| {
                    (i % 5 != 4).then(|| ChunkEntry {
                        digest: Digest::of(&[i as u8]),
                        stored_len: 65536,
                        zstd: false,
                    })
                })
                .collect(),
        })
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
        let mut buf = vec![0u8; 65536 * 2];
        let mut slot = [crate::engine::IoBuf::default(); 1];
        assert!(c
            .read(17 * 65536, IoRange::from_slice(&mut slot, &mut buf[..65536]))
            .unwrap());
        assert!(buf[..65536].iter().all(|&b| b == 2));
        let mut slot = [crate::engine::IoBuf::default(); 1];
        assert!(!c.read(16 * 65536, IoRange::from_slice(&mut slot, &mut buf)).unwrap());
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
        for (i, id) in ids.iter().enumerate() {
            let c = ImageCache::open(root.path(), *id, m.clone()).unwrap();
            for k in 0..4 {
                c.write_chunk(ChunkIdx(k), &[1u8; 65536]).unwrap();
            }
            c.persist().unwrap();
            drop(c);
            let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000 + i as u64);
            File::options()
                .write(true)
                .open(root.path().join(id.to_hex()).join("bitmap"))
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
        let in_use: HashSet<_> = [ids[0]].into_iter().collect();
        let one = dir_usage(&root.path().join(ids[2].to_hex()));
        let removed = evict(root.path(), one + one / 2, &in_use);
        // ids[0] is oldest but in use; ids[1] goes; then ids[2] is needed too.
        assert_eq!(removed, vec![ids[1].to_hex(), ids[2].to_hex()]);
        assert!(root.path().join(ids[0].to_hex()).exists());
    }
}
