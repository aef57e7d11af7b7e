//! The Local Cache: per host and image, a sparse data file at image offsets
//! and a presence bitmap with one bit per chunk. Shared by every disk of the
//! image on the host; read-only to guests (only verified chunks are written).
//! All file I/O goes through [`Storage`], so tests run it on a simulated disk.
//!
//! Crash safety: a bit claims a chunk only if its bytes are durable.
//! - A chunk's data is synced before its bit is persisted, so after a crash
//!   the bitmap may under-report, never over-report.
//! - The bitmap header carries a generation and the data file is named by
//!   it (`data.<gen>`): a bitmap is used only with the data file it was
//!   made for, and a new one is made durable only after its data file is.
//! - Eviction first renames the bitmap to a tombstone, so a crash part way
//!   through deleting leaves a directory that no one reads chunks from.
//! - After a failed sync, a retry may "succeed" without the lost pages
//!   (fsyncgate): the cache stops persisting bits until it is reopened.

use std::collections::HashSet;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use bitvec::prelude::*;

use crate::storage::sched::Mutex;
use crate::storage::{parent_of, IoRange, LockGuard, RealStorage, Storage, StorageFile};
use crate::store::{ChunkIdx, Digest, ImageId, Manifest};

const MAGIC: &[u8; 8] = b"SBLKBMP2";
const HEADER_LEN: usize = 64;
const BITMAP: &str = "bitmap";
/// A new bitmap is written here, then renamed over [`BITMAP`].
const BITMAP_TMP: &str = "bitmap.tmp";
/// An image directory being evicted: its bitmap renamed so nothing uses it.
const TOMBSTONE: &str = "bitmap.evicting";
const LOCK: &str = "lock";
const DATA_PREFIX: &str = "data.";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("create cache directory {0}")]
    CreateDir(std::path::PathBuf, #[source] io::Error),
    #[error("lock cache {0}")]
    Lock(std::path::PathBuf, #[source] io::Error),
    #[error("cache {0} is in use by another streamblk process")]
    Locked(std::path::PathBuf),
    #[error("open cache file {0}")]
    Open(std::path::PathBuf, #[source] io::Error),
    #[error("start cache {0} afresh")]
    Reset(std::path::PathBuf, #[source] io::Error),
    #[error("read cache file")]
    ReadCacheFile(#[source] io::Error),
    #[error("write cache file")]
    WriteCacheFile(#[source] io::Error),
    #[error("sync cache file")]
    SyncCacheFile(#[source] io::Error),
    #[error("the cache stopped storing chunks after a failed write or sync; a restart recovers it")]
    Stopped,
}

/// What the cache has seen; read by `status` and the logs.
#[derive(Debug, Default)]
pub struct CacheCounters {
    /// Guest reads served from the cache.
    pub hits: AtomicU64,
    /// Guest reads that had to wait for a fetch.
    pub misses: AtomicU64,
}

/// The first [`HEADER_LEN`] bytes of a bitmap file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    chunks: u32,
    id: ImageId,
    /// Names the data file this bitmap's bits describe.
    generation: u64,
    /// When the cache was last opened (ns since the epoch), for LRU eviction.
    last_used: u64,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&self.chunks.to_le_bytes());
        b[16..48].copy_from_slice(&self.id.0);
        b[48..56].copy_from_slice(&self.generation.to_le_bytes());
        b[56..64].copy_from_slice(&self.last_used.to_le_bytes());
        b
    }

    /// Reads the header of `file`; `None` if it is not a bitmap.
    fn read(file: &(dyn StorageFile + 'static)) -> io::Result<Option<Header>> {
        if file.len()? < HEADER_LEN as u64 {
            return Ok(None);
        }
        let mut b = [0u8; HEADER_LEN];
        file.read_exact_at(&mut b, 0)?;
        if &b[..8] != MAGIC {
            return Ok(None);
        }
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
        Ok(Some(Header {
            chunks: u32::from_le_bytes(b[8..12].try_into().unwrap()),
            id: Digest(b[16..48].try_into().unwrap()),
            generation: u64_at(48),
            last_used: u64_at(56),
        }))
    }
}

struct Persist {
    bitmap: Arc<dyn StorageFile>,
    /// Bits whose data is synced, as on disk.
    durable: BitVec<u8, Lsb0>,
    /// Chunks written but not yet synced.
    unsynced: Vec<ChunkIdx>,
    /// A sync failed: nothing may be persisted again by this instance.
    stopped: bool,
}

pub struct ImageCache {
    id: ImageId,
    manifest: Arc<Manifest>,
    data: Arc<dyn StorageFile>,
    present: BitVec<AtomicU64, Lsb0>,
    /// Non-zero chunks present; the fill progress.
    filled: AtomicU64,
    /// Held across storage operations: a scheduler-aware lock.
    persist: Mutex<Persist>,
    pub counters: CacheCounters,
    _lock: LockGuard,
}

impl ImageCache {
    /// Opens (creating if needed) the cache of image `id` under `root` on
    /// the real file system.
    pub fn open(root: &Path, id: ImageId, manifest: Arc<Manifest>) -> Result<Self, Error> {
        Self::open_in(&RealStorage, root, id, manifest)
    }

    /// Opens (creating if needed) the cache of image `id` under `root`.
    pub fn open_in(storage: &dyn Storage, root: &Path, id: ImageId, manifest: Arc<Manifest>) -> Result<Self, Error> {
        let dir = root.join(id.to_hex());
        storage
            .create_dir_all(&dir)
            .map_err(|e| Error::CreateDir(dir.clone(), e))?;
        let lock = match storage.try_lock(&dir.join(LOCK)) {
            Ok(Some(lock)) => lock,
            Ok(None) => return Err(Error::Locked(dir)),
            Err(e) => return Err(Error::Lock(dir, e)),
        };
        let n = manifest.chunk_count() as usize;
        let Bitmap {
            file: bitmap,
            header,
            durable,
        } = match load(storage, &dir, id, n)? {
            Loaded::Usable(found) => {
                // Leftovers of an interrupted reset or eviction; harmless if
                // a removal fails or is lost.
                let _ = remove_all_but(storage, &dir, &[BITMAP, &data_name(found.header.generation)]);
                found
            }
            Loaded::Unusable { generation } => {
                reset(storage, &dir, id, &manifest, generation).map_err(|e| Error::Reset(dir.clone(), e))?
            }
        };
        let data_path = dir.join(data_name(header.generation));
        let data = storage.open(&data_path, false).map_err(|e| Error::Open(data_path, e))?;
        // Stamp the use for LRU eviction (best effort: only the stamp differs
        // from what is there). The sync makes durable any bits a previous run
        // wrote but did not sync: their data was synced before they were written.
        let stamp = Header {
            last_used: now(),
            ..header
        };
        let _ = bitmap.write_all_at(&stamp.encode(), 0);
        bitmap.sync_data().map_err(Error::SyncCacheFile)?;

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
                stopped: false,
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
        self.data.read_at(dst, offset).map_err(Error::ReadCacheFile)?;
        Ok(true)
    }

    /// Chunk `c`'s bytes if it is present, for a peer; not counted as a
    /// guest read. None if it is not present (an all-zero chunk never is).
    pub fn read_chunk(&self, c: ChunkIdx) -> Result<Option<Vec<u8>>, Error> {
        if self.manifest.chunks[c.0 as usize].is_none() || !self.present[c.0 as usize] {
            return Ok(None);
        }
        let mut buf = vec![0u8; self.manifest.chunk_len(c) as usize];
        self.data
            .read_at(IoRange::from_slice(&mut buf), self.manifest.chunk_offset(c))
            .map_err(Error::ReadCacheFile)?;
        Ok(Some(buf))
    }

    /// Stores a verified chunk and marks it present (durable at the next
    /// persist). Fails once the cache has stopped.
    pub fn write_chunk(&self, c: ChunkIdx, data: &[u8]) -> Result<(), Error> {
        debug_assert_eq!(data.len() as u64, self.manifest.chunk_len(c));
        if self.present[c.0 as usize] {
            return Ok(());
        }
        self.data
            .write_all_at(data, self.manifest.chunk_offset(c))
            .map_err(Error::WriteCacheFile)?;
        let mut p = self.persist.lock();
        if p.stopped {
            return Err(Error::Stopped);
        }
        if !self.present[c.0 as usize] {
            self.present.set_aliased(c.0 as usize, true);
            self.filled.fetch_add(1, Ordering::Relaxed);
            p.unsynced.push(c);
        }
        Ok(())
    }

    /// Makes the presence of every chunk written so far durable: data
    /// first, then the bits. After a failed sync every call fails.
    pub fn persist(&self) -> Result<(), Error> {
        let mut p = self.persist.lock();
        if p.stopped {
            return Err(Error::Stopped);
        }
        if p.unsynced.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut p.unsynced);
        if let Err(e) = self.data.sync_data() {
            // The kernel may have dropped these pages: the chunks are not
            // local any more, and a later sync proves nothing.
            p.stopped = true;
            for c in batch {
                self.present.set_aliased(c.0 as usize, false);
                self.filled.fetch_sub(1, Ordering::Relaxed);
            }
            return Err(Error::SyncCacheFile(e));
        }
        let (mut lo, mut hi) = (usize::MAX, 0);
        for c in &batch {
            p.durable.set(c.0 as usize, true);
            lo = lo.min(c.0 as usize / 8);
            hi = hi.max(c.0 as usize / 8 + 1);
        }
        let written = p
            .bitmap
            .write_all_at(&p.durable.as_raw_slice()[lo..hi], (HEADER_LEN + lo) as u64);
        if let Err(e) = written {
            if e.raw_os_error() == Some(libc::ENOSPC) {
                // A refused write changed nothing, and the data is synced:
                // the bits can wait for the next persist.
                p.unsynced = batch;
            } else {
                p.stopped = true;
            }
            return Err(Error::WriteCacheFile(e));
        }
        if let Err(e) = p.bitmap.sync_data() {
            p.stopped = true;
            return Err(Error::SyncCacheFile(e));
        }
        Ok(())
    }

    pub fn unsynced(&self) -> usize {
        self.persist.lock().unsynced.len()
    }
}

/// An open bitmap file and what it holds.
struct Bitmap {
    file: Arc<dyn StorageFile>,
    header: Header,
    durable: BitVec<u8, Lsb0>,
}

/// What [`load`] found in an image directory.
enum Loaded {
    /// A bitmap for this image, with the data file of its generation.
    Usable(Bitmap),
    /// Nothing usable; `generation` is the bitmap's, if it had one, else 0.
    Unusable { generation: u64 },
}

/// Reads the bitmap of `dir` if it belongs to image `id` of `n` chunks and
/// the data file of its generation exists.
fn load(storage: &dyn Storage, dir: &Path, id: ImageId, n: usize) -> Result<Loaded, Error> {
    let path = dir.join(BITMAP);
    let bitmap = match storage.open(&path, false) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Loaded::Unusable { generation: 0 }),
        Err(e) => return Err(Error::Open(path, e)),
    };
    // An I/O error is not "unusable": a reset could then reuse the
    // generation of a bitmap it failed to read.
    let Some(header) = Header::read(&*bitmap).map_err(Error::ReadCacheFile)? else {
        return Ok(Loaded::Unusable { generation: 0 });
    };
    let unusable = Loaded::Unusable {
        generation: header.generation,
    };
    let len = bitmap.len().map_err(Error::ReadCacheFile)?;
    if header.id != id || header.chunks as usize != n || len < (HEADER_LEN + n.div_ceil(8)) as u64 {
        return Ok(unusable);
    }
    let data_path = dir.join(data_name(header.generation));
    if !storage.exists(&data_path).map_err(|e| Error::Open(data_path, e))? {
        return Ok(unusable);
    }
    let mut durable = bitvec![u8, Lsb0; 0; n];
    bitmap
        .read_exact_at(durable.as_raw_mut_slice(), HEADER_LEN as u64)
        .map_err(Error::ReadCacheFile)?;
    Ok(Loaded::Usable(Bitmap {
        file: bitmap,
        header,
        durable,
    }))
}

/// Starts the cache in `dir` afresh under a generation newer than any there
/// (`seen` and the data files'). The new data file is durable before the
/// new bitmap names it, and the bitmap replaces the old one atomically, so a
/// crash anywhere leaves either the old state or the new empty one.
fn reset(storage: &dyn Storage, dir: &Path, id: ImageId, manifest: &Manifest, seen: u64) -> io::Result<Bitmap> {
    let newest = storage
        .read_dir(dir)?
        .iter()
        .filter_map(|name| name.strip_prefix(DATA_PREFIX)?.parse::<u64>().ok())
        .fold(seen, u64::max);
    let header = Header {
        chunks: manifest.chunk_count(),
        id,
        generation: newest + 1,
        last_used: now(),
    };
    remove_all_but(storage, dir, &[BITMAP])?;
    // Sparse: it grows as chunks arrive, and reads past its end are zeros.
    let data = storage.open(&dir.join(data_name(header.generation)), true)?;
    data.sync_data()?;
    storage.sync_dir(dir)?;

    let durable = bitvec![u8, Lsb0; 0; manifest.chunk_count() as usize];
    let mut bytes = header.encode().to_vec();
    bytes.extend_from_slice(durable.as_raw_slice());
    let tmp = dir.join(BITMAP_TMP);
    let bitmap = storage.open(&tmp, true)?;
    bitmap.write_all_at(&bytes, 0)?;
    bitmap.sync_data()?;
    storage.rename(&tmp, &dir.join(BITMAP))?;
    storage.sync_dir(dir)?;
    // The image directory itself, if it is new.
    storage.sync_dir(&parent_of(dir))?;
    Ok(Bitmap {
        file: bitmap,
        header,
        durable,
    })
}

fn data_name(generation: u64) -> String {
    format!("{DATA_PREFIX}{generation}")
}

/// Removes the files of `dir` other than `keep` and the lock.
fn remove_all_but(storage: &dyn Storage, dir: &Path, keep: &[&str]) -> io::Result<()> {
    for name in storage.read_dir(dir)? {
        if name != LOCK && !keep.contains(&name.as_str()) {
            storage.remove_file(&dir.join(name))?;
        }
    }
    Ok(())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Removes the least recently used image caches of `root` on the real file
/// system; see [`evict_in`].
pub fn evict(root: &Path, limit: u64, in_use: &HashSet<ImageId>) -> Vec<String> {
    evict_in(&RealStorage, root, limit, in_use)
}

/// Removes the least recently used image caches that no disk uses (not in
/// `in_use`, not locked by another process) until `root` holds at most
/// `limit` bytes, and the remains of interrupted evictions whatever the
/// size. Returns the images removed.
pub fn evict_in(storage: &dyn Storage, root: &Path, limit: u64, in_use: &HashSet<ImageId>) -> Vec<String> {
    let Ok(names) = storage.read_dir(root) else {
        return Vec::new();
    };
    let mut images: Vec<(u64, u64, ImageId)> = names
        .iter()
        .filter_map(|name| ImageId::from_hex(name))
        .map(|id| {
            let dir = root.join(id.to_hex());
            // Unreadable, half made or tombstoned: the oldest.
            let used = storage
                .open(&dir.join(BITMAP), false)
                .ok()
                .and_then(|f| Header::read(&*f).ok().flatten())
                .map_or(0, |h| h.last_used);
            (used, storage.usage(&dir).unwrap_or(0), id)
        })
        .collect();
    let mut total: u64 = images.iter().map(|i| i.1).sum();
    images.sort();
    let mut removed = Vec::new();
    for (_, size, id) in images {
        if in_use.contains(&id) {
            continue;
        }
        let dir = root.join(id.to_hex());
        let dead = storage.exists(&dir.join(TOMBSTONE)).unwrap_or(false);
        if total <= limit && !dead {
            continue;
        }
        // Another daemon may be using it: its lock says so.
        let Ok(Some(_lock)) = storage.try_lock(&dir.join(LOCK)) else {
            continue;
        };
        if remove_image(storage, root, &dir).is_ok() {
            total = total.saturating_sub(size);
            if !dead {
                removed.push(id.to_hex());
            }
        }
    }
    removed
}

/// Deletes an image directory, first making it unusable: the bitmap becomes
/// a tombstone (durably) before any data goes, and is deleted last, so a
/// crash part way through never leaves a bitmap whose chunks are gone.
fn remove_image(storage: &dyn Storage, root: &Path, dir: &Path) -> io::Result<()> {
    let bitmap = dir.join(BITMAP);
    if storage.exists(&bitmap)? {
        storage.rename(&bitmap, &dir.join(TOMBSTONE))?;
        storage.sync_dir(dir)?;
    }
    // File by file, as remove_dir_all does on a real file system, so the
    // order is ours (and a simulated disk sees the states between).
    remove_all_but(storage, dir, &[TOMBSTONE])?;
    if storage.exists(&dir.join(TOMBSTONE))? {
        storage.remove_file(&dir.join(TOMBSTONE))?;
    }
    storage.remove_dir_all(dir)?;
    storage.sync_dir(root)
}

#[cfg(test)]
mod tests;
