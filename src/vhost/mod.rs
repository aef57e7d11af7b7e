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

use std::fs::File;
use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use vhost::vhost_user::{BackendReqHandler, Listener};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use vmm_sys_util::event::EventConsumer;

pub use crate::DisplayChain;
pub use completion::{Completions, FinishedRequest, GuestMemory, PendingRequest};
pub use handler::VhostUserBlkHandler;
pub use thread::{
    DiskContext, LogLimit, VhostUserBlkThread, Waiting, DEFAULT_POLL_US, MAX_POLL_US, MAX_WAITING_BYTES,
    MAX_WAITING_REQUESTS,
};

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
    /// Each queue's error eventfd (VHOST_USER_SET_VRING_ERR), if given.
    err_fds: Vec<Mutex<Option<File>>>,
    /// A handle on the frontend connection's socket, to hang up on it.
    connection: Mutex<Option<UnixStream>>,
    /// Set once a queue broke: the connection is being dropped.
    broken: AtomicBool,
}

impl VhostUserBlkBackend {
    pub fn new(ctx: Arc<DiskContext>, queues: usize) -> Result<Self, Error> {
        let mut threads = Vec::with_capacity(queues);
        let mut completion_fds = Vec::with_capacity(queues);
        let err_fds = (0..queues).map(|_| Mutex::new(None)).collect();
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
            err_fds,
            connection: Mutex::new(None),
            broken: AtomicBool::new(false),
        })
    }

    /// Gives the backend a handle on its connection's socket (a dup).
    pub fn set_connection(&self, stream: UnixStream) {
        *lock(&self.connection) = Some(stream);
    }

    /// Hangs up on the frontend: the connection's request loop sees it go
    /// and tears the connection down. Harmless once it is gone.
    pub fn hang_up(&self) {
        if let Some(s) = lock(&self.connection).take() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// True once a queue broke and the connection was dropped for it.
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// A queue is broken beyond use (the driver corrupted its ring): tell
    /// the frontend as vhost-user allows, as QEMU's `virtio_error` and the
    /// kernel's `vq_err` do for their devices. The queue's error eventfd is
    /// signalled (QEMU logs "vhost vring error" and raises a
    /// VIRTQUEUE_ERROR event), then the connection is dropped, as
    /// libvhost-user does after `vu_panic`: the frontend sees the device
    /// gone, and a reconnect starts from a clean device.
    fn fail_queue(&self, q: usize) {
        self.broken.store(true, Ordering::Release);
        if let Some(f) = lock(&self.err_fds[q]).as_mut() {
            let _ = f.write_all(&1u64.to_ne_bytes());
        }
        self.hang_up();
    }

    fn thread(&self, q: usize) -> MutexGuard<'_, VhostUserBlkThread> {
        lock(&self.threads[q])
    }

    pub fn num_queues(&self) -> usize {
        self.threads.len()
    }

    /// Waits for every queue's requests in flight, up to `timeout` each,
    /// and for the queues' workers to put those finished on their rings
    /// (and signal the frontend). A request finished but not yet on its
    /// ring when the caller then hangs up would be published after the
    /// frontend stopped listening: QEMU drops that interrupt, and the guest
    /// waits for the request for ever.
    pub fn drain(&self, timeout: Duration) -> bool {
        let completions: Vec<_> = (0..self.threads.len())
            .map(|q| self.thread(q).completions.clone())
            .collect();
        let mut all = true;
        for (q, c) in completions.iter().enumerate() {
            let published = c.wait_published(timeout);
            if published {
                // The worker took them under the queue's lock and lets go
                // of it only once they are on the ring.
                drop(self.thread(q));
            }
            all &= published;
        }
        all
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
        // A second handle on the socket lets the backend hang up (a broken
        // queue, a forced removal) while this thread waits in a read.
        match stream.try_clone() {
            Ok(dup) => backend.set_connection(dup),
            Err(e) => tracing::warn!(disk = name, "cannot keep a handle on the connection: {e}"),
        }
        let handler = Arc::new(Mutex::new(VhostUserBlkHandler::new(backend.clone(), name)));
        let mut requests = BackendReqHandler::from_stream(stream, handler.clone());
        *lock(&active) = Some(backend.clone());
        ctx.disk.attach();
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
        backend.hang_up();
        lock(&handler).disconnect();
        drop(requests);
        drop(handler);
        if ctx.stopping.load(Ordering::Acquire) {
            return Ok(());
        }
        tracing::info!(disk = name, "frontend disconnected; waiting for the next");
    }
}
