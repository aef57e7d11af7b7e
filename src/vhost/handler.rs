//! The vhost-user frontend protocol of one connection: our own
//! implementation of the `vhost` crate's backend request-handler trait.
//!
//! vhost-user-backend's handler answers GET_INFLIGHT_FD with an error, keeps
//! its workers (and, with them, the rings) running after a ring is stopped,
//! and cannot be wrapped (the daemon owns it privately), so this replaces
//! it; vhost-user-backend still provides the vring state (`VringRwLock`).
//!
//! A queue runs on its own worker thread while it is started (it has a kick
//! eventfd) and enabled. Stopping it (GET_VRING_BASE, reset, disconnect)
//! joins the worker, so that nothing touches the ring afterwards, and
//! cancels the requests still in the engine: the inflight region the
//! frontend keeps has them run again.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight, VhostUserLog,
    VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig, VhostUserSharedMsg,
    VhostUserSingleMemoryRegion, VhostUserVirtioFeatures, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Error as ProtoError, GpuBackend, Result as ProtoResult, VhostUserBackendReqHandlerMut};
use vhost::VhostUserMemoryRegionBase;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestRegionMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

use super::inflight::InflightRegion;
use super::{lock, GuestMemory, VhostUserBlkBackend, MAX_QUEUE_SIZE};

/// Memory slots we accept (QEMU's vhost-user limit is lower).
const MAX_MEM_SLOTS: u64 = 509;
/// Without inflight tracking a stopped ring must hold every request it
/// took: wait for them this long before giving up on them.
const UNTRACKED_DRAIN: Duration = Duration::from_secs(10);

const EV_KICK: u64 = 0;
const EV_COMPLETION: u64 = 1;
const EV_EXIT: u64 = 2;

struct AddrMapping {
    vmm_addr: u64,
    size: u64,
    gpa_base: u64,
}

/// A queue's running worker thread.
struct Worker {
    handle: JoinHandle<EventConsumer>,
    exit: EventNotifier,
    halt: Arc<AtomicBool>,
}

pub struct VhostUserBlkHandler {
    backend: Arc<VhostUserBlkBackend>,
    disk: String,
    mem: GuestMemoryAtomic<GuestMemory>,
    mappings: Vec<AddrMapping>,
    vrings: Vec<VringRwLock>,
    workers: Vec<Option<Worker>>,
    /// Per queue: started (kicked) but not yet prepared by `thread.start`.
    needs_start: Vec<bool>,
    owned: bool,
    acked_features: u64,
    acked_protocol_features: u64,
    inflight: Option<Arc<InflightRegion>>,
}

fn invalid(what: &'static str) -> ProtoError {
    ProtoError::InvalidOperation(what)
}

fn internal(e: impl std::fmt::Display) -> ProtoError {
    ProtoError::ReqHandlerError(io::Error::other(e.to_string()))
}

impl VhostUserBlkHandler {
    pub fn new(backend: Arc<VhostUserBlkBackend>, disk: &str) -> Self {
        let mem = GuestMemoryAtomic::new(GuestMemory::new());
        let queues = backend.num_queues();
        let vrings = (0..queues)
            .map(|_| VringRwLock::new(mem.clone(), MAX_QUEUE_SIZE as u16).expect("a vring over empty memory"))
            .collect();
        VhostUserBlkHandler {
            backend,
            disk: disk.to_string(),
            mem,
            mappings: Vec::new(),
            vrings,
            workers: (0..queues).map(|_| None).collect(),
            needs_start: vec![false; queues],
            owned: false,
            acked_features: 0,
            acked_protocol_features: 0,
            inflight: None,
        }
    }

    fn vring(&self, index: u32) -> ProtoResult<&VringRwLock> {
        self.vrings.get(index as usize).ok_or(ProtoError::InvalidParam)
    }

    fn tracks_inflight(&self) -> bool {
        self.acked_protocol_features & VhostUserProtocolFeatures::INFLIGHT_SHMFD.bits() != 0 && self.inflight.is_some()
    }

    fn vmm_va_to_gpa(&self, va: u64) -> ProtoResult<u64> {
        self.mappings
            .iter()
            .find(|m| va >= m.vmm_addr && va - m.vmm_addr < m.size)
            .map(|m| va - m.vmm_addr + m.gpa_base)
            .ok_or(ProtoError::InvalidParam)
    }

    fn set_memory(&mut self, mem: GuestMemory) {
        self.mem.lock().unwrap_or_else(|e| e.into_inner()).replace(mem);
        for t in &self.backend.threads {
            lock(t).set_memory(self.mem.clone());
        }
    }

    /// Starts or stops queue `q`'s worker to match the ring's state.
    fn sync_worker(&mut self, q: usize) -> ProtoResult<()> {
        let vring = self.vrings[q].clone();
        let runnable = {
            let s = vring.get_ref();
            s.get_queue().ready() && s.is_enabled() && s.get_kick().is_some()
        };
        match (runnable, self.workers[q].is_some()) {
            (true, false) => self.start_worker(q),
            (false, true) => {
                self.stop_worker(q);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn start_worker(&mut self, q: usize) -> ProtoResult<()> {
        let vring = self.vrings[q].clone();
        let kick = match vring.get_ref().get_kick() {
            Some(k) => k.try_clone().map_err(ProtoError::ReqHandlerError)?,
            None => return Ok(()),
        };
        let halt = {
            let mut t = self.backend.thread(q);
            if self.needs_start[q] {
                let inflight = if self.tracks_inflight() {
                    self.inflight.as_ref().and_then(|r| r.queue(q))
                } else {
                    None
                };
                t.start(&vring, inflight).map_err(ProtoError::ReqHandlerError)?;
                self.needs_start[q] = false;
                // A daemon killed between publishing a used entry and
                // signalling it left a completion the guest never heard of;
                // it may be waiting on nothing else. A spurious interrupt
                // costs the guest a look at its ring.
                if vring.get_ref().get_call().is_some() {
                    let _ = vring.signal_used_queue();
                }
            }
            t.halt_flag()
        };
        let Some(completion) = lock(&self.backend.completion_fds[q]).take() else {
            return Err(invalid("queue has no completion channel"));
        };
        let (exit_rx, exit) = new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)
            .map_err(ProtoError::ReqHandlerError)?;
        let backend = self.backend.clone();
        let (h2, name) = (halt.clone(), format!("{}-q{q}", self.disk));
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(move || run_worker(&backend, q, &vring, &kick, completion, &exit_rx, &h2))
            .map_err(ProtoError::ReqHandlerError)?;
        self.workers[q] = Some(Worker { handle, exit, halt });
        Ok(())
    }

    /// Stops queue `q`'s worker and waits for it: it touches the ring no more.
    fn stop_worker(&mut self, q: usize) {
        let Some(w) = self.workers[q].take() else { return };
        w.halt.store(true, Ordering::Release);
        let _ = w.exit.notify();
        match w.handle.join() {
            Ok(completion) => *lock(&self.backend.completion_fds[q]) = Some(completion),
            Err(_) => tracing::error!(disk = %self.disk, queue = q, "queue worker panicked"),
        }
    }

    /// Stops queue `q` for good (until it is set up again): no worker, no
    /// request of its left to complete into the ring.
    fn stop_queue(&mut self, q: usize, publish: bool) {
        self.stop_worker(q);
        let vring = self.vrings[q].clone();
        vring.set_queue_ready(false);
        let tracked = self.tracks_inflight();
        let mut t = self.backend.thread(q);
        if publish {
            if !tracked && !t.completions.wait_idle(UNTRACKED_DRAIN) {
                tracing::error!(disk = %self.disk, queue = q, "requests still in flight when the ring stopped: dropped");
            }
            // Those already finished go on the ring while it is still ours;
            // the rest stay inflight for the next start.
            t.completions.cancel();
            if let Err(e) = t.process_completions(&vring) {
                tracing::warn!(disk = %self.disk, queue = q, "completing requests at stop: {e}");
            }
        }
        match t.reset() {
            Ok(consumer) => *lock(&self.backend.completion_fds[q]) = Some(consumer),
            Err(e) => tracing::error!(disk = %self.disk, queue = q, "new completion eventfd: {e}"),
        }
        self.needs_start[q] = false;
    }

    /// The frontend went away: stop every queue without touching the rings.
    pub fn disconnect(&mut self) {
        for q in 0..self.vrings.len() {
            self.stop_queue(q, false);
        }
    }
}

/// A queue's worker: waits on the kick, completion and exit eventfds.
/// Returns the completion eventfd for the next worker of the queue.
fn run_worker(
    backend: &VhostUserBlkBackend,
    q: usize,
    vring: &VringRwLock,
    kick: &EventConsumer,
    completion: EventConsumer,
    exit: &EventConsumer,
    halt: &AtomicBool,
) -> EventConsumer {
    let epoll = match Epoll::new() {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(queue = q, "create epoll: {e}");
            return completion;
        }
    };
    for (fd, ev) in [
        (kick.as_raw_fd(), EV_KICK),
        (completion.as_raw_fd(), EV_COMPLETION),
        (exit.as_raw_fd(), EV_EXIT),
    ] {
        if let Err(e) = epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, ev)) {
            tracing::error!(queue = q, "epoll add: {e}");
            return completion;
        }
    }
    let mut broken = false;
    let run = |ev: u64, broken: &mut bool| {
        if *broken {
            return;
        }
        let mut t = backend.thread(q);
        let r = match ev {
            EV_KICK => t.process_queue(vring),
            _ => t.process_completions(vring),
        };
        let r = match r {
            // Stopped at the disk's cap on waiting requests: a completion
            // (this one may have brought the disk back under) runs it again.
            Ok(()) if ev == EV_COMPLETION && t.stalled() => t.process_queue(vring),
            r => r,
        };
        if let Err(e) = r {
            // Logged once: the queue is never processed again, and the
            // frontend is told and disconnected.
            tracing::error!(queue = q, "queue broken, dropping the frontend connection: {e}");
            *broken = true;
            drop(t);
            backend.fail_queue(q);
        }
    };
    // Whatever was made available or finished before we started (and the
    // requests to resubmit after a reconnect).
    run(EV_COMPLETION, &mut broken);
    run(EV_KICK, &mut broken);
    let mut events = vec![EpollEvent::default(); 4];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(queue = q, "epoll wait: {e}");
                return completion;
            }
        };
        for ev in &events[..n] {
            if halt.load(Ordering::Acquire) {
                return completion;
            }
            match ev.data() {
                EV_KICK => {
                    let _ = kick.consume();
                    run(EV_KICK, &mut broken);
                }
                EV_COMPLETION => {
                    // Drain the eventfd before the list, so a completion
                    // that lands in between wakes us again.
                    let _ = completion.consume();
                    run(EV_COMPLETION, &mut broken);
                }
                _ => return completion,
            }
        }
    }
}

impl VhostUserBackendReqHandlerMut for VhostUserBlkHandler {
    fn set_owner(&mut self) -> ProtoResult<()> {
        if self.owned {
            return Err(invalid("already claimed"));
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> ProtoResult<()> {
        self.owned = false;
        self.acked_features = 0;
        self.acked_protocol_features = 0;
        Ok(())
    }

    fn reset_device(&mut self) -> ProtoResult<()> {
        for q in 0..self.vrings.len() {
            self.stop_queue(q, false);
            self.vrings[q].set_enabled(false);
        }
        self.acked_features = 0;
        Ok(())
    }

    fn get_features(&mut self) -> ProtoResult<u64> {
        Ok(self.backend.features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
    }

    fn set_features(&mut self, features: u64) -> ProtoResult<()> {
        if features & !self.get_features()? != 0 {
            return Err(ProtoError::InvalidParam);
        }
        self.acked_features = features;
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for (q, vring) in self.vrings.iter().enumerate() {
            vring.set_queue_event_idx(event_idx);
            lock(&self.backend.threads[q]).set_event_idx(event_idx);
        }
        // Without VHOST_USER_F_PROTOCOL_FEATURES rings start enabled.
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            for q in 0..self.vrings.len() {
                self.vrings[q].set_enabled(true);
                self.sync_worker(q)?;
            }
        }
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> ProtoResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy_listening.is_some() {
            return Err(invalid("postcopy is not supported"));
        }
        let mut regions = Vec::with_capacity(ctx.len());
        let mut mappings = Vec::with_capacity(ctx.len());
        for (region, file) in ctx.iter().zip(files) {
            let r = GuestRegionMmap::new(region.mmap_region(file)?, GuestAddress(region.guest_phys_addr))
                .ok_or(ProtoError::InvalidParam)?;
            regions.push(r);
            mappings.push(AddrMapping {
                vmm_addr: region.user_addr,
                size: region.memory_size,
                gpa_base: region.guest_phys_addr,
            });
        }
        let mem = GuestMemory::from_regions(regions).map_err(internal)?;
        self.set_memory(mem);
        self.mappings = mappings;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> ProtoResult<()> {
        let vring = self.vring(index)?;
        // Split rings have power-of-two sizes (virtio 1.2, 2.7).
        if num == 0 || num as usize > MAX_QUEUE_SIZE || !num.is_power_of_two() {
            return Err(ProtoError::InvalidParam);
        }
        vring.set_queue_size(num as u16);
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> ProtoResult<()> {
        let vring = self.vring(index)?.clone();
        let desc = self.vmm_va_to_gpa(descriptor)?;
        let avail = self.vmm_va_to_gpa(available)?;
        let used = self.vmm_va_to_gpa(used)?;
        vring
            .set_queue_info(desc, avail, used)
            .map_err(|_| ProtoError::InvalidParam)?;
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> ProtoResult<()> {
        // With inflight tracking the start recomputes it from the region.
        self.vring(index)?.set_queue_next_avail(base as u16);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> ProtoResult<VhostUserVringState> {
        let q = index as usize;
        let vring = self.vring(index)?.clone();
        self.stop_queue(q, true);
        let next_avail = vring.queue_next_avail();
        vring.set_kick(None);
        vring.set_call(None);
        Ok(VhostUserVringState::new(index, u32::from(next_avail)))
    }

    fn set_vring_kick(&mut self, index: u8, file: Option<File>) -> ProtoResult<()> {
        let q = usize::from(index);
        let vring = self.vring(u32::from(index))?.clone();
        // A new kick fd for a running queue: its worker waits on the old one.
        self.stop_worker(q);
        vring.set_kick(file);
        if !vring.get_ref().get_queue().ready() && vring.get_ref().get_kick().is_some() {
            vring.set_queue_ready(true);
            self.needs_start[q] = true;
        }
        self.sync_worker(q)
    }

    fn set_vring_call(&mut self, index: u8, file: Option<File>) -> ProtoResult<()> {
        let vring = self.vring(u32::from(index))?;
        vring.set_call(file);
        // A running queue may have completed requests while it had no call
        // eventfd: a spurious interrupt is harmless, a lost one hangs the guest.
        if self.workers[usize::from(index)].is_some() {
            let _ = vring.signal_used_queue();
        }
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, file: Option<File>) -> ProtoResult<()> {
        let vring = self.vring(u32::from(index))?;
        let ours = file
            .as_ref()
            .map(File::try_clone)
            .transpose()
            .map_err(ProtoError::ReqHandlerError)?;
        vring.set_err(file);
        *lock(&self.backend.err_fds[usize::from(index)]) = ours;
        Ok(())
    }

    fn get_protocol_features(&mut self) -> ProtoResult<VhostUserProtocolFeatures> {
        Ok(VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD)
    }

    fn set_protocol_features(&mut self, features: u64) -> ProtoResult<()> {
        self.acked_protocol_features = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> ProtoResult<u64> {
        Ok(self.vrings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> ProtoResult<()> {
        if self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(ProtoError::InactiveFeature(VhostUserVirtioFeatures::PROTOCOL_FEATURES));
        }
        self.vring(index)?.set_enabled(enable);
        self.sync_worker(index as usize)
    }

    fn get_config(&mut self, offset: u32, size: u32, _flags: VhostUserConfigFlags) -> ProtoResult<Vec<u8>> {
        Ok(self.backend.config.read(offset, size))
    }

    fn set_config(&mut self, _offset: u32, _buf: &[u8], _flags: VhostUserConfigFlags) -> ProtoResult<()> {
        // Nothing in our config space is writable.
        Ok(())
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> ProtoResult<()> {
        Err(invalid("not a GPU"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> ProtoResult<File> {
        Err(invalid("no shared objects"))
    }

    fn get_inflight_fd(&mut self, msg: &VhostUserInflight) -> ProtoResult<(VhostUserInflight, File)> {
        if msg.num_queues == 0
            || usize::from(msg.num_queues) > self.vrings.len()
            || msg.queue_size == 0
            || usize::from(msg.queue_size) > MAX_QUEUE_SIZE
        {
            return Err(ProtoError::InvalidParam);
        }
        let (region, file) =
            InflightRegion::create(msg.num_queues, msg.queue_size).map_err(ProtoError::ReqHandlerError)?;
        let len = file.metadata().map_err(ProtoError::ReqHandlerError)?.len();
        drop(region);
        Ok((VhostUserInflight::new(len, 0, msg.num_queues, msg.queue_size), file))
    }

    fn set_inflight_fd(&mut self, msg: &VhostUserInflight, file: File) -> ProtoResult<()> {
        if usize::from(msg.num_queues) > self.vrings.len() || usize::from(msg.queue_size) > MAX_QUEUE_SIZE {
            return Err(ProtoError::InvalidParam);
        }
        let region = InflightRegion::map(&file, msg.mmap_offset, msg.mmap_size, msg.num_queues, msg.queue_size)
            .map_err(ProtoError::ReqHandlerError)?;
        self.inflight = Some(region);
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> ProtoResult<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        file: File,
        postcopy_listening: Option<bool>,
    ) -> ProtoResult<Option<VhostUserMemoryRegionBase>> {
        if postcopy_listening.is_some() {
            return Err(invalid("postcopy is not supported"));
        }
        let r = GuestRegionMmap::new(region.mmap_region(file)?, GuestAddress(region.guest_phys_addr))
            .ok_or(ProtoError::InvalidParam)?;
        let mem = self.mem.memory().insert_region(Arc::new(r)).map_err(internal)?;
        self.set_memory(mem);
        self.mappings.push(AddrMapping {
            vmm_addr: region.user_addr,
            size: region.memory_size,
            gpa_base: region.guest_phys_addr,
        });
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> ProtoResult<()> {
        let (mem, _) = self
            .mem
            .memory()
            .remove_region(GuestAddress(region.guest_phys_addr), region.memory_size)
            .map_err(internal)?;
        self.set_memory(mem);
        self.mappings.retain(|m| m.gpa_base != region.guest_phys_addr);
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> ProtoResult<Option<File>> {
        Err(invalid("no device state transfer"))
    }

    fn check_device_state(&mut self) -> ProtoResult<()> {
        Err(invalid("no device state transfer"))
    }

    fn get_shmem_config(&mut self) -> ProtoResult<VhostUserShMemConfig> {
        Err(invalid("no shared memory regions"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> ProtoResult<()> {
        Err(invalid("no dirty logging"))
    }
}

impl Drop for VhostUserBlkHandler {
    fn drop(&mut self) {
        for q in 0..self.workers.len() {
            self.stop_worker(q);
        }
    }
}
