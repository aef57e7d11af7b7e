//! Where this host finds a chunk by digest: the images it has open (where
//! a missing chunk can be fetched), the host's chunk store (every chunk it
//! holds, whichever image brought it, open or not), and a small in-memory
//! LRU of chunks it fetched as a home for images it does not have open.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};

use bytes::Bytes;

use crate::cache::{ChunkStore, ImageCache};
use crate::store::{ChunkIdx, Digest};

/// Where one chunk is: the open images that have it, and its index there.
type Places = Vec<(Weak<ImageCache>, ChunkIdx)>;

/// digest -> the open images' caches that have a chunk with it.
#[derive(Default)]
pub struct ChunkIndex {
    map: RwLock<HashMap<Digest, Places>>,
    /// The host's chunk store, known once an image has been opened.
    store: OnceLock<Arc<ChunkStore>>,
}

impl ChunkIndex {
    /// Adds every non-zero chunk of an opened image, and drops the entries
    /// of images closed since.
    pub fn add(&self, cache: &Arc<ImageCache>) {
        self.set_store(cache.store().clone());
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, v| {
            v.retain(|(w, _)| w.strong_count() > 0);
            !v.is_empty()
        });
        for (i, entry) in cache.manifest().chunks.iter().enumerate() {
            if let Some(e) = entry {
                let v = map.entry(e.digest).or_default();
                // An image may hold the same chunk many times: one place is enough.
                if !v.iter().any(|(w, _)| w.as_ptr() == Arc::as_ptr(cache)) {
                    v.push((Arc::downgrade(cache), ChunkIdx(i as u32)));
                }
            }
        }
    }

    /// A place of the chunk in an open image: one where it is present if
    /// there is one (true), else one where it can be fetched (false).
    pub fn find(&self, digest: &Digest) -> Option<(Arc<ImageCache>, ChunkIdx, bool)> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        let mut cold = None;
        for (w, c) in map.get(digest)? {
            let Some(cache) = w.upgrade() else { continue };
            if cache.is_ready(*c) {
                return Some((cache, *c, true));
            }
            cold.get_or_insert((cache, *c, false));
        }
        cold
    }

    /// Serves the host's chunk store's chunks (the one store a daemon has).
    pub fn set_store(&self, store: Arc<ChunkStore>) {
        let _ = self.store.set(store);
    }

    /// The host's chunk store, once an image has been opened.
    pub fn store(&self) -> Option<&Arc<ChunkStore>> {
        self.store.get()
    }

    /// Distinct chunks indexed (closed images' until the next `add`).
    pub fn len(&self) -> usize {
        self.map.read().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Chunks a home fetched for its peers without having their image open:
/// the least recently used go beyond `cap` bytes.
pub struct LooseChunks {
    cap: u64,
    inner: Mutex<Lru>,
}

#[derive(Default)]
struct Lru {
    map: HashMap<Digest, (Bytes, u64)>,
    bytes: u64,
    tick: u64,
}

impl LooseChunks {
    pub fn new(cap: u64) -> Self {
        LooseChunks {
            cap,
            inner: Mutex::default(),
        }
    }

    pub fn get(&self, digest: &Digest) -> Option<Bytes> {
        let mut l = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        l.tick += 1;
        let tick = l.tick;
        let (bytes, used) = l.map.get_mut(digest)?;
        *used = tick;
        Some(bytes.clone())
    }

    /// Keeps a verified chunk. Eviction scans the map: it holds a few
    /// hundred chunks, and a chunk is inserted once per store fetch.
    pub fn insert(&self, digest: Digest, data: Bytes) {
        if data.len() as u64 > self.cap {
            return;
        }
        let mut l = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        l.tick += 1;
        let tick = l.tick;
        let len = data.len() as u64;
        if let Some((old, _)) = l.map.insert(digest, (data, tick)) {
            l.bytes -= old.len() as u64;
        }
        l.bytes += len;
        while l.bytes > self.cap {
            let Some(oldest) = l.map.iter().min_by_key(|(_, (_, t))| *t).map(|(d, _)| *d) else {
                break;
            };
            if let Some((old, _)) = l.map.remove(&oldest) {
                l.bytes -= old.len() as u64;
            }
        }
    }

    /// (chunks, bytes) held.
    pub fn usage(&self) -> (usize, u64) {
        let l = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        (l.map.len(), l.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loose_chunks_keep_the_recently_used_under_the_cap() {
        let lru = LooseChunks::new(300);
        let d = |i: u8| Digest::of(&[i]);
        lru.insert(d(1), Bytes::from(vec![1; 100]));
        lru.insert(d(2), Bytes::from(vec![2; 100]));
        lru.insert(d(3), Bytes::from(vec![3; 100]));
        assert!(lru.get(&d(1)).is_some());
        lru.insert(d(4), Bytes::from(vec![4; 100]));
        assert!(lru.get(&d(2)).is_none(), "the least recently used stayed");
        assert_eq!(lru.get(&d(1)).unwrap()[0], 1);
        assert_eq!(lru.usage(), (3, 300));
        lru.insert(d(5), Bytes::from(vec![5; 400]));
        assert!(lru.get(&d(5)).is_none(), "a chunk larger than the cap was kept");
    }
}
