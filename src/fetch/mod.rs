//! The fetch scheduler, one per daemon: brings chunks from the store into
//! Local Caches. Three classes in strict priority (demand > profile >
//! background), single flight per chunk, a concurrency limit, per-attempt
//! timeouts, retries with backoff up to a deadline, rates for the low
//! classes (adaptive or fixed, see `rate`) that a flight passes before it
//! takes a slot, and digest verification before a chunk enters a cache.
//! Sources: the chunk's peers (P2P, see `peers`) if any, then the store.

mod base;
mod boot;
mod lru;
mod peers;
pub mod rate;
mod replay;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

pub use base::StreamedBase;
pub use boot::BootWatch;
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
pub use lru::{ChunkLru, StoredForm};
pub use peers::{PeerChunk, PeerError, Peers, StillBusy};
pub use rate::FillRate;
/// The profile order with peers, for the P2P simulator.
pub(crate) use replay::fleet_order;
pub use replay::ProfileReplay;
use tokio::sync::{watch, Notify};
// tokio's clock, so that tests can run the scheduler on paused time.
use tokio::time::Instant;

use crate::cache::ImageCache;
use crate::store::{self, verify_chunk, verify_plain, ChunkEntry, ChunkIdx, Digest, ImageId, ImageStore};

/// Why a chunk is wanted, in priority order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Class {
    /// The rest of the image, filled at a capped rate.
    Background = 0,
    /// The image's boot profile, streamed ahead of the guest.
    Profile = 1,
    /// A guest is waiting.
    Demand = 2,
}

impl Class {
    pub const ALL: [Class; 3] = [Class::Background, Class::Profile, Class::Demand];

    pub fn name(self) -> &'static str {
        match self {
            Class::Background => "background",
            Class::Profile => "profile",
            Class::Demand => "demand",
        }
    }

    /// The class stored as `c as u8`.
    fn of(c: u8) -> Class {
        match c {
            2 => Class::Demand,
            1 => Class::Profile,
            _ => Class::Background,
        }
    }

    pub fn from_name(name: &str) -> Option<Class> {
        Class::ALL.into_iter().find(|c| c.name() == name)
    }
}

#[derive(Clone, Debug)]
pub struct FetchConfig {
    /// Fetches in flight at once.
    pub concurrency: usize,
    /// Of those, at most this many for profile and background.
    pub low_concurrency: usize,
    /// Cap on background fetching, bytes per second; None: adaptive (it
    /// yields to guests' fetches and uses the link while they are idle).
    pub fill_rate: Option<u64>,
    /// Cap on profile streaming, bytes per second (None: no cap).
    pub profile_rate: Option<u64>,
    /// Longest one attempt may take.
    pub attempt_timeout: Duration,
    /// How long a chunk is retried before its waiters get an error.
    pub deadline: Duration,
    /// Fill the whole image in the background.
    pub background_fill: bool,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            concurrency: 8,
            low_concurrency: 4,
            fill_rate: None,
            profile_rate: Some(200_000_000),
            attempt_timeout: Duration::from_secs(10),
            deadline: Duration::from_secs(30),
            background_fill: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("fetch chunk {digest} from {store}")]
    FetchChunk {
        digest: store::Digest,
        store: String,
        #[source]
        source: store::Error,
    },
    #[error("chunk {digest} from {store} is corrupt: {why}")]
    Corrupt {
        digest: store::Digest,
        store: String,
        why: String,
    },
    #[error("chunk {0} timed out")]
    Timeout(store::Digest),
    #[error("write chunk to the cache")]
    WriteCache(#[source] crate::cache::Error),
    #[error("the fetch was abandoned")]
    Abandoned,
}

impl FetchError {
    /// Another try may succeed: the store or the chunk it sent failed, not
    /// the cache or the scheduler.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            FetchError::FetchChunk { .. } | FetchError::Corrupt { .. } | FetchError::Timeout(_)
        )
    }
}

/// What the scheduler has done, for logs and `status`.
#[derive(Debug, Default)]
pub struct FetchCounters {
    pub store_chunks: AtomicU64,
    pub store_bytes: AtomicU64,
    /// Chunks (and their bytes) that peers served, verified.
    pub peer_chunks: AtomicU64,
    pub peer_bytes: AtomicU64,
    /// Peer answers that were not a chunk (down, busy, timeout, refused).
    pub peer_failures: AtomicU64,
    /// Chunks from peers that failed verification (never cached).
    pub bad_peer_chunks: AtomicU64,
    /// Chunks from the store that failed verification.
    pub corrupt_chunks: AtomicU64,
    pub failed_attempts: AtomicU64,
    /// Guest reads that waited on a fetch, and the time they waited.
    pub demand_waits: AtomicU64,
    pub demand_wait_us: AtomicU64,
    /// Chunks fetched per class (background, profile, demand) at the time they started.
    pub by_class: [AtomicU64; 3],
    /// Time from a fetch's start to its end (success or failure, retries
    /// included), per class at its start, of the fetches the store served
    /// or that failed.
    pub latency: [crate::metrics::Histogram; 3],
    /// The same, for the fetches a peer served.
    pub peer_latency: [crate::metrics::Histogram; 3],
    /// Time each guest read that missed waited for its chunks.
    pub demand_wait: crate::metrics::Histogram,
}

/// A rate that is no cap.
const NO_CAP: u64 = u64::MAX;
/// Profile and background flights waiting on peers at once: a window of
/// their own beside the store's (`low_concurrency`), since they cost the
/// store nothing (the design brief's simulation: 4 -> 1.51x one host's
/// boot time at 1,000 hosts, 16 -> 1.27x).
pub(crate) const PEER_WINDOW: usize = 16;
/// How far down a class's queue a worker looks for a flight whose window
/// has room when the head's is full.
pub(crate) const SCAN: usize = 64;
/// Bytes of stored forms kept for peers: a boot's working set as stored
/// (about 20 MiB for a Debian boot) while a fleet boots it.
const STORED_FORM_BYTES: u64 = 64 << 20;
/// The background rate that says "adaptive".
const AUTO: u64 = u64::MAX - 1;

/// A flight's key: one per chunk of an image, or per digest for a loose chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Key {
    /// A chunk for the host's chunk store: one flight per digest, whichever
    /// images want it (the store keeps it once for all of them).
    Cached(Digest),
    Loose(Digest),
}

/// What a flight ends with: for a loose chunk, its verified bytes.
type Outcome = Option<Result<Option<Bytes>, Arc<FetchError>>>;

/// Called with a loose chunk's verified bytes before its flight ends, so
/// that whoever keeps them has them before a later want could start another fetch.
pub type KeepLoose = Arc<dyn Fn(&Digest, &Bytes) + Send + Sync>;

/// What a flight brings.
enum Target {
    /// A chunk of an open image, into its cache.
    Cached { cache: Arc<ImageCache>, chunk: ChunkIdx },
    /// A chunk known only by its entry (a peer asked this host, its home,
    /// for a chunk of an image it does not have open): from the store only,
    /// so that hosts whose views of the membership differ cannot ask each
    /// other in a loop; its bytes go to the waiters, not to a cache.
    Loose {
        entry: ChunkEntry,
        len: u64,
        keep: KeepLoose,
    },
}

impl Target {
    /// The image a cached chunk is wanted for (the flight's first want's).
    fn image(&self) -> Option<ImageId> {
        match self {
            Target::Cached { cache, .. } => Some(*cache.id()),
            Target::Loose { .. } => None,
        }
    }

    /// The chunk's entry and length; None for an all-zero chunk.
    fn entry(&self) -> Option<(ChunkEntry, u64)> {
        match self {
            Target::Cached { cache, chunk } => {
                let m = cache.manifest();
                m.chunks[chunk.0 as usize].map(|e| (e, m.chunk_len(*chunk)))
            }
            Target::Loose { entry, len, .. } => Some((*entry, *len)),
        }
    }
}

struct Flight {
    key: Key,
    target: Target,
    class: AtomicU8,
    started: AtomicBool,
    /// Its peers were asked (it is queued again, or taken, for the store).
    peers_tried: AtomicBool,
    /// Taken at a low class to ask peers: it holds a peer window place.
    on_peers: AtomicBool,
    /// When a worker first took it.
    taken_at: std::sync::OnceLock<Instant>,
    tx: watch::Sender<Outcome>,
}

#[derive(Default)]
struct State {
    /// Per class, flights in the order wanted. A flight wanted again at a
    /// higher class is queued there too; its older entry is skipped.
    queues: [VecDeque<Key>; 3],
    flights: HashMap<Key, Arc<Flight>>,
    /// Profile and background flights fetching from the store, and
    /// waiting on peers: two windows, so that a flight waiting on a peer
    /// never holds a slot a store fetch needs (a home's store fetches for
    /// its peers would otherwise queue behind its own requests to them,
    /// which wait on theirs: a cycle broken only by timeouts, and then a
    /// second store fetch).
    running_low: usize,
    running_peer: usize,
    /// Flights wanted at demand class and not finished: guests waiting.
    demand_pending: usize,
}

impl State {
    /// Frees the window place a flight taken at a low class holds.
    fn release_low(&mut self, flight: &Flight) {
        if flight.on_peers.swap(false, Ordering::AcqRel) {
            self.running_peer -= 1;
        } else {
            self.running_low -= 1;
        }
    }
}

/// What the workers saw since the controller's last tick.
#[derive(Default)]
struct TickLog {
    demand_seen: bool,
    samples: Vec<rate::Sample>,
}

/// Samples kept per tick; beyond it they are dropped (plenty to judge by).
const MAX_SAMPLES: usize = 1024;

struct Inner {
    store: ImageStore,
    /// Asked before the store, if set.
    peers: Option<Arc<dyn Peers>>,
    /// With peers: the stored forms of compressed chunks fetched lately.
    stored: Option<ChunkLru<StoredForm>>,
    config: FetchConfig,
    state: Mutex<State>,
    wake: Notify,
    /// Token buckets for background and profile.
    buckets: [Mutex<rate::Bucket>; 2],
    /// Caps of background and profile in bytes per second (NO_CAP: none,
    /// AUTO: background adapts); start as the config's, changed by `set_rates`.
    rates: [AtomicU64; 2],
    /// The rates in force for background and profile, bytes per second:
    /// the caps, or the controller's rates under them.
    effective: [AtomicU64; 2],
    controller: Mutex<rate::RateController>,
    tick_log: Mutex<TickLog>,
    counters: FetchCounters,
    /// Chunks in the order workers took them, for the ordering tests.
    #[cfg(test)]
    taken: Mutex<Vec<u32>>,
}

#[derive(Clone)]
pub struct Fetcher {
    inner: Arc<Inner>,
}

impl Fetcher {
    /// Starts the scheduler's workers on `runtime`, with the store as the only source.
    #[cfg(test)]
    pub fn new(store: ImageStore, config: FetchConfig, runtime: &tokio::runtime::Handle) -> Fetcher {
        Self::with_peers(store, None, config, runtime)
    }

    /// Starts the scheduler's workers on `runtime`; chunks of open images
    /// are asked of `peers` (if any) before the store.
    pub fn with_peers(
        store: ImageStore,
        peers: Option<Arc<dyn Peers>>,
        config: FetchConfig,
        runtime: &tokio::runtime::Handle,
    ) -> Fetcher {
        let stored = peers.as_ref().map(|_| ChunkLru::new(STORED_FORM_BYTES));
        let inner = Arc::new(Inner {
            store,
            peers,
            stored,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            buckets: [
                Mutex::new(rate::Bucket::new(Instant::now())),
                Mutex::new(rate::Bucket::new(Instant::now())),
            ],
            rates: [
                AtomicU64::new(config.fill_rate.unwrap_or(AUTO)),
                AtomicU64::new(config.profile_rate.unwrap_or(NO_CAP)),
            ],
            effective: [AtomicU64::new(0), AtomicU64::new(0)],
            controller: Mutex::new(rate::RateController::new()),
            tick_log: Mutex::default(),
            counters: FetchCounters::default(),
            #[cfg(test)]
            taken: Mutex::default(),
            config,
        });
        inner.publish_rates();
        for _ in 0..inner.config.concurrency.max(1) {
            runtime.spawn(worker(inner.clone()));
        }
        runtime.spawn(control_loop(Arc::downgrade(&inner)));
        Fetcher { inner }
    }

    pub fn counters(&self) -> &FetchCounters {
        &self.inner.counters
    }

    /// Changes the background fill cap (bytes per second; None: adaptive)
    /// and the profile streaming cap (None: no cap) of fetches from now on.
    /// Whether background fill runs at all is fixed when the fetcher starts.
    pub fn set_rates(&self, fill: Option<u64>, profile: Option<u64>) {
        self.inner.rates[0].store(fill.unwrap_or(AUTO), Ordering::Relaxed);
        self.inner.rates[1].store(profile.unwrap_or(NO_CAP), Ordering::Relaxed);
        self.inner.publish_rates();
    }

    /// The current background fill cap (None: adaptive) and profile streaming cap.
    pub fn rates(&self) -> (Option<u64>, Option<u64>) {
        (self.inner.rate(0), self.inner.rate(1))
    }

    /// Background fill is adaptive (`--fill-rate auto`).
    pub fn fill_is_auto(&self) -> bool {
        self.inner.rates[0].load(Ordering::Relaxed) == AUTO
    }

    /// The background fill rate in force now, bytes per second: the
    /// adaptive controller's rate, or the fixed cap (u64::MAX: no cap); 0
    /// when background fill is off.
    pub fn fill_rate_now(&self) -> u64 {
        if self.inner.config.background_fill {
            self.inner.effective[0].load(Ordering::Relaxed)
        } else {
            0
        }
    }

    /// The profile streaming rate in force now, bytes per second (u64::MAX: no limit).
    pub fn profile_rate_now(&self) -> u64 {
        self.inner.effective[1].load(Ordering::Relaxed)
    }

    /// The stored form of a compressed chunk fetched lately (from the store
    /// or a peer), to send to peers as it is: a third of the plaintext's
    /// bytes on the wire for a typical OS image, and no compression work.
    pub fn stored_form(&self, digest: &Digest) -> Option<StoredForm> {
        self.inner.stored.as_ref()?.get(digest)
    }

    /// Peers are asked before the store (P2P).
    pub fn has_peers(&self) -> bool {
        self.inner.peers.is_some()
    }

    /// Members of the fleet, this host included (0 without peers).
    pub fn fleet_size(&self) -> usize {
        self.inner.peers.as_ref().map_or(0, |p| p.fleet_size())
    }

    pub fn config(&self) -> &FetchConfig {
        &self.inner.config
    }

    pub fn store(&self) -> &ImageStore {
        &self.inner.store
    }

    /// Resolves when chunk `c` of the cache's image is local, or with the
    /// error that stopped it. Concurrent wants of one chunk share one fetch.
    pub fn want(
        &self,
        cache: &Arc<ImageCache>,
        c: ChunkIdx,
        class: Class,
    ) -> impl std::future::Future<Output = Result<(), Arc<FetchError>>> + Send + 'static {
        let rx = if cache.is_ready(c) {
            None
        } else {
            let digest = cache.manifest().chunks[c.0 as usize]
                .as_ref()
                .expect("a chunk that is not ready is not all zeros")
                .digest;
            let key = Key::Cached(digest);
            // Checked again under the lock: a fetch may just have finished.
            self.inner.join(key, class, || {
                (!cache.is_ready(c)).then(|| Target::Cached {
                    cache: cache.clone(),
                    chunk: c,
                })
            })
        };
        async move {
            let Some(rx) = rx else { return Ok(()) };
            wait(rx).await.map(|_| ())
        }
    }

    /// The verified bytes (plaintext) of a chunk known only by its entry,
    /// from the store, for a peer that asked this host (the chunk's home)
    /// for a chunk of an image it does not have open. Concurrent wants of
    /// one digest share one fetch; nothing is cached here, but the flight
    /// that fetches calls `keep` with the bytes before it ends.
    pub fn want_loose(
        &self,
        entry: ChunkEntry,
        len: u64,
        class: Class,
        keep: KeepLoose,
    ) -> impl std::future::Future<Output = Result<Bytes, Arc<FetchError>>> + Send + 'static {
        let rx = self.inner.join(Key::Loose(entry.digest), class, || {
            Some(Target::Loose { entry, len, keep })
        });
        async move {
            let Some(rx) = rx else {
                unreachable!("a loose target is always made")
            };
            match wait(rx).await? {
                Some(bytes) => Ok(bytes),
                None => Err(Arc::new(FetchError::Abandoned)),
            }
        }
    }

    /// Streams the image's boot profile (if any) `window` chunks ahead of
    /// the guests, then, once the first boot is over (`boot` says when, or
    /// the profile's clock if sooner), fills the rest of the image in the
    /// background until every chunk is local or the cache is dropped. Also
    /// persists the cache's presence bits as chunks arrive.
    pub fn start_fill(
        &self,
        cache: &Arc<ImageCache>,
        profile: Option<Arc<ProfileReplay>>,
        boot: Arc<BootWatch>,
        window: u32,
        runtime: &tokio::runtime::Handle,
    ) {
        runtime.spawn(persist_loop(Arc::downgrade(cache)));
        let (fetcher, weak, fill) = (self.clone(), Arc::downgrade(cache), self.inner.config.background_fill);
        runtime.spawn(async move {
            match profile {
                Some(p) => {
                    replay::replay(&fetcher, &weak, &p, window).await;
                    // The rest of the image waits for the boot, not just its
                    // profile: the recorded boot's length, or less if the
                    // guests go quiet sooner.
                    tokio::select! {
                        () = p.boot_over() => {}
                        () = boot.boot_over() => {}
                    }
                }
                None => boot.boot_over().await,
            }
            if fill {
                fill_loop(fetcher, weak).await;
            }
        });
    }
}

fn push(s: &mut State, class: Class, key: Key) {
    s.queues[class as usize].push_back(key);
}

/// Waits for a flight's outcome.
async fn wait(mut rx: watch::Receiver<Outcome>) -> Result<Option<Bytes>, Arc<FetchError>> {
    let outcome = match rx.wait_for(|v| v.is_some()).await {
        Ok(v) => v.clone().expect("checked by wait_for"),
        Err(_) => Err(Arc::new(FetchError::Abandoned)),
    };
    outcome
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Joins the flight of `key` at `class`, or starts one for the target
    /// `make` gives (None: nothing to fetch).
    fn join(&self, key: Key, class: Class, make: impl FnOnce() -> Option<Target>) -> Option<watch::Receiver<Outcome>> {
        let mut s = self.lock();
        if let Some(f) = s.flights.get(&key).cloned() {
            // A higher class overtakes the queue if not started yet.
            let prev = f.class.fetch_max(class as u8, Ordering::AcqRel);
            if class == Class::Demand && prev < Class::Demand as u8 {
                s.demand_pending += 1;
            }
            if (class as u8) > prev && !f.started.load(Ordering::Acquire) {
                push(&mut s, class, key);
                self.wake.notify_one();
            }
            return Some(f.tx.subscribe());
        }
        let target = make()?;
        let (tx, rx) = watch::channel(None);
        s.flights.insert(
            key,
            Arc::new(Flight {
                key,
                target,
                class: AtomicU8::new(class as u8),
                started: AtomicBool::new(false),
                peers_tried: AtomicBool::new(false),
                on_peers: AtomicBool::new(false),
                taken_at: std::sync::OnceLock::new(),
                tx,
            }),
        );
        if class == Class::Demand {
            s.demand_pending += 1;
        }
        push(&mut s, class, key);
        self.wake.notify_one();
        Some(rx)
    }

    /// Takes the next flight this worker may start: the oldest of the
    /// highest class that has one, if a slot is free and (for the low
    /// classes) its rate allows it now. Otherwise says when a rate-limited
    /// flight could go (None: wait for a want).
    fn take(&self) -> Result<(Arc<Flight>, Class), Option<Instant>> {
        let mut s = self.lock();
        let mut retry: Option<Instant> = None;
        for class in [Class::Demand, Class::Profile, Class::Background] {
            let low = class < Class::Demand;
            let store_full = low && s.running_low >= self.config.low_concurrency;
            let peers_full = low && s.running_peer >= PEER_WINDOW;
            if store_full && (peers_full || self.peers.is_none()) {
                break;
            }
            // With one window full, a flight for the other may come from
            // a little further down the queue.
            let mut i = 0;
            while i < s.queues[class as usize].len() && i < SCAN {
                let key = s.queues[class as usize][i];
                let flight = match s.flights.get(&key) {
                    Some(f) if !f.started.load(Ordering::Acquire) && f.class.load(Ordering::Acquire) == class as u8 => {
                        f.clone()
                    }
                    // Done, started, or queued again at a higher class.
                    _ => {
                        s.queues[class as usize].remove(i);
                        continue;
                    }
                };
                if low {
                    let to_peers = self.goes_to_peers(&flight);
                    if (to_peers && peers_full) || (!to_peers && store_full) {
                        i += 1;
                        continue;
                    }
                    // The rate is passed before the slot is taken: a flight
                    // waiting for its rate holds no slot.
                    let bytes = flight.target.entry().map_or(0, |(e, _)| e.stored_len as u64);
                    if let Err(at) = self.pass_rate(class, bytes) {
                        retry = Some(retry.map_or(at, |r| r.min(at)));
                        break;
                    }
                    if to_peers {
                        s.running_peer += 1;
                        flight.on_peers.store(true, Ordering::Release);
                    } else {
                        s.running_low += 1;
                    }
                }
                s.queues[class as usize].remove(i);
                flight.started.store(true, Ordering::Release);
                if !flight.peers_tried.load(Ordering::Acquire) {
                    // Counted once, not again when its peers failed it.
                    self.counters.by_class[class as usize].fetch_add(1, Ordering::Relaxed);
                }
                #[cfg(test)]
                self.taken.lock().unwrap().push(match flight.target {
                    Target::Cached { chunk, .. } => chunk.0,
                    Target::Loose { .. } => u32::MAX,
                });
                if s.queues.iter().any(|q| !q.is_empty()) {
                    // Let another worker look at the rest.
                    self.wake.notify_one();
                }
                return Ok((flight, class));
            }
        }
        Err(retry)
    }

    /// The cap of background (0) or profile (1) fetching, if any.
    fn rate(&self, i: usize) -> Option<u64> {
        Some(self.rates[i].load(Ordering::Relaxed)).filter(|&r| r != NO_CAP && r != AUTO)
    }

    /// Takes `bytes` from the low class's bucket, or says when to try again.
    fn pass_rate(&self, class: Class, bytes: u64) -> Result<(), Instant> {
        let rate = self.effective[class as usize].load(Ordering::Relaxed);
        if rate == NO_CAP {
            return Ok(());
        }
        let mut b = self.buckets[class as usize].lock().unwrap_or_else(|e| e.into_inner());
        b.try_take(bytes, rate as f64, Instant::now())
    }

    /// Sets the rates in force from the caps and the controller.
    fn publish_rates(&self) {
        let (fill, profile) = {
            let c = self.controller.lock().unwrap_or_else(|e| e.into_inner());
            (c.fill() as u64, c.profile() as u64)
        };
        let fill = match self.rates[0].load(Ordering::Relaxed) {
            AUTO => fill,
            cap => cap,
        };
        // The profile yields to guests under its cap (if any) too.
        let profile = self.rates[1].load(Ordering::Relaxed).min(profile);
        let profile = if profile as f64 >= rate::MAX_RATE {
            NO_CAP
        } else {
            profile
        };
        self.effective[0].store(fill, Ordering::Relaxed);
        self.effective[1].store(profile, Ordering::Relaxed);
    }

    /// Records a finished fetch for the controller.
    fn log_fetch(&self, class: Class, latency: Duration, bytes: u64) {
        let mut log = self.tick_log.lock().unwrap_or_else(|e| e.into_inner());
        if class == Class::Demand {
            log.demand_seen = true;
        }
        if log.samples.len() < MAX_SAMPLES {
            log.samples.push(rate::Sample { class, latency, bytes });
        }
    }

    /// Fetches the flight's chunk from the store, verifies and delivers it.
    async fn fetch(&self, flight: &Flight) -> Result<Fetched, FetchError> {
        let Some((entry, len)) = flight.target.entry() else {
            return Ok(Fetched::default());
        };
        let deadline = Instant::now() + self.config.deadline;
        let mut backoff = Duration::from_millis(100);
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let err = match tokio::time::timeout(self.config.attempt_timeout, self.store.chunk(&entry)).await {
                Ok(Ok(bytes)) => match verify_chunk(&entry, len, &bytes) {
                    Ok(data) => {
                        self.keep_stored(&entry, len, &bytes);
                        let data = self.deliver(flight, Bytes::from(data)).await?;
                        self.counters.store_chunks.fetch_add(1, Ordering::Relaxed);
                        self.counters
                            .store_bytes
                            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                        return Ok(Fetched {
                            bytes: bytes.len() as u64,
                            data,
                            from_peer: false,
                        });
                    }
                    Err(why) => {
                        self.counters.corrupt_chunks.fetch_add(1, Ordering::Relaxed);
                        let e = FetchError::Corrupt {
                            digest: entry.digest,
                            store: self.store.url().to_string(),
                            why: why.to_string(),
                        };
                        tracing::warn!("{e}; not served, fetching again");
                        e
                    }
                },
                Ok(Err(source)) => FetchError::FetchChunk {
                    digest: entry.digest,
                    store: self.store.url().to_string(),
                    source,
                },
                Err(_) => FetchError::Timeout(entry.digest),
            };
            self.counters.failed_attempts.fetch_add(1, Ordering::Relaxed);
            // Peers that hold the chunk serve it when the store does not:
            // a host with no store access, or a store down.
            if let Some(fetched) = self.ask_holders(flight, &entry, len).await {
                return fetched;
            }
            if attempt == 1 {
                tracing::warn!(error = %crate::DisplayChain(&err), "chunk fetch failed; retrying");
            }
            if Instant::now() + backoff >= deadline {
                return Err(err);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// True if a worker taking the flight now would ask peers for it.
    fn goes_to_peers(&self, flight: &Flight) -> bool {
        let Some(peers) = &self.peers else { return false };
        if !matches!(flight.target, Target::Cached { .. }) || flight.peers_tried.load(Ordering::Acquire) {
            return false;
        }
        flight
            .target
            .entry()
            .is_some_and(|(entry, _)| !peers.candidates(&entry.digest).is_empty())
    }

    /// The peers to ask for a flight's chunk before the store, if any: a
    /// chunk of an open image, not asked of its peers yet, that this host
    /// is not the home of. Marks the flight as asked.
    fn peer_candidates(&self, flight: &Flight) -> Option<(Vec<SocketAddr>, ChunkEntry, u64)> {
        let peers = self.peers.as_ref()?;
        if !matches!(flight.target, Target::Cached { .. }) || flight.peers_tried.load(Ordering::Acquire) {
            return None;
        }
        let (entry, len) = flight.target.entry()?;
        flight.peers_tried.store(true, Ordering::Release);
        let candidates = peers.candidates(&entry.digest);
        (!candidates.is_empty()).then_some((candidates, entry, len))
    }

    /// The flight's chunk from a peer that holds it, after the store
    /// failed; None if no peer does. Asked while the flight holds its
    /// fetch slot: a holder waits on nothing (it neither fetches nor
    /// redirects), so no wait cycle through this host can form.
    async fn ask_holders(&self, flight: &Flight, entry: &ChunkEntry, len: u64) -> Option<Result<Fetched, FetchError>> {
        let holders = self.peers.as_ref()?.holders(&entry.digest);
        if holders.is_empty() {
            return None;
        }
        let class = Class::of(flight.class.load(Ordering::Acquire));
        let (data, n) = self.ask_peers(holders, entry, len, class, None, true).await?;
        let data = match self.deliver(flight, data).await {
            Ok(data) => data,
            Err(e) => return Some(Err(e)),
        };
        self.counters.peer_chunks.fetch_add(1, Ordering::Relaxed);
        self.counters.peer_bytes.fetch_add(n, Ordering::Relaxed);
        Some(Ok(Fetched {
            bytes: n,
            data,
            from_peer: true,
        }))
    }

    /// The chunk's plaintext from the first of `candidates` that sends it
    /// intact (asked as holders if `held`, else as homes, told the `image`
    /// it is for), and the bytes
    /// that came over the wire; None if none does (the store is asked
    /// then). A peer's bytes are checked against the manifest's digest
    /// here, before anything caches them. A holder has `attempt_timeout`;
    /// a home the fetch's `deadline` (a busy home is asked again within
    /// it), and one busy to the end ([`StillBusy`]) ends the asking: the
    /// next candidate would fetch the chunk from the store a second time.
    async fn ask_peers(
        &self,
        candidates: Vec<SocketAddr>,
        entry: &ChunkEntry,
        len: u64,
        class: Class,
        image: Option<ImageId>,
        held: bool,
    ) -> Option<(Bytes, u64)> {
        let peers = self.peers.as_ref()?;
        for peer in candidates {
            let ask = if held {
                peers.get_held(peer, *entry, len, class)
            } else {
                peers.get(peer, *entry, len, class, image)
            };
            let within = if held {
                self.config.attempt_timeout
            } else {
                self.config.deadline
            };
            let got = tokio::time::timeout(within, ask).await;
            match got {
                Ok(Ok((sender, chunk))) => match (chunk.len() as u64, self.verify_peer_chunk(entry, len, chunk)) {
                    (wire, Ok(data)) => {
                        peers.verified(peer, sender, &entry.digest);
                        return Some((data, wire));
                    }
                    (_, Err(why)) => {
                        self.counters.bad_peer_chunks.fetch_add(1, Ordering::Relaxed);
                        peers.bad_chunk(sender, &entry.digest, &why.to_string());
                    }
                },
                Ok(Err(e)) => {
                    self.counters.peer_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%peer, digest = %entry.digest, "peer did not serve the chunk: {e}");
                    if e.is::<StillBusy>() {
                        return None;
                    }
                }
                Err(_) => {
                    self.counters.peer_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%peer, digest = %entry.digest, "peer timed out");
                }
            }
        }
        None
    }

    /// A peer's chunk as plaintext, if it is the manifest entry's chunk.
    fn verify_peer_chunk(
        &self,
        entry: &ChunkEntry,
        len: u64,
        chunk: PeerChunk,
    ) -> Result<Bytes, store::manifest::ChunkError> {
        match chunk {
            PeerChunk::Plain(data) => verify_plain(entry, len, &data).map(|()| data),
            PeerChunk::Stored(stored) => {
                let data = verify_chunk(entry, len, &stored)?;
                self.keep_stored(entry, len, &stored);
                Ok(Bytes::from(data))
            }
        }
    }

    /// Keeps a verified chunk's stored form for peers, if it is compressed
    /// (an uncompressed one is its plaintext, read from the cache).
    fn keep_stored(&self, entry: &ChunkEntry, len: u64, stored: &Bytes) {
        if let Some(lru) = &self.stored {
            if entry.zstd && (stored.len() as u64) < len {
                lru.insert(
                    entry.digest,
                    StoredForm {
                        bytes: stored.clone(),
                        zstd: true,
                    },
                );
            }
        }
    }

    /// Ends a flight: its waiters get `result`, its slot is free.
    fn finish(&self, flight: &Flight, class: Class, result: Result<Fetched, Arc<FetchError>>) {
        let took = flight.taken_at.get().map_or(Duration::ZERO, |t| t.elapsed());
        let from_peer = result.as_ref().is_ok_and(|f| f.from_peer);
        let latency = if from_peer {
            &self.counters.peer_latency
        } else {
            &self.counters.latency
        };
        latency[class as usize].observe(took);
        self.log_fetch(class, took, result.as_ref().map_or(0, |f| f.bytes));
        {
            let mut s = self.lock();
            s.flights.remove(&flight.key);
            if class < Class::Demand {
                s.release_low(flight);
            }
            if flight.class.load(Ordering::Acquire) == Class::Demand as u8 {
                s.demand_pending -= 1;
            }
        }
        flight.tx.send_replace(Some(result.map(|f| f.data)));
        self.wake.notify_one();
    }

    /// Puts a flight its peers did not serve back at the head of its
    /// class's queue (the class it has now), for a worker to fetch from the store.
    fn requeue(&self, flight: &Flight, taken_as: Class) {
        let mut s = self.lock();
        if taken_as < Class::Demand {
            s.release_low(flight);
        }
        flight.started.store(false, Ordering::Release);
        let class = Class::of(flight.class.load(Ordering::Acquire));
        s.queues[class as usize].push_front(flight.key);
        self.wake.notify_one();
    }

    /// Writes a verified chunk to its cache, or hands a loose chunk's bytes back.
    async fn deliver(&self, flight: &Flight, data: Bytes) -> Result<Option<Bytes>, FetchError> {
        match &flight.target {
            Target::Cached { cache, chunk } => {
                let (cache, c) = (cache.clone(), *chunk);
                tokio::task::spawn_blocking(move || cache.write_chunk(c, &data))
                    .await
                    .map_err(|_| FetchError::Abandoned)?
                    .map_err(FetchError::WriteCache)?;
                Ok(None)
            }
            Target::Loose { entry, keep, .. } => {
                keep(&entry.digest, &data);
                Ok(Some(data))
            }
        }
    }
}

/// What a finished fetch brought.
#[derive(Default)]
struct Fetched {
    /// Bytes moved (stored form from the store, plaintext from a peer).
    bytes: u64,
    /// A loose chunk's bytes.
    data: Option<Bytes>,
    /// A peer sent it.
    from_peer: bool,
}

async fn worker(strong: Arc<Inner>) {
    loop {
        let notified = strong.wake.notified();
        let (flight, class) = match strong.take() {
            Ok(taken) => taken,
            Err(None) => {
                notified.await;
                continue;
            }
            Err(Some(at)) => {
                // Rates change with every tick: look again at least that often.
                let at = at.min(Instant::now() + rate::TICK);
                tokio::select! {
                    _ = notified => {}
                    _ = tokio::time::sleep_until(at) => {}
                }
                continue;
            }
        };
        flight.taken_at.get_or_init(Instant::now);
        // A flight waiting on peers holds no worker: workers only wait on
        // the store, so a home's store fetches never queue behind requests
        // to peers that may be waiting on this host (a cycle).
        if let Some((candidates, entry, len)) = strong.peer_candidates(&flight) {
            tokio::spawn(from_peers_or_requeue(
                strong.clone(),
                flight,
                class,
                candidates,
                entry,
                len,
            ));
            continue;
        }
        let result = strong.fetch(&flight).await.map_err(Arc::new);
        strong.finish(&flight, class, result);
    }
}

/// Asks a flight's peers; ends the flight with what one sent, or queues it
/// again for the store if none did.
async fn from_peers_or_requeue(
    inner: Arc<Inner>,
    flight: Arc<Flight>,
    class: Class,
    candidates: Vec<SocketAddr>,
    entry: ChunkEntry,
    len: u64,
) {
    // The class it is wanted at now: a guest may have come to wait for it.
    let now = Class::of(flight.class.load(Ordering::Acquire));
    let image = flight.target.image();
    let Some((data, n)) = inner.ask_peers(candidates, &entry, len, now, image, false).await else {
        inner.requeue(&flight, class);
        return;
    };
    let result = inner.deliver(&flight, data).await.map(|data| Fetched {
        bytes: n,
        data,
        from_peer: true,
    });
    if result.is_ok() {
        inner.counters.peer_chunks.fetch_add(1, Ordering::Relaxed);
        inner.counters.peer_bytes.fetch_add(n, Ordering::Relaxed);
    }
    inner.finish(&flight, class, result.map_err(Arc::new));
}

/// Every tick, feeds what the fetches saw to the rate controller and
/// publishes the rates it decides.
async fn control_loop(inner: Weak<Inner>) {
    let mut ticks = tokio::time::interval(rate::TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = Instant::now();
    loop {
        ticks.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let now = Instant::now();
        let log = std::mem::take(&mut *inner.tick_log.lock().unwrap_or_else(|e| e.into_inner()));
        let tick = rate::Tick {
            dt: now.duration_since(last),
            demand_waiting: log.demand_seen || inner.lock().demand_pending > 0,
            samples: log.samples,
        };
        last = now;
        {
            let mut c = inner.controller.lock().unwrap_or_else(|e| e.into_inner());
            let decision = c.update(&tick, now);
            if !tick.samples.is_empty() || tick.demand_waiting {
                tracing::debug!(
                    ?decision,
                    fill = c.fill() as u64,
                    profile = c.profile() as u64,
                    fetches = tick.samples.len(),
                    bytes = tick.samples.iter().map(|s| s.bytes).sum::<u64>(),
                    "fetch rates"
                );
            }
        }
        inner.publish_rates();
        if !tick.samples.is_empty() || tick.demand_waiting {
            // Workers waiting on a rate may go sooner now.
            inner.wake.notify_waiters();
        }
    }
}

/// Persists a cache's presence bits as chunks arrive.
async fn persist_loop(cache: Weak<ImageCache>) {
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let Some(c) = cache.upgrade() else { return };
        if c.unsynced() == 0 {
            continue;
        }
        let res = tokio::task::spawn_blocking(move || c.persist()).await;
        if let Ok(Err(e)) = res {
            tracing::error!(error = %crate::DisplayChain(&e), "persisting cache bitmap failed");
        }
    }
}

/// Fills an image in the background, chunk order, a few at a time.
async fn fill_loop(fetcher: Fetcher, cache: Weak<ImageCache>) {
    let per_pass = fetcher.inner.config.low_concurrency.max(1);
    let mut last_log = Instant::now();
    loop {
        let Some(c) = cache.upgrade() else { return };
        let n = c.manifest().chunk_count();
        let id = *c.id();
        drop(c);
        let mut failed = 0;
        let mut next = 0u32;
        let mut running = FuturesUnordered::new();
        loop {
            while running.len() < per_pass && next < n {
                let Some(c) = cache.upgrade() else { return };
                if !c.has_room() {
                    // Fill never evicts: what guests read stays.
                    let (have, all) = c.fill();
                    tracing::info!(image = %id, "cache full: background fill stops at {have}/{all} chunks");
                    return;
                }
                if !c.is_ready(ChunkIdx(next)) {
                    running.push(fetcher.want(&c, ChunkIdx(next), Class::Background));
                }
                next += 1;
            }
            match running.next().await {
                Some(Ok(())) => {}
                Some(Err(_)) => failed += 1,
                None if next >= n => break,
                None => {}
            }
            if last_log.elapsed() >= Duration::from_secs(10) {
                if let Some(c) = cache.upgrade() {
                    let (have, all) = c.fill();
                    tracing::info!(image = %id, "filling: {have}/{all} chunks ({:.0}%)", pct(have, all));
                }
                last_log = Instant::now();
            }
        }
        if failed == 0 {
            if let Some(c) = cache.upgrade() {
                let (have, all) = c.fill();
                tracing::info!(image = %id, "image fully cached: {have}/{all} chunks");
            }
            return;
        }
        // The store is failing: try the rest again later.
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

pub fn pct(a: u64, b: u64) -> f64 {
    if b == 0 {
        100.0
    } else {
        a as f64 * 100.0 / b as f64
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;
    use crate::profile::Profile;
    use crate::store::{ChunkEntry, Digest, Manifest};

    /// An image of `n` 64 KiB chunks in an in-memory store, and its cache.
    async fn setup(n: u32, dir: &std::path::Path) -> (ImageStore, Arc<ImageCache>) {
        let store = ImageStore::with_backend(Arc::new(object_store::memory::InMemory::new()), "memory");
        let cache = image(&store, n, dir, "img").await;
        (store, cache)
    }

    /// Puts an image of `n` 64 KiB chunks in `store`; its cache, in a
    /// chunk store of its own under `dir`. Chunk `i` of "img" and "img2" is
    /// `i % 251 + 1` repeated (from 251 on, starting with `i`); other
    /// names' chunks start with the name.
    async fn image(store: &ImageStore, n: u32, dir: &std::path::Path, name: &str) -> Arc<ImageCache> {
        let mut chunks = Vec::new();
        for i in 0..n {
            let mut data = vec![(i % 251) as u8 + 1; 65536];
            if i >= 251 {
                // Every chunk distinct: the cache keeps equal chunks once.
                data[..4].copy_from_slice(&i.to_le_bytes());
            }
            if !name.starts_with("img") {
                data[..name.len()].copy_from_slice(name.as_bytes());
            }
            let d = Digest::of(&data);
            store.put_chunk(&d, Bytes::from(data)).await.unwrap();
            chunks.push(Some(ChunkEntry {
                digest: d,
                stored_len: 65536,
                zstd: false,
            }));
        }
        let m = Manifest {
            version: 1,
            size: n as u64 * 65536,
            chunk_size: 65536,
            chunks,
        };
        let chunks = crate::cache::ChunkStore::open(&dir.join(name), None).unwrap();
        Arc::new(ImageCache::open(&chunks, Digest::of(name.as_bytes()), Arc::new(m)).unwrap())
    }

    /// A store whose every GET takes `latency` (requests do not queue on each other).
    fn slow_store(latency: Duration) -> ImageStore {
        let config = object_store::throttle::ThrottleConfig {
            wait_get_per_call: latency,
            ..Default::default()
        };
        let slow = object_store::throttle::ThrottledStore::new(object_store::memory::InMemory::new(), config);
        ImageStore::with_backend(Arc::new(slow), "slow")
    }

    fn ready(cache: &ImageCache) -> u64 {
        cache.fill().0
    }

    fn profile(chunks: Vec<u32>, boot_ms: Option<u64>) -> Profile {
        Profile {
            version: crate::profile::VERSION,
            chunk_size: 65536,
            chunks,
            boot_ms,
        }
    }

    fn config(concurrency: usize) -> FetchConfig {
        FetchConfig {
            concurrency,
            low_concurrency: concurrency,
            fill_rate: None,
            profile_rate: None,
            background_fill: false,
            ..Default::default()
        }
    }

    /// How a fake peer answers.
    #[derive(Clone, Copy, PartialEq)]
    enum Peer {
        Good,
        /// Sends the chunk with a byte flipped.
        Liar,
        /// Cannot be reached.
        Down,
        /// Answers nothing for a long while, then fails.
        Hangs,
        /// A home busy until the time for peers was up.
        Busy,
    }

    /// Peers for the tests: chunk digests map to their candidates.
    struct FakePeers {
        data: HashMap<Digest, Vec<u8>>,
        candidates: HashMap<Digest, Vec<(SocketAddr, Peer)>>,
        asked: Mutex<Vec<SocketAddr>>,
        bad: Mutex<Vec<SocketAddr>>,
        /// (asked, sender) of each chunk reported verified.
        verified: Mutex<Vec<(SocketAddr, SocketAddr)>>,
    }

    impl FakePeers {
        /// Every chunk of `n` (as `image` makes them) has `peers` as candidates.
        fn new(n: u32, peers: &[Peer]) -> FakePeers {
            let mut fake = FakePeers {
                data: HashMap::new(),
                candidates: HashMap::new(),
                asked: Mutex::default(),
                bad: Mutex::default(),
                verified: Mutex::default(),
            };
            for i in 0..n {
                let data = vec![(i % 251) as u8 + 1; 65536];
                let d = Digest::of(&data);
                let list = peers
                    .iter()
                    .enumerate()
                    .map(|(k, p)| (SocketAddr::from(([127, 0, 0, 1], 7000 + k as u16)), *p))
                    .collect();
                fake.candidates.insert(d, list);
                fake.data.insert(d, data);
            }
            fake
        }

        fn kind(&self, peer: SocketAddr) -> Peer {
            self.candidates
                .values()
                .flatten()
                .find(|(a, _)| *a == peer)
                .map_or(Peer::Down, |p| p.1)
        }
    }

    impl Peers for FakePeers {
        fn candidates(&self, digest: &Digest) -> Vec<SocketAddr> {
            self.candidates
                .get(digest)
                .map_or(Vec::new(), |v| v.iter().map(|p| p.0).collect())
        }

        fn get(
            &self,
            peer: SocketAddr,
            entry: ChunkEntry,
            _len: u64,
            _class: Class,
            _image: Option<ImageId>,
        ) -> futures::future::BoxFuture<'static, Result<(SocketAddr, PeerChunk), PeerError>> {
            self.asked.lock().unwrap().push(peer);
            let data = self.data.get(&entry.digest).cloned();
            let kind = self.kind(peer);
            Box::pin(async move {
                let mut data = data.ok_or("unknown chunk")?;
                match kind {
                    Peer::Good => {}
                    Peer::Liar => data[100] ^= 1,
                    Peer::Down => return Err("connection refused".into()),
                    Peer::Busy => {
                        return Err(Box::new(StillBusy {
                            peer,
                            source: "503".into(),
                        }) as PeerError)
                    }
                    Peer::Hangs => {
                        tokio::time::sleep(Duration::from_secs(3)).await;
                        return Err("timed out".into());
                    }
                }
                Ok((peer, PeerChunk::Plain(Bytes::from(data))))
            })
        }

        fn bad_chunk(&self, peer: SocketAddr, _digest: &Digest, _why: &str) {
            self.bad.lock().unwrap().push(peer);
        }

        fn verified(&self, asked: SocketAddr, sender: SocketAddr, _digest: &Digest) {
            self.verified.lock().unwrap().push((asked, sender));
        }
    }

    fn count(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn profile_flights_waiting_on_peers_leave_the_store_slots_free() {
        let dir = tempfile::tempdir().unwrap();
        let (store, cache) = setup(8, dir.path()).await;
        // Chunks 0-3 go to a peer that hangs for 3 s; this host is the
        // home of chunks 4-7, which come from the store.
        let mut peers = FakePeers::new(8, &[Peer::Hangs]);
        let entry = |i: u32| cache.manifest().chunks[i as usize].unwrap().digest;
        for i in 4..8 {
            peers.candidates.remove(&entry(i));
        }
        let fetcher = Fetcher::with_peers(
            store,
            Some(Arc::new(peers)),
            FetchConfig {
                low_concurrency: 2,
                ..config(8)
            },
            &tokio::runtime::Handle::current(),
        );
        let hung: Vec<_> = (0..4)
            .map(|i| tokio::spawn(fetcher.want(&cache, ChunkIdx(i), Class::Profile)))
            .collect();
        let homed: Vec<_> = (4..8)
            .map(|i| tokio::spawn(fetcher.want(&cache, ChunkIdx(i), Class::Profile)))
            .collect();
        let took = std::time::Instant::now();
        for w in homed {
            tokio::time::timeout(Duration::from_secs(2), w)
                .await
                .expect("a store fetch waited for the flights on peers")
                .unwrap()
                .unwrap();
        }
        assert!(took.elapsed() < Duration::from_secs(2));
        // The hung ones then come from the store too, after their peer failed.
        for w in hung {
            w.await.unwrap().unwrap();
        }
        assert_eq!(count(&fetcher.counters().store_chunks), 8);
    }

    /// Peers that send chunks in their stored (zstd) form: the first
    /// candidate with a byte of it flipped, the second intact.
    struct StoredPeers {
        forms: HashMap<Digest, Bytes>,
        liar: SocketAddr,
        good: SocketAddr,
        bad: Mutex<Vec<SocketAddr>>,
    }

    impl Peers for StoredPeers {
        fn candidates(&self, _digest: &Digest) -> Vec<SocketAddr> {
            vec![self.liar, self.good]
        }

        fn get(
            &self,
            peer: SocketAddr,
            entry: ChunkEntry,
            _len: u64,
            _class: Class,
            _image: Option<ImageId>,
        ) -> futures::future::BoxFuture<'static, Result<(SocketAddr, PeerChunk), PeerError>> {
            let mut form = self.forms[&entry.digest].to_vec();
            if peer == self.liar {
                let mid = form.len() / 2;
                form[mid] ^= 0x40;
            }
            Box::pin(async move { Ok((peer, PeerChunk::Stored(Bytes::from(form)))) })
        }

        fn bad_chunk(&self, peer: SocketAddr, _digest: &Digest, _why: &str) {
            self.bad.lock().unwrap().push(peer);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peers_stored_form_is_checked_like_the_stores_and_kept_for_other_peers() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::with_backend(Arc::new(object_store::memory::InMemory::new()), "memory");
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 300) as u8).collect();
        let form = Bytes::from(zstd::bulk::compress(&data, 3).unwrap());
        assert!(form.len() < data.len());
        let d = Digest::of(&data);
        let m = Manifest {
            version: 1,
            size: 65536,
            chunk_size: 65536,
            chunks: vec![Some(ChunkEntry {
                digest: d,
                stored_len: form.len() as u32,
                zstd: true,
            })],
        };
        let chunks = crate::cache::ChunkStore::open(dir.path(), None).unwrap();
        let cache = Arc::new(ImageCache::open(&chunks, Digest::of(b"z"), Arc::new(m)).unwrap());
        let peers = Arc::new(StoredPeers {
            forms: HashMap::from([(d, form.clone())]),
            liar: SocketAddr::from(([127, 0, 0, 1], 7001)),
            good: SocketAddr::from(([127, 0, 0, 1], 7002)),
            bad: Mutex::default(),
        });
        let fetcher = Fetcher::with_peers(
            store,
            Some(peers.clone()),
            config(2),
            &tokio::runtime::Handle::current(),
        );
        fetcher.want(&cache, ChunkIdx(0), Class::Demand).await.unwrap();
        assert_eq!(cache.read_chunk(ChunkIdx(0)).unwrap().unwrap(), data);
        assert_eq!(
            *peers.bad.lock().unwrap(),
            vec![peers.liar],
            "the liar was not reported"
        );
        let n = fetcher.counters();
        assert_eq!(
            (count(&n.bad_peer_chunks), count(&n.peer_chunks), count(&n.store_chunks)),
            (1, 1, 0)
        );
        assert_eq!(
            count(&n.peer_bytes),
            form.len() as u64,
            "peer bytes are not the bytes sent"
        );
        let kept = fetcher
            .stored_form(&d)
            .expect("the verified stored form was not kept for peers");
        assert_eq!((kept.bytes, kept.zstd), (form, true));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_home_busy_to_the_end_sends_the_fetch_to_the_store_not_to_the_next_candidate() {
        let dir = tempfile::tempdir().unwrap();
        let (store, cache) = setup(2, dir.path()).await;
        let peers = Arc::new(FakePeers::new(2, &[Peer::Busy, Peer::Good]));
        let fetcher = Fetcher::with_peers(
            store,
            Some(peers.clone()),
            config(2),
            &tokio::runtime::Handle::current(),
        );
        fetcher.want(&cache, ChunkIdx(0), Class::Demand).await.unwrap();
        let n = fetcher.counters();
        assert_eq!((count(&n.peer_chunks), count(&n.store_chunks)), (0, 1));
        assert_eq!(
            peers.asked.lock().unwrap().len(),
            1,
            "the candidate after a busy home was asked"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_chunk_is_reported_verified_only_once_it_checks_out_so_a_liar_is_never_announced() {
        let dir = tempfile::tempdir().unwrap();
        let (store, cache) = setup(2, dir.path()).await;
        let peers = Arc::new(FakePeers::new(2, &[Peer::Liar, Peer::Good]));
        let fetcher = Fetcher::with_peers(
            store,
            Some(peers.clone()),
            config(2),
            &tokio::runtime::Handle::current(),
        );
        fetcher.want(&cache, ChunkIdx(1), Class::Demand).await.unwrap();
        let good = SocketAddr::from(([127, 0, 0, 1], 7001));
        assert_eq!(
            *peers.verified.lock().unwrap(),
            vec![(good, good)],
            "the liar's chunk was reported verified, or the good one was not"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_bad_chunk_from_a_peer_is_never_cached_and_the_next_source_serves_it() {
        let dir = tempfile::tempdir().unwrap();
        let (store, cache) = setup(2, dir.path()).await;
        let peers = Arc::new(FakePeers::new(2, &[Peer::Liar, Peer::Good]));
        let fetcher = Fetcher::with_peers(
            store.clone(),
            Some(peers.clone()),
            config(2),
            &tokio::runtime::Handle::current(),
        );
        fetcher.want(&cache, ChunkIdx(1), Class::Demand).await.unwrap();
        let mut buf = vec![0u8; 65536];
        assert!(cache.read(65536, crate::engine::IoRange::from_slice(&mut buf)).unwrap());
        assert!(buf.iter().all(|&b| b == 2), "a peer's bad byte reached the cache");
        let n = fetcher.counters();
        assert_eq!(
            (count(&n.bad_peer_chunks), count(&n.peer_chunks), count(&n.store_chunks)),
            (1, 1, 0)
        );
        assert_eq!(peers.bad.lock().unwrap().len(), 1, "the liar was not reported");

        // Every peer failing: the store serves.
        let dir = tempfile::tempdir().unwrap();
        let cache = image(&store, 2, dir.path(), "img2").await;
        let peers = Arc::new(FakePeers::new(2, &[Peer::Liar, Peer::Down]));
        let fetcher = Fetcher::with_peers(
            store,
            Some(peers.clone()),
            config(2),
            &tokio::runtime::Handle::current(),
        );
        fetcher.want(&cache, ChunkIdx(0), Class::Demand).await.unwrap();
        let n = fetcher.counters();
        assert_eq!(
            (
                count(&n.bad_peer_chunks),
                count(&n.peer_failures),
                count(&n.peer_chunks),
                count(&n.store_chunks)
            ),
            (1, 1, 0, 1)
        );
        assert_eq!(
            peers.asked.lock().unwrap().len(),
            2,
            "a peer was asked twice, or not at all"
        );
        assert_eq!(
            count(&n.by_class[Class::Demand as usize]),
            1,
            "the store retake was counted again"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flight_waiting_on_a_peer_holds_no_worker() {
        let dir = tempfile::tempdir().unwrap();
        let (store, cache) = setup(2, dir.path()).await;
        // Chunk 0's home hangs; chunk 1's home is this host (no candidates).
        let mut peers = FakePeers::new(2, &[Peer::Hangs]);
        peers.candidates.retain(|d, _| *d == Digest::of(&[1u8; 65536]));
        let fetcher = Fetcher::with_peers(
            store,
            Some(Arc::new(peers)),
            config(1),
            &tokio::runtime::Handle::current(),
        );
        let hanging = fetcher.want(&cache, ChunkIdx(0), Class::Demand);
        tokio::time::sleep(Duration::from_millis(50)).await;
        // One worker, and it is not stuck behind the hanging peer.
        tokio::time::timeout(Duration::from_secs(1), fetcher.want(&cache, ChunkIdx(1), Class::Demand))
            .await
            .expect("the only worker waited on a peer")
            .unwrap();
        // The hanging peer fails at last and the store serves chunk 0.
        hanging.await.unwrap();
        assert_eq!(count(&fetcher.counters().store_chunks), 2);
        assert_eq!(count(&fetcher.counters().peer_failures), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn loose_wants_of_one_digest_share_one_store_fetch() {
        let store = slow_store(Duration::from_millis(50));
        let data = vec![9u8; 65536];
        let d = Digest::of(&data);
        store.put_chunk(&d, Bytes::from(data.clone())).await.unwrap();
        let entry = ChunkEntry {
            digest: d,
            stored_len: 65536,
            zstd: false,
        };
        let fetcher = Fetcher::new(store, config(4), &tokio::runtime::Handle::current());
        let kept = Arc::new(AtomicU64::new(0));
        let k = kept.clone();
        let keep: KeepLoose = Arc::new(move |_: &Digest, _: &Bytes| {
            k.fetch_add(1, Ordering::Relaxed);
        });
        let wants: Vec<_> = (0..10)
            .map(|i| {
                let class = if i % 2 == 0 { Class::Demand } else { Class::Background };
                fetcher.want_loose(entry, 65536, class, keep.clone())
            })
            .collect();
        for got in futures::future::join_all(wants).await {
            assert_eq!(got.unwrap(), data);
        }
        assert_eq!(count(&fetcher.counters().store_chunks), 1);
        assert_eq!(kept.load(Ordering::Relaxed), 1, "kept once, by the flight");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn demand_overtakes_queued_background_and_profile_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let (store, cache) = setup(12, dir.path()).await;
        let fetcher = Fetcher::new(store, config(1), &tokio::runtime::Handle::current());
        // All queued before the single worker runs (current-thread runtime);
        // the order the worker takes them is the order the classes say.
        let mut wants = Vec::new();
        for (c, class) in [
            (0, Class::Background),
            (1, Class::Background),
            (2, Class::Profile),
            (3, Class::Background),
            (4, Class::Demand),
            (5, Class::Profile),
            (6, Class::Demand),
        ] {
            wants.push(fetcher.want(&cache, ChunkIdx(c), class));
        }
        for r in futures::future::join_all(wants).await {
            r.unwrap();
        }
        assert_eq!(*fetcher.inner.taken.lock().unwrap(), vec![4, 6, 2, 5, 0, 1, 3]);
        // An upgraded want overtakes too: chunk 7 queued as background after
        // chunk 8, then wanted on demand.
        let wants = [(8, Class::Background), (7, Class::Background), (7, Class::Demand)]
            .map(|(c, class)| fetcher.want(&cache, ChunkIdx(c), class));
        for r in futures::future::join_all(wants).await {
            r.unwrap();
        }
        assert_eq!(
            fetcher.inner.taken.lock().unwrap()[7..],
            [7, 8],
            "the demand want of chunk 7 waited for background chunk 8"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_wants_of_a_chunk_share_one_fetch() {
        let dir = tempfile::tempdir().unwrap();
        let (store, cache) = setup(4, dir.path()).await;
        let fetcher = Fetcher::new(store, config(4), &tokio::runtime::Handle::current());
        let wants: Vec<_> = (0..50)
            .map(|i| {
                fetcher.want(
                    &cache,
                    ChunkIdx(i % 2),
                    if i % 3 == 0 { Class::Demand } else { Class::Background },
                )
            })
            .collect();
        for r in futures::future::join_all(wants).await {
            r.unwrap();
        }
        assert_eq!(fetcher.counters().store_chunks.load(Ordering::Relaxed), 2);
        // Ready chunks need no fetch at all.
        fetcher.want(&cache, ChunkIdx(0), Class::Demand).await.unwrap();
        assert_eq!(fetcher.counters().store_chunks.load(Ordering::Relaxed), 2);
        let mut buf = vec![0u8; 65536];
        assert!(cache.read(65536, crate::engine::IoRange::from_slice(&mut buf)).unwrap());
        assert!(buf.iter().all(|&b| b == 2));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_missing_chunk_fails_after_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let (store, cache) = setup(2, dir.path()).await;
        let empty = ImageStore::with_backend(Arc::new(object_store::memory::InMemory::new()), "empty");
        drop(store);
        let cfg = FetchConfig {
            deadline: Duration::from_millis(300),
            ..config(1)
        };
        let fetcher = Fetcher::new(empty, cfg, &tokio::runtime::Handle::current());
        let t = Instant::now();
        let e = fetcher.want(&cache, ChunkIdx(0), Class::Demand).await.unwrap_err();
        assert!(matches!(*e, FetchError::FetchChunk { .. }), "{e}");
        assert!(t.elapsed() >= Duration::from_millis(100));
        assert!(!cache.is_ready(ChunkIdx(0)));
    }

    /// A guest request for chunk `c` of `cache`, made at `since`.
    fn guest_read(
        fetcher: &Fetcher,
        cache: &Arc<ImageCache>,
        c: u64,
        since: std::time::Instant,
    ) -> crate::engine::FetchFuture {
        use crate::engine::Base;
        StreamedBase::new(cache.clone(), fetcher.clone(), None, Arc::default()).fetch(c * 65536, 1, since)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_guest_request_fails_only_when_its_own_deadline_passes() {
        let dir = tempfile::tempdir().unwrap();
        let (store, cache) = setup(1, dir.path()).await;
        let entry = cache.manifest().chunks[0].unwrap();
        let data = store.chunk(&entry).await.unwrap();
        let (store, cache) = (
            ImageStore::with_backend(Arc::new(object_store::memory::InMemory::new()), "late"),
            cache,
        );
        let cfg = FetchConfig {
            deadline: Duration::from_secs(2),
            ..config(1)
        };
        let fetcher = Fetcher::new(store.clone(), cfg, &tokio::runtime::Handle::current());
        // A background flight starts while the store lacks the chunk; a
        // guest asks half way through it.
        let fill = fetcher.want(&cache, ChunkIdx(0), Class::Background);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let read = tokio::spawn(guest_read(&fetcher, &cache, 0, std::time::Instant::now()));
        let e = fill.await.unwrap_err();
        assert!(matches!(*e, FetchError::FetchChunk { .. }), "{e}");
        // The flight failed before the guest's deadline: once the store has
        // the chunk, the guest's read gets it.
        store.put_chunk(&entry.digest, data).await.unwrap();
        read.await
            .unwrap()
            .expect("the guest's read failed with its deadline not passed");
        assert!(cache.is_ready(ChunkIdx(0)));

        // A chunk the store never has (the store has chunk 0's bytes only):
        // the read fails, not before its deadline.
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = ImageStore::with_backend(Arc::new(object_store::memory::InMemory::new()), "elsewhere");
        let other = image(&elsewhere, 2, dir.path(), "other").await;
        let asked = std::time::Instant::now();
        let e = guest_read(&fetcher, &other, 1, asked).await.unwrap_err();
        let waited = asked.elapsed();
        let e = crate::DisplayChain(&e).to_string();
        assert!(waited >= Duration::from_secs(2), "failed after {waited:?}: {e}");
        assert!(e.contains("deadline passed"), "{e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn capped_fill_does_not_hold_a_slot_while_throttled() {
        let dir = tempfile::tempdir().unwrap();
        let (store, a) = setup(4, dir.path()).await;
        let b = image(&store, 4, dir.path(), "other").await;
        // One low slot; image a's fill capped at 1 KB/s: its first chunk
        // passes, the next owes the bucket a minute.
        let cfg = FetchConfig {
            low_concurrency: 1,
            fill_rate: Some(1000),
            ..config(2)
        };
        let fetcher = Fetcher::new(store, cfg, &tokio::runtime::Handle::current());
        let fill: Vec<_> = (0..4)
            .map(|c| fetcher.want(&a, ChunkIdx(c), Class::Background))
            .collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Image b's profile stream gets the slot at once.
        let profile = (0..4).map(|c| fetcher.want(&b, ChunkIdx(c), Class::Profile));
        tokio::time::timeout(Duration::from_secs(5), futures::future::try_join_all(profile))
            .await
            .expect("a throttled fill flight held the only low slot")
            .unwrap();
        assert_eq!(ready(&a), 1, "the fill kept its cap");
        // A throttled chunk wanted by a guest goes at once.
        let demand = fetcher.want(&a, ChunkIdx(3), Class::Demand);
        tokio::time::timeout(Duration::from_secs(5), demand)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ready(&a), 2);
        drop(fill);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replay_ends_at_profile_end_when_guests_never_read_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        let (store, cache) = setup(8, dir.path()).await;
        // No recorded boot length: the clock moves at the profile rate, 20 chunks a second.
        let cfg = FetchConfig {
            profile_rate: Some(20 * 65536),
            background_fill: true,
            ..config(4)
        };
        let fetcher = Fetcher::new(store, cfg, &tokio::runtime::Handle::current());
        let replay = Arc::new(ProfileReplay::new(profile(vec![5, 4, 3, 2, 1, 0], None), 8));
        fetcher.start_fill(
            &cache,
            Some(replay.clone()),
            Arc::default(),
            1,
            &tokio::runtime::Handle::current(),
        );
        replay.note_attach();
        // The guest reads the profile's head and nothing more.
        replay.note_read(5..6, |c| cache.is_ready(c));
        let t = Instant::now();
        while ready(&cache) < 8 {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "{} chunks after 10 s",
                ready(&cache)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(replay.times_ms().1.is_some(), "replay ended");
        assert_eq!(replay.counters.streamed.load(Ordering::Relaxed), 6);
        // And background fill took the two chunks outside the profile.
        assert_eq!(
            fetcher.counters().by_class[Class::Background as usize].load(Ordering::Relaxed),
            2
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replay_clock_starts_at_the_first_attach_and_follows_the_recorded_boot() {
        let dir = tempfile::tempdir().unwrap();
        let (store, cache) = setup(10, dir.path()).await;
        let fetcher = Fetcher::new(store, config(4), &tokio::runtime::Handle::current());
        // A recorded boot of 2 s: 5 profile chunks a second, 1 chunk of window.
        let replay = Arc::new(ProfileReplay::new(profile((0..10).collect(), Some(2000)), 10));
        fetcher.start_fill(
            &cache,
            Some(replay.clone()),
            Arc::default(),
            1,
            &tokio::runtime::Handle::current(),
        );
        // Open but not attached: nothing streams (peers may not be up).
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert_eq!(ready(&cache), 0, "replay streamed before any guest attached");
        replay.note_attach();
        let attached = Instant::now();
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let half = ready(&cache);
        // Half the boot: 5 chunks plus the window, give or take a tick.
        assert!((4..=8).contains(&half), "{half} chunks half way through the boot");
        while ready(&cache) < 10 {
            assert!(attached.elapsed() < Duration::from_secs(10), "replay never ended");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            attached.elapsed() >= Duration::from_millis(1700),
            "{:?}",
            attached.elapsed()
        );
        let (first_read, done) = replay.times_ms();
        assert_eq!(first_read, None);
        assert!(
            done.unwrap() >= 1700,
            "{done:?} ms from attach to the end of the stream"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replay_of_an_image_no_guest_attaches_to_waits_then_streams_and_fill_follows() {
        let dir = tempfile::tempdir().unwrap();
        let (store, cache) = setup(6, dir.path()).await;
        let cfg = FetchConfig {
            background_fill: true,
            ..config(4)
        };
        let fetcher = Fetcher::new(store, cfg, &tokio::runtime::Handle::current());
        let replay = Arc::new(
            ProfileReplay::new(profile(vec![3, 2, 1], Some(300)), 6).unattached_after(Duration::from_millis(800)),
        );
        let boot = Arc::new(BootWatch::default());
        fetcher.start_fill(
            &cache,
            Some(replay.clone()),
            boot,
            8,
            &tokio::runtime::Handle::current(),
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(ready(&cache), 0, "replay streamed before its wait for a guest was over");
        let t = Instant::now();
        while ready(&cache) < 6 {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "{} chunks after 30 s",
                ready(&cache)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(replay.counters.streamed.load(Ordering::Relaxed), 3);
        assert_eq!(
            fetcher.counters().by_class[Class::Background as usize].load(Ordering::Relaxed),
            3
        );
    }

    /// Rates of background fill seen every 100 ms for `secs`, with a guest
    /// reading chunks `guest` (one at a time) if given.
    async fn watch_fill(fetcher: &Fetcher, cache: &Arc<ImageCache>, secs: f64, guest: Option<&mut u32>) -> Vec<u64> {
        let end = Instant::now() + Duration::from_secs_f64(secs);
        let mut rates = Vec::new();
        let mut next_tick = Instant::now();
        let mut guest = guest;
        while Instant::now() < end {
            if let Some(c) = guest.as_deref_mut() {
                fetcher.want(cache, ChunkIdx(*c), Class::Demand).await.unwrap();
                *c -= 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            } else {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if Instant::now() >= next_tick {
                rates.push(fetcher.fill_rate_now());
                next_tick += Duration::from_millis(100);
            }
        }
        rates
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn auto_fill_ramps_up_while_idle_and_backs_off_when_guests_wait() {
        let dir = tempfile::tempdir().unwrap();
        let store = slow_store(Duration::from_millis(5));
        // Fill (8 fetches of 5 ms at a time: at most 1600 chunks a second)
        // must not finish the image while idle, or the guest reads hits.
        let n = 2500;
        let cache = image(&store, n, dir.path(), "img").await;
        let cfg = FetchConfig {
            concurrency: 16,
            low_concurrency: 8,
            fill_rate: None,
            background_fill: true,
            ..config(16)
        };
        let fetcher = Fetcher::new(store, cfg, &tokio::runtime::Handle::current());
        assert!(fetcher.fill_is_auto());
        assert_eq!(fetcher.fill_rate_now(), rate::START_FILL as u64);
        let boot = Arc::new(BootWatch::default());
        boot.end();
        fetcher.start_fill(&cache, None, boot, 1, &tokio::runtime::Handle::current());
        let bg = || fetcher.counters().by_class[Class::Background as usize].load(Ordering::Relaxed);

        // Idle guests: the rate grows.
        let idle = watch_fill(&fetcher, &cache, 1.0, None).await;
        let (bg_idle, peak) = (bg(), *idle.last().unwrap());
        assert!(peak > 3 * rate::START_FILL as u64, "fill rates while idle: {idle:?}");

        // A guest reading (a miss every 10 ms or so): the rate falls to its minimum.
        let mut guest_chunk = n - 1;
        let busy = watch_fill(&fetcher, &cache, 1.5, Some(&mut guest_chunk)).await;
        let bg_busy = bg() - bg_idle;
        assert_eq!(
            *busy.last().unwrap(),
            rate::MIN_FILL as u64,
            "fill rates while a guest waits: {busy:?}"
        );
        let low = busy.iter().position(|&r| r <= peak / 16).expect("never backed off");
        assert!(low <= 6, "took {low} ticks to back off: {busy:?}");

        // The guest goes idle: after the hold, the rate grows again.
        let after = watch_fill(&fetcher, &cache, 2.5, None).await;
        assert!(
            *after.last().unwrap() > 4 * rate::MIN_FILL as u64,
            "fill rates after: {after:?}"
        );
        eprintln!(
            "fill: {bg_idle} chunks in 1 s idle (rate {peak} B/s at the end); {bg_busy} in 1.5 s with a guest \
             waiting (rate {} B/s); {} B/s 2.5 s after",
            busy.last().unwrap(),
            after.last().unwrap()
        );
    }
}
