//! Inflight I/O tracking for split rings (vhost-user spec, "Inflight I/O
//! tracking"): a shared region, kept by the frontend across our restarts,
//! that records which descriptor heads were taken from a ring and not yet
//! put on its used ring, so a restarted daemon can run them again.
//!
//! The layout is libvhost-user's `VuVirtqInflight` / `VuDescStateSplit`, so
//! a region written by one backend is read correctly by another. Only this
//! module reads or writes the region; it knows nothing of the engine.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

/// `VuVirtqInflight::version` of an initialised queue region.
pub const INFLIGHT_VERSION: u16 = 1;
/// Queue regions start at multiples of this (libvhost-user's `INFLIGHT_ALIGNMENT`).
const ALIGNMENT: u64 = 64;
/// `VuVirtqInflight` before its `desc[]`: features (u64), version,
/// desc_num, last_batch_head, used_idx (u16 each).
const HEADER_LEN: usize = 16;
/// `VuDescStateSplit`: inflight (u8), padding[5], next (u16), counter (u64).
const DESC_LEN: usize = 16;

/// Bytes of one queue's region: libvhost-user's `vu_inflight_queue_size`.
/// (The header fits in the alignment slack.)
pub fn queue_region_len(queue_size: u16) -> u64 {
    (DESC_LEN as u64 * u64::from(queue_size) + 2).div_ceil(ALIGNMENT) * ALIGNMENT
}

/// A mapping of the frontend's inflight file.
pub struct InflightRegion {
    addr: *mut u8,
    len: usize,
    num_queues: u16,
    queue_size: u16,
}

// SAFETY: the region is plain shared memory, only accessed through atomics.
unsafe impl Send for InflightRegion {}
// SAFETY: as above.
unsafe impl Sync for InflightRegion {}

impl InflightRegion {
    /// Allocates a zeroed region for `num_queues` queues of `queue_size`
    /// (GET_INFLIGHT_FD); returns it and the file the frontend keeps.
    pub fn create(num_queues: u16, queue_size: u16) -> io::Result<(Arc<Self>, File)> {
        if num_queues == 0 || queue_size == 0 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let len = u64::from(num_queues) * queue_region_len(queue_size);
        // SAFETY: a plain memfd_create with a static name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"streamblk-inflight".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a new file descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len)?;
        let region = Self::map(&file, 0, len, num_queues, queue_size)?;
        Ok((region, file))
    }

    /// Maps the frontend's region (SET_INFLIGHT_FD). The file may be closed
    /// afterwards: the mapping keeps the memory.
    pub fn map(file: &File, offset: u64, len: u64, num_queues: u16, queue_size: u16) -> io::Result<Arc<Self>> {
        let needed = u64::from(num_queues) * queue_region_len(queue_size);
        if num_queues == 0 || queue_size == 0 || len < needed || len > isize::MAX as u64 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let file_len = file.metadata()?.len();
        if offset.checked_add(len).is_none_or(|end| end > file_len) {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let offset = libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a fresh shared mapping of a file we hold; the kernel checks
        // the fd, offset alignment and length, and the result is checked.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Arc::new(InflightRegion {
            addr: addr.cast(),
            len: len as usize,
            num_queues,
            queue_size,
        }))
    }

    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// The region of queue `q`, if the region has one.
    pub fn queue(self: &Arc<Self>, q: usize) -> Option<InflightQueue> {
        if q >= usize::from(self.num_queues) {
            return None;
        }
        let offset = q * queue_region_len(self.queue_size) as usize;
        let queue = InflightQueue {
            region: self.clone(),
            // SAFETY: offset + the queue's length is inside the mapping
            // (checked against `len` when it was mapped).
            base: unsafe { self.addr.add(offset) },
            desc_num: self.queue_size,
            counter: 0,
        };
        // libvhost-user sets desc_num when the region is handed over.
        queue.desc_num_field().store(self.queue_size, Ordering::Relaxed);
        Some(queue)
    }
}

impl Drop for InflightRegion {
    fn drop(&mut self) {
        // SAFETY: addr/len is our own mapping and nothing borrows it any more
        // (every InflightQueue holds an Arc of the region).
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

/// What a queue must do when it starts on a region a previous backend used.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Heads to run again, in the order they were first taken.
    pub resubmit: Vec<u16>,
    /// The ring's next avail index: every entry before it was taken.
    pub next_avail: u16,
}

/// One queue's part of the region.
pub struct InflightQueue {
    region: Arc<InflightRegion>,
    base: *mut u8,
    desc_num: u16,
    /// Order of the next head taken.
    counter: u64,
}

// SAFETY: the pointer is into the region, which the Arc keeps mapped; all
// accesses are atomic.
unsafe impl Send for InflightQueue {}

impl InflightQueue {
    fn u16_at(&self, offset: usize) -> &AtomicU16 {
        // SAFETY: offset is a 2-aligned field inside this queue's region,
        // which stays mapped while self holds the region.
        unsafe { AtomicU16::from_ptr(self.base.add(offset).cast()) }
    }

    fn version(&self) -> &AtomicU16 {
        self.u16_at(8)
    }

    fn desc_num_field(&self) -> &AtomicU16 {
        self.u16_at(10)
    }

    fn last_batch_head(&self) -> &AtomicU16 {
        self.u16_at(12)
    }

    fn used_idx(&self) -> &AtomicU16 {
        self.u16_at(14)
    }

    fn inflight(&self, head: u16) -> &AtomicU8 {
        debug_assert!(head < self.desc_num);
        // SAFETY: head < desc_num: the entry is inside the queue's region.
        unsafe { AtomicU8::from_ptr(self.base.add(HEADER_LEN + DESC_LEN * usize::from(head))) }
    }

    fn counter_of(&self, head: u16) -> &AtomicU64 {
        // SAFETY: as in `inflight`; the counter is 8-aligned (the region is
        // page aligned, queues 64-aligned, entries 16 bytes).
        unsafe { AtomicU64::from_ptr(self.base.add(HEADER_LEN + DESC_LEN * usize::from(head) + 8).cast()) }
    }

    /// Entries the region has room for: heads must be below it.
    pub fn desc_num(&self) -> u16 {
        self.desc_num
    }

    /// Called when the queue starts, with the used index the ring has in
    /// guest memory. A fresh region is initialised; a used one is repaired
    /// (a crash between publishing a used entry and clearing its head) and
    /// its inflight heads returned, oldest first.
    pub fn start(&mut self, ring_used_idx: u16) -> Option<Recovery> {
        if self.version().load(Ordering::Acquire) == 0 {
            self.used_idx().store(ring_used_idx, Ordering::Relaxed);
            self.version().store(INFLIGHT_VERSION, Ordering::Release);
            self.counter = 0;
            return None;
        }
        if self.used_idx().load(Ordering::Acquire) != ring_used_idx {
            // The used entry of last_batch_head was published, but its head
            // was not cleared: it is complete.
            let head = self.last_batch_head().load(Ordering::Relaxed);
            if head < self.desc_num {
                self.inflight(head).store(0, Ordering::Release);
            }
            self.used_idx().store(ring_used_idx, Ordering::Release);
        }
        let mut heads: Vec<(u64, u16)> = (0..self.desc_num)
            .filter(|&h| self.inflight(h).load(Ordering::Acquire) == 1)
            .map(|h| (self.counter_of(h).load(Ordering::Relaxed), h))
            .collect();
        heads.sort_unstable();
        self.counter = heads.last().map_or(0, |&(c, _)| c + 1);
        Some(Recovery {
            next_avail: ring_used_idx.wrapping_add(heads.len() as u16),
            resubmit: heads.into_iter().map(|(_, h)| h).collect(),
        })
    }

    /// Records that `head` was taken from the avail ring.
    pub fn take(&mut self, head: u16) {
        if head >= self.desc_num {
            return;
        }
        self.counter_of(head).store(self.counter, Ordering::Relaxed);
        self.counter += 1;
        self.inflight(head).store(1, Ordering::Release);
    }

    /// Before `head`'s used entry is published.
    pub fn before_publish(&self, head: u16) {
        self.last_batch_head().store(head, Ordering::Release);
    }

    /// After `head`'s used entry is published and the used index is `used_idx`.
    pub fn after_publish(&self, head: u16, used_idx: u16) {
        if head < self.desc_num {
            self.inflight(head).store(0, Ordering::Release);
        }
        self.used_idx().store(used_idx, Ordering::Release);
    }

    /// Heads marked inflight (for tests and diagnostics).
    pub fn inflight_heads(&self) -> Vec<u16> {
        (0..self.desc_num)
            .filter(|&h| self.inflight(h).load(Ordering::Acquire) == 1)
            .collect()
    }

    pub fn region(&self) -> &Arc<InflightRegion> {
        &self.region
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A queue as a restarted daemon sees it: the same file, mapped again.
    fn remap(file: &File, q: usize) -> InflightQueue {
        let len = 2 * queue_region_len(8);
        InflightRegion::map(file, 0, len, 2, 8).unwrap().queue(q).unwrap()
    }

    /// Publishes `head` as a ring whose used index was `used` would.
    fn publish(q: &InflightQueue, head: u16, used: &mut u16) {
        q.before_publish(head);
        *used += 1;
        q.after_publish(head, *used);
    }

    #[test]
    fn layout_matches_libvhost_user() {
        // vu_inflight_queue_size: ALIGN_UP(16 * n + 2, 64).
        assert_eq!(queue_region_len(128), 2112);
        assert_eq!(queue_region_len(256), 4160);
        assert_eq!(queue_region_len(1), 64);
        let (region, file) = InflightRegion::create(2, 8).unwrap();
        assert_eq!(file.metadata().unwrap().len(), 2 * 192);
        let mut q = region.queue(1).unwrap();
        assert_eq!(q.start(0), None);
        q.take(3);
        // Byte layout: version at 8, desc_num at 10, desc[3] at 16 + 48.
        let bytes = std::fs::read(format!("/proc/self/fd/{}", file.as_raw_fd())).unwrap();
        let qb = &bytes[192..];
        assert_eq!(u16::from_le_bytes([qb[8], qb[9]]), INFLIGHT_VERSION);
        assert_eq!(u16::from_le_bytes([qb[10], qb[11]]), 8);
        assert_eq!(qb[16 + 48], 1);
        assert!(region.queue(2).is_none());
    }

    #[test]
    fn fresh_region_resubmits_nothing() {
        let (region, _file) = InflightRegion::create(1, 8).unwrap();
        let mut q = region.queue(0).unwrap();
        assert_eq!(q.start(5), None);
        // Started again with nothing taken: an empty recovery at the used index.
        assert_eq!(
            q.start(5),
            Some(Recovery {
                resubmit: vec![],
                next_avail: 5
            })
        );
    }

    #[test]
    fn out_of_order_completions_leave_the_rest_in_pop_order() {
        let (region, file) = InflightRegion::create(2, 8).unwrap();
        let mut q = region.queue(0).unwrap();
        q.start(0);
        // A, B, C, D taken (heads 6, 2, 4, 0); B and D complete.
        for h in [6, 2, 4, 0] {
            q.take(h);
        }
        let mut used = 0;
        publish(&q, 2, &mut used);
        publish(&q, 0, &mut used);
        drop(q);
        drop(region);
        let mut q = remap(&file, 0);
        let r = q.start(used).unwrap();
        assert_eq!(r.resubmit, vec![6, 4]);
        assert_eq!(r.next_avail, 4);
        // New heads are ordered after the resubmitted ones.
        q.take(1);
        let mut q2 = remap(&file, 0);
        assert_eq!(q2.start(used).unwrap().resubmit, vec![6, 4, 1]);
    }

    #[test]
    fn crash_after_used_publish_before_clearing_the_head_completes_it() {
        let (region, file) = InflightRegion::create(2, 8).unwrap();
        let mut q = region.queue(1).unwrap();
        q.start(10);
        q.take(3);
        q.take(5);
        // Publish 3: last_batch_head set, the used entry reaches the ring
        // (used idx 11)... and the daemon dies before after_publish.
        q.before_publish(3);
        let ring_used = 11;
        drop(q);
        let mut q = remap(&file, 1);
        let r = q.start(ring_used).unwrap();
        assert_eq!(r.resubmit, vec![5], "3 is on the used ring: not run twice");
        assert_eq!(r.next_avail, 12);
        assert_eq!(q.inflight_heads(), vec![5]);
    }

    #[test]
    fn crash_before_used_publish_resubmits_the_head() {
        let (region, file) = InflightRegion::create(2, 8).unwrap();
        let mut q = region.queue(0).unwrap();
        q.start(0);
        q.take(3);
        q.take(5);
        let mut used = 0;
        publish(&q, 5, &mut used);
        // Publish of 3 began (last_batch_head = 3) but the used index was
        // not written: the ring still says 1.
        q.before_publish(3);
        drop(q);
        let mut q = remap(&file, 0);
        let r = q.start(used).unwrap();
        assert_eq!(r.resubmit, vec![3]);
        assert_eq!(r.next_avail, 2);
    }

    #[test]
    fn crash_between_clearing_the_head_and_recording_the_used_index() {
        let (region, file) = InflightRegion::create(2, 8).unwrap();
        let mut q = region.queue(0).unwrap();
        q.start(0);
        q.take(1);
        q.take(2);
        // 1 published, its head cleared, the region's used_idx not updated.
        q.before_publish(1);
        q.inflight(1).store(0, Ordering::Release);
        drop(q);
        let mut q = remap(&file, 0);
        let r = q.start(1).unwrap();
        assert_eq!(r.resubmit, vec![2]);
        assert_eq!(r.next_avail, 2);
    }

    #[test]
    fn used_index_wraps() {
        let (region, file) = InflightRegion::create(1, 8).unwrap();
        let mut q = region.queue(0).unwrap();
        q.start(u16::MAX - 1);
        q.take(0);
        q.take(1);
        q.take(2);
        let mut used = u16::MAX - 1;
        q.before_publish(1);
        used = used.wrapping_add(1);
        q.after_publish(1, used);
        q.before_publish(2);
        used = used.wrapping_add(1);
        q.after_publish(2, used);
        assert_eq!(used, 0);
        drop(q);
        drop(region);
        let mut q = InflightRegion::map(&file, 0, queue_region_len(8), 1, 8)
            .unwrap()
            .queue(0)
            .unwrap();
        let r = q.start(used).unwrap();
        assert_eq!(r.resubmit, vec![0]);
        assert_eq!(r.next_avail, 1);
    }

    #[test]
    fn regions_too_small_for_their_queues_are_refused() {
        let (_region, file) = InflightRegion::create(1, 8).unwrap();
        assert!(InflightRegion::map(&file, 0, queue_region_len(8), 2, 8).is_err());
        assert!(InflightRegion::map(&file, 4096, queue_region_len(8), 1, 8).is_err());
        assert!(InflightRegion::map(&file, 0, queue_region_len(8), 1, 0).is_err());
    }
}
