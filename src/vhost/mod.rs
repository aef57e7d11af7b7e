//! The vhost-user-blk device: the backend QEMU talks to, one worker thread
//! per queue, and the accept loop that rebuilds the backend for every
//! frontend connection so QEMU can reconnect.

mod completion;
mod thread;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

pub use crate::DisplayChain;
pub use completion::{Completions, FinishedRequest, GuestMemory, PendingRequest};
pub use thread::{DiskContext, VhostUserBlkThread, DEFAULT_POLL_US, MAX_POLL_US};

use crate::virtio_blk::{self, BlkConfig};

/// Queue size the device accepts at most.
pub const MAX_QUEUE_SIZE: usize = 1024;
/// How long a stopping queue waits for its requests in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("listen on {0}")]
    Listen(PathBuf, #[source] vhost::vhost_user::Error),
    // vhost_user_backend::Error is not a std error: keep its text.
    #[error("create vhost-user daemon: {0}")]
    NewDaemon(String),
    #[error("accept a frontend connection: {0}")]
    Accept(String),
    #[error("create completion eventfd")]
    Eventfd(#[source] std::io::Error),
    #[error("register completion eventfd")]
    Register(#[source] std::io::Error),
}

/// The backend of one frontend connection to one disk.
pub struct VhostUserBlkBackend {
    config: BlkConfig,
    features: u64,
    threads: Vec<Mutex<VhostUserBlkThread>>,
    /// Completion eventfds, registered on each worker's epoll after creation.
    completion_fds: Mutex<Vec<Option<EventConsumer>>>,
    exit: Vec<(Mutex<Option<EventConsumer>>, EventNotifier)>,
    /// Each queue's vring, seen on its first event; `stop_vring` needs it.
    vrings: Vec<OnceLock<VringRwLock>>,
}

impl VhostUserBlkBackend {
    pub fn new(ctx: Arc<DiskContext>, queues: usize) -> Result<Self, Error> {
        let mut threads = Vec::with_capacity(queues);
        let mut completion_fds = Vec::with_capacity(queues);
        let mut exit = Vec::with_capacity(queues);
        for _ in 0..queues {
            let (completions, consumer) = Completions::new().map_err(Error::Eventfd)?;
            threads.push(Mutex::new(VhostUserBlkThread::new(ctx.clone(), completions)));
            completion_fds.push(Some(consumer));
            let (c, n) =
                new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).map_err(Error::Eventfd)?;
            exit.push((Mutex::new(Some(c)), n));
        }
        let readonly = ctx.disk.readonly();
        let size = ctx.disk.size();
        Ok(VhostUserBlkBackend {
            config: BlkConfig::new(size, queues as u16),
            features: virtio_blk::features(readonly) | 1 << VIRTIO_F_VERSION_1,
            threads,
            completion_fds: Mutex::new(completion_fds),
            exit,
            vrings: (0..queues).map(|_| OnceLock::new()).collect(),
        })
    }

    fn thread(&self, q: usize) -> MutexGuard<'_, VhostUserBlkThread> {
        lock(&self.threads[q])
    }

    /// Event id of the completion eventfd on a worker's epoll: past the
    /// ids the framework reserves (queues and exit event). Each worker has
    /// one queue, whose kick is event 0.
    fn completion_event(&self) -> u16 {
        (self.threads.len() + 1) as u16
    }

    /// Registers the completion eventfds with the workers' epolls.
    fn register_completions(&self, daemon: &VhostUserDaemon<Arc<Self>>) -> Result<(), Error> {
        let handlers = daemon.get_epoll_handlers();
        let fds = lock(&self.completion_fds);
        for (q, handler) in handlers.iter().enumerate() {
            if let Some(fd) = fds[q].as_ref() {
                use std::os::unix::io::AsRawFd;
                handler
                    .register_listener(fd.as_raw_fd(), EventSet::IN, u64::from(self.completion_event()))
                    .map_err(Error::Register)?;
            }
        }
        Ok(())
    }

    /// Waits for every queue's requests in flight, up to `timeout` each.
    pub fn drain(&self, timeout: Duration) -> bool {
        let completions: Vec<_> = (0..self.threads.len())
            .map(|q| self.thread(q).completions.clone())
            .collect();
        completions.iter().all(|c| c.wait_idle(timeout))
    }

    pub fn inflight(&self) -> usize {
        (0..self.threads.len())
            .map(|q| self.thread(q).completions.inflight())
            .sum()
    }
}

impl VhostUserBackend for VhostUserBlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.threads.len()
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        self.features | vhost::vhost_user::VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        for t in &self.threads {
            lock(t).set_event_idx(enabled);
        }
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemory>) -> std::io::Result<()> {
        for t in &self.threads {
            lock(t).set_memory(mem.clone());
        }
        Ok(())
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config.read(offset, size)
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.threads.len()).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) = self.exit.get(thread_index)?;
        let consumer = lock(consumer).take()?;
        Some((consumer, notifier.try_clone().ok()?))
    }

    fn stop_vring(&self, queue_index: u32) -> std::io::Result<()> {
        let q = queue_index as usize;
        if q >= self.threads.len() {
            return Ok(());
        }
        // The frontend reads the ring's state after this: requests taken
        // from it must be on the used ring by then.
        let completions = self.thread(q).completions.clone();
        if !completions.wait_idle(DRAIN_TIMEOUT) {
            tracing::error!(queue = q, "requests still in flight when the queue stopped");
        }
        if let Some(vring) = self.vrings[q].get() {
            self.thread(q).process_completions(vring)?;
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> std::io::Result<()> {
        // One queue per worker: queue `thread_id` is this worker's vrings[0].
        let (q, Some(vring)) = (thread_id, vrings.first()) else {
            return Ok(());
        };
        if evset != EventSet::IN || q >= self.threads.len() {
            return Ok(());
        }
        self.vrings[q].get_or_init(|| vring.clone());
        if device_event == 0 {
            return self.thread(q).process_queue(vring);
        }
        if device_event == self.completion_event() {
            let mut t = self.thread(q);
            // Drain the eventfd before the list, so a completion that lands
            // in between wakes us again rather than being missed.
            if let Some(Some(fd)) = lock(&self.completion_fds).get(q) {
                let _ = fd.consume();
            }
            return t.process_completions(vring);
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Binds the disk's socket (replacing a stale one).
pub fn listen(socket: &Path) -> Result<Listener, Error> {
    Listener::new(socket, true).map_err(|e| Error::Listen(socket.to_path_buf(), e))
}

/// Serves one disk on a unix socket, one frontend at a time, for ever:
/// after a frontend disconnects, the next one (or the same, reconnecting)
/// gets a fresh backend over the same disk.
pub fn serve(
    name: &str,
    mut listener: Listener,
    ctx: Arc<DiskContext>,
    queues: usize,
    active: Arc<Mutex<Option<Arc<VhostUserBlkBackend>>>>,
) -> Result<(), Error> {
    loop {
        let backend = Arc::new(VhostUserBlkBackend::new(ctx.clone(), queues)?);
        let mem = GuestMemoryAtomic::new(GuestMemory::new());
        let mut daemon = VhostUserDaemon::new(format!("streamblk-{name}"), backend.clone(), mem)
            .map_err(|e| Error::NewDaemon(e.to_string()))?;
        backend.register_completions(&daemon)?;
        daemon.start(&mut listener).map_err(|e| Error::Accept(e.to_string()))?;
        *lock(&active) = Some(backend.clone());
        if let Some(t) = ctx.disk.trace() {
            t.attach();
        }
        tracing::info!(disk = name, "frontend connected");
        match daemon.wait() {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => {}
            Err(e) => tracing::warn!(disk = name, "frontend connection ended: {e}"),
        }
        *lock(&active) = None;
        if !backend.drain(DRAIN_TIMEOUT) {
            tracing::error!(
                disk = name,
                inflight = backend.inflight(),
                "requests still in flight after disconnect"
            );
        }
        for h in daemon.get_epoll_handlers() {
            h.send_exit_event();
        }
        if ctx.stopping.load(Ordering::Acquire) {
            return Ok(());
        }
        tracing::info!(disk = name, "frontend disconnected; waiting for the next");
    }
}
