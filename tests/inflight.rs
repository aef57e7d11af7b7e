//! The vhost-user handler against an inflight region a previous daemon left
//! behind, driven in process through the protocol trait with shared memfd
//! guest memory: the requests it took and never put on the used ring run
//! again first, in the order it took them, and the ones it did not take run
//! once, after them; and a completion it published without signalling is
//! signalled.

mod common;

use std::fs::File;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use streamblk::engine::{Disk, LocalBase};
use streamblk::vhost::inflight::InflightRegion;
use streamblk::vhost::{DiskContext, GuestMemory, VhostUserBlkBackend, VhostUserBlkHandler};
use vhost::vhost_user::message::{
    VhostUserInflight, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags,
};
use vhost::vhost_user::VhostUserBackendReqHandlerMut;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestRegionMmap, MmapRegion};
use vmm_sys_util::eventfd::EventFd;

use common::frontend::memfd;
use common::ring::{make_available, read_chain, AVAIL, DESC, USED};

const MEM: usize = 4 << 20;
const QSIZE: u16 = 64;
/// Where the frontend "has" guest memory in its address space.
const VMM_VA: u64 = 0x7f00_0000_0000;
const DISK: usize = 1 << 20;

fn eventfd_file() -> File {
    let e = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    // SAFETY: into_raw_fd hands over the fd's ownership.
    unsafe { File::from_raw_fd(e.into_raw_fd()) }
}

/// A disk over `base` with its handler, through SET_MEM_TABLE with
/// inflight tracking negotiated, and the guest memory shared with it.
struct Rig {
    h: VhostUserBlkHandler,
    mem: GuestMemory,
    _rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

fn rig(base: &[u8]) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("base"), base).unwrap();
    let disk = Disk::open(
        Arc::new(LocalBase::open(&dir.path().join("base")).unwrap()),
        &dir.path().join("overlay"),
        false,
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let ctx = Arc::new(DiskContext {
        capacity_sectors: (base.len() / 512) as u64,
        disk: Arc::new(disk),
        serial: [0; 20],
        runtime: rt.handle().clone(),
        stopping: Default::default(),
        poll: Duration::ZERO,
        stats: Default::default(),
        waiting: Default::default(),
        bad_request_log: Default::default(),
    });

    // Guest memory, shared with the "frontend" (this test).
    let guest_file = memfd(MEM as u64);
    let region = MmapRegion::from_file(FileOffset::new(guest_file.try_clone().unwrap(), 0), MEM).unwrap();
    let mem = GuestMemory::from_regions(vec![GuestRegionMmap::new(region, GuestAddress(0)).unwrap()]).unwrap();

    let backend = Arc::new(VhostUserBlkBackend::new(ctx, 1).unwrap());
    let mut h = VhostUserBlkHandler::new(backend, "test");
    h.set_owner().unwrap();
    let features = h.get_features().unwrap();
    assert_ne!(features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
    h.set_features(1 << VIRTIO_F_VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
        .unwrap();
    let proto = h.get_protocol_features().unwrap();
    assert!(proto.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
    h.set_protocol_features(proto.bits()).unwrap();
    h.set_mem_table(
        &[VhostUserMemoryRegion::new(0, MEM as u64, VMM_VA, 0)],
        vec![guest_file],
        None,
    )
    .unwrap();
    Rig {
        h,
        mem,
        _rt: rt,
        _dir: dir,
    }
}

/// The frontend restores queue 0 (after a crash its base is the used
/// index) and enables it.
fn restore_queue(h: &mut VhostUserBlkHandler, base: u32, call: File) {
    h.set_vring_num(0, u32::from(QSIZE)).unwrap();
    h.set_vring_base(0, base).unwrap();
    h.set_vring_addr(
        0,
        VhostUserVringAddrFlags::empty(),
        VMM_VA + DESC,
        VMM_VA + USED,
        VMM_VA + AVAIL,
        0,
    )
    .unwrap();
    h.set_vring_kick(0, Some(eventfd_file())).unwrap();
    h.set_vring_call(0, Some(call)).unwrap();
    h.set_vring_enable(0, true).unwrap();
}

#[test]
fn requests_a_dead_daemon_took_run_again_first_in_the_order_it_took_them() {
    let base: Vec<u8> = (0..DISK).map(|i| (i * 13 % 251) as u8).collect();
    let Rig { mut h, mem, .. } = rig(&base);

    // Three reads. The dead daemon took heads 6 and 0 (in that order) and
    // completed neither; head 3 it never took.
    read_chain(&mem, 0, 8, 0x10_0000, 0x20_0000, 0x30_0000);
    read_chain(&mem, 3, 16, 0x10_1000, 0x20_1000, 0x30_0001);
    read_chain(&mem, 6, 24, 0x10_2000, 0x20_2000, 0x30_0002);
    make_available(&mem, &[6, 0, 3]);

    // The region, as the frontend got it from the first daemon and kept it.
    let (info, inflight_file) = h.get_inflight_fd(&VhostUserInflight::new(0, 0, 1, QSIZE)).unwrap();
    {
        let r = InflightRegion::map(&inflight_file, 0, info.mmap_size, 1, QSIZE).unwrap();
        let mut q = r.queue(0).unwrap();
        assert_eq!(q.start(0), None);
        q.take(6);
        q.take(0);
    }
    h.set_inflight_fd(&info, inflight_file.try_clone().unwrap()).unwrap();
    restore_queue(&mut h, 0, eventfd_file());

    let deadline = Instant::now() + Duration::from_secs(30);
    while mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap() < 3 {
        assert!(Instant::now() < deadline, "the requests were not completed");
        std::thread::sleep(Duration::from_millis(5));
    }
    // GET_VRING_BASE: every entry was taken once.
    let base_idx = { h.get_vring_base(0).unwrap().num };
    assert_eq!(base_idx, 3);
    assert_eq!(
        mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(),
        3,
        "head run twice"
    );
    let ids: Vec<u32> = (0..3)
        .map(|i| mem.read_obj(GuestAddress(USED + 4 + 8 * i)).unwrap())
        .collect();
    assert_eq!(ids, [6, 0, 3], "resubmitted first, in the order taken");
    for (i, (sector, data)) in [(8u64, 0x20_0000u64), (16, 0x20_1000), (24, 0x20_2000)]
        .into_iter()
        .enumerate()
    {
        let status: u8 = mem.read_obj(GuestAddress(0x30_0000 + i as u64)).unwrap();
        assert_eq!(status, 0, "status of the read of sector {sector}");
        let mut got = vec![0u8; 4096];
        mem.read_slice(&mut got, GuestAddress(data)).unwrap();
        let off = sector as usize * 512;
        assert_eq!(got, &base[off..off + 4096], "data of sector {sector}");
    }
    // Nothing is left inflight in the frontend's region.
    let r = InflightRegion::map(&inflight_file, 0, info.mmap_size, 1, QSIZE).unwrap();
    assert!(r.queue(0).unwrap().inflight_heads().is_empty());
    h.disconnect();
}

/// A daemon killed after it put a request on the used ring but before it
/// signalled the guest leaves a completion the guest never hears of: the
/// guest (waiting on a flush, say) may have nothing else to submit and
/// hangs. The next daemon signals each queue once when it starts it; a
/// spurious interrupt costs the guest a look at its ring.
#[test]
fn a_restarted_daemon_signals_completions_its_predecessor_published_unsignalled() {
    let Rig { mut h, mem, .. } = rig(&vec![7u8; DISK]);
    // The dead daemon took head 0 and published it (status 0, used index
    // 1), and was killed before writing the call eventfd.
    read_chain(&mem, 0, 8, 0x10_0000, 0x20_0000, 0x30_0000);
    make_available(&mem, &[0]);
    mem.write_obj(0u8, GuestAddress(0x30_0000)).unwrap();
    mem.write_obj(0u32, GuestAddress(USED + 4)).unwrap();
    mem.write_obj(4096u32 + 1, GuestAddress(USED + 8)).unwrap();
    mem.write_obj(1u16, GuestAddress(USED + 2)).unwrap();
    let (info, inflight_file) = h.get_inflight_fd(&VhostUserInflight::new(0, 0, 1, QSIZE)).unwrap();
    {
        let r = InflightRegion::map(&inflight_file, 0, info.mmap_size, 1, QSIZE).unwrap();
        let mut q = r.queue(0).unwrap();
        assert_eq!(q.start(0), None);
        q.take(0);
        q.before_publish(0);
        q.after_publish(0, 1);
    }
    h.set_inflight_fd(&info, inflight_file).unwrap();

    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    // SAFETY: into_raw_fd hands over the new fd's ownership.
    let call_file = unsafe { File::from_raw_fd(call.try_clone().unwrap().into_raw_fd()) };
    restore_queue(&mut h, 1, call_file);
    assert!(call.read().is_ok(), "the guest was not signalled");
    // Nothing ran twice.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(), 1);
    h.disconnect();
}
