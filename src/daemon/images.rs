//! The image registry: each image opened on first use (manifest, profile,
//! Local Cache, fill), shared by the disks that use it, released when the
//! last one goes.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::learn::{LearnConfig, LearnWorker, Learner, ProfileSource};
use super::Error;
use crate::cache::{self, ChunkStore, ImageCache};
use crate::control::status::{ByClass, CacheStatus, FetchStatus, ImageStatus, LatencyByClass, ProfileStatus};
use crate::engine::Base;
use crate::fetch::{BootWatch, FetchConfig, Fetcher, ProfileReplay, StreamedBase};
use crate::p2p::P2p;
use crate::profile::Profile;
use crate::profile::TraceRecorder;
use crate::store::{check_manifest, ImageId, ImageStore, Manifest, ManifestCopies};
use crate::DisplayChain;

/// An image some disk uses. Dropped with its last lease: the fill stops
/// with the cache, and the cache becomes evictable.
pub(crate) struct OpenImage {
    cache: Arc<ImageCache>,
    replay: Option<Arc<ProfileReplay>>,
    /// When the first boot is over, for fill, if the image has no profile.
    boot: Arc<BootWatch>,
    profile_source: ProfileSource,
    /// Set while this host learns the image's profile.
    learner: Option<Arc<Learner>>,
    fetcher: Fetcher,
    names: Mutex<HashSet<String>>,
    opened: Instant,
    filled_at_open: u64,
}

impl OpenImage {
    pub(crate) fn base(&self) -> Arc<dyn Base> {
        Arc::new(StreamedBase::new(
            self.cache.clone(),
            self.fetcher.clone(),
            self.replay.clone(),
            self.boot.clone(),
        ))
    }

    /// A recorder for a disk's first boot, if the image's profile is being
    /// learned and wants more boots.
    pub(crate) fn boot_recorder(&self) -> Option<TraceRecorder> {
        self.learner.as_ref().and_then(|l| l.recorder())
    }

    fn status(&self, users: u64) -> ImageStatus {
        let c = &self.cache;
        let (have, all) = c.fill();
        let chunk_size = c.manifest().chunk_size as u64;
        let secs = self.opened.elapsed().as_secs_f64().max(1e-3);
        let fill_rate = have.saturating_sub(self.filled_at_open) as f64 * chunk_size as f64 / secs;
        let left = all.saturating_sub(have) as f64 * chunk_size as f64;
        let mut profile = self.replay.as_ref().map_or_else(ProfileStatus::default, |p| {
            let (first, done) = p.times_ms();
            ProfileStatus {
                chunks: p.len() as u64,
                streamed: p.counters.streamed.load(Ordering::Relaxed),
                hits: p.counters.hits.load(Ordering::Relaxed),
                stalls: p.counters.stalls.load(Ordering::Relaxed),
                first_read_ms: first,
                done_ms: done,
                ..ProfileStatus::default()
            }
        });
        profile.source = self.profile_source.name().into();
        if let Some(l) = &self.learner {
            profile.learned_traces = l.traces();
            profile.recording = l.recording();
        }
        let mut names: Vec<String> = lock(&self.names).iter().cloned().collect();
        names.sort();
        ImageStatus {
            id: c.id().to_hex(),
            names,
            chunk_size,
            chunks: all,
            filled: have,
            percent: crate::fetch::pct(have, all),
            fill_rate,
            eta_secs: (left > 0.0 && fill_rate > 0.0).then(|| left / fill_rate),
            hits: c.counters.hits.load(Ordering::Relaxed),
            misses: c.counters.misses.load(Ordering::Relaxed),
            users,
            profile: Some(profile),
        }
    }
}

impl Drop for OpenImage {
    fn drop(&mut self) {
        let (have, all) = self.cache.fill();
        match self.cache.persist() {
            Ok(()) => {
                tracing::info!(image = %self.cache.id(), "released by its last disk; cache has {have}/{all} chunks")
            }
            Err(e) => tracing::error!(image = %self.cache.id(), "persisting the cache failed: {}", DisplayChain(&e)),
        }
    }
}

#[derive(Default)]
struct State {
    /// Opened lazily by the first image= disk.
    store: Option<Fetcher>,
    /// Opened by the first image= disk.
    chunks: Option<Arc<ChunkStore>>,
    by_name: HashMap<String, Weak<OpenImage>>,
    by_id: HashMap<ImageId, Weak<OpenImage>>,
}

pub(crate) struct Images {
    store: Option<String>,
    store_proxy: Option<String>,
    cache_dir: PathBuf,
    /// The chunk store's size cap, bytes.
    cache_limit: Option<u64>,
    /// For the fetcher, made when the first image opens; its rates change on reload.
    fetch: Mutex<FetchConfig>,
    profile_window: u64,
    learn: LearnConfig,
    learning: LearnWorker,
    runtime: tokio::runtime::Handle,
    /// The fleet, if P2P is on: a source for the fetcher, and the server
    /// that serves the open images' chunks.
    p2p: Option<Arc<P2p>>,
    /// Held while an image opens: opening is rare and short next to a boot.
    state: Mutex<State>,
    /// The manifests of the images this host opened, served to peers.
    copies: Arc<ManifestCopies>,
}

/// Where an opened image's manifest came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ManifestFrom {
    Store,
    /// This host's copy, or a peer: the store failed.
    Elsewhere,
}

impl Images {
    pub(crate) fn new(
        settings: &super::Settings,
        runtime: tokio::runtime::Handle,
        p2p: Option<Arc<P2p>>,
    ) -> Result<Arc<Images>, Error> {
        let images = Arc::new(Images {
            store: settings.store.clone(),
            store_proxy: settings.store_proxy.clone(),
            cache_dir: settings.cache_dir.clone(),
            cache_limit: settings.cache_limit,
            fetch: Mutex::new(settings.fetch.clone()),
            profile_window: settings.profile_window,
            learn: settings.learn.clone(),
            learning: LearnWorker::start(&runtime),
            runtime,
            p2p,
            state: Mutex::default(),
            copies: Arc::new(ManifestCopies::new(&settings.cache_dir)),
        });
        if let Some(p) = &images.p2p {
            p.set_manifests(images.copies.clone());
        }
        // A home fetches chunks for its peers whether or not it has their
        // image open: its fetcher exists from the start; and it serves
        // every chunk its chunk store holds, from the start too.
        if let (Some(p), Some(_)) = (&images.p2p, &images.store) {
            let mut s = lock(&images.state);
            images.fetcher(&mut s)?;
            p.set_chunk_store(images.chunks(&mut s)?);
        }
        Ok(images)
    }

    /// The fetcher, made (with the peers as a source, if any) on first use.
    fn fetcher(&self, s: &mut State) -> Result<Fetcher, Error> {
        if let Some(f) = &s.store {
            return Ok(f.clone());
        }
        let location = self.store.as_ref().ok_or(Error::NoStore)?;
        let store = ImageStore::open_via(location, false, self.store_proxy.as_deref())
            .map_err(|e| Error::OpenStore(DisplayChain(&e).to_string()))?;
        let config = lock(&self.fetch).clone();
        let f = Fetcher::with_peers(store, self.p2p.as_ref().map(|p| p.peers()), config, &self.runtime);
        if let Some(p) = &self.p2p {
            p.set_fetcher(f.clone());
        }
        s.store = Some(f.clone());
        Ok(f)
    }

    /// The host's chunk store, opened on first use.
    fn chunks(&self, s: &mut State) -> Result<Arc<ChunkStore>, Error> {
        if let Some(c) = &s.chunks {
            return Ok(c.clone());
        }
        let fail = |e: cache::Error| Error::OpenCache(self.cache_dir.clone(), DisplayChain(&e).to_string());
        let chunks = ChunkStore::open(&self.cache_dir, self.cache_limit).map_err(fail)?;
        let usage = chunks.usage();
        tracing::info!(
            dir = %self.cache_dir.display(),
            chunks = usage.chunks,
            mib = usage.bytes >> 20,
            limit_mib = self.cache_limit.map(|l| l >> 20),
            "chunk store opened"
        );
        let old = cache::old_images(&**chunks.storage(), &self.cache_dir);
        if !old.is_empty() {
            tracing::info!(
                "{} image caches of the old per-image layout remain in {}: each moves into the chunk store when its image is next opened",
                old.len(),
                self.cache_dir.display()
            );
        }
        s.chunks = Some(chunks.clone());
        Ok(chunks)
    }

    /// The image `name` (a name or an id in the store), opened if no disk
    /// has it open. Fails if the store is unreachable or the image missing
    /// or bad.
    pub(crate) fn open(&self, name: &str) -> Result<Arc<OpenImage>, Error> {
        let mut s = lock(&self.state);
        if let Some(img) = s.by_name.get(name).and_then(Weak::upgrade) {
            return Ok(img);
        }
        let fail = |e: &dyn std::error::Error| Error::OpenImage(name.to_string(), DisplayChain(e).to_string());
        let fetcher = self.fetcher(&mut s)?;
        let (id, manifest, bytes, from) = self.runtime.block_on(self.find_manifest(fetcher.store(), name))?;
        if let Err(e) = self.copies.save(&id, &bytes) {
            tracing::warn!(image = %name, "keeping a copy of the manifest for peers failed: {}", DisplayChain(&e));
        }
        if let Some(img) = s.by_id.get(&id).and_then(Weak::upgrade) {
            lock(&img.names).insert(name.to_string());
            s.by_name.insert(name.to_string(), Arc::downgrade(&img));
            return Ok(img);
        }
        let store_profile = match self.runtime.block_on(fetcher.store().profile(&id)) {
            Ok(p) => p,
            Err(e) if from == ManifestFrom::Store => return Err(fail(&e)),
            // The store failed for the manifest too: boot without its
            // profile rather than not at all.
            Err(e) => {
                tracing::warn!(image = %name, "no boot profile from the store: {}", DisplayChain(&e));
                None
            }
        };
        let learner = (self.learn.boots > 0).then(|| {
            Learner::open(
                &self.learning,
                &self.cache_dir,
                id,
                manifest.chunk_size,
                manifest.chunk_count(),
                self.learn.clone(),
                fetcher.store().clone(),
            )
        });
        // The store's profile wins, unless it is the one this host learned
        // and published: then the local one, maybe refined since, is used.
        let (profile, profile_source, learner) = match store_profile {
            Some(bytes) => match learner.filter(|l| l.published_is(&bytes)) {
                Some(l) => match l.profile() {
                    Some(p) => (Some(p), ProfileSource::Learned, Some(l)),
                    None => {
                        let p = Profile::parse(&bytes, manifest.chunk_size, manifest.chunk_count())
                            .map_err(|e| fail(&e))?;
                        (Some(p), ProfileSource::Store, Some(l))
                    }
                },
                None => {
                    let p =
                        Profile::parse(&bytes, manifest.chunk_size, manifest.chunk_count()).map_err(|e| fail(&e))?;
                    (Some(p), ProfileSource::Store, None)
                }
            },
            None => match learner.as_ref().and_then(|l| l.profile()) {
                Some(p) => (Some(p), ProfileSource::Learned, learner),
                None => (None, ProfileSource::None, learner),
            },
        };
        let replay = profile.map(|p| Arc::new(ProfileReplay::new(p, manifest.chunk_count())));
        let chunks = self.chunks(&mut s)?;
        let cache = Arc::new(ImageCache::open(&chunks, id, Arc::new(manifest)).map_err(|e| fail(&e))?);
        let (have, all) = cache.fill();
        tracing::info!(
            image = %name,
            id = %id,
            profile_chunks = replay.as_ref().map_or(0, |p| p.len()),
            profile = profile_source.name(),
            "opened; cache has {have}/{all} chunks"
        );
        if let Some(p) = &self.p2p {
            p.add_image(&cache, replay.as_ref().map(|r| Arc::from(r.chunks())));
        }
        let window = (self.profile_window / cache.manifest().chunk_size as u64).max(1) as u32;
        let boot = Arc::new(BootWatch::default());
        fetcher.start_fill(&cache, replay.clone(), boot.clone(), window, &self.runtime);
        let img = Arc::new(OpenImage {
            cache,
            replay,
            boot,
            profile_source,
            learner,
            fetcher,
            names: Mutex::new([name.to_string()].into()),
            opened: Instant::now(),
            filled_at_open: have,
        });
        s.by_id.insert(id, Arc::downgrade(&img));
        s.by_name.insert(name.to_string(), Arc::downgrade(&img));
        Ok(img)
    }

    /// Image `name`'s id, manifest and the manifest's bytes. The store is
    /// the source of truth and is asked first; if it fails (other than
    /// saying there is no such image), an image given by id is opened
    /// from this host's copy of its manifest or from a peer's, either
    /// checked exactly as the store's would be. A name needs the store.
    async fn find_manifest(
        &self,
        store: &ImageStore,
        name: &str,
    ) -> Result<(ImageId, Manifest, bytes::Bytes, ManifestFrom), Error> {
        use crate::store::Error as StoreError;
        let fail = |why: String| Error::OpenImage(name.to_string(), why);
        let final_answer = |e: &StoreError| matches!(e, StoreError::NoImage(_) | StoreError::BadName(_));
        let id = match store.resolve(name).await {
            Ok(id) => id,
            Err(e) if final_answer(&e) => return Err(fail(DisplayChain(&e).to_string())),
            Err(e) => {
                return Err(fail(format!(
                    "{} (a name is looked up in the store: give the image by its id to get its manifest from peers)",
                    DisplayChain(&e)
                )))
            }
        };
        let store_failed = match store.manifest_of(name, &id).await {
            Ok((m, bytes)) => return Ok((id, m, bytes, ManifestFrom::Store)),
            Err(e) if final_answer(&e) => return Err(fail(DisplayChain(&e).to_string())),
            Err(e) => DisplayChain(&e).to_string(),
        };
        let copy = match self.copies.load(&id) {
            Ok(Some(bytes)) => check_manifest(name, &id, &bytes)
                .map(|m| (m, bytes))
                .map_err(|e| DisplayChain(&e).to_string()),
            Ok(None) => Err("none".to_string()),
            Err(e) => Err(DisplayChain(&e).to_string()),
        };
        let copy_failed = match copy {
            Ok((m, bytes)) => {
                tracing::warn!(image = %name, "the store failed ({store_failed}): opened from this host's copy of the manifest");
                return Ok((id, m, bytes, ManifestFrom::Elsewhere));
            }
            Err(why) => why,
        };
        let Some(p2p) = &self.p2p else {
            return Err(fail(format!(
                "the store failed: {store_failed}; this host's copy: {copy_failed}; P2P is off"
            )));
        };
        match p2p.manifest(&id).await {
            Ok((m, bytes, peer)) => {
                tracing::warn!(image = %name, %peer, "the store failed ({store_failed}): manifest from a peer, checked against the id");
                Ok((id, m, bytes, ManifestFrom::Elsewhere))
            }
            Err(e) => Err(fail(format!(
                "the store failed: {store_failed}; this host's copy: {copy_failed}; no peer served it: {}",
                DisplayChain(&e)
            ))),
        }
    }

    /// Changes the background fill and profile streaming caps, now and for
    /// a fetcher made later.
    pub(crate) fn set_rates(&self, fill: Option<u64>, profile: Option<u64>) {
        let s = lock(&self.state);
        let mut config = lock(&self.fetch);
        config.fill_rate = fill;
        config.profile_rate = profile;
        if let Some(f) = &s.store {
            f.set_rates(fill, profile);
        }
    }

    /// Waits (a while) for learned profiles of the traces finished so far
    /// to be built and published.
    pub(crate) fn finish_learning(&self) {
        self.learning.flush(&self.runtime, Duration::from_secs(30));
    }

    /// The images some disk uses, each with its number of users.
    fn open_images(&self) -> Vec<(Arc<OpenImage>, u64)> {
        let mut s = lock(&self.state);
        s.by_name.retain(|_, w| w.strong_count() > 0);
        s.by_id.retain(|_, w| w.strong_count() > 0);
        s.by_id
            .values()
            .filter_map(|w| {
                let n = w.strong_count() as u64;
                w.upgrade().map(|img| (img, n))
            })
            .collect()
    }

    pub(crate) fn p2p(&self) -> Option<&Arc<P2p>> {
        self.p2p.as_ref()
    }

    /// The chunk store's use, once it is open.
    pub(crate) fn cache_status(&self) -> Option<CacheStatus> {
        let chunks = lock(&self.state).chunks.clone()?;
        let u = chunks.usage();
        Some(CacheStatus {
            dir: self.cache_dir.clone(),
            chunks: u.chunks,
            bytes: u.bytes,
            limit: u.limit,
            inserted: chunks.counters.inserted.load(Ordering::Relaxed),
            evicted: chunks.counters.evicted.load(Ordering::Relaxed),
        })
    }

    pub(crate) fn status(&self) -> (Vec<ImageStatus>, Option<FetchStatus>) {
        let mut images: Vec<ImageStatus> = self.open_images().iter().map(|(img, n)| img.status(*n)).collect();
        images.sort_by(|a, b| a.id.cmp(&b.id));
        let fetch = lock(&self.state).store.as_ref().map(|f| {
            let n = f.counters();
            FetchStatus {
                store: f.store().url().to_string(),
                store_chunks: n.store_chunks.load(Ordering::Relaxed),
                store_bytes: n.store_bytes.load(Ordering::Relaxed),
                peer_chunks: n.peer_chunks.load(Ordering::Relaxed),
                peer_bytes: n.peer_bytes.load(Ordering::Relaxed),
                peer_failures: n.peer_failures.load(Ordering::Relaxed),
                bad_peer_chunks: n.bad_peer_chunks.load(Ordering::Relaxed),
                corrupt_chunks: n.corrupt_chunks.load(Ordering::Relaxed),
                failed_attempts: n.failed_attempts.load(Ordering::Relaxed),
                guest_waits: n.demand_waits.load(Ordering::Relaxed),
                guest_wait_ms: n.demand_wait_us.load(Ordering::Relaxed) / 1000,
                by_class: ByClass {
                    background: n.by_class[0].load(Ordering::Relaxed),
                    profile: n.by_class[1].load(Ordering::Relaxed),
                    demand: n.by_class[2].load(Ordering::Relaxed),
                },
                latency: LatencyByClass {
                    background: n.latency[0].snapshot(),
                    profile: n.latency[1].snapshot(),
                    demand: n.latency[2].snapshot(),
                },
                peer_latency: LatencyByClass {
                    background: n.peer_latency[0].snapshot(),
                    profile: n.peer_latency[1].snapshot(),
                    demand: n.peer_latency[2].snapshot(),
                },
                guest_wait: n.demand_wait.snapshot(),
                fill_rate_cap: f.rates().0,
                profile_rate_cap: f.rates().1,
                fill_auto: f.fill_is_auto(),
                fill_rate_now: limit(f.fill_rate_now()),
                profile_rate_now: limit(f.profile_rate_now()),
            }
        });
        (images, fetch)
    }

    /// One log line per open image and one for the fetcher: the numbers an
    /// operator watches while images stream.
    pub(crate) fn log_stats(&self) {
        let (images, fetch) = self.status();
        for i in images {
            tracing::info!(
                image = %i.id,
                chunks = i.filled,
                of = i.chunks,
                hits = i.hits,
                misses = i.misses,
                "cache {:.1}% filled",
                i.percent
            );
        }
        if let Some(f) = fetch {
            tracing::info!(
                store_chunks = f.store_chunks,
                store_bytes = f.store_bytes,
                corrupt_chunks = f.corrupt_chunks,
                failed_attempts = f.failed_attempts,
                guest_waits = f.guest_waits,
                guest_wait_ms = f.guest_wait_ms,
                "fetched from {}",
                f.store
            );
        }
    }
}

/// A rate in force, bytes per second; None: no limit.
fn limit(rate: u64) -> Option<u64> {
    (rate != u64::MAX).then_some(rate)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
