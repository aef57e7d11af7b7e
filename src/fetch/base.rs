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

    /// Wants every chunk of the range at demand class, all at once. A
    /// failed flight (one that started before this request, say) is wanted
    /// again: the request fails only once its own deadline, counted from
    /// `since`, has passed.
    fn fetch(&self, offset: u64, len: u64, since: Instant) -> FetchFuture {
        let (cache, fetcher) = (self.cache.clone(), self.fetcher.clone());
        let chunks = cache.manifest().chunks_of(offset, len);
        let by = tokio::time::Instant::from_std(since + fetcher.config().deadline);
        Box::pin(async move {
            let start = Instant::now();
            let fetched = tokio::time::timeout_at(by, async {
                loop {
                    let wants = chunks.clone().map(|c| fetcher.want(&cache, ChunkIdx(c), Class::Demand));
                    match futures::future::try_join_all(wants).await {
                        Ok(_) => return Ok(()),
                        Err(e) if e.is_transient() => {
                            tokio::time::sleep(RETRY_PAUSE).await;
                        }
                        Err(e) => return Err(e),
                    }
                }
            })
            .await;
            let counters = fetcher.counters();
            let waited = start.elapsed();
            counters.demand_waits.fetch_add(1, Ordering::Relaxed);
            counters
                .demand_wait_us
                .fetch_add(waited.as_micros() as u64, Ordering::Relaxed);
            counters.demand_wait.observe(waited);
            match fetched {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(Error::FetchBase(Box::new(ArcError(e)))),
                Err(_) => Err(Error::FetchBase(Box::new(DeadlinePassed(since.elapsed())))),
            }
        })
    }
}

/// Between a failed flight and wanting its chunk again.
const RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// A guest request's fetch deadline passed.
#[derive(Debug, thiserror::Error)]
#[error("the fetch deadline passed {0:.1?} after the guest's request")]
struct DeadlinePassed(std::time::Duration);

/// An `Arc`ed error as a boxed error source.
#[derive(Debug)]
struct ArcError(Arc<super::FetchError>);

impl std::fmt::Display for ArcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", crate::DisplayChain(&*self.0))
    }
}

impl std::error::Error for ArcError {}
