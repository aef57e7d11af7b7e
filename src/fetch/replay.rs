//! Boot profile replay: stream an image's profile in order at profile
//! priority, a bounded window ahead of the boot, and count how well it kept
//! ahead. Nothing streams before the first guest attaches: a daemon that
//! starts with its fleet would otherwise ask homes that are not listening
//! yet, and fail over to the store for chunks they will fetch too. An
//! image no guest attaches to within [`UNATTACHED`] of its opening streams
//! anyway, as if one had, so that background fill (which follows replay)
//! still comes. The boot's position is the further of the guests' progress
//! through the profile and the boot clock, which starts at the first guest
//! attach: with the recorded boot's length, the profile is spread evenly
//! over it; without, the clock moves at the profile's rate. Replay ends at
//! the profile's end whatever the guests read. In a fleet of more than
//! [`SHUFFLE_MEMBERS`], each host streams every block of the profile in an
//! order of its own after the block's head (`fleet_order`), so hosts booting together do not all ask
//! the same home for the same chunk at the same moment.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Weak;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{Class, Fetcher};
use crate::cache::ImageCache;
use crate::profile::Profile;
use crate::store::ChunkIdx;

const NOT_IN_PROFILE: u32 = u32::MAX;
/// An image no guest attached to this long after it opened streams its
/// profile anyway (as the boot watch ends a boot nobody started).
pub const UNATTACHED: Duration = super::boot::QUIET;
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
    /// Guests moved on, or the first attached.
    moved: Notify,
    /// When the image opened; times below are microseconds since.
    start: Instant,
    /// How long after `start` replay waits for a first attach.
    unattached: Duration,
    /// The first guest attach (or, if none was reported, the first read).
    attach_us: AtomicU64,
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
            unattached: UNATTACHED,
            attach_us: AtomicU64::new(UNSET),
            first_read_us: AtomicU64::new(UNSET),
            done_us: AtomicU64::new(UNSET),
            counters: ProfileCounters::default(),
        }
    }

    /// Waits `d` (not [`UNATTACHED`]) for a first attach.
    #[cfg(test)]
    pub fn unattached_after(mut self, d: Duration) -> Self {
        self.unattached = d;
        self
    }

    pub fn len(&self) -> usize {
        self.profile.chunks.len()
    }

    /// The profile's chunk indices, in order.
    pub fn chunks(&self) -> &[u32] {
        &self.profile.chunks
    }

    /// Notes that a guest attached to a disk of the image: the first
    /// attach starts the boot clock (later ones change nothing).
    pub fn note_attach(&self) {
        if set_once(&self.attach_us, self.start) {
            self.moved.notify_one();
        }
    }

    /// When the boot clock started, if it did.
    fn attached_at(&self) -> Option<Instant> {
        let us = self.attach_us.load(Ordering::Relaxed);
        (us != UNSET).then(|| self.start + Duration::from_micros(us))
    }

    /// Notes a guest read of `chunks`; `ready` says whether a chunk is local.
    pub fn note_read(&self, chunks: std::ops::Range<u32>, ready: impl Fn(ChunkIdx) -> bool) {
        if self.first_read_us.load(Ordering::Relaxed) == UNSET {
            set_once(&self.first_read_us, self.start);
            // A read is an attach, whether or not one was reported.
            self.note_attach();
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

    /// Waits for the first attach (or the end of the wait for one), then
    /// until the boot the profile recorded would be over.
    pub async fn boot_over(&self) {
        let started = self.boot_started().await;
        if let Some(ms) = self.profile.boot_ms {
            tokio::time::sleep_until(started + Duration::from_millis(ms)).await;
        }
    }

    /// The boot clock's start: the first attach, or the end of the wait
    /// for one.
    async fn boot_started(&self) -> Instant {
        let unattached = self.start + self.unattached;
        loop {
            let moved = self.moved.notified();
            if let Some(t) = self.attached_at() {
                return t;
            }
            tokio::select! {
                _ = moved => {}
                _ = tokio::time::sleep_until(unattached) => return unattached,
            }
        }
    }

    /// Milliseconds from the first attach to the guest's first read, and to
    /// the end of the profile stream (from the image's opening while no
    /// attach was reported).
    pub fn times_ms(&self) -> (Option<u64>, Option<u64>) {
        let attach = match self.attach_us.load(Ordering::Relaxed) {
            UNSET => 0,
            us => us,
        };
        let f = |v: u64| (v != UNSET).then_some(v.saturating_sub(attach) / 1000);
        (
            f(self.first_read_us.load(Ordering::Relaxed)),
            f(self.done_us.load(Ordering::Relaxed)),
        )
    }
}

/// Sets `slot` to the microseconds since `start` unless it is set; true if it was not.
fn set_once(slot: &AtomicU64, start: Instant) -> bool {
    let now = start.elapsed().as_micros() as u64;
    slot.compare_exchange(UNSET, now, Ordering::Relaxed, Ordering::Relaxed)
        .is_ok()
}

/// The boot clock: how far through the profile the boot should be by now.
struct BootClock {
    /// Recorded boot length: the profile's chunks spread evenly over it.
    boot: Option<Duration>,
    /// Otherwise: stored bytes of the profile up to each position (the clock
    /// moves at the profile's rate).
    bytes_before: Vec<u64>,
    /// Bytes the clock has moved through at the profile's rate.
    bytes: f64,
    last: Option<Instant>,
}

impl BootClock {
    fn new(replay: &ProfileReplay, cache: &ImageCache) -> Self {
        let m = cache.manifest();
        let mut total = 0;
        let bytes_before = replay
            .profile
            .chunks
            .iter()
            .map(|&c| {
                let before = total;
                total += m.chunks[c as usize].map_or(0, |e| u64::from(e.stored_len));
                before
            })
            .collect();
        BootClock {
            boot: replay.profile.boot_ms.filter(|&ms| ms > 0).map(Duration::from_millis),
            bytes_before,
            bytes: 0.0,
            last: None,
        }
    }

    /// The profile position the clock is at, moving at `rate` bytes per
    /// second since the last call (u64::MAX: no limit).
    fn position(&mut self, attached: Instant, rate: u64, now: Instant) -> u32 {
        let n = self.bytes_before.len();
        if let Some(boot) = self.boot {
            let f = now.duration_since(attached).as_secs_f64() / boot.as_secs_f64();
            return (n as f64 * f).min(n as f64) as u32;
        }
        if rate == u64::MAX {
            return n as u32;
        }
        let since = self.last.map_or(attached, |t| t.max(attached));
        self.bytes += now.duration_since(since).as_secs_f64() * rate as f64;
        self.last = Some(now);
        self.bytes_before.partition_point(|&b| (b as f64) < self.bytes) as u32
    }
}

/// How often the boot clock moves the window while nothing else happens.
const CLOCK_STEP: Duration = Duration::from_millis(100);
/// With more members than this, profile positions are shuffled within
/// blocks of [`BLOCK`], after the first [`BLOCK_HEAD`] of each, which keep
/// their order. The shuffle spreads a fleet's hosts over the homes, but
/// each chunk a host asks for out of its boot's order is one its boot may
/// wait for. A small fleet's requests for one chunk fit a home's upload
/// slots and the queue behind them, so it gains nothing and pays the wait:
/// the fleet benchmark's 8 hosts replayed the boot in 1.31-1.33x one host's
/// time with blocks of 64 after 8, 1.16-1.35x with 16 after 4, 1.11-1.19x
/// unshuffled. A large one gains: in the simulator, 1,000 hosts with a
/// 1 Gbit/s store boot in 2.62x one host's time shuffled, 3.56x not, and
/// uploads are 2-4.5x more even.
pub(crate) const SHUFFLE_MEMBERS: usize = 16;
const BLOCK: usize = 16;
const BLOCK_HEAD: usize = 4;

/// The order to stream `n` profile positions in, for a fleet of `members`:
/// the profile's own for a small fleet; for a larger one each block of
/// [`BLOCK`] keeps its head in order and shuffles the rest by `seed` (one
/// per host), so no position moves out of its block.
pub(crate) fn fleet_order(n: usize, seed: u64, members: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..n as u32).collect();
    if members <= SHUFFLE_MEMBERS {
        return order;
    }
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for block in order.chunks_mut(BLOCK) {
        if block.len() <= BLOCK_HEAD {
            continue;
        }
        let tail = &mut block[BLOCK_HEAD..];
        // Fisher-Yates.
        for i in (1..tail.len()).rev() {
            let j = (next() % (i as u64 + 1)) as usize;
            tail.swap(i, j);
        }
    }
    order
}

/// A seed that differs between hosts and runs.
fn host_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish()
}

/// Streams the profile, `window` chunks ahead of the boot (see the module's
/// documentation), until its end.
pub(super) async fn replay(fetcher: &Fetcher, cache: &Weak<ImageCache>, replay: &ProfileReplay, window: u32) {
    let per_pass = fetcher.config().low_concurrency.max(1);
    let n = replay.len() as u32;
    let mut clock = match cache.upgrade() {
        Some(c) => BootClock::new(replay, &c),
        None => return,
    };
    // Positions in streaming order: the profile's, or per host with peers.
    let order = fetcher
        .has_peers()
        .then(|| fleet_order(n as usize, host_seed(), fetcher.fleet_size()));
    let started = replay.boot_started().await;
    let mut next = 0u32;
    let mut running = FuturesUnordered::new();
    loop {
        let moved = replay.moved.notified();
        let boot = replay.progress.load(Ordering::Relaxed).max(clock.position(
            started,
            fetcher.profile_rate_now(),
            Instant::now(),
        ));
        while running.len() < per_pass && next < n && next < boot.saturating_add(window) {
            let Some(c) = cache.upgrade() else { return };
            let at = order.as_ref().map_or(next, |o| o[next as usize]);
            let chunk = ChunkIdx(replay.profile.chunks[at as usize]);
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
            _ = moved => {}
            _ = tokio::time::sleep(CLOCK_STEP), if next < n => {}
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleet_order_shuffles_each_block_after_its_head_and_keeps_every_position() {
        let n = 3 * BLOCK + 20;
        let big = SHUFFLE_MEMBERS + 1;
        let a = fleet_order(n, 1, big);
        let b = fleet_order(n, 2, big);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            (0..n as u32).collect::<Vec<_>>(),
            "a position was lost or doubled"
        );
        for (i, &p) in a.iter().enumerate() {
            assert_eq!(p as usize / BLOCK, i / BLOCK, "position {p} left its block");
            if i % BLOCK < BLOCK_HEAD {
                assert_eq!(p as usize, i, "a block's head moved");
            }
        }
        assert_ne!(a, b, "two hosts stream in the same order");
        assert_ne!(a, (0..n as u32).collect::<Vec<_>>());
        assert_eq!(fleet_order(5, 9, big), vec![0, 1, 2, 3, 4]);
        // A small fleet streams the profile in its own order.
        assert_eq!(fleet_order(n, 1, SHUFFLE_MEMBERS), (0..n as u32).collect::<Vec<_>>());
    }
}
