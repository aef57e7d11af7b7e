//! The Local Cache. The host's [`ChunkStore`] keeps every chunk once by
//! digest, whichever images hold it; an [`ImageCache`] is one image's view
//! of it: the image's manifest and, per chunk, the slot it was last found
//! in. Read-only to guests (only verified chunks are written). All file
//! I/O goes through [`Storage`](crate::storage::Storage), so tests run it
//! on a simulated disk.

mod legacy;
mod store;

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub(crate) use legacy::old_images;
pub use store::ChunkStore;
use store::{Pinned, SlotRef};

use crate::storage::IoRange;
use crate::store::{ChunkIdx, ImageId, Manifest};

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
    #[error("rewrite cache {0}")]
    Reset(std::path::PathBuf, #[source] io::Error),
    #[error("{0} is not a streamblk chunk index; move it away or point --cache-dir elsewhere")]
    NotAnIndex(std::path::PathBuf),
    #[error("read cache file")]
    ReadCacheFile(#[source] io::Error),
    #[error("write cache file")]
    WriteCacheFile(#[source] io::Error),
    #[error("sync cache file")]
    SyncCacheFile(#[source] io::Error),
    #[error("a chunk of {0} bytes is larger than the largest cache slot (4 MiB)")]
    TooLarge(u64),
    #[error("the cache is full of chunks being read: none can be evicted now")]
    Full,
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

pub struct ImageCache {
    id: ImageId,
    manifest: Arc<Manifest>,
    store: Arc<ChunkStore>,
    /// Per chunk: the slot it was last found in, or [`SlotRef::NONE`]. A
    /// stale one (the chunk was evicted) is looked up again by digest.
    view: Box<[AtomicU64]>,
    pub counters: CacheCounters,
}

impl ImageCache {
    /// Opens image `id`'s view of the host's chunk store, first moving in
    /// the chunks of its cache directory of the old layout, if it has one.
    pub fn open(store: &Arc<ChunkStore>, id: ImageId, manifest: Arc<Manifest>) -> Result<Self, Error> {
        let cache = ImageCache {
            id,
            view: (0..manifest.chunks.len())
                .map(|_| AtomicU64::new(SlotRef::NONE))
                .collect(),
            manifest,
            store: store.clone(),
            counters: CacheCounters::default(),
        };
        let moved = legacy::migrate(&cache)?;
        if moved > 0 {
            tracing::info!(image = %id, "moved {moved} chunks from the old cache layout into the chunk store");
        }
        Ok(cache)
    }

    pub fn id(&self) -> &ImageId {
        &self.id
    }

    pub fn manifest(&self) -> &Arc<Manifest> {
        &self.manifest
    }

    pub fn store(&self) -> &Arc<ChunkStore> {
        &self.store
    }

    /// The slot that holds non-zero chunk `c` now, if any.
    fn slot(&self, c: usize) -> Option<SlotRef> {
        if let Some(r) = SlotRef::from_raw(self.view[c].load(Ordering::Relaxed)) {
            if self.store.is_live(r) {
                return Some(r);
            }
        }
        let entry = self.manifest.chunks[c].as_ref()?;
        let r = self.store.lookup(&entry.digest)?;
        self.view[c].store(r.raw(), Ordering::Relaxed);
        Some(r)
    }

    /// Pins non-zero chunk `c`'s slot for reading, if the chunk is local.
    fn pin(&self, c: usize) -> Option<Pinned<'_>> {
        if let Some(r) = SlotRef::from_raw(self.view[c].load(Ordering::Relaxed)) {
            if let Some(p) = self.store.pin(r) {
                return Some(p);
            }
        }
        let entry = self.manifest.chunks[c].as_ref()?;
        let r = self.store.lookup(&entry.digest)?;
        self.view[c].store(r.raw(), Ordering::Relaxed);
        self.store.pin(r)
    }

    /// True if the chunk's data is local: present, or all zeros.
    pub fn is_ready(&self, c: ChunkIdx) -> bool {
        let c = c.0 as usize;
        self.manifest.chunks[c].is_none() || self.slot(c).is_some()
    }

    /// (non-zero chunks present, non-zero chunks in all).
    pub fn fill(&self) -> (u64, u64) {
        let (mut have, mut all) = (0, 0);
        for (c, entry) in self.manifest.chunks.iter().enumerate() {
            if entry.is_some() {
                all += 1;
                have += self.slot(c).is_some() as u64;
            }
        }
        (have, all)
    }

    /// Reads `offset..offset+dst.len()` if every chunk of it is local.
    /// Each chunk read is pinned while it is read: never evicted under it.
    pub fn read(&self, offset: u64, dst: IoRange) -> Result<bool, Error> {
        let m = &self.manifest;
        let end = offset + dst.len() as u64;
        for c in m.chunks_of(offset, dst.len() as u64) {
            let start = m.chunk_offset(ChunkIdx(c));
            let (from, to) = (offset.max(start), end.min(start + m.chunk_size as u64));
            let part = dst.sub((from - offset) as usize, (to - from) as usize);
            if m.chunks[c as usize].is_none() {
                part.fill_zero();
                continue;
            }
            let Some(pinned) = self.pin(c as usize) else {
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
                return Ok(false);
            };
            pinned.read(part, from - start).map_err(Error::ReadCacheFile)?;
        }
        self.counters.hits.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Chunk `c`'s bytes if it is present, for a peer; not counted as a
    /// guest read. None if it is not present (an all-zero chunk never is).
    pub fn read_chunk(&self, c: ChunkIdx) -> Result<Option<Vec<u8>>, Error> {
        if self.manifest.chunks[c.0 as usize].is_none() {
            return Ok(None);
        }
        let Some(pinned) = self.pin(c.0 as usize) else {
            return Ok(None);
        };
        let mut buf = vec![0u8; self.manifest.chunk_len(c) as usize];
        pinned
            .read(IoRange::from_slice(&mut buf), 0)
            .map_err(Error::ReadCacheFile)?;
        Ok(Some(buf))
    }

    /// Stores a verified chunk (once per host, whichever images hold it)
    /// and marks it present; durable at the next persist. Fails once the
    /// store has stopped.
    pub fn write_chunk(&self, c: ChunkIdx, data: &[u8]) -> Result<(), Error> {
        debug_assert_eq!(data.len() as u64, self.manifest.chunk_len(c));
        let Some(entry) = &self.manifest.chunks[c.0 as usize] else {
            return Ok(());
        };
        let r = self.store.insert(entry.digest, data)?;
        self.view[c.0 as usize].store(r.raw(), Ordering::Relaxed);
        Ok(())
    }

    /// True if another chunk fits under the cache's size cap without
    /// evicting: background fill stops when it does not.
    pub fn has_room(&self) -> bool {
        self.store.has_room(self.manifest.chunk_size as u64)
    }

    /// Makes the presence of every chunk written so far durable.
    pub fn persist(&self) -> Result<(), Error> {
        self.store.persist()
    }

    pub fn unsynced(&self) -> usize {
        self.store.unsynced()
    }
}

#[cfg(test)]
mod tests;
