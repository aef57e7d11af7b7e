//! Request parsing on raw descriptor chains laid out in guest memory: the
//! input is the guest memory itself (descriptor table, avail ring, headers,
//! data), so chains can loop, point anywhere, nest indirect tables and lie
//! about lengths. Every chain the queue yields must parse or be refused,
//! never panic, and a parsed request's buffers must lie in guest memory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use streamblk::virtio_blk;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};

const MEM: usize = 64 * 1024;
const QSIZE: u16 = 16;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;

fuzz_target!(|data: &[u8]| {
    let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let n = data.len().min(MEM);
    vm_memory::Bytes::write_slice(&mem, &data[..n], GuestAddress(0)).unwrap();
    let mut q = Queue::new(QSIZE).unwrap();
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    if !q.is_valid(&mem) {
        return;
    }
    // A 1 MiB disk: ranges past it must be refused.
    let capacity = 2048;
    let mut descs = Vec::new();
    let Ok(iter) = q.iter(&mem) else { return };
    for chain in iter.take(QSIZE as usize) {
        let mut bufs = streamblk::engine::IoBufs::new();
        if let Ok(req) = virtio_blk::parse(chain, &mem, capacity, &mut descs, &mut bufs) {
            let total: usize = bufs.iter().map(|b| b.len()).sum();
            assert!(total >= req.data_len as usize);
            assert!(
                streamblk::engine::GuestBufs::new(std::sync::Arc::new(mem.clone()), &bufs).is_some(),
                "a request buffer outside guest memory"
            );
            if matches!(
                req.kind,
                virtio_blk::RequestType::Discard | virtio_blk::RequestType::WriteZeroes
            ) {
                let _ = virtio_blk::discard_segments(req.kind, &bufs, capacity);
            }
        }
    }
});
