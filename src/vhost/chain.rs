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
