//! Requests the worker could not finish at once, and the way they come back.
//!
//! A [`PendingRequest`] is `Send`: it crosses into tokio with its guest
//! buffers and a reference to the guest memory they live in. When it is done
//! a [`FinishedRequest`] is queued here and the completion eventfd, which is
//! on the worker's epoll, wakes the worker to put it on the used ring.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

use crate::engine::IoBuf;
use crate::virtio_blk::Request;

pub type GuestMemory = GuestMemoryMmap<()>;

/// A request that left the worker thread.
pub struct PendingRequest {
    pub head: u16,
    pub req: Request,
    pub data: Vec<IoBuf>,
    /// Keeps the buffers in `data` mapped, even if the guest's memory table
    /// changes or the frontend goes away meanwhile.
    pub mem: Arc<GuestMemory>,
}

/// What the worker adds to the used ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FinishedRequest {
    pub head: u16,
    pub used_len: u32,
}

#[derive(Default)]
struct State {
    finished: Vec<FinishedRequest>,
    inflight: usize,
}

/// One per queue.
pub struct Completions {
    state: Mutex<State>,
    idle: Condvar,
    notifier: EventNotifier,
}

impl Completions {
    pub fn new() -> std::io::Result<(Arc<Self>, EventConsumer)> {
        let (consumer, notifier) = new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)?;
        let c = Completions {
            state: Mutex::new(State::default()),
            idle: Condvar::new(),
            notifier,
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

    /// Takes the finished requests, swapping in `spare` (kept to avoid allocating).
    pub fn take(&self, spare: &mut Vec<FinishedRequest>) {
        spare.clear();
        std::mem::swap(&mut self.lock().finished, spare);
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
}
