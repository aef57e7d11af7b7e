//! A split virtqueue laid out in test guest memory, for tests that drive
//! the vhost handler in process: where its tables are, and the chains a
//! guest would put on it.

use streamblk::vhost::GuestMemory;
use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use vm_memory::{Bytes, GuestAddress};

/// The descriptor table, the available ring and the used ring.
pub const DESC: u64 = 0x0;
pub const AVAIL: u64 = 0x1000;
pub const USED: u64 = 0x2000;

/// A read of sector `sector` into `data`, status at `status`, as a chain
/// at descriptors `first..first + 3`.
pub fn read_chain(mem: &GuestMemory, first: u16, sector: u64, hdr: u64, data: u64, status: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(hdr)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
    let descs = [
        (hdr, 16, 0u16),
        (data, 4096, VRING_DESC_F_WRITE as u16),
        (status, 1, VRING_DESC_F_WRITE as u16),
    ];
    for (i, &(addr, len, flags)) in descs.iter().enumerate() {
        let i = i as u16;
        let flags = if i < 2 { flags | VRING_DESC_F_NEXT as u16 } else { flags };
        let d = RawDescriptor::from(Descriptor::new(addr, len, flags, first + i + 1));
        mem.write_obj(d, GuestAddress(DESC + 16 * u64::from(first + i)))
            .unwrap();
    }
}

/// Puts `heads` on the available ring, in order.
pub fn make_available(mem: &GuestMemory, heads: &[u16]) {
    for (i, &h) in heads.iter().enumerate() {
        mem.write_obj(h, GuestAddress(AVAIL + 4 + 2 * i as u64)).unwrap();
    }
    mem.write_obj(heads.len() as u16, GuestAddress(AVAIL + 2)).unwrap();
}
