//! A small in-memory LRU of chunk-sized values keyed by digest, bounded in
//! bytes: a home's loose chunks (P2P) and the stored forms of recently
//! fetched chunks (what peers are sent). A few hundred entries at most, so
//! eviction scans the map; a value is inserted once per fetch.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;

use crate::store::Digest;

/// A value's size against the LRU's byte cap.
pub trait Weigh {
    fn weight(&self) -> u64;
}

impl Weigh for Bytes {
    fn weight(&self) -> u64 {
        self.len() as u64
    }
}

/// A chunk as the store keeps it (`chunks/<digest>`): what a requester
/// checks with `verify_chunk` against its own manifest entry.
#[derive(Clone, Debug)]
pub struct StoredForm {
    pub bytes: Bytes,
    pub zstd: bool,
}

impl Weigh for StoredForm {
    fn weight(&self) -> u64 {
        self.bytes.len() as u64
    }
}

/// The least recently used values go beyond `cap` bytes.
pub struct ChunkLru<V> {
    cap: u64,
    inner: Mutex<Lru<V>>,
}

struct Lru<V> {
    map: HashMap<Digest, (V, u64)>,
    bytes: u64,
    tick: u64,
}

impl<V: Weigh + Clone> ChunkLru<V> {
    pub fn new(cap: u64) -> Self {
        ChunkLru {
            cap,
            inner: Mutex::new(Lru {
                map: HashMap::new(),
                bytes: 0,
                tick: 0,
            }),
        }
    }

    pub fn get(&self, digest: &Digest) -> Option<V> {
        let mut l = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        l.tick += 1;
        let tick = l.tick;
        let (value, used) = l.map.get_mut(digest)?;
        *used = tick;
        Some(value.clone())
    }

    /// Keeps a verified value; one larger than the cap is not kept.
    pub fn insert(&self, digest: Digest, value: V) {
        let len = value.weight();
        if len > self.cap {
            return;
        }
        let mut l = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        l.tick += 1;
        let tick = l.tick;
        if let Some((old, _)) = l.map.insert(digest, (value, tick)) {
            l.bytes -= old.weight();
        }
        l.bytes += len;
        while l.bytes > self.cap {
            let Some(oldest) = l.map.iter().min_by_key(|(_, (_, t))| *t).map(|(d, _)| *d) else {
                break;
            };
            if let Some((old, _)) = l.map.remove(&oldest) {
                l.bytes -= old.weight();
            }
        }
    }

    /// (entries, bytes) held.
    pub fn usage(&self) -> (usize, u64) {
        let l = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        (l.map.len(), l.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recently_used_stay_under_the_cap() {
        let lru = ChunkLru::new(300);
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
        assert!(lru.get(&d(5)).is_none(), "a value larger than the cap was kept");
    }
}
