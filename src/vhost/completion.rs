//! Requests the worker could not finish at once, and the way they come back.
//!
//! A [`PendingRequest`] is `Send`: it crosses into tokio with its guest
//! buffers and a reference to the guest memory they live in. When it is done
//! a [`FinishedRequest`] is queued here and the completion eventfd, which is
//! on the worker's epoll, wakes the worker to write its status byte and put
//! it on the used ring.
//!
//! When the frontend takes a ring back (GET_VRING_BASE) or goes away, the
//! queue's `Completions` is cancelled: requests still in the engine stop at
//! their next step and their results are dropped, never written into a ring
//! the frontend owns again; the inflight region has them resubmitted.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

use crate::engine::GuestBufs;
use crate::virtio_blk::Request;

pub type GuestMemory = GuestMemoryMmap<()>;

/// A request that left the worker thread.
pub struct PendingRequest {
    pub head: u16,
    pub req: Request,
    /// Its data buffers, with the guest memory they live in: mapped even
    /// if the guest's memory table changes or the frontend goes away.
    pub data: GuestBufs<GuestMemory>,
    /// When the worker took it, for the disk's latency histogram.
    pub started: std::time::Instant,
}

/// What the worker adds to the used ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FinishedRequest {
    pub head: u16,
    pub used_len: u32,
    /// The status byte to write before the used entry, and where.
    pub status: Option<(GuestAddress, u8)>,
}

#[derive(Default)]
struct State {
    finished: Vec<FinishedRequest>,
    inflight: usize,
    /// Callers of [`Completions::wait_published`] waiting: `take` wakes them.
    drain_waiters: usize,
    /// Set by `cancel`: no worker takes what is finished any more.
    cancelled: bool,
}

/// One per queue.
pub struct Completions {
    state: Mutex<State>,
    idle: Condvar,
    notifier: EventNotifier,
    /// True once cancelled. Readers hold it while they touch guest memory,
    /// so `cancel` returns only after the last of them is done.
    gate: RwLock<bool>,
    cancelled: tokio::sync::Notify,
}

impl Completions {
    pub fn new() -> std::io::Result<(Arc<Self>, EventConsumer)> {
        let (consumer, notifier) = new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)?;
        let c = Completions {
            state: Mutex::new(State::default()),
            idle: Condvar::new(),
            notifier,
            gate: RwLock::new(false),
            cancelled: tokio::sync::Notify::new(),
        };
        Ok((Arc::new(c), consumer))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a request that is leaving the worker.
    pub fn start(&self) {
        self.lock().inflight += 1;
    }

    /// Hands a finished request back to the worker.
    pub fn finish(&self, done: FinishedRequest) {
        let mut s = self.lock();
        s.finished.push(done);
        s.inflight -= 1;
        if s.inflight == 0 {
            self.idle.notify_all();
        }
        drop(s);
        if let Err(e) = self.notifier.notify() {
            tracing::error!("completion eventfd: {e}");
        }
    }

    /// Wakes the queue's worker with no request finished (its disk went
    /// back under the cap on waiting requests).
    pub fn wake(&self) {
        if let Err(e) = self.notifier.notify() {
            tracing::error!("completion eventfd: {e}");
        }
    }

    /// Forgets a request that was cancelled: nothing goes on the used ring.
    pub fn abandon(&self) {
        let mut s = self.lock();
        s.inflight -= 1;
        if s.inflight == 0 {
            self.idle.notify_all();
        }
    }

    /// Stops every request of this queue at its next step, and waits for
    /// those touching guest memory right now (never for a fetch).
    pub fn cancel(&self) {
        *self.gate.write().unwrap_or_else(|e| e.into_inner()) = true;
        self.cancelled.notify_waiters();
        self.lock().cancelled = true;
        self.idle.notify_all();
    }

    pub fn is_cancelled(&self) -> bool {
        *self.gate.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` unless cancelled; `cancel` waits for it to return.
    pub fn gated<R>(&self, f: impl FnOnce() -> R) -> Option<R> {
        let g = self.gate.read().unwrap_or_else(|e| e.into_inner());
        (!*g).then(f)
    }

    /// Resolves once cancelled (check `is_cancelled` after enabling it).
    pub fn cancelled(&self) -> tokio::sync::futures::Notified<'_> {
        self.cancelled.notified()
    }

    /// Takes the finished requests, swapping in `spare` (kept to avoid allocating).
    pub fn take(&self, spare: &mut Vec<FinishedRequest>) {
        spare.clear();
        let mut s = self.lock();
        std::mem::swap(&mut s.finished, spare);
        if s.drain_waiters > 0 {
            self.idle.notify_all();
        }
    }

    pub fn inflight(&self) -> usize {
        self.lock().inflight
    }

    /// Waits until no request is in flight, or `timeout`; true if none is.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let s = self.lock();
        let (s, _) = self
            .idle
            .wait_timeout_while(s, timeout, |s| s.inflight > 0)
            .unwrap_or_else(|e| e.into_inner());
        s.inflight == 0
    }

    /// Waits until no request is in flight and the queue's worker has taken
    /// every finished one (it puts them on the used ring before it lets go
    /// of the queue's lock; once the queue is cancelled none is taken), or
    /// `timeout`; true unless the time ran out.
    pub fn wait_published(&self, timeout: Duration) -> bool {
        let mut s = self.lock();
        s.drain_waiters += 1;
        let (mut s, _) = self
            .idle
            .wait_timeout_while(s, timeout, |s| {
                s.inflight > 0 || (!s.finished.is_empty() && !s.cancelled)
            })
            .unwrap_or_else(|e| e.into_inner());
        s.drain_waiters -= 1;
        s.inflight == 0 && (s.finished.is_empty() || s.cancelled)
    }
}
