//! A vhost-user frontend of the tests' own: the `vhost` crate's frontend
//! API over the daemon's real socket, with guest memory in a memfd it
//! shares, so a test can write rings and chains no real driver would.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Guest memory size.
pub const MEM: usize = 4 << 20;
/// Where the rings are (room for 256 entries each).
pub const DESC: u64 = 0x0;
pub const AVAIL: u64 = 0x1000;
pub const USED: u64 = 0x2000;
/// Where the frontend "has" guest memory in its address space.
const VMM_VA: u64 = 0x7f00_0000_0000;

pub struct TestFrontend {
    pub fe: Frontend,
    pub mem: GuestMemoryMmap<()>,
    pub qsize: u16,
    pub kick: EventFd,
    pub call: EventFd,
    pub err: EventFd,
    avail_idx: u16,
    used_seen: u16,
    _file: File,
}

/// Guest memory as the frontend shares it: a memfd of `len` bytes.
pub fn memfd(len: u64) -> File {
    // SAFETY: a plain memfd_create; the result is checked.
    let fd = unsafe { libc::memfd_create(c"guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a new fd nothing else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    f
}

impl TestFrontend {
    /// Connects (retrying while the daemon comes up) and negotiates
    /// features and memory; no queue is set up yet.
    pub fn connect(socket: &Path) -> TestFrontend {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut fe = loop {
            match Frontend::connect(socket, 1) {
                Ok(fe) => break fe,
                Err(e) if Instant::now() > deadline => panic!("connect {}: {e}", socket.display()),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        fe.set_owner().unwrap();
        let offered = fe.get_features().unwrap();
        let want = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        assert_eq!(offered & want, want, "features offered: {offered:#x}");
        fe.set_features(want).unwrap();
        let proto = fe.get_protocol_features().unwrap();
        fe.set_protocol_features(proto & (VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::MQ))
            .unwrap();
        // Every message that can fail is answered: a refusal shows here.
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);

        let file = memfd(MEM as u64);
        let region = MmapRegion::from_file(FileOffset::new(file.try_clone().unwrap(), 0), MEM).unwrap();
        let mem = GuestMemoryMmap::from_regions(vec![GuestRegionMmap::new(region, GuestAddress(0)).unwrap()]).unwrap();
        fe.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM as u64,
            userspace_addr: VMM_VA,
            mmap_offset: 0,
            mmap_handle: file.as_raw_fd(),
        }])
        .unwrap();
        TestFrontend {
            fe,
            mem,
            qsize: 0,
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            call: EventFd::new(EFD_NONBLOCK).unwrap(),
            err: EventFd::new(EFD_NONBLOCK).unwrap(),
            avail_idx: 0,
            used_seen: 0,
            _file: file,
        }
    }

    /// Sets up queue 0 with `qsize` entries and starts it.
    pub fn start_queue(&mut self, qsize: u16) -> vhost::Result<()> {
        self.fe.set_vring_num(0, qsize)?;
        self.fe.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: qsize,
                queue_size: qsize,
                flags: 0,
                desc_table_addr: VMM_VA + DESC,
                used_ring_addr: VMM_VA + USED,
                avail_ring_addr: VMM_VA + AVAIL,
                log_addr: None,
            },
        )?;
        self.fe.set_vring_base(0, 0)?;
        self.fe.set_vring_call(0, &self.call)?;
        self.fe.set_vring_err(0, &self.err)?;
        self.fe.set_vring_kick(0, &self.kick)?;
        self.fe.set_vring_enable(0, true)?;
        self.qsize = qsize;
        Ok(())
    }

    /// Writes descriptor `i` of the table at `table`.
    pub fn desc_at(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
        self.mem.write_obj(d, GuestAddress(table + 16 * u64::from(i))).unwrap();
    }

    /// Writes descriptor `i` of the ring's table.
    pub fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.desc_at(DESC, i, addr, len, flags, next);
    }

    /// Makes `head` available and kicks.
    pub fn publish(&mut self, head: u16) {
        let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % self.qsize);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(self.avail_idx);
    }

    /// Writes the avail index as it is, and kicks.
    pub fn set_avail_idx(&self, idx: u16) {
        self.mem.write_obj(idx, GuestAddress(AVAIL + 2)).unwrap();
        self.kick.write(1).unwrap();
    }

    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    /// Waits for the next used entry: (id, len), or None after `timeout`.
    pub fn wait_used(&mut self, timeout: Duration) -> Option<(u32, u32)> {
        let deadline = Instant::now() + timeout;
        while self.used_idx() == self.used_seen {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let entry = USED + 4 + 8 * u64::from(self.used_seen % self.qsize);
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((
            self.mem.read_obj(GuestAddress(entry)).unwrap(),
            self.mem.read_obj(GuestAddress(entry + 4)).unwrap(),
        ))
    }

    /// All of guest memory.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut v = vec![0u8; MEM];
        self.mem.read_slice(&mut v, GuestAddress(0)).unwrap();
        v
    }

    /// Bytes that differ from `before` outside the used ring and the
    /// `allowed` ranges (address, length).
    pub fn changed_outside(&self, before: &[u8], allowed: &[(u64, usize)]) -> Vec<u64> {
        let used_end = USED + 6 + 8 * u64::from(self.qsize);
        let now = self.snapshot();
        (0..MEM as u64)
            .filter(|&a| before[a as usize] != now[a as usize])
            .filter(|&a| !(USED..used_end).contains(&a))
            .filter(|&a| !allowed.iter().any(|&(s, l)| a >= s && a < s + l as u64))
            .collect()
    }

    /// True once the daemon signalled the queue's error eventfd, within `timeout`.
    pub fn wait_err(&self, timeout: Duration) -> bool {
        poll_until(timeout, Duration::from_millis(5), || self.err.read().is_ok())
    }

    /// True once the daemon dropped the connection, within `timeout`.
    pub fn wait_disconnected(&self, timeout: Duration) -> bool {
        poll_until(timeout, Duration::from_millis(20), || self.fe.get_features().is_err())
    }
}

/// Checks `done` every `every` until it holds (true) or `timeout` passes (false).
fn poll_until(timeout: Duration, every: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(every);
    }
}
