//! One queue's processing: pop chains, parse, run them against the disk,
//! complete them. Hits finish here, on the worker thread, straight into guest
//! memory; misses and flushes go to tokio and come back through
//! [`Completions`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::runtime::Handle;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};

use super::completion::{Completions, FinishedRequest, GuestMemory, PendingRequest};
use crate::engine::{Disk, IoBuf, IoRange, Status};
use crate::virtio_blk::{self, RequestType, STATUS_IOERR, STATUS_OK};

/// Attempts of one request against misses before it fails: a fetched chunk
/// can be evicted again before the retry reads it, but not forever.
const MAX_ATTEMPTS: usize = 8;

/// What a disk shares with its queues' workers and their pending requests.
pub struct DiskContext {
    pub disk: Arc<Disk>,
    pub serial: [u8; 20],
    pub capacity_sectors: u64,
    pub runtime: Handle,
    /// Set at shutdown: stop taking new requests from the rings.
    pub stopping: AtomicBool,
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
            let mut status = Status::Done;
            let r = virtio_blk::discard_segments(req.kind, data, ctx.capacity_sectors, |seg| {
                let res = if req.kind == RequestType::Discard {
                    disk.discard(seg.offset, seg.len).map(|()| Status::Done)
                } else {
                    disk.write_zeroes(seg.offset, seg.len)
                };
                match res {
                    Ok(Status::Done) => Ok(()),
                    Ok(miss) => {
                        status = miss;
                        Err(virtio_blk::Error::Layout(0))
                    }
                    Err(e) => {
                        tracing::warn!(error = %DisplayChain(&e), "discard/write-zeroes failed");
                        Err(virtio_blk::Error::Layout(0))
                    }
                }
            });
            match (r, status) {
                (_, Status::Miss { offset, len }) => return Outcome::Miss { offset, len },
                (Ok(()), _) => Ok(Status::Done),
                (Err(e), _) => return Outcome::Done(e.status().unwrap_or(STATUS_IOERR)),
            }
        }
    };
    match result {
        Ok(Status::Done) => Outcome::Done(STATUS_OK),
        Ok(Status::Miss { offset, len }) => Outcome::Miss { offset, len },
        Err(e) => {
            tracing::warn!(kind = ?req.kind, offset = req.offset, error = %DisplayChain(&e), "request failed");
            Outcome::Done(STATUS_IOERR)
        }
    }
}

/// Finishes a request off the worker thread: fetch, retry, report.
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
                if let Err(e) = ctx.disk.fetch(offset, len).await {
                    tracing::warn!(offset, len, error = %DisplayChain(&e), "fetch for a guest request failed");
                    break STATUS_IOERR;
                }
            }
            Outcome::Flush => {}
        }
        let (ctx2, p2) = (ctx.clone(), p.clone());
        outcome = match tokio::task::spawn_blocking(move || execute(&ctx2, &p2.req, &p2.data, true)).await {
            Ok(o) => o,
            Err(e) => {
                tracing::error!("request task failed: {e}");
                Outcome::Done(STATUS_IOERR)
            }
        };
    };
    let ok = status == STATUS_OK;
    if !virtio_blk::write_status(&*p.mem, p.req.status_addr, status) {
        tracing::warn!("status byte of a finished request is outside guest memory");
    }
    completions.finish(FinishedRequest {
        head: p.head,
        used_len: if ok { p.req.used_len() } else { 1 },
    });
}

/// Owns the processing of one queue (one worker thread each).
pub struct VhostUserBlkThread {
    ctx: Arc<DiskContext>,
    pub(super) completions: Arc<Completions>,
    mem: Option<GuestMemoryAtomic<GuestMemory>>,
    event_idx: bool,
    // Scratch kept across requests so the hot path does not allocate.
    descs: Vec<(vm_memory::GuestAddress, u32, bool)>,
    data: Vec<IoBuf>,
    finished: Vec<FinishedRequest>,
    bad_requests: u64,
}

impl VhostUserBlkThread {
    pub fn new(ctx: Arc<DiskContext>, completions: Arc<Completions>) -> Self {
        VhostUserBlkThread {
            ctx,
            completions,
            mem: None,
            event_idx: false,
            descs: Vec::with_capacity(256),
            data: Vec::with_capacity(256),
            finished: Vec::with_capacity(256),
            bad_requests: 0,
        }
    }

    pub fn set_memory(&mut self, mem: GuestMemoryAtomic<GuestMemory>) {
        self.mem = Some(mem);
    }

    pub fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    /// Processes every available request of the queue.
    pub fn process_queue(&mut self, vring: &VringRwLock) -> std::io::Result<()> {
        if self.ctx.stopping.load(Ordering::Acquire) {
            return Ok(());
        }
        let Some(atomic) = &self.mem else { return Ok(()) };
        let mem = atomic.memory();
        let mut state = vring.get_mut();
        let mut used = false;
        loop {
            if self.event_idx {
                state.disable_notification().map_err(queue_error)?;
            }
            while let Some(chain) = state.get_queue_mut().pop_descriptor_chain(&*mem) {
                let head = chain.head_index();
                if let Some(used_len) = self.handle_chain(head, chain, &mem) {
                    state.add_used(head, used_len).map_err(queue_error)?;
                    used = true;
                }
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

    /// Puts finished asynchronous requests on the used ring.
    pub fn process_completions(&mut self, vring: &VringRwLock) -> std::io::Result<()> {
        self.completions.take(&mut self.finished);
        if self.finished.is_empty() {
            return Ok(());
        }
        let mut state = vring.get_mut();
        for f in &self.finished {
            state.add_used(f.head, f.used_len).map_err(queue_error)?;
        }
        if state.needs_notification().map_err(queue_error)? {
            state.signal_used_queue()?;
        }
        Ok(())
    }

    /// Runs one chain; returns its used length if it is done.
    fn handle_chain<D>(
        &mut self,
        head: u16,
        chain: virtio_queue::DescriptorChain<D>,
        mem: &vm_memory::GuestMemoryLoadGuard<GuestMemory>,
    ) -> Option<u32>
    where
        D: std::ops::Deref,
        D::Target: vm_memory::GuestMemory,
    {
        let req = match virtio_blk::parse(
            chain,
            &**mem,
            self.ctx.capacity_sectors,
            &mut self.descs,
            &mut self.data,
        ) {
            Ok(req) => req,
            Err((e, status_addr)) => {
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
                virtio_blk::write_status(&**mem, req.status_addr, status);
                Some(if status == STATUS_OK { req.used_len() } else { 1 })
            }
            outcome => {
                let pending = PendingRequest {
                    head,
                    req,
                    data: self.data.clone(),
                    mem: mem.clone().into_inner(),
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

/// Shows an error with its sources, one line.
pub struct DisplayChain<'a>(pub &'a dyn std::error::Error);

impl std::fmt::Display for DisplayChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut src = self.0.source();
        while let Some(s) = src {
            write!(f, ": {s}")?;
            src = s.source();
        }
        Ok(())
    }
}
