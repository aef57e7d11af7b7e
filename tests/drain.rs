//! What SIGTERM's drain leaves on the ring before the daemon hangs up on
//! its frontend. `ServedDisk::stop` drains the backend, then hangs up at
//! once; QEMU then stops the device and closes the eventfd it hears
//! completions on. A request that finished during the drain but that its
//! queue's worker (busy, or not scheduled yet) puts on the used ring only
//! after the hang-up is signalled to nobody: the guest waits for it until
//! some later completion on the same queue, which may never come. Driven in
//! process through the protocol trait, with a base whose reads the test
//! holds: one waits on the "store", one holds up the queue's worker.

mod common;

use std::fs::File;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use streamblk::engine::{Base, Disk, Error, FetchFuture, IoRange};
use streamblk::vhost::{DiskContext, GuestMemory, VhostUserBlkBackend, VhostUserBlkHandler};
use vhost::vhost_user::message::{VhostUserMemoryRegion, VhostUserVirtioFeatures, VhostUserVringAddrFlags};
use vhost::vhost_user::VhostUserBackendReqHandlerMut;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestRegionMmap, MmapRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use common::frontend::memfd;
use common::ring::{make_available, read_chain, AVAIL, DESC, USED};

const MEM: usize = 4 << 20;
const QSIZE: u16 = 64;
const VMM_VA: u64 = 0x7f00_0000_0000;
const DISK: u64 = 1 << 20;
/// The read that misses and waits on the store.
const MISS_SECTOR: u64 = 8;
/// The read whose local read holds up the queue's worker.
const SLOW_SECTOR: u64 = 64;

/// A base that reads zeros, except that `MISS_SECTOR` is missing until the
/// "store" answers and a read of `SLOW_SECTOR` waits until it is let go.
#[derive(Default)]
struct HeldBase {
    store_answers: Arc<AtomicBool>,
    fetched: Arc<AtomicBool>,
    worker_held: AtomicBool,
    let_go: (Mutex<bool>, Condvar),
}

impl HeldBase {
    fn let_worker_go(&self) {
        *self.let_go.0.lock().unwrap() = true;
        self.let_go.1.notify_all();
    }
}

impl Base for HeldBase {
    fn size(&self) -> u64 {
        DISK
    }

    fn id(&self) -> String {
        "held".into()
    }

    fn read_local(&self, offset: u64, dst: IoRange) -> Result<bool, Error> {
        if offset == SLOW_SECTOR * 512 {
            self.worker_held.store(true, Ordering::SeqCst);
            let mut go = self.let_go.0.lock().unwrap();
            while !*go {
                go = self.let_go.1.wait(go).unwrap();
            }
        }
        if offset == MISS_SECTOR * 512 && !self.fetched.load(Ordering::SeqCst) {
            return Ok(false);
        }
        dst.fill_zero();
        Ok(true)
    }

    fn fetch(&self, _offset: u64, _len: u64, _since: Instant) -> FetchFuture {
        let (answers, fetched) = (self.store_answers.clone(), self.fetched.clone());
        Box::pin(async move {
            while !answers.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            fetched.store(true, Ordering::SeqCst);
            Ok(())
        })
    }
}

fn file_of(e: &EventFd) -> File {
    // SAFETY: into_raw_fd hands over the new fd's ownership.
    unsafe { File::from_raw_fd(e.try_clone().unwrap().into_raw_fd()) }
}

fn used(mem: &GuestMemory) -> Vec<u32> {
    let n: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
    (0..u64::from(n))
        .map(|i| mem.read_obj(GuestAddress(USED + 4 + 8 * i)).unwrap())
        .collect()
}

#[test]
fn a_request_finished_during_the_drain_is_on_the_ring_and_signalled_before_drain_returns() {
    let dir = tempfile::tempdir().unwrap();
    let base = Arc::new(HeldBase::default());
    let disk = Disk::open(base.clone(), &dir.path().join("overlay"), false).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let ctx = Arc::new(DiskContext {
        capacity_sectors: DISK / 512,
        disk: Arc::new(disk),
        serial: [0; 20],
        runtime: rt.handle().clone(),
        stopping: Default::default(),
        poll: Duration::ZERO,
        stats: Default::default(),
        waiting: Default::default(),
        bad_request_log: Default::default(),
    });
    let guest_file = memfd(MEM as u64);
    let region = MmapRegion::from_file(FileOffset::new(guest_file.try_clone().unwrap(), 0), MEM).unwrap();
    let mem = GuestMemory::from_regions(vec![GuestRegionMmap::new(region, GuestAddress(0)).unwrap()]).unwrap();

    let backend = Arc::new(VhostUserBlkBackend::new(ctx.clone(), 1).unwrap());
    let mut h = VhostUserBlkHandler::new(backend.clone(), "test");
    h.set_owner().unwrap();
    h.set_features(1 << VIRTIO_F_VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
        .unwrap();
    let proto = h.get_protocol_features().unwrap();
    h.set_protocol_features(proto.bits()).unwrap();
    h.set_mem_table(
        &[VhostUserMemoryRegion::new(0, MEM as u64, VMM_VA, 0)],
        vec![guest_file.try_clone().unwrap()],
        None,
    )
    .unwrap();
    h.set_vring_num(0, u32::from(QSIZE)).unwrap();
    h.set_vring_base(0, 0).unwrap();
    h.set_vring_addr(
        0,
        VhostUserVringAddrFlags::empty(),
        VMM_VA + DESC,
        VMM_VA + USED,
        VMM_VA + AVAIL,
        0,
    )
    .unwrap();
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    h.set_vring_kick(0, Some(file_of(&kick))).unwrap();
    h.set_vring_call(0, Some(file_of(&call))).unwrap();

    // A guest read waits on the store.
    read_chain(&mem, 0, MISS_SECTOR, 0x10_0000, 0x20_0000, 0x30_0000);
    make_available(&mem, &[0]);
    h.set_vring_enable(0, true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while backend.inflight() != 1 {
        assert!(Instant::now() < deadline, "the read did not go to the store");
        std::thread::sleep(Duration::from_millis(2));
    }

    // SIGTERM: the disk drains (and its caller hangs up the moment the
    // drain returns: what is on the ring then is all the frontend hears of).
    let drain = {
        let (backend, mem) = (backend.clone(), mem.clone());
        let call = call.try_clone().unwrap();
        std::thread::spawn(move || {
            let clean = backend.drain(Duration::from_secs(10));
            (clean, used(&mem), call.read().is_ok())
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    // Meanwhile the queue's worker is busy with another request (on a
    // loaded host: not scheduled) when the store answers the first.
    read_chain(&mem, 3, SLOW_SECTOR, 0x10_1000, 0x20_1000, 0x30_0001);
    make_available(&mem, &[0, 3]);
    kick.write(1).unwrap();
    while !base.worker_held.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the worker did not take the second read");
        std::thread::sleep(Duration::from_millis(2));
    }
    ctx.stopping.store(true, Ordering::Release);
    base.store_answers.store(true, Ordering::SeqCst);
    let let_go = {
        let base = base.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(500));
            base.let_worker_go();
        })
    };

    let (clean, on_ring, signalled) = drain.join().unwrap();
    let_go.join().unwrap();
    assert!(clean, "the drain timed out");
    assert!(
        on_ring.contains(&0),
        "the read that finished during the drain was not on the used ring when the drain \
         returned (used: {on_ring:?}): it is published after the hang-up, and its interrupt is lost"
    );
    assert!(signalled, "the frontend was not signalled before the drain returned");
    let status: u8 = mem.read_obj(GuestAddress(0x30_0000)).unwrap();
    assert_eq!(status, 0, "status of the drained read");
    h.disconnect();
}
