//! Walks the descriptor chain of a given head, for requests resubmitted from
//! the inflight region (their avail ring entries may have been reused).
//! Same rules as `virtio_queue::DescriptorChain`: at most queue-size
//! descriptors, one level of indirection, at most 4 GiB in all.

use virtio_bindings::virtio_ring::VRING_DESC_ALIGN_SIZE;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

pub struct HeadChain<'a, M> {
    mem: &'a M,
    table: GuestAddress,
    size: u16,
    next: u16,
    ttl: u16,
    indirect: bool,
    bytes: u32,
}

impl<'a, M: GuestMemory> HeadChain<'a, M> {
    pub fn new(mem: &'a M, desc_table: GuestAddress, queue_size: u16, head: u16) -> Self {
        HeadChain {
            mem,
            table: desc_table,
            size: queue_size,
            next: head,
            ttl: queue_size,
            indirect: false,
            bytes: 0,
        }
    }
}

impl<M: GuestMemory> Iterator for HeadChain<'_, M> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        if self.ttl == 0 || self.next >= self.size {
            return None;
        }
        let addr = self.table.checked_add(u64::from(self.next) * 16)?;
        let desc: Descriptor = self.mem.read_obj(addr).ok()?;
        if desc.refers_to_indirect_table() {
            if self.indirect || desc.len() & (VRING_DESC_ALIGN_SIZE - 1) != 0 {
                return None;
            }
            let n = u16::try_from(desc.len() / VRING_DESC_ALIGN_SIZE).ok()?;
            self.table = desc.addr();
            self.size = n;
            self.ttl = n;
            self.next = 0;
            self.indirect = true;
            return self.next();
        }
        self.bytes = self.bytes.checked_add(desc.len())?;
        if desc.has_next() {
            self.next = desc.next();
            self.ttl -= 1;
        } else {
            self.ttl = 0;
        }
        Some(desc)
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::RawDescriptor;

    use super::*;
    use crate::virtio_blk::{self, Error};

    const N: u16 = VRING_DESC_F_NEXT as u16;
    const W: u16 = VRING_DESC_F_WRITE as u16;

    fn mem() -> crate::vhost::GuestMemory {
        crate::vhost::GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn put(mem: &crate::vhost::GuestMemory, table: u64, i: u16, d: (u64, u32, u16, u16)) {
        let raw = RawDescriptor::from(Descriptor::new(d.0, d.1, d.2, d.3));
        mem.write_obj(raw, GuestAddress(table + 16 * u64::from(i))).unwrap();
    }

    /// Parses the chain at head 0 of a 16-entry table at 0.
    fn parse(mem: &crate::vhost::GuestMemory) -> Result<virtio_blk::Request, Error> {
        let (mut descs, mut data) = (Vec::new(), crate::engine::IoBufs::new());
        let chain = HeadChain::new(mem, GuestAddress(0), 16, 0);
        virtio_blk::parse(chain, mem, 2048, &mut descs, &mut data).map_err(|(e, status)| {
            assert_eq!(status, None, "a status address for a chain that ended early");
            e
        })
    }

    #[test]
    fn a_chain_the_walk_ends_early_is_broken_never_a_request() {
        let m = mem();
        // A whole read parses.
        put(&m, 0, 0, (0x1000, 16, N, 1));
        put(&m, 0, 1, (0x2000, 512, W | N, 2));
        put(&m, 0, 2, (0x3000, 1, W, 0));
        assert!(parse(&m).is_ok());
        // A loop, a next index outside the table, over 4 GiB in all.
        for last in [(0x3000, 1, W | N, 1), (0x3000, 1, W | N, 16)] {
            put(&m, 0, 2, last);
            assert_eq!(parse(&m).unwrap_err(), Error::BrokenChain, "{last:?}");
        }
        put(&m, 0, 2, (0x3000, u32::MAX - 8, W | N, 3));
        put(&m, 0, 3, (0x3000, 1, W, 0));
        assert_eq!(parse(&m).unwrap_err(), Error::BrokenChain);
        // An indirect table whose last entry points past its end.
        put(&m, 0, 0, (0x8000, 48, VRING_DESC_F_INDIRECT as u16, 0));
        put(&m, 0x8000, 0, (0x1000, 16, N, 1));
        put(&m, 0x8000, 1, (0x2000, 512, W | N, 2));
        put(&m, 0x8000, 2, (0x3000, 1, W | N, 3));
        assert_eq!(parse(&m).unwrap_err(), Error::BrokenChain);
    }
}
