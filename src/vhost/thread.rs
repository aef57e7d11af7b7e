//! One queue's processing: pop chains, parse, run them against the disk,
//! complete them. Hits finish here, on the worker thread, straight into guest
//! memory; misses and flushes go to tokio and come back through
//! [`Completions`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use vhost_user_backend::{VringRwLock, VringState, VringT};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::event::EventConsumer;

use super::chain::HeadChain;
use super::completion::{Completions, FinishedRequest, GuestMemory, PendingRequest};
use super::inflight::InflightQueue;
use crate::engine::{Disk, IoBuf, IoRange, Status};
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
fn execute(ctx: &DiskContext, req: &virtio_blk::Request, data: &[IoBuf], may_block: bool) -> Outcome {
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
async fn complete_pending(ctx: Arc<DiskContext>, completions: Arc<Completions>, p: PendingRequest, first: Outcome) {
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
                    r = ctx.disk.fetch(offset, len) => if let Err(e) = r {
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
                Some(execute(&ctx2, &p2.req, &p2.data, true))
            } else {
                c2.gated(|| execute(&ctx2, &p2.req, &p2.data, true))
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
    data: Vec<IoBuf>,
    finished: Vec<FinishedRequest>,
    bad_requests: u64,
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
            data: Vec::with_capacity(256),
            finished: Vec::with_capacity(256),
            bad_requests: 0,
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
            while let Some(chain) = state.get_queue_mut().pop_descriptor_chain(&*mem) {
                let head = chain.head_index();
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
            if halt.load(Ordering::Relaxed) {
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
        let req = match virtio_blk::parse(
            chain,
            &**mem,
            self.ctx.capacity_sectors,
            &mut self.descs,
            &mut self.data,
        ) {
            Ok(req) => req,
            Err((e, status_addr)) => {
                self.ctx.stats.bad_request();
                self.bad_requests += 1;
                // Hostile or broken guests must not flood the log.
                if self.bad_requests <= 10 || self.bad_requests.is_power_of_two() {
                    tracing::warn!(head, count = self.bad_requests, "bad request: {e}");
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
        match execute(&self.ctx, &req, &self.data, false) {
            Outcome::Done(status) => {
                record(&self.ctx.stats, &req, status, started);
                Some(match virtio_blk::write_status(&**mem, req.status_addr, status) {
                    false => 0,
                    true if status == STATUS_OK => req.used_len(),
                    true => 1,
                })
            }
            outcome => {
                let pending = PendingRequest {
                    head,
                    req,
                    data: self.data.clone(),
                    mem: mem.clone().into_inner(),
                    started,
                };
                self.completions.start();
                let (ctx, completions) = (self.ctx.clone(), self.completions.clone());
                self.ctx
                    .runtime
                    .spawn(complete_pending(ctx, completions, pending, outcome));
                None
            }
        }
    }
}

fn queue_error(e: virtio_queue::Error) -> std::io::Error {
    std::io::Error::other(e.to_string())
}
