//! Boot profile replay: stream an image's profile in order at profile
//! priority, a bounded window ahead of the guests' progress through it, and
//! count how well it kept ahead.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Weak;
use std::time::Instant;

use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::Notify;

use super::{Class, Fetcher};
use crate::cache::ImageCache;
use crate::profile::Profile;
use crate::store::ChunkIdx;

const NOT_IN_PROFILE: u32 = u32::MAX;
const UNSET: u64 = u64::MAX;

/// What replay did; read by `status`.
#[derive(Debug, Default)]
pub struct ProfileCounters {
    /// Profile chunks the stream fetched.
    pub streamed: AtomicU64,
    /// Profile chunks already local when a guest first read them.
    pub hits: AtomicU64,
    /// Profile chunks a guest had to wait for.
    pub stalls: AtomicU64,
}

pub struct ProfileReplay {
    profile: Profile,
    /// Position in the profile of each chunk of the image.
    position: Vec<u32>,
    /// Per profile position: a guest has read it.
    seen: Vec<AtomicBool>,
    /// One past the furthest profile position a guest has read.
    progress: AtomicU32,
    moved: Notify,
    start: Instant,
    first_read_us: AtomicU64,
    done_us: AtomicU64,
    pub counters: ProfileCounters,
}

impl ProfileReplay {
    pub fn new(profile: Profile, chunk_count: u32) -> Self {
        let mut position = vec![NOT_IN_PROFILE; chunk_count as usize];
        for (i, &c) in profile.chunks.iter().enumerate() {
            position[c as usize] = i as u32;
        }
        ProfileReplay {
            seen: (0..profile.chunks.len()).map(|_| AtomicBool::new(false)).collect(),
            profile,
            position,
            progress: AtomicU32::new(0),
            moved: Notify::new(),
            start: Instant::now(),
            first_read_us: AtomicU64::new(UNSET),
            done_us: AtomicU64::new(UNSET),
            counters: ProfileCounters::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.profile.chunks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.profile.chunks.is_empty()
    }

    /// Notes a guest read of `chunks`; `ready` says whether a chunk is local.
    pub fn note_read(&self, chunks: std::ops::Range<u32>, ready: impl Fn(ChunkIdx) -> bool) {
        if self.first_read_us.load(Ordering::Relaxed) == UNSET {
            let _ = self.first_read_us.compare_exchange(
                UNSET,
                self.start.elapsed().as_micros() as u64,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        for c in chunks {
            let p = self.position[c as usize];
            if p == NOT_IN_PROFILE || self.seen[p as usize].swap(true, Ordering::Relaxed) {
                continue;
            }
            if ready(ChunkIdx(c)) {
                self.counters.hits.fetch_add(1, Ordering::Relaxed);
            } else {
                self.counters.stalls.fetch_add(1, Ordering::Relaxed);
            }
            if self.progress.fetch_max(p + 1, Ordering::Relaxed) < p + 1 {
                self.moved.notify_one();
            }
        }
    }

    /// Waits until the boot the profile recorded would be over.
    pub async fn boot_over(&self) {
        if let Some(ms) = self.profile.boot_ms {
            tokio::time::sleep_until((self.start + std::time::Duration::from_millis(ms)).into()).await;
        }
    }

    /// Milliseconds from attach to the guest's first read, and to the end of the profile stream.
    pub fn times_ms(&self) -> (Option<u64>, Option<u64>) {
        let f = |v: u64| (v != UNSET).then_some(v / 1000);
        (
            f(self.first_read_us.load(Ordering::Relaxed)),
            f(self.done_us.load(Ordering::Relaxed)),
        )
    }
}

/// Streams the profile, `window` chunks ahead of the guests' progress.
pub(super) async fn replay(fetcher: &Fetcher, cache: &Weak<ImageCache>, replay: &ProfileReplay, window: u32) {
    let per_pass = fetcher.config().low_concurrency.max(1);
    let n = replay.len() as u32;
    let mut next = 0u32;
    let mut running = FuturesUnordered::new();
    loop {
        while running.len() < per_pass && next < n && next < replay.progress.load(Ordering::Relaxed) + window {
            let Some(c) = cache.upgrade() else { return };
            let chunk = ChunkIdx(replay.profile.chunks[next as usize]);
            if !c.is_ready(chunk) {
                let want = fetcher.want(&c, chunk, Class::Profile);
                running.push(async move { want.await.is_ok() });
            }
            next += 1;
        }
        if next >= n && running.is_empty() {
            break;
        }
        tokio::select! {
            Some(ok) = running.next(), if !running.is_empty() => {
                if ok {
                    replay.counters.streamed.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ = replay.moved.notified() => {}
        }
    }
    replay
        .done_us
        .store(replay.start.elapsed().as_micros() as u64, Ordering::Relaxed);
    tracing::info!(
        chunks = n,
        streamed = replay.counters.streamed.load(Ordering::Relaxed),
        "boot profile streamed"
    );
}
