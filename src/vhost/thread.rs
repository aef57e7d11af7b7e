//! One queue's processing: pop chains, parse, run them against the disk,
//! complete them. Hits finish here, on the worker thread, straight into guest
//! memory; misses and flushes go to tokio and come back through
//! [`Completions`].

use std::collections::VecDeque;
use std::num::Wrapping;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use vhost_user_backend::{VringRwLock, VringState, VringT};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueT;
use vm_memory::{Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::event::EventConsumer;

use super::chain::HeadChain;
use super::completion::{Completions, FinishedRequest, GuestMemory, PendingRequest};
use super::inflight::InflightQueue;
use crate::engine::{Disk, GuestBufs, IoBuf, IoBufs, IoRange, Status};
use crate::metrics::{DiskStats, Op};
use crate::virtio_blk::{self, RequestType, STATUS_IOERR, STATUS_OK};
use crate::DisplayChain;

/// Attempts of one request against misses before it fails: a fetched chunk
/// can be evicted again before the retry reads it, but not forever.
const MAX_ATTEMPTS: usize = 8;

/// Default queue poll budget in microseconds (`serve --poll-us`).
pub const DEFAULT_POLL_US: u64 = 30;
/// The smallest poll worth starting.
const MIN_POLL: Duration = Duration::from_micros(1);
/// A longer poll only burns CPU and holds off the ring's other users.
pub const MAX_POLL_US: u64 = 1000;

/// Requests a disk may have waiting off its workers (misses waiting on
/// fetches, flushes) before its queues stop taking more.
pub const MAX_WAITING_REQUESTS: usize = 256;
/// Data bytes of those requests: at 256 KiB chunks, 256 chunks wanted.
pub const MAX_WAITING_BYTES: u64 = 64 << 20;

/// A disk's requests waiting off its workers, and the cap on them. Over the
/// cap its queues stop popping (requests wait in the ring, in guest memory)
/// until completions bring it back under; nothing is dropped or failed.
/// Each queue looks before it pops (two loads, no reservation on the hot
/// path), so queues popping at once may pass the cap by a request each.
pub struct Waiting {
    requests: AtomicUsize,
    bytes: AtomicU64,
    max_requests: usize,
    max_bytes: u64,
    /// Set while a queue waits in `stalled`.
    has_stalled: AtomicBool,
    /// Queues that stopped at the cap: their completion eventfds wake them.
    stalled: Mutex<Vec<Arc<Completions>>>,
}

impl Default for Waiting {
    fn default() -> Self {
        Waiting::new(MAX_WAITING_REQUESTS, MAX_WAITING_BYTES)
    }
}

impl Waiting {
    pub fn new(max_requests: usize, max_bytes: u64) -> Self {
        Waiting {
            requests: AtomicUsize::new(0),
            bytes: AtomicU64::new(0),
            max_requests: max_requests.max(1),
            max_bytes: max_bytes.max(1),
            has_stalled: AtomicBool::new(false),
            stalled: Mutex::new(Vec::new()),
        }
    }

    /// Requests and data bytes waiting now.
    pub fn current(&self) -> (usize, u64) {
        (
            self.requests.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }

    fn over(&self, order: Ordering) -> bool {
        self.requests.load(order) >= self.max_requests || self.bytes.load(order) >= self.max_bytes
    }

    fn add(&self, bytes: u64) {
        self.requests.fetch_add(1, Ordering::SeqCst);
        self.bytes.fetch_add(bytes, Ordering::SeqCst);
    }

    fn release(&self, bytes: u64) {
        self.requests.fetch_sub(1, Ordering::SeqCst);
        self.bytes.fetch_sub(bytes, Ordering::SeqCst);
        if self.has_stalled.load(Ordering::SeqCst) && !self.over(Ordering::SeqCst) {
            // Cleared under the lock registrations take: one made after
            // this sets it again and stays in the list.
            let stalled = {
                let mut s = self.stalled.lock().unwrap_or_else(|e| e.into_inner());
                self.has_stalled.store(false, Ordering::SeqCst);
                std::mem::take(&mut *s)
            };
            for c in stalled {
                c.wake();
            }
        }
    }

    /// True if the queue whose completions are `c` must stop popping; it is
    /// then woken through `c` once the disk is back under the cap.
    fn must_stall(&self, c: &Arc<Completions>) -> bool {
        if !self.over(Ordering::Relaxed) {
            return false;
        }
        {
            let mut s = self.stalled.lock().unwrap_or_else(|e| e.into_inner());
            if !s.iter().any(|x| Arc::ptr_eq(x, c)) {
                s.push(c.clone());
            }
            self.has_stalled.store(true, Ordering::SeqCst);
        }
        // A release between the first look and the registration saw no one
        // to wake: look again (a spurious wake-up later is harmless).
        self.over(Ordering::SeqCst)
    }
}

/// A request counted in its disk's `Waiting` until dropped.
struct WaitingGuard {
    ctx: Arc<DiskContext>,
    bytes: u64,
}

impl WaitingGuard {
    fn new(ctx: Arc<DiskContext>, bytes: u64) -> Self {
        ctx.waiting.add(bytes);
        WaitingGuard { ctx, bytes }
    }
}

impl Drop for WaitingGuard {
    fn drop(&mut self) {
        self.ctx.waiting.release(self.bytes);
    }
}

/// Lets a few log lines through per window, lock-free, and counts the rest.
pub struct LogLimit {
    epoch: Instant,
    window_secs: u64,
    burst: u64,
    window: AtomicU64,
    logged: AtomicU64,
    suppressed: AtomicU64,
}

impl Default for LogLimit {
    /// Ten lines per minute.
    fn default() -> Self {
        LogLimit::new(10, Duration::from_secs(60))
    }
}

impl LogLimit {
    pub fn new(burst: u64, window: Duration) -> Self {
        LogLimit {
            epoch: Instant::now(),
            window_secs: window.as_secs().max(1),
            burst,
            window: AtomicU64::new(0),
            logged: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(lines suppressed since the last one let through)` if this one may be logged.
    pub fn allow(&self) -> Option<u64> {
        let now = self.epoch.elapsed().as_secs() / self.window_secs;
        let w = self.window.load(Ordering::Relaxed);
        if now != w
            && self
                .window
                .compare_exchange(w, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.logged.store(0, Ordering::Relaxed);
        }
        if self.logged.fetch_add(1, Ordering::Relaxed) < self.burst {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// What a disk shares with its queues' workers and their pending requests.
pub struct DiskContext {
    pub disk: Arc<Disk>,
    pub serial: [u8; 20],
    pub capacity_sectors: u64,
    pub runtime: Handle,
    /// Set at shutdown: stop taking new requests from the rings.
    pub stopping: AtomicBool,
    /// How long a worker polls its queue before sleeping (zero: never).
    pub poll: Duration,
    /// The disk's request counters, kept across frontend connections.
    pub stats: DiskStats,
    /// Requests waiting off the workers, capped.
    pub waiting: Waiting,
    /// Rate limit of the disk's bad-request log lines, whichever queue.
    pub bad_request_log: LogLimit,
}

/// Counts a finished request in the disk's stats.
fn record(stats: &DiskStats, req: &virtio_blk::Request, status: u8, started: Instant) {
    let (op, bytes) = match req.kind {
        RequestType::In => (Op::Read, u64::from(req.data_len)),
        RequestType::Out => (Op::Write, u64::from(req.data_len)),
        RequestType::Flush => (Op::Flush, 0),
        RequestType::GetId | RequestType::Discard | RequestType::WriteZeroes => (Op::Other, 0),
    };
    stats.record(op, bytes, status == STATUS_OK, started.elapsed());
}

/// How running a request against the disk ended.
enum Outcome {
    Done(u8),
    Miss {
        offset: u64,
        len: u64,
    },
    /// Must run off the worker (it blocks for a device sync).
    Flush,
}

/// Runs a request whose data buffers are `data`.
fn execute(ctx: &DiskContext, req: &virtio_blk::Request, data: &[IoBuf<'_>], may_block: bool) -> Outcome {
    let disk = &ctx.disk;
    let result = match req.kind {
        RequestType::In => disk.read(req.offset, IoRange::new(data)),
        RequestType::Out => disk.write(req.offset, IoRange::new(data)),
        RequestType::Flush if !may_block => return Outcome::Flush,
        RequestType::Flush => disk.flush().map(|()| Status::Done),
        RequestType::GetId => {
            IoRange::new(data)
                .sub(0, req.data_len as usize)
                .copy_from(&ctx.serial[..req.data_len as usize]);
            Ok(Status::Done)
        }
        RequestType::Discard | RequestType::WriteZeroes => {
            let segments = match virtio_blk::discard_segments(req.kind, data, ctx.capacity_sectors) {
                Ok(s) => s,
                Err(e) => return Outcome::Done(e.status().unwrap_or(STATUS_IOERR)),
            };
            // Each segment is idempotent: a retry after a miss redoes them all.
            segments
                .iter()
                .map(|seg| match req.kind {
                    RequestType::Discard => disk.discard(seg.offset, seg.len).map(|()| Status::Done),
                    _ => disk.write_zeroes(seg.offset, seg.len),
                })
                .find(|r| !matches!(r, Ok(Status::Done)))
                .unwrap_or(Ok(Status::Done))
        }
    };
    match result {
        Ok(Status::Done) => Outcome::Done(STATUS_OK),
        Ok(Status::Miss { offset, len }) => Outcome::Miss { offset, len },
        Err(e) => {
            if !e.is_repeat() {
                tracing::warn!(kind = ?req.kind, offset = req.offset, error = %DisplayChain(&e), "request failed");
            }
            Outcome::Done(STATUS_IOERR)
        }
    }
}

/// Finishes a request off the worker thread: fetch, retry, report. A
/// cancelled queue drops it at the next step (its head stays inflight).
async fn complete_pending(waiting: WaitingGuard, completions: Arc<Completions>, p: PendingRequest, first: Outcome) {
    let ctx = waiting.ctx.clone();
    let p = Arc::new(p);
    let mut outcome = first;
    let mut attempts = 0;
    let status = loop {
        attempts += 1;
        match outcome {
            Outcome::Done(status) => break status,
            _ if attempts > MAX_ATTEMPTS => {
                tracing::warn!(
                    offset = p.req.offset,
                    "request still missing data after {MAX_ATTEMPTS} fetches"
                );
                break STATUS_IOERR;
            }
            Outcome::Miss { offset, len } => {
                let cancelled = completions.cancelled();
                tokio::pin!(cancelled);
                cancelled.as_mut().enable();
                if completions.is_cancelled() {
                    return completions.abandon();
                }
                tokio::select! {
                    r = ctx.disk.fetch(offset, len, p.started) => if let Err(e) = r {
                        tracing::warn!(offset, len, error = %DisplayChain(&e), "fetch for a guest request failed");
                        break STATUS_IOERR;
                    },
                    () = &mut cancelled => return completions.abandon(),
                }
            }
            Outcome::Flush => {}
        }
        let (ctx2, p2, c2) = (ctx.clone(), p.clone(), completions.clone());
        let run = move || {
            // A flush touches no guest memory and may take long: a stopping
            // queue need not wait for it.
            if p2.req.kind == RequestType::Flush {
                Some(execute(&ctx2, &p2.req, p2.data.bufs(), true))
            } else {
                c2.gated(|| execute(&ctx2, &p2.req, p2.data.bufs(), true))
            }
        };
        outcome = match tokio::task::spawn_blocking(run).await {
            Ok(Some(o)) => o,
            Ok(None) => return completions.abandon(),
            Err(e) => {
                tracing::error!("request task failed: {e}");
                Outcome::Done(STATUS_IOERR)
            }
        };
    };
    record(&ctx.stats, &p.req, status, p.started);
    let ok = status == STATUS_OK;
    completions.finish(FinishedRequest {
        head: p.head,
        used_len: if ok { p.req.used_len() } else { 1 },
        status: Some((p.req.status_addr, status)),
    });
}

/// Puts `head` on the used ring, tracked in the inflight region so that a
/// crash at any point neither loses it nor runs it twice.
fn publish(
    inflight: Option<&InflightQueue>,
    state: &mut VringState<GuestMemoryAtomic<GuestMemory>>,
    head: u16,
    used_len: u32,
) -> std::io::Result<()> {
    if let Some(i) = inflight {
        i.before_publish(head);
    }
    state.add_used(head, used_len).map_err(queue_error)?;
    if let Some(i) = inflight {
        i.after_publish(head, state.get_queue().next_used());
    }
    Ok(())
}

/// Owns the processing of one queue (one worker thread each).
pub struct VhostUserBlkThread {
    ctx: Arc<DiskContext>,
    pub(super) completions: Arc<Completions>,
    mem: Option<GuestMemoryAtomic<GuestMemory>>,
    event_idx: bool,
    /// How long to poll the queue for more requests before sleeping.
    poll: Duration,
    /// The current, adaptive poll budget, at most `poll`.
    poll_now: Duration,
    /// When the last poll gave up (the worker went to sleep).
    slept_at: Option<Instant>,
    // Scratch kept across requests so the hot path does not allocate.
    descs: Vec<(vm_memory::GuestAddress, u32, bool)>,
    finished: Vec<FinishedRequest>,
    /// Set when the queue stopped popping at the disk's cap on waiting
    /// requests: the next completion (of any queue of the disk) re-runs it.
    stalled: bool,
    /// This queue's part of the inflight region, if the frontend gave one.
    inflight: Option<InflightQueue>,
    /// Heads a previous backend took and did not finish, oldest first.
    resubmit: VecDeque<u16>,
    /// Set when the queue is being stopped: leave the ring at once.
    halt: Arc<AtomicBool>,
}

impl VhostUserBlkThread {
    pub fn new(ctx: Arc<DiskContext>, completions: Arc<Completions>) -> Self {
        let poll = ctx.poll;
        VhostUserBlkThread {
            ctx,
            completions,
            mem: None,
            event_idx: false,
            poll,
            poll_now: poll,
            slept_at: None,
            descs: Vec::with_capacity(256),
            finished: Vec::with_capacity(256),
            stalled: false,
            inflight: None,
            resubmit: VecDeque::new(),
            halt: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Prepares the queue to run from the ring's current state: the used
    /// index from guest memory and, with an inflight region a previous
    /// backend used, the avail index and the requests to run again.
    pub fn start(&mut self, vring: &VringRwLock, inflight: Option<InflightQueue>) -> std::io::Result<()> {
        let used = vring.queue_used_idx().map_err(queue_error)?;
        vring.set_queue_next_used(used);
        self.resubmit.clear();
        self.inflight = None;
        self.halt = Arc::new(AtomicBool::new(false));
        let Some(mut inflight) = inflight else { return Ok(()) };
        let size = vring.get_ref().get_queue().size();
        if size > inflight.desc_num() {
            tracing::warn!(
                size,
                entries = inflight.desc_num(),
                "inflight region smaller than the queue: not tracking"
            );
            return Ok(());
        }
        if let Some(r) = inflight.start(used) {
            if !r.resubmit.is_empty() {
                tracing::info!(
                    count = r.resubmit.len(),
                    "resubmitting requests in flight at the last disconnect"
                );
            }
            vring.set_queue_next_avail(r.next_avail);
            self.resubmit = r.resubmit.into_iter().filter(|&h| h < size).collect();
        }
        self.inflight = Some(inflight);
        Ok(())
    }

    /// The flag that makes a running `process_queue` return early.
    pub fn halt_flag(&self) -> Arc<AtomicBool> {
        self.halt.clone()
    }

    /// After the queue stopped: forget the ring (requests still in the
    /// engine are cancelled) and get a fresh completion channel for a later
    /// start; returns its eventfd.
    pub fn reset(&mut self) -> std::io::Result<EventConsumer> {
        self.completions.cancel();
        let (completions, consumer) = Completions::new()?;
        self.completions = completions;
        self.inflight = None;
        self.resubmit.clear();
        Ok(consumer)
    }

    pub fn set_memory(&mut self, mem: GuestMemoryAtomic<GuestMemory>) {
        self.mem = Some(mem);
    }

    pub fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    /// Processes every available request of the queue (first those to run
    /// again after a reconnect).
    pub fn process_queue(&mut self, vring: &VringRwLock) -> std::io::Result<()> {
        if self.ctx.stopping.load(Ordering::Acquire) {
            return Ok(());
        }
        let Some(atomic) = &self.mem else { return Ok(()) };
        let mem = atomic.memory();
        self.note_kick();
        self.stalled = false;
        let mut state = vring.get_mut();
        let mut used = false;
        while let Some(head) = self.resubmit.pop_front() {
            let q = state.get_queue();
            let chain = HeadChain::new(&*mem, GuestAddress(q.desc_table()), q.size(), head);
            if let Some(used_len) = self.handle_chain(head, chain, &mem) {
                publish(self.inflight.as_ref(), &mut state, head, used_len)?;
                used = true;
            }
        }
        let halt = self.halt.clone();
        loop {
            if self.event_idx {
                state.disable_notification().map_err(queue_error)?;
            }
            loop {
                if self.ctx.waiting.must_stall(&self.completions) {
                    self.stalled = true;
                    break;
                }
                let Some(chain) = state.get_queue_mut().pop_descriptor_chain(&*mem) else {
                    check_avail(state.get_queue(), &*mem)?;
                    break;
                };
                let head = chain.head_index();
                if head >= state.get_queue().size() {
                    // QEMU: "Guest says index is available"; no used entry can name it.
                    return Err(std::io::Error::other(format!("the driver made head {head} available")));
                }
                if let Some(i) = self.inflight.as_mut() {
                    i.take(head);
                }
                if let Some(used_len) = self.handle_chain(head, chain, &mem) {
                    publish(self.inflight.as_ref(), &mut state, head, used_len)?;
                    used = true;
                    // With EVENT_IDX, tell a waiting driver at once rather than
                    // after the whole batch: it refills the ring while we work
                    // on the rest, instead of the two sides taking turns. The
                    // check is a load; the driver re-arms it only when it waits.
                    if self.event_idx && state.needs_notification().map_err(queue_error)? {
                        state.signal_used_queue()?;
                        used = false;
                    }
                }
                if halt.load(Ordering::Relaxed) {
                    break;
                }
            }
            // Stalled, the queue stays as it is (with EVENT_IDX the driver may
            // not kick again): a completion brings the worker back.
            if halt.load(Ordering::Relaxed) || self.stalled {
                break;
            }
            // A short busy poll before sleeping: a driver that submits again
            // within it saves the kick and our wake-up.
            if self.poll_avail(state.get_queue(), &*mem) {
                continue;
            }
            if !self.event_idx || !state.enable_notification().map_err(queue_error)? {
                break;
            }
        }
        if used && state.needs_notification().map_err(queue_error)? {
            state.signal_used_queue()?;
        }
        Ok(())
    }

    /// Polls for the driver to make a request available; true if it did.
    ///
    /// The budget adapts, as QEMU's AioContext polling does: it halves when
    /// a poll finds nothing (the driver is idle, or it shares our CPU and
    /// cannot run while we spin) and doubles, up to the maximum, when a poll
    /// succeeds or a kick comes soon after we went to sleep.
    fn poll_avail<M: vm_memory::GuestMemory>(&mut self, queue: &virtio_queue::Queue, mem: &M) -> bool {
        if self.poll.is_zero() {
            return false;
        }
        let found = self.spin(queue, mem);
        self.poll_now = if found {
            (self.poll_now * 2).max(MIN_POLL).min(self.poll)
        } else {
            self.poll_now / 2
        };
        if !found {
            self.slept_at = Some(Instant::now());
        }
        found
    }

    /// Called on a kick: a kick that came within the maximum budget would
    /// have been caught by polling, so poll more.
    fn note_kick(&mut self) {
        if let Some(t) = self.slept_at.take() {
            if t.elapsed() < self.poll {
                self.poll_now = (self.poll_now * 2).max(MIN_POLL).min(self.poll);
            }
        }
    }

    /// Spins up to the current budget; true if a request became available.
    fn spin<M: vm_memory::GuestMemory>(&self, queue: &virtio_queue::Queue, mem: &M) -> bool {
        if self.poll_now.is_zero() {
            return false;
        }
        let deadline = Instant::now() + self.poll_now;
        loop {
            // Reading the clock costs more than a look at the ring.
            for _ in 0..32 {
                match queue.avail_idx(mem, Ordering::Acquire) {
                    Ok(idx) if idx.0 != queue.next_avail() => return true,
                    Ok(_) => std::hint::spin_loop(),
                    Err(_) => return false,
                }
            }
            if Instant::now() >= deadline {
                return false;
            }
        }
    }

    /// True if the queue stopped popping at the disk's cap: run it again
    /// when a completion comes.
    pub fn stalled(&self) -> bool {
        self.stalled
    }

    /// Puts finished asynchronous requests on the used ring.
    pub fn process_completions(&mut self, vring: &VringRwLock) -> std::io::Result<()> {
        self.completions.take(&mut self.finished);
        if self.finished.is_empty() {
            return Ok(());
        }
        let mem = self.mem.as_ref().map(|m| m.memory());
        let mut state = vring.get_mut();
        for f in &self.finished {
            let mut used_len = f.used_len;
            if let (Some((addr, status)), Some(mem)) = (f.status, mem.as_ref()) {
                if !virtio_blk::write_status(&**mem, addr, status) {
                    tracing::warn!("status byte of a finished request is outside guest memory");
                    used_len = 0;
                }
            }
            publish(self.inflight.as_ref(), &mut state, f.head, used_len)?;
        }
        if state.needs_notification().map_err(queue_error)? {
            state.signal_used_queue()?;
        }
        Ok(())
    }

    /// Runs one chain; returns its used length if it is done.
    fn handle_chain<C>(
        &mut self,
        head: u16,
        chain: C,
        mem: &vm_memory::GuestMemoryLoadGuard<GuestMemory>,
    ) -> Option<u32>
    where
        C: IntoIterator<Item = Descriptor>,
    {
        let started = Instant::now();
        let mut data = IoBufs::new();
        let req = match virtio_blk::parse(chain, &**mem, self.ctx.capacity_sectors, &mut self.descs, &mut data) {
            Ok(req) => req,
            Err((e, status_addr)) => {
                let count = self.ctx.stats.bad_request();
                // Hostile or broken guests must not flood the log: a few
                // lines per disk and minute, whichever queue they come from.
                if let Some(suppressed) = self.ctx.bad_request_log.allow() {
                    tracing::warn!(head, count, suppressed, "bad request: {e}");
                }
                return Some(match (status_addr, e.status()) {
                    (Some(addr), Some(status)) if virtio_blk::write_status(&**mem, addr, status) => 1,
                    _ => 0,
                });
            }
        };
        if req.kind == RequestType::In {
            if let Some(t) = self.ctx.disk.trace() {
                t.record(req.offset, u64::from(req.data_len));
            }
        }
        match execute(&self.ctx, &req, &data, false) {
            Outcome::Done(status) => {
                record(&self.ctx.stats, &req, status, started);
                Some(match virtio_blk::write_status(&**mem, req.status_addr, status) {
                    false => 0,
                    true if status == STATUS_OK => req.used_len(),
                    true => 1,
                })
            }
            outcome => {
                // The buffers came from this memory: they are inside it.
                let Some(data) = GuestBufs::new(mem.clone().into_inner(), &data) else {
                    tracing::error!(head, "request buffers outside the guest memory they came from");
                    return Some(u32::from(virtio_blk::write_status(
                        &**mem,
                        req.status_addr,
                        STATUS_IOERR,
                    )));
                };
                let pending = PendingRequest {
                    head,
                    req,
                    data,
                    started,
                };
                self.completions.start();
                let waiting = WaitingGuard::new(self.ctx.clone(), u64::from(req.data_len));
                self.ctx
                    .runtime
                    .spawn(complete_pending(waiting, self.completions.clone(), pending, outcome));
                None
            }
        }
    }
}

/// Called when no chain could be popped: a driver that moved the avail
/// index by more than the queue size (or backwards), or put the avail ring
/// outside its memory, broke the queue (QEMU's "Guest moved used index").
/// Never popping again, rather than retrying, is what keeps the worker from
/// spinning on it.
fn check_avail<M: vm_memory::GuestMemory>(q: &virtio_queue::Queue, mem: &M) -> std::io::Result<()> {
    let next = q.next_avail();
    let idx = q.avail_idx(mem, Ordering::Acquire).map_err(queue_error)?;
    let pending = (idx - Wrapping(next)).0;
    if pending == 0 {
        return Ok(());
    }
    if pending > q.size() {
        return Err(std::io::Error::other(format!(
            "the driver moved the avail index from {next} to {} (queue size {})",
            idx.0,
            q.size()
        )));
    }
    // Made available between the pop's look and ours, or unreadable.
    let entry = next
        .checked_rem(q.size())
        .and_then(|i| GuestAddress(q.avail_ring()).checked_add(4 + 2 * u64::from(i)));
    match entry.map(|a| mem.read_obj::<u16>(a)) {
        Some(Ok(_)) => Ok(()),
        _ => Err(std::io::Error::other("the avail ring is outside guest memory")),
    }
}

fn queue_error(e: virtio_queue::Error) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_limit_lets_a_burst_through_then_counts_what_it_holds_back() {
        let l = LogLimit::new(3, Duration::from_secs(3600));
        assert_eq!((0..3).map(|_| l.allow()).collect::<Vec<_>>(), [Some(0); 3]);
        assert_eq!(l.allow(), None);
        assert_eq!(l.allow(), None);
        // A new window lets lines through again and says how many were held back.
        l.window.store(u64::MAX, Ordering::Relaxed);
        assert_eq!(l.allow(), Some(2));
    }

    #[test]
    fn a_stalled_queue_is_woken_once_the_disk_is_back_under_its_cap() {
        let w = Waiting::new(2, 1 << 20);
        let (c, wake) = Completions::new().unwrap();
        w.add(4096);
        assert!(!w.must_stall(&c));
        w.add(4096);
        assert!(w.must_stall(&c), "at the cap on requests");
        assert!(wake.consume().is_err(), "woken while over the cap");
        w.release(4096);
        assert!(wake.consume().is_ok(), "not woken once under the cap");
        assert!(!w.must_stall(&c));
        // The cap on bytes stalls as well.
        w.add(1 << 20);
        assert!(w.must_stall(&c));
        w.release(1 << 20);
        w.release(4096);
        assert_eq!(w.current(), (0, 0));
    }
}
