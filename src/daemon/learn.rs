//! Boot profiles learned at run time. A disk of an image with no profile
//! records its first boot (bounded in time and size) into the image's
//! learned-profile directory under the cache directory; once `learn-boots`
//! traces exist the profile is built from them, used by the image's later
//! opens on this host and, with `publish-profiles`, stored in the store
//! next to the manifest. Later boots refine it, up to [`MAX_TRACES`].
//! Building and publishing run on one task, off the disks' threads.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::profile::learned::LearnedDir;
use crate::profile::{Profile, TraceEnd, TraceRecorder};
use crate::store::{Digest, ImageId, ImageStore};
use crate::DisplayChain;

/// Most guest bytes one learned trace records.
pub(crate) const LEARN_MAX_BYTES: u64 = 4 << 30;
/// Most traces a learned profile merges: recording stops there (unless
/// `learn-boots` asks for more before the first build).
pub(crate) const MAX_TRACES: usize = 5;

/// How profiles are learned: the `learn-*` and `publish-profiles` settings.
#[derive(Clone, Debug, PartialEq)]
pub struct LearnConfig {
    /// Recorded boots before a profile is built; 0: no learning.
    pub boots: u32,
    /// How long after attach a trace records.
    pub window: Duration,
    /// Most guest bytes a trace records.
    pub max_bytes: u64,
    /// Store learned profiles in the store too.
    pub publish: bool,
}

impl LearnConfig {
    fn max_traces(&self) -> usize {
        MAX_TRACES.max(self.boots as usize)
    }
}

/// Where an open image's boot profile came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ProfileSource {
    Store,
    Learned,
    None,
}

impl ProfileSource {
    pub(crate) fn name(self) -> &'static str {
        match self {
            ProfileSource::Store => "store",
            ProfileSource::Learned => "learned",
            ProfileSource::None => "none",
        }
    }
}

/// Work for the learning task, done in order.
enum Job {
    /// A trace was written: count it, rebuild, publish.
    Trace(Arc<Learner>, PathBuf, u64),
    /// Publish this profile.
    Publish(Arc<Learner>, Vec<u8>),
    /// Answer once the jobs before are done.
    Flush(oneshot::Sender<()>),
}

/// The daemon's one learning task.
pub(crate) struct LearnWorker {
    jobs: mpsc::UnboundedSender<Job>,
}

impl LearnWorker {
    pub(crate) fn start(runtime: &tokio::runtime::Handle) -> LearnWorker {
        let (jobs, mut rx) = mpsc::unbounded_channel::<Job>();
        runtime.spawn(async move {
            while let Some(job) = rx.recv().await {
                match job {
                    Job::Trace(l, path, records) => {
                        let learner = l.clone();
                        let built = tokio::task::spawn_blocking(move || learner.add_trace(&path, records))
                            .await
                            .ok()
                            .flatten();
                        if let Some(bytes) = built.filter(|_| l.config.publish) {
                            l.publish(bytes).await;
                        }
                    }
                    Job::Publish(l, bytes) => l.publish(bytes).await,
                    Job::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
        LearnWorker { jobs }
    }

    /// Waits up to `timeout` for the traces finished so far to be counted,
    /// built and published. Blocks: call it outside the runtime's tasks.
    pub(crate) fn flush(&self, runtime: &tokio::runtime::Handle, timeout: Duration) {
        let (tx, rx) = oneshot::channel();
        if self.jobs.send(Job::Flush(tx)).is_err() {
            return;
        }
        if runtime
            .block_on(async { tokio::time::timeout(timeout, rx).await })
            .is_err()
        {
            tracing::warn!("learned profiles: still building or publishing at exit");
        }
    }
}

/// One image's learning on this host.
pub(crate) struct Learner {
    id: ImageId,
    dir: LearnedDir,
    chunk_size: u32,
    chunk_count: u32,
    config: LearnConfig,
    store: ImageStore,
    /// Traces being recorded now.
    recording: AtomicUsize,
    /// Complete traces in the directory.
    traces: AtomicUsize,
    jobs: mpsc::UnboundedSender<Job>,
}

impl Learner {
    /// Image `id`'s learning, in `cache_dir`; clears what a crash left
    /// half recorded (no recorder of this image runs yet).
    pub(crate) fn open(
        worker: &LearnWorker,
        cache_dir: &Path,
        id: ImageId,
        chunk_size: u32,
        chunk_count: u32,
        config: LearnConfig,
        store: ImageStore,
    ) -> Arc<Learner> {
        let dir = LearnedDir::new(cache_dir, &id.to_hex());
        dir.remove_partial();
        let traces = dir.traces().len();
        Arc::new(Learner {
            id,
            dir,
            chunk_size,
            chunk_count,
            config,
            store,
            recording: AtomicUsize::new(0),
            traces: AtomicUsize::new(traces),
            jobs: worker.jobs.clone(),
        })
    }

    pub(crate) fn traces(&self) -> u64 {
        self.traces.load(Ordering::Relaxed) as u64
    }

    pub(crate) fn recording(&self) -> u64 {
        self.recording.load(Ordering::Relaxed) as u64
    }

    /// True if the store's profile is the one this host published.
    pub(crate) fn published_is(&self, bytes: &[u8]) -> bool {
        self.dir.published().as_deref() == Some(Digest::of(bytes).to_hex().as_str())
    }

    /// The learned profile, once enough boots are recorded: built now if
    /// the daemon stopped before it could (and published if it should be
    /// and was not). Blocks on file I/O. None if there is none yet or it
    /// does not load (logged).
    pub(crate) fn profile(self: &Arc<Self>) -> Option<Profile> {
        if self.traces() < u64::from(self.config.boots) {
            return None;
        }
        let loaded = match self.dir.profile_bytes() {
            Ok(Some(bytes)) => Ok(Some(bytes)),
            Ok(None) => self
                .dir
                .build(self.chunk_size, self.chunk_count, self.config.max_traces())
                .map(|b| b.map(|b| b.bytes)),
            Err(e) => Err(e),
        };
        let bytes = match loaded {
            Ok(Some(b)) => b,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(image = %self.id, "learned profile not used: {}", DisplayChain(&e));
                return None;
            }
        };
        match Profile::parse(&bytes, self.chunk_size, self.chunk_count) {
            Ok(p) => {
                if self.config.publish && !self.published_is(&bytes) {
                    let _ = self.jobs.send(Job::Publish(self.clone(), bytes));
                }
                Some(p)
            }
            Err(e) => {
                tracing::warn!(
                    image = %self.id,
                    path = %self.dir.profile_path().display(),
                    "learned profile not used: {}",
                    DisplayChain(&e)
                );
                None
            }
        }
    }

    /// A recorder for a boot of a disk of the image, if more traces are
    /// wanted. Its end is reported to the learning task.
    pub(crate) fn recorder(self: &Arc<Self>) -> Option<TraceRecorder> {
        let max = self.config.max_traces();
        let reserved = self.recording.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n + self.traces.load(Ordering::Relaxed) < max).then_some(n + 1)
        });
        if reserved.is_err() {
            return None;
        }
        let made = self.dir.create().and_then(|()| {
            TraceRecorder::create(&self.dir.new_trace_path(), self.config.window, self.config.max_bytes)
        });
        match made {
            Ok(t) => {
                let me = self.clone();
                Some(t.on_finish(move |end| match end {
                    TraceEnd::Written { path, records } => {
                        let jobs = me.jobs.clone();
                        let _ = jobs.send(Job::Trace(me, path.to_path_buf(), records));
                    }
                    TraceEnd::Abandoned => {
                        me.recording.fetch_sub(1, Ordering::AcqRel);
                    }
                }))
            }
            Err(e) => {
                self.recording.fetch_sub(1, Ordering::AcqRel);
                tracing::warn!(image = %self.id, "boot not recorded: {}", DisplayChain(&e));
                None
            }
        }
    }

    /// Counts a finished trace and, once enough boots are recorded,
    /// rebuilds the profile: its bytes, if built. Blocks on file I/O.
    fn add_trace(&self, path: &Path, records: u64) -> Option<Vec<u8>> {
        let _ = self
            .recording
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        if records == 0 {
            // No guest read (never attached): not a boot.
            let _ = std::fs::remove_file(path);
            return None;
        }
        let n = self.dir.traces().len();
        self.traces.store(n, Ordering::Relaxed);
        if n < self.config.boots as usize {
            tracing::info!(image = %self.id, "boot {n} of {} recorded for a learned profile", self.config.boots);
            return None;
        }
        match self
            .dir
            .build(self.chunk_size, self.chunk_count, self.config.max_traces())
        {
            Ok(Some(b)) => {
                tracing::info!(
                    image = %self.id,
                    traces = b.traces,
                    chunks = b.profile.chunks.len(),
                    path = %self.dir.profile_path().display(),
                    "learned boot profile built; later opens of the image use it"
                );
                Some(b.bytes)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::error!(image = %self.id, "building the learned profile failed: {}", DisplayChain(&e));
                None
            }
        }
    }

    /// Stores the profile in the store, unless the store holds a profile
    /// this host did not publish (an operator's: it wins).
    async fn publish(&self, bytes: Vec<u8>) {
        match self.store.profile(&self.id).await {
            Ok(Some(there)) if there[..] == bytes[..] => {}
            Ok(Some(there)) if !self.published_is(&there) => {
                tracing::info!(image = %self.id, "learned profile not published: the store has another");
                return;
            }
            Ok(_) => {
                if let Err(e) = self.store.put_profile(&self.id, bytes.clone().into()).await {
                    tracing::warn!(image = %self.id, "publishing the learned profile failed: {}", DisplayChain(&e));
                    return;
                }
                tracing::info!(image = %self.id, store = %self.store.url(), "learned profile published");
            }
            Err(e) => {
                tracing::warn!(image = %self.id, "publishing the learned profile failed: {}", DisplayChain(&e));
                return;
            }
        }
        let tag = Digest::of(&bytes).to_hex();
        if let Err(e) = self.dir.set_published(&tag) {
            tracing::warn!(image = %self.id, "{}", DisplayChain(&e));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CS: u32 = 65536;

    fn config(boots: u32, publish: bool) -> LearnConfig {
        LearnConfig {
            boots,
            window: Duration::from_secs(60),
            max_bytes: u64::MAX,
            publish,
        }
    }

    struct Fixture {
        rt: tokio::runtime::Runtime,
        cache: tempfile::TempDir,
        store: ImageStore,
        worker: LearnWorker,
    }

    fn fixture() -> Fixture {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let store = ImageStore::with_backend(Arc::new(object_store::memory::InMemory::new()), "memory://");
        let worker = LearnWorker::start(rt.handle());
        Fixture {
            rt,
            cache: tempfile::tempdir().unwrap(),
            store,
            worker,
        }
    }

    impl Fixture {
        fn learner(&self, boots: u32, publish: bool) -> Arc<Learner> {
            Learner::open(
                &self.worker,
                self.cache.path(),
                Digest::of(b"image"),
                CS,
                16,
                config(boots, publish),
                self.store.clone(),
            )
        }

        /// One boot: reads of these chunks, in order.
        fn boot(&self, l: &Arc<Learner>, chunks: &[u64]) {
            let t = l.recorder().expect("a boot is recorded");
            t.attach();
            for &c in chunks {
                t.record(c * u64::from(CS), 4096);
                std::thread::sleep(Duration::from_millis(2));
            }
            t.finish();
            self.worker.flush(self.rt.handle(), Duration::from_secs(10));
        }
    }

    #[test]
    fn a_profile_is_learned_after_the_configured_boots_and_used_by_later_opens() {
        let f = fixture();
        let l = f.learner(2, false);
        assert!(l.profile().is_none());
        f.boot(&l, &[5, 1]);
        assert_eq!(l.traces(), 1);
        assert!(
            f.learner(2, false).profile().is_none(),
            "one boot of two: no profile yet"
        );
        f.boot(&l, &[5, 2]);
        let again = f.learner(2, false);
        assert_eq!(again.traces(), 2);
        let p = again.profile().expect("learned after two boots");
        assert_eq!(p.chunks[0], 5);
        let mut chunks = p.chunks.clone();
        chunks.sort();
        assert_eq!(chunks, vec![1, 2, 5]);
        // Not published unless asked.
        assert!(f.rt.block_on(f.store.profile(&Digest::of(b"image"))).unwrap().is_none());
    }

    #[test]
    fn recording_stops_at_the_most_traces_and_a_boot_with_no_read_is_not_counted() {
        let f = fixture();
        let l = f.learner(1, false);
        let idle = l.recorder().unwrap();
        assert_eq!(l.recording(), 1);
        idle.finish();
        f.worker.flush(f.rt.handle(), Duration::from_secs(10));
        assert_eq!((l.traces(), l.recording()), (0, 0), "never attached: not a boot");
        for i in 0..MAX_TRACES as u64 {
            f.boot(&l, &[i]);
        }
        assert_eq!(l.traces(), MAX_TRACES as u64);
        assert!(l.recorder().is_none(), "enough traces: no more recording");
        // A recorder dropped unfinished gives its slot back.
        let l = f.learner(10, false);
        let t = l.recorder().unwrap();
        drop(t);
        assert_eq!(l.recording(), 0);
    }

    #[test]
    fn a_learned_profile_is_published_but_never_over_an_operators() {
        let f = fixture();
        let id = Digest::of(b"image");
        let l = f.learner(1, true);
        f.boot(&l, &[3, 4]);
        let stored = f.rt.block_on(f.store.profile(&id)).unwrap().expect("published");
        let p = Profile::parse(&stored, CS, 16).unwrap();
        assert_eq!(p.chunks, vec![3, 4]);
        assert!(l.published_is(&stored));
        // A refining boot republishes over this host's own profile.
        f.boot(&l, &[3, 4, 9]);
        let stored = f.rt.block_on(f.store.profile(&id)).unwrap().unwrap();
        assert!(Profile::parse(&stored, CS, 16).unwrap().chunks.contains(&9));
        // An operator's profile is left alone.
        let theirs = Profile {
            version: crate::profile::VERSION,
            chunk_size: CS,
            chunks: vec![0],
            boot_ms: None,
        };
        f.rt.block_on(f.store.put_profile(&id, theirs.to_bytes().into()))
            .unwrap();
        f.boot(&l, &[7]);
        let stored = f.rt.block_on(f.store.profile(&id)).unwrap().unwrap();
        assert_eq!(stored[..], theirs.to_bytes()[..]);
    }
}
