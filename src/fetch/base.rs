//! A disk base streamed from the store: reads of local chunks come from the
//! Local Cache; missing chunks are fetched at demand class.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::{Class, Fetcher, ProfileReplay};
use crate::cache::ImageCache;
use crate::engine::{Base, Error, FetchFuture, IoRange};
use crate::store::ChunkIdx;

pub struct StreamedBase {
    cache: Arc<ImageCache>,
    fetcher: Fetcher,
    profile: Option<Arc<ProfileReplay>>,
}

impl StreamedBase {
    pub fn new(cache: Arc<ImageCache>, fetcher: Fetcher, profile: Option<Arc<ProfileReplay>>) -> Self {
        StreamedBase {
            cache,
            fetcher,
            profile,
        }
    }
}

impl Base for StreamedBase {
    fn size(&self) -> u64 {
        self.cache.manifest().size
    }

    fn id(&self) -> String {
        format!("image:{}", self.cache.id())
    }

    fn read_local(&self, offset: u64, dst: IoRange) -> Result<bool, Error> {
        if let Some(p) = &self.profile {
            p.note_read(self.cache.manifest().chunks_of(offset, dst.len() as u64), |c| {
                self.cache.is_ready(c)
            });
        }
        self.cache.read(offset, dst).map_err(|e| Error::FetchBase(Box::new(e)))
    }

    /// Starts the profile's boot clock (the first attach counts).
    fn attach(&self) {
        if let Some(p) = &self.profile {
            p.note_attach();
        }
    }

    fn fetch(&self, offset: u64, len: u64) -> FetchFuture {
        let wants: Vec<_> = self
            .cache
            .manifest()
            .chunks_of(offset, len)
            .map(|c| self.fetcher.want(&self.cache, ChunkIdx(c), Class::Demand))
            .collect();
        let fetcher = self.fetcher.clone();
        Box::pin(async move {
            let start = Instant::now();
            let result = futures::future::try_join_all(wants).await;
            let counters = fetcher.counters();
            let waited = start.elapsed();
            counters.demand_waits.fetch_add(1, Ordering::Relaxed);
            counters
                .demand_wait_us
                .fetch_add(waited.as_micros() as u64, Ordering::Relaxed);
            counters.demand_wait.observe(waited);
            result.map(|_| ()).map_err(|e| Error::FetchBase(Box::new(ArcError(e))))
        })
    }
}

/// An `Arc`ed error as a boxed error source.
#[derive(Debug)]
struct ArcError(Arc<super::FetchError>);

impl std::fmt::Display for ArcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", crate::DisplayChain(&*self.0))
    }
}

impl std::error::Error for ArcError {}
