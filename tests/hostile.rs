//! Hostile guest input, at the queue worker: malformed chains, wrong
//! directions, missing status bytes, bad lengths and sectors, unknown types.
//! Each gets the right status (or is dropped with no status), and the queue
//! keeps serving. Chains the descriptor walk ends early get no status; an
//! avail index that jumps is an error, never a spin; a disk over its cap on
//! waiting requests stops popping and resumes.

use std::sync::Arc;

use streamblk::engine::{Base, Disk, FetchFuture, IoRange, LocalBase};
use streamblk::vhost::{Completions, DiskContext, GuestMemory, VhostUserBlkThread, Waiting};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};

const QSIZE: u16 = 64;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const MEM: usize = 4 << 20;
const DISK: usize = 1 << 20;

struct Rig {
    ctx: Arc<DiskContext>,
    mem: GuestMemory,
    vring: VringRwLock,
    thread: VhostUserBlkThread,
    next_desc: u16,
    used_seen: u16,
    desc_table: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    base: Vec<u8>,
    _dir: tempfile::TempDir,
    _rt: tokio::runtime::Runtime,
}

/// A raw descriptor: table, index, address, length, flags, next.
type Raw = (u64, u16, u64, u32, u16, u16);

fn desc(addr: u64, len: u32, write: bool) -> (u64, u32, bool) {
    (addr, len, write)
}

/// A base whose data is not local until the test opens the gate: reads
/// miss, and fetches wait for it.
struct GatedBase {
    inner: LocalBase,
    gate: tokio::sync::watch::Sender<bool>,
}

impl Base for GatedBase {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn id(&self) -> String {
        self.inner.id()
    }

    fn read_local(&self, offset: u64, dst: IoRange) -> Result<bool, streamblk::engine::Error> {
        if !*self.gate.borrow() {
            return Ok(false);
        }
        self.inner.read_local(offset, dst)
    }

    fn fetch(&self, _offset: u64, _len: u64, _: std::time::Instant) -> FetchFuture {
        let mut rx = self.gate.subscribe();
        Box::pin(async move {
            let _ = rx.wait_for(|&open| open).await;
            Ok(())
        })
    }
}

impl Rig {
    fn new(readonly: bool) -> Rig {
        Rig::with(readonly, None, Waiting::default())
    }

    fn with(readonly: bool, gate: Option<tokio::sync::watch::Sender<bool>>, waiting: Waiting) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let base: Vec<u8> = (0..DISK).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(dir.path().join("base"), &base).unwrap();
        let local = LocalBase::open(&dir.path().join("base")).unwrap();
        let base_of_disk: Arc<dyn Base> = match gate {
            Some(gate) => Arc::new(GatedBase { inner: local, gate }),
            None => Arc::new(local),
        };
        let disk = Disk::open(base_of_disk, &dir.path().join("overlay"), readonly).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let mut serial = [0u8; 20];
        serial[..6].copy_from_slice(b"serial");
        let ctx = Arc::new(DiskContext {
            capacity_sectors: (DISK / 512) as u64,
            disk: Arc::new(disk),
            serial,
            runtime: rt.handle().clone(),
            stopping: Default::default(),
            poll: std::time::Duration::ZERO,
            stats: Default::default(),
            waiting,
            bad_request_log: Default::default(),
        });
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
        let (completions, _consumer) = Completions::new().unwrap();
        let mut thread = VhostUserBlkThread::new(ctx.clone(), completions);
        let atomic = GuestMemoryAtomic::new(mem.clone());
        thread.set_memory(atomic.clone());
        let mock = MockSplitQueue::new(&mem, QSIZE);
        let vring = VringRwLock::new(atomic, QSIZE).unwrap();
        vring.set_queue_size(QSIZE);
        vring
            .set_queue_info(mock.desc_table_addr().0, mock.avail_addr().0, mock.used_addr().0)
            .unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        Rig {
            ctx,
            desc_table: mock.desc_table_addr(),
            avail: mock.avail_addr(),
            used: mock.used_addr(),
            mem,
            vring,
            thread,
            next_desc: 0,
            used_seen: 0,
            base,
            _dir: dir,
            _rt: rt,
        }
    }

    fn header(&self, type_: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&type_.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    /// Puts one chain on the avail ring, runs the worker, and returns the
    /// used length and the status byte (0xff if the device did not write it).
    fn submit(&mut self, descs: &[(u64, u32, bool)]) -> (u32, u8) {
        self.push(descs);
        self.thread.process_queue(&self.vring).unwrap();
        self.wait_completed()
    }

    /// Writes a chain into the table and makes it available; returns its head.
    fn push(&mut self, descs: &[(u64, u32, bool)]) -> u16 {
        let mut start = self.next_desc;
        if start as usize + descs.len() > QSIZE as usize {
            start = 0;
        }
        for (i, &(addr, len, write)) in descs.iter().enumerate() {
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.raw_desc(
                self.desc_table.0,
                start + i as u16,
                addr,
                len,
                flags,
                start + i as u16 + 1,
            );
        }
        self.make_available(start);
        self.next_desc = start + descs.len() as u16;
        start
    }

    fn raw_desc(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
        self.mem
            .write_obj(d, GuestAddress(table).unchecked_add(16 * u64::from(i)))
            .unwrap();
    }

    fn make_available(&self, head: u16) {
        let avail_idx: u16 = self.mem.read_obj(self.avail.unchecked_add(2)).unwrap();
        self.mem
            .write_obj(head, self.avail.unchecked_add(4 + 2 * (avail_idx % QSIZE) as u64))
            .unwrap();
        self.mem
            .write_obj(avail_idx.wrapping_add(1), self.avail.unchecked_add(2))
            .unwrap();
    }

    /// Raw descriptors (table, index, addr, len, flags, next), head 0 made
    /// available; runs the worker like `submit`.
    fn submit_raw(&mut self, descs: &[Raw]) -> (u32, u8) {
        for &(table, i, addr, len, flags, next) in descs {
            self.raw_desc(table, i, addr, len, flags, next);
        }
        self.make_available(0);
        self.next_desc = QSIZE;
        self.thread.process_queue(&self.vring).unwrap();
        self.wait_completed()
    }

    fn wait_completed(&mut self) -> (u32, u8) {
        // Completions that went asynchronous (flush) come back by eventfd.
        for _ in 0..500 {
            self.thread.process_completions(&self.vring).unwrap();
            let used_idx: u16 = self.mem.read_obj(self.used.unchecked_add(2)).unwrap();
            if used_idx != self.used_seen {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let used_idx: u16 = self.mem.read_obj(self.used.unchecked_add(2)).unwrap();
        assert_eq!(used_idx, self.used_seen.wrapping_add(1), "the chain was not completed");
        let entry = self.used.unchecked_add(4 + 8 * (self.used_seen % QSIZE) as u64);
        self.used_seen = used_idx;
        let len: u32 = self.mem.read_obj(entry.unchecked_add(4)).unwrap();
        let status: u8 = self.mem.read_obj(GuestAddress(STATUS)).unwrap();
        (len, status)
    }

    fn good_read(&mut self) {
        self.header(VIRTIO_BLK_T_IN, 8);
        let r = self.submit(&[desc(HDR, 16, false), desc(DATA, 4096, true), desc(STATUS, 1, true)]);
        assert_eq!(r, (4097, VIRTIO_BLK_S_OK as u8));
        let mut got = vec![0u8; 4096];
        self.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert!(got == self.base[4096..8192]);
    }
}

use vm_memory::Address;

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
const UNTOUCHED: u8 = 0xff;

#[test]
fn every_bad_request_gets_its_status_and_the_queue_keeps_serving() {
    let mut rig = Rig::new(false);
    rig.good_read();

    // Header in a device-writable descriptor: no readable header at all.
    rig.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        rig.submit(&[desc(HDR, 16, true), desc(DATA, 512, true), desc(STATUS, 1, true)]),
        (1, IOERR)
    );

    // A readable descriptor after a writable one: malformed, dropped.
    rig.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        rig.submit(&[desc(HDR, 16, false), desc(STATUS, 1, true), desc(DATA, 512, false)]),
        (0, UNTOUCHED)
    );

    // No status byte: the last descriptor is readable.
    rig.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        rig.submit(&[desc(HDR, 16, false), desc(DATA, 512, false)]),
        (0, UNTOUCHED)
    );

    // A zero-length status descriptor.
    rig.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(
        rig.submit(&[desc(HDR, 16, false), desc(STATUS, 0, true)]),
        (0, UNTOUCHED)
    );

    // Short header.
    rig.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        rig.submit(&[desc(HDR, 8, false), desc(DATA, 512, true), desc(STATUS, 1, true)]),
        (1, IOERR)
    );

    // Data not a multiple of 512.
    rig.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        rig.submit(&[desc(HDR, 16, false), desc(DATA, 1000, true), desc(STATUS, 1, true)]),
        (1, IOERR)
    );
    rig.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        rig.submit(&[desc(HDR, 16, false), desc(DATA, 100, false), desc(STATUS, 1, true)]),
        (1, IOERR)
    );

    // Sectors beyond the capacity, and a sector number that overflows.
    let last = (DISK / 512) as u64;
    rig.header(VIRTIO_BLK_T_IN, last - 1);
    assert_eq!(
        rig.submit(&[desc(HDR, 16, false), desc(DATA, 1024, true), desc(STATUS, 1, true)]),
        (1, IOERR)
    );
    rig.header(VIRTIO_BLK_T_OUT, u64::MAX);
    assert_eq!(
        rig.submit(&[desc(HDR, 16, false), desc(DATA, 512, false), desc(STATUS, 1, true)]),
        (1, IOERR)
    );
    // ...while the last sector itself is fine.
    rig.header(VIRTIO_BLK_T_IN, last - 1);
    assert_eq!(
        rig.submit(&[desc(HDR, 16, false), desc(DATA, 512, true), desc(STATUS, 1, true)]),
        (513, OK)
    );

    // Data outside guest memory.
    rig.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        rig.submit(&[
            desc(HDR, 16, false),
            desc(MEM as u64 - 256, 512, true),
            desc(STATUS, 1, true)
        ]),
        (1, IOERR)
    );
    rig.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        rig.submit(&[
            desc(HDR, 16, false),
            desc(u64::MAX - 100, 512, true),
            desc(STATUS, 1, true)
        ]),
        (1, IOERR)
    );

    // Unknown and unsupported request types.
    for t in [
        99,
        VIRTIO_BLK_T_SCSI_CMD,
        VIRTIO_BLK_T_ZONE_REPORT,
        VIRTIO_BLK_T_SECURE_ERASE,
    ] {
        rig.header(t, 0);
        assert_eq!(
            rig.submit(&[desc(HDR, 16, false), desc(STATUS, 1, true)]),
            (1, UNSUPP),
            "type {t}"
        );
    }

    // Wrong layouts: a read with readable data, a write with writable data.
    rig.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        rig.submit(&[desc(HDR, 16, false), desc(DATA, 512, false), desc(STATUS, 1, true)]),
        (1, IOERR)
    );
    rig.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        rig.submit(&[desc(HDR, 16, false), desc(DATA, 512, true), desc(STATUS, 1, true)]),
        (1, IOERR)
    );

    // Discard with the unmap flag (only write-zeroes may have it), and
    // write-zeroes with a range past the end.
    let seg = |sector: u64, count: u32, flags: u32| {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&count.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        s
    };
    rig.header(VIRTIO_BLK_T_DISCARD, 0);
    rig.mem
        .write_slice(&seg(0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP), GuestAddress(DATA))
        .unwrap();
    assert_eq!(
        rig.submit(&[desc(HDR, 16, false), desc(DATA, 16, false), desc(STATUS, 1, true)]),
        (1, UNSUPP)
    );
    rig.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    rig.mem.write_slice(&seg(last - 4, 8, 0), GuestAddress(DATA)).unwrap();
    assert_eq!(
        rig.submit(&[desc(HDR, 16, false), desc(DATA, 16, false), desc(STATUS, 1, true)]),
        (1, IOERR)
    );
    rig.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    rig.mem.write_slice(&seg(0, 8, 0), GuestAddress(DATA)).unwrap();
    assert_eq!(
        rig.submit(&[desc(HDR, 16, false), desc(DATA, 10, false), desc(STATUS, 1, true)]),
        (1, IOERR)
    );

    // GET_ID returns the serial; a good write and a flush still work.
    rig.header(VIRTIO_BLK_T_GET_ID, 0);
    assert_eq!(
        rig.submit(&[desc(HDR, 16, false), desc(DATA, 20, true), desc(STATUS, 1, true)]),
        (21, OK)
    );
    let mut id = [0u8; 20];
    rig.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..7], b"serial\0");
    rig.header(VIRTIO_BLK_T_OUT, 16);
    rig.mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(
        rig.submit(&[desc(HDR, 16, false), desc(DATA, 512, false), desc(STATUS, 1, true)]),
        (1, OK)
    );
    rig.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(rig.submit(&[desc(HDR, 16, false), desc(STATUS, 1, true)]), (1, OK));
    rig.good_read();
}

#[test]
fn a_readonly_disk_refuses_writes_discards_and_zeroes() {
    let mut rig = Rig::new(true);
    rig.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        rig.submit(&[desc(HDR, 16, false), desc(DATA, 512, false), desc(STATUS, 1, true)]),
        (1, IOERR)
    );
    let mut s = [0u8; 16];
    s[8..12].copy_from_slice(&8u32.to_le_bytes());
    rig.mem.write_slice(&s, GuestAddress(DATA)).unwrap();
    for t in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        rig.header(t, 0);
        assert_eq!(
            rig.submit(&[desc(HDR, 16, false), desc(DATA, 16, false), desc(STATUS, 1, true)]),
            (1, IOERR)
        );
    }
    rig.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(rig.submit(&[desc(HDR, 16, false), desc(STATUS, 1, true)]), (1, OK));
    rig.good_read();
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

    /// Any chain at all: the worker completes it with a sane used length and
    /// status (or drops it with none), never panics, and keeps serving.
    #[test]
    fn random_chains_never_break_the_worker(
        type_ in proptest::prop_oneof![0u32..16, proptest::prelude::any::<u32>()],
        sector in proptest::prop_oneof![0u64..4096, proptest::prelude::any::<u64>()],
        descs in proptest::collection::vec(
            (proptest::prop_oneof![Just(HDR), Just(DATA), Just(STATUS), Just(MEM as u64 - 100), proptest::prelude::any::<u64>()],
             proptest::prop_oneof![0u32..32, Just(512u32), Just(4096u32), 0u32..70000],
             proptest::prelude::any::<bool>()),
            0..6),
    ) {
        let mut rig = Rig::new(false);
        rig.header(type_, sector);
        if !descs.is_empty() {
            let (len, status) = rig.submit(&descs);
            let writable: u64 = descs.iter().filter(|d| d.2).map(|d| u64::from(d.1)).sum();
            proptest::prop_assert!(u64::from(len) <= writable.max(1));
            // With a proper status descriptor last, the status is a real one.
            let ordered = descs.windows(2).all(|w| !w[0].2 || w[1].2);
            if ordered && descs.last() == Some(&(STATUS, 1, true)) && descs.iter().filter(|d| d.0 == STATUS).count() == 1 {
                proptest::prop_assert!([OK, IOERR, UNSUPP].contains(&status), "status {}", status);
                proptest::prop_assert!(len >= 1);
            }
        }
        rig.good_read();
    }
}

use proptest::prelude::Just;

const N: u16 = VRING_DESC_F_NEXT as u16;
const W: u16 = VRING_DESC_F_WRITE as u16;
const I: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;
const TABLE: u64 = 0x38_0000;

#[test]
fn chains_the_walk_ends_early_get_no_status_and_the_queue_keeps_serving() {
    let mut rig = Rig::new(false);
    let t = rig.desc_table.0;
    let cases: [(&str, Vec<Raw>); 4] = [
        (
            "a loop",
            vec![
                (t, 0, HDR, 16, N, 1),
                (t, 1, DATA, 512, W | N, 2),
                (t, 2, STATUS, 1, W | N, 1),
            ],
        ),
        (
            "a next index outside the table",
            vec![
                (t, 0, HDR, 16, N, 1),
                (t, 1, DATA, 512, W | N, 2),
                (t, 2, STATUS, 1, W | N, QSIZE + 3),
            ],
        ),
        (
            "more than 4 GiB in all",
            vec![
                (t, 0, HDR, 16, N, 1),
                (t, 1, DATA, 512, W | N, 2),
                (t, 2, DATA + 4096, u32::MAX - 256, W | N, 3),
                (t, 3, STATUS, 1, W, 0),
            ],
        ),
        (
            "an indirect table whose last entry points past it",
            vec![
                (t, 0, TABLE, 48, I, 0),
                (TABLE, 0, HDR, 16, N, 1),
                (TABLE, 1, DATA, 512, W | N, 2),
                (TABLE, 2, STATUS, 1, W | N, 3),
            ],
        ),
    ];
    for (what, descs) in cases {
        rig.header(VIRTIO_BLK_T_IN, 0);
        assert_eq!(rig.submit_raw(&descs), (0, UNTOUCHED), "{what}");
    }
    rig.good_read();
}

#[test]
fn requests_beyond_seg_max_or_size_max_get_ioerr() {
    let mut rig = Rig::new(false);
    let seg_max = streamblk::virtio_blk::SEG_MAX as u16;
    for (segments, want) in [(seg_max, (seg_max as u32 * 512 + 1, OK)), (seg_max + 1, (1, IOERR))] {
        rig.header(VIRTIO_BLK_T_IN, 0);
        let mut descs = vec![(rig.desc_table.0, 0, TABLE, 16 * (u32::from(segments) + 2), I, 0)];
        descs.push((TABLE, 0, HDR, 16, N, 1));
        for i in 0..segments {
            descs.push((TABLE, i + 1, DATA + 512 * u64::from(i), 512, W | N, i + 2));
        }
        descs.push((TABLE, segments + 1, STATUS, 1, W, 0));
        assert_eq!(rig.submit_raw(&descs), want, "{segments} segments");
    }
    let size_max = streamblk::virtio_blk::SIZE_MAX;
    for (len, want) in [(size_max, (size_max + 1, OK)), (size_max + 512, (1, IOERR))] {
        rig.header(VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            rig.submit(&[desc(HDR, 16, false), desc(DATA, len, true), desc(STATUS, 1, true)]),
            want,
            "a segment of {len} bytes"
        );
    }
    rig.good_read();
}

#[test]
fn an_avail_index_that_jumps_or_a_head_outside_the_table_is_an_error_not_a_spin() {
    for (what, jump, head) in [
        ("forwards", QSIZE + 1, 0),
        ("backwards", u16::MAX, 0),
        ("head outside the table", 1, QSIZE + 3),
    ] {
        let mut rig = Rig::new(false);
        rig.good_read();
        let idx: u16 = rig.mem.read_obj(rig.avail.unchecked_add(2)).unwrap();
        rig.mem
            .write_obj(head, rig.avail.unchecked_add(4 + 2 * (idx % QSIZE) as u64))
            .unwrap();
        rig.mem
            .write_obj(idx.wrapping_add(jump), rig.avail.unchecked_add(2))
            .unwrap();
        let started = std::time::Instant::now();
        assert!(rig.thread.process_queue(&rig.vring).is_err(), "{what}: not an error");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(1),
            "{what}: took long"
        );
    }
}

#[test]
fn a_disk_over_its_cap_on_waiting_requests_stops_popping_and_resumes_as_they_complete() {
    let (gate, _) = tokio::sync::watch::channel(false);
    let mut rig = Rig::with(false, Some(gate.clone()), Waiting::new(2, u64::MAX));
    // Three reads that miss, each with buffers of its own.
    let reads: Vec<(u64, u64, u64)> = (0..3u64)
        .map(|i| (HDR + 64 * i, DATA + 4096 * i, STATUS + 1 + i))
        .collect();
    for (i, &(hdr, data, status)) in reads.iter().enumerate() {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        h[8..16].copy_from_slice(&(8 * i as u64).to_le_bytes());
        rig.mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        rig.mem.write_obj(UNTOUCHED, GuestAddress(status)).unwrap();
        rig.push(&[desc(hdr, 16, false), desc(data, 4096, true), desc(status, 1, true)]);
    }
    rig.thread.process_queue(&rig.vring).unwrap();
    assert_eq!(
        rig.ctx.waiting.current(),
        (2, 8192),
        "two requests taken, up to the cap"
    );
    assert!(rig.thread.stalled());
    // A kick while over the cap takes nothing more, and loses nothing.
    rig.thread.process_queue(&rig.vring).unwrap();
    assert_eq!(rig.ctx.waiting.current().0, 2);
    let used: u16 = rig.mem.read_obj(rig.used.unchecked_add(2)).unwrap();
    assert_eq!(used, 0);

    // The data arrives: the worker, as its event loop does, completes and
    // runs the stalled queue again.
    gate.send_replace(true);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        rig.thread.process_completions(&rig.vring).unwrap();
        if rig.thread.stalled() {
            rig.thread.process_queue(&rig.vring).unwrap();
        }
        let used: u16 = rig.mem.read_obj(rig.used.unchecked_add(2)).unwrap();
        if used == 3 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "only {used} of 3 completed");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    for (i, &(_, data, status)) in reads.iter().enumerate() {
        assert_eq!(rig.mem.read_obj::<u8>(GuestAddress(status)).unwrap(), OK);
        let mut got = vec![0u8; 4096];
        rig.mem.read_slice(&mut got, GuestAddress(data)).unwrap();
        assert!(got == rig.base[4096 * i..4096 * (i + 1)], "read {i}");
    }
    assert_eq!(rig.ctx.waiting.current(), (0, 0));
}
