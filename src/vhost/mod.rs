//! The vhost-user-blk device: the frontend protocol (our own request
//! handler, with inflight I/O tracking), one worker thread per queue, and
//! the accept loop that builds a fresh backend for every frontend
//! connection so QEMU can reconnect.
//!
//! It owns the rings and guest memory of a connection; it must not touch
//! them once the frontend has taken a ring back or gone away.

mod chain;
mod completion;
mod handler;
pub mod inflight;
mod thread;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use vhost::vhost_user::{BackendReqHandler, Listener};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use vmm_sys_util::event::EventConsumer;

pub use crate::DisplayChain;
pub use completion::{Completions, FinishedRequest, GuestMemory, PendingRequest};
pub use handler::VhostUserBlkHandler;
pub use thread::{DiskContext, VhostUserBlkThread, DEFAULT_POLL_US, MAX_POLL_US};

use crate::virtio_blk::{self, BlkConfig};

/// Queue size the device accepts at most.
pub const MAX_QUEUE_SIZE: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("listen on {0}")]
    Listen(PathBuf, #[source] vhost::vhost_user::Error),
    #[error("accept a frontend connection")]
    Accept(#[source] vhost::vhost_user::Error),
    #[error("create completion eventfd")]
    Eventfd(#[source] std::io::Error),
}

/// The device state of one frontend connection to one disk: config,
/// features and the queues' processing.
pub struct VhostUserBlkBackend {
    config: BlkConfig,
    features: u64,
    threads: Vec<Mutex<VhostUserBlkThread>>,
    /// Each queue's completion eventfd, while no worker holds it.
    completion_fds: Vec<Mutex<Option<EventConsumer>>>,
}

impl VhostUserBlkBackend {
    pub fn new(ctx: Arc<DiskContext>, queues: usize) -> Result<Self, Error> {
        let mut threads = Vec::with_capacity(queues);
        let mut completion_fds = Vec::with_capacity(queues);
        for _ in 0..queues {
            let (completions, consumer) = Completions::new().map_err(Error::Eventfd)?;
            threads.push(Mutex::new(VhostUserBlkThread::new(ctx.clone(), completions)));
            completion_fds.push(Mutex::new(Some(consumer)));
        }
        let readonly = ctx.disk.readonly();
        let size = ctx.disk.size();
        Ok(VhostUserBlkBackend {
            config: BlkConfig::new(size, queues as u16),
            features: virtio_blk::features(readonly) | 1 << VIRTIO_F_VERSION_1,
            threads,
            completion_fds,
        })
    }

    fn thread(&self, q: usize) -> MutexGuard<'_, VhostUserBlkThread> {
        lock(&self.threads[q])
    }

    pub fn num_queues(&self) -> usize {
        self.threads.len()
    }

    /// Waits for every queue's requests in flight, up to `timeout` each.
    /// Those finished are put on their rings by the queues' workers.
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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Binds the disk's socket (replacing a stale one).
pub fn listen(socket: &Path) -> Result<Listener, Error> {
    Listener::new(socket, true).map_err(|e| Error::Listen(socket.to_path_buf(), e))
}

/// Serves one disk on a unix socket, one frontend at a time, for ever:
/// after a frontend disconnects, the next one (or the same, reconnecting)
/// gets a fresh backend over the same disk. Requests of the old connection
/// still in the engine are cancelled; the inflight region the frontend keeps
/// has the next connection run them again.
pub fn serve(
    name: &str,
    listener: Listener,
    ctx: Arc<DiskContext>,
    queues: usize,
    active: Arc<Mutex<Option<Arc<VhostUserBlkBackend>>>>,
) -> Result<(), Error> {
    loop {
        let Some(stream) = listener.accept().map_err(Error::Accept)? else {
            continue;
        };
        let backend = Arc::new(VhostUserBlkBackend::new(ctx.clone(), queues)?);
        let handler = Arc::new(Mutex::new(VhostUserBlkHandler::new(backend.clone(), name)));
        let mut requests = BackendReqHandler::from_stream(stream, handler.clone());
        *lock(&active) = Some(backend.clone());
        if let Some(t) = ctx.disk.trace() {
            t.attach();
        }
        tracing::info!(disk = name, "frontend connected");
        let end = loop {
            if let Err(e) = requests.handle_request() {
                break e;
            }
        };
        match end {
            vhost::vhost_user::Error::Disconnected
            | vhost::vhost_user::Error::PartialMessage
            | vhost::vhost_user::Error::SocketBroken(_) => {}
            e => tracing::warn!(disk = name, "frontend connection ended: {e}"),
        }
        *lock(&active) = None;
        lock(&handler).disconnect();
        drop(requests);
        drop(handler);
        if ctx.stopping.load(Ordering::Acquire) {
            return Ok(());
        }
        tracing::info!(disk = name, "frontend disconnected; waiting for the next");
    }
}
