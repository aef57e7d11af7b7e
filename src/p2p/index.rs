//! Where this host finds a chunk by digest: the images it has open (where
//! a missing chunk can be fetched), the host's chunk store (every chunk it
//! holds, whichever image brought it, open or not), and a small in-memory
//! LRU of chunks it fetched as a home for images it does not have open.
//! Also the open images by id, with their boot profiles: what a home may
//! prefetch for its peers (never more than an open image's manifest and
//! profile name).

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock, Weak};

use bytes::Bytes;

use crate::cache::{ChunkStore, ImageCache};
use crate::fetch::ChunkLru;
use crate::store::{ChunkIdx, Digest, ImageId};

/// Where one chunk is: the open images that have it, and its index there.
type Places = Vec<(Weak<ImageCache>, ChunkIdx)>;

/// An open image with a boot profile, and the profile's chunk indices in order.
type Profiled = (Weak<ImageCache>, Arc<[u32]>);

/// digest -> the open images' caches that have a chunk with it.
#[derive(Default)]
pub struct ChunkIndex {
    map: RwLock<HashMap<Digest, Places>>,
    /// The host's chunk store, known once an image has been opened.
    store: OnceLock<Arc<ChunkStore>>,
    /// The open images that have a boot profile, by id, and the profile's
    /// chunk indices in order.
    profiles: RwLock<HashMap<ImageId, Profiled>>,
}

impl ChunkIndex {
    /// Adds every non-zero chunk of an opened image, and its boot profile
    /// (chunk indices in order; checked against the manifest when it was
    /// parsed), and drops the entries of images closed since.
    pub fn add(&self, cache: &Arc<ImageCache>, profile: Option<Arc<[u32]>>) {
        self.set_store(cache.store().clone());
        {
            let mut profiles = self.profiles.write().unwrap_or_else(|e| e.into_inner());
            profiles.retain(|_, (w, _)| w.strong_count() > 0);
            if let Some(p) = profile {
                profiles.insert(*cache.id(), (Arc::downgrade(cache), p));
            }
        }
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

    /// Open image `id` and its boot profile, if this host has it open
    /// with one.
    pub fn profile(&self, id: &ImageId) -> Option<(Arc<ImageCache>, Arc<[u32]>)> {
        let profiles = self.profiles.read().unwrap_or_else(|e| e.into_inner());
        let (w, p) = profiles.get(id)?;
        Some((w.upgrade()?, p.clone()))
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
/// the least recently used go beyond the cap.
pub type LooseChunks = ChunkLru<Bytes>;
