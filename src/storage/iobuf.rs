//! Buffers the engine and storage read into and write from, and the vectored
//! file I/O on them. The caller (the vhost layer) maps guest memory into
//! `IoBuf`s, so data moves between files and guest memory with no copy in
//! between.

use std::cell::Cell;
use std::fs::File;
use std::io;
use std::marker::PhantomData;
use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use smallvec::SmallVec;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress, VolatileSlice};

/// Largest iovec batch handed to one `preadv`/`pwritev` call.
const IOV_BATCH: usize = 64;

/// A span of memory that the engine reads into and writes from: guest
/// memory (through a [`VolatileSlice`]) or a host buffer. It borrows what it
/// points into for `'m`, so it cannot outlive the mapping; a request that
/// leaves the worker keeps its buffers in [`GuestBufs`], which owns a
/// reference to the guest memory instead.
///
/// Guest memory may change under us at any time (the guest owns it), so the
/// bytes are only ever copied with volatile accesses or handed to the kernel
/// (`preadv`/`pwritev`), never turned into Rust references.
///
/// It cannot outlive what it borrows:
/// ```compile_fail,E0597
/// use streamblk::storage::IoBuf;
/// let buf = {
///     let mut v = vec![0u8; 8];
///     IoBuf::from_mut(&mut v)
/// };
/// assert_eq!(buf.len(), 8);
/// ```
#[derive(Clone, Copy, Debug)]
pub struct IoBuf<'m> {
    ptr: *mut u8,
    len: usize,
    _mem: PhantomData<&'m [Cell<u8>]>,
}

// SAFETY: an `IoBuf` is an address range borrowed for 'm from memory that
// stays mapped for 'm and is only accessed with volatile copies or system
// calls; concurrent access to guest memory is the guest's business, as it is
// for `VolatileSlice` users across threads.
unsafe impl Send for IoBuf<'_> {}
// SAFETY: as above.
unsafe impl Sync for IoBuf<'_> {}

impl Default for IoBuf<'_> {
    /// An empty buffer, never dereferenced.
    fn default() -> Self {
        IoBuf {
            ptr: std::ptr::null_mut(),
            len: 0,
            _mem: PhantomData,
        }
    }
}

impl<'m> IoBuf<'m> {
    /// A slice of guest memory, for as long as the memory is borrowed.
    pub fn from_volatile<B: BitmapSlice>(s: VolatileSlice<'m, B>) -> Self {
        IoBuf {
            ptr: s.ptr_guard_mut().as_ptr(),
            len: s.len(),
            _mem: PhantomData,
        }
    }

    /// A host buffer, for as long as it is borrowed.
    pub fn from_mut(buf: &'m mut [u8]) -> Self {
        IoBuf {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            _mem: PhantomData,
        }
    }

    /// A buffer over `buf`, for writing a byte slice to a file.
    ///
    /// # Safety
    /// The buffer (and any `IoRange` over it) must only be read from.
    pub unsafe fn for_reading(buf: &'m [u8]) -> Self {
        IoBuf {
            ptr: buf.as_ptr().cast_mut(),
            len: buf.len(),
            _mem: PhantomData,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// The buffer without its first `n` bytes (`n` at most its length).
    pub fn skip(&self, n: usize) -> IoBuf<'m> {
        assert!(n <= self.len, "skip past the end of a buffer");
        IoBuf {
            // SAFETY: n <= len: the pointer stays inside (or one past) the buffer.
            ptr: unsafe { self.ptr.add(n) },
            len: self.len - n,
            _mem: PhantomData,
        }
    }

    /// The buffer as a volatile slice, for copies.
    fn volatile(&self) -> VolatileSlice<'m> {
        // SAFETY: the range is valid for 'm (how it was made), and every
        // access to it goes through volatile copies or system calls.
        unsafe { VolatileSlice::new(self.ptr, self.len) }
    }
}

/// The usual number of data buffers of a request, kept inline.
const INLINE_BUFS: usize = 16;

/// A request's data buffers: inline for the common case, no allocation.
pub type IoBufs<'m> = SmallVec<[IoBuf<'m>; INLINE_BUFS]>;

/// Data buffers that outlive the borrow of guest memory they were made
/// from: for a request finished off the worker thread. They hold a
/// reference to the memory, which keeps it mapped even if the frontend
/// changes its memory table or goes away.
pub struct GuestBufs<M> {
    mem: Arc<M>,
    /// Point into `mem`'s regions (checked when made); only handed out
    /// borrowed from `self`, so never beyond `mem`'s life.
    bufs: IoBufs<'static>,
}

impl<M: GuestMemoryBackend> GuestBufs<M> {
    /// Keeps `bufs`, which must lie inside `mem`'s regions (checked: None
    /// if one does not), alive with `mem`.
    pub fn new(mem: Arc<M>, bufs: &[IoBuf<'_>]) -> Option<Self> {
        let inside = |b: &IoBuf<'_>| {
            let (start, end) = (b.ptr as usize, b.ptr as usize + b.len);
            b.len == 0
                || mem.iter().any(|r| {
                    r.get_host_address(MemoryRegionAddress(0)).is_ok_and(|base| {
                        let base = base as usize;
                        start >= base && end <= base + r.len() as usize
                    })
                })
        };
        if !bufs.iter().all(inside) {
            return None;
        }
        let bufs = bufs
            .iter()
            .map(|b| IoBuf {
                ptr: b.ptr,
                len: b.len,
                _mem: PhantomData,
            })
            .collect();
        Some(GuestBufs { mem, bufs })
    }

    /// The buffers, for as long as `self` (and so the memory) lives.
    pub fn bufs(&self) -> &[IoBuf<'_>] {
        &self.bufs
    }

    pub fn memory(&self) -> &Arc<M> {
        &self.mem
    }
}

/// A byte range of the concatenation of some buffers: `len` bytes starting
/// `skip` bytes into them.
#[derive(Clone, Copy, Debug)]
pub struct IoRange<'a> {
    bufs: Bufs<'a>,
    skip: usize,
    len: usize,
}

#[derive(Clone, Copy, Debug)]
enum Bufs<'a> {
    One(IoBuf<'a>),
    Many(&'a [IoBuf<'a>]),
}

impl<'a> Bufs<'a> {
    fn as_slice(&self) -> &[IoBuf<'a>] {
        match self {
            Bufs::One(b) => std::slice::from_ref(b),
            Bufs::Many(bufs) => bufs,
        }
    }
}

impl<'a> IoRange<'a> {
    /// The whole of `bufs`.
    pub fn new(bufs: &'a [IoBuf<'a>]) -> Self {
        let len = bufs.iter().map(|b| b.len).sum();
        IoRange {
            bufs: Bufs::Many(bufs),
            skip: 0,
            len,
        }
    }

    /// A host buffer as a range.
    pub fn from_slice(buf: &'a mut [u8]) -> Self {
        IoRange {
            len: buf.len(),
            bufs: Bufs::One(IoBuf::from_mut(buf)),
            skip: 0,
        }
    }

    /// A host buffer as a range that is only read from.
    ///
    /// # Safety
    /// Nothing may write to the range (it is the source of a write).
    pub unsafe fn for_reading(buf: &'a [u8]) -> Self {
        IoRange {
            len: buf.len(),
            // SAFETY: the caller only reads the range.
            bufs: Bufs::One(unsafe { IoBuf::for_reading(buf) }),
            skip: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `len` bytes starting `offset` bytes into this range.
    pub fn sub(&self, offset: usize, len: usize) -> IoRange<'a> {
        assert!(offset + len <= self.len, "sub-range out of bounds");
        IoRange {
            bufs: self.bufs,
            skip: self.skip + offset,
            len,
        }
    }

    /// Calls `f` on each contiguous piece of the range, in order.
    fn for_each_piece<E>(&self, mut f: impl FnMut(IoBuf<'a>) -> Result<(), E>) -> Result<(), E> {
        let mut skip = self.skip;
        let mut left = self.len;
        for b in self.bufs.as_slice() {
            if left == 0 {
                break;
            }
            if skip >= b.len {
                skip -= b.len;
                continue;
            }
            let n = (b.len - skip).min(left);
            f(IoBuf { len: n, ..b.skip(skip) })?;
            skip = 0;
            left -= n;
        }
        Ok(())
    }

    /// Fills the range with zeros.
    pub fn fill_zero(&self) {
        static ZEROS: [u8; 4096] = [0; 4096];
        let _ = self.for_each_piece::<()>(|b| {
            let v = b.volatile();
            let mut at = 0;
            while at < v.len() {
                let n = (v.len() - at).min(ZEROS.len());
                // Cannot fail: at + n <= len.
                if let Ok(s) = v.subslice(at, n) {
                    s.copy_from(&ZEROS[..n]);
                }
                at += n;
            }
            Ok(())
        });
    }

    /// Copies the range into `dst`, which must be as long as the range.
    pub fn copy_to(&self, dst: &mut [u8]) {
        assert_eq!(dst.len(), self.len);
        let mut at = 0;
        let _ = self.for_each_piece::<()>(|b| {
            b.volatile().copy_to(&mut dst[at..at + b.len]);
            at += b.len;
            Ok(())
        });
    }

    /// Copies `src`, which must be as long as the range, into the range.
    pub fn copy_from(&self, src: &[u8]) {
        assert_eq!(src.len(), self.len);
        let mut at = 0;
        let _ = self.for_each_piece::<()>(|b| {
            b.volatile().copy_from(&src[at..at + b.len]);
            at += b.len;
            Ok(())
        });
    }

    /// Reads the whole range from `file` at `offset`; bytes past the end of
    /// the file read as zeros.
    pub fn read_from(&self, file: &File, offset: u64) -> io::Result<()> {
        self.vectored(file, offset, false)
    }

    /// Writes the whole range to `file` at `offset`.
    pub fn write_to(&self, file: &File, offset: u64) -> io::Result<()> {
        self.vectored(file, offset, true)
    }

    fn vectored(&self, file: &File, offset: u64, write: bool) -> io::Result<()> {
        let mut done = 0usize;
        while done < self.len {
            let rest = self.sub(done, self.len - done);
            let mut iov = [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; IOV_BATCH];
            let mut n = 0;
            let _ = rest.for_each_piece(|b| {
                if n == IOV_BATCH {
                    return Err(());
                }
                iov[n] = libc::iovec {
                    iov_base: b.ptr.cast(),
                    iov_len: b.len,
                };
                n += 1;
                Ok(())
            });
            let pos = (offset + done as u64) as libc::off_t;
            // SAFETY: every iovec points into memory valid for the range's life
            // (the buffers borrow it), and `n` entries of `iov` are initialised.
            let ret = unsafe {
                if write {
                    libc::pwritev(file.as_raw_fd(), iov.as_ptr(), n as libc::c_int, pos)
                } else {
                    libc::preadv(file.as_raw_fd(), iov.as_ptr(), n as libc::c_int, pos)
                }
            };
            if ret < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if ret == 0 {
                if write {
                    return Err(io::Error::new(io::ErrorKind::WriteZero, "pwritev wrote nothing"));
                }
                // End of file: the rest reads as zeros (sparse tail).
                rest.fill_zero();
                return Ok(());
            }
            done += ret as usize;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn bufs_of(chunks: &mut [Vec<u8>]) -> Vec<IoBuf<'_>> {
        chunks.iter_mut().map(|c| IoBuf::from_mut(c)).collect()
    }

    #[test]
    fn sub_range_spans_buffers_in_order() {
        let mut chunks = vec![vec![1u8; 3], vec![2u8; 5], vec![3u8; 2]];
        let bufs = bufs_of(&mut chunks);
        let r = IoRange::new(&bufs);
        assert_eq!(r.len(), 10);
        let mut out = [0u8; 6];
        r.sub(2, 6).copy_to(&mut out);
        assert_eq!(out, [1, 2, 2, 2, 2, 2]);
        r.sub(7, 3).fill_zero();
        assert_eq!(chunks[1], vec![2, 2, 2, 2, 0]);
        assert_eq!(chunks[2], vec![0, 0]);
    }

    #[test]
    fn vectored_io_round_trips_and_reads_zeros_past_eof() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[7u8; 100]).unwrap();
        let mut chunks: Vec<Vec<u8>> = (0..100).map(|_| vec![0xffu8; 3]).collect();
        let bufs = bufs_of(&mut chunks);
        let r = IoRange::new(&bufs);
        r.read_from(&f, 50).unwrap();
        let mut all = vec![0u8; 300];
        r.copy_to(&mut all);
        assert!(all[..50].iter().all(|&b| b == 7));
        assert!(all[50..].iter().all(|&b| b == 0));
        r.copy_from(&vec![9u8; 300]);
        r.write_to(&f, 1000).unwrap();
        let mut back = vec![0u8; 300];
        IoRange::from_slice(&mut back).read_from(&f, 1000).unwrap();
        assert!(back.iter().all(|&b| b == 9));
    }

    #[test]
    fn guest_bufs_keep_memory_mapped_and_refuse_foreign_buffers() {
        use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
        let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap();
        mem.write_slice(&[5u8; 16], GuestAddress(0x100)).unwrap();
        let mem = Arc::new(mem);
        let owned = {
            let slice = mem.get_slice(GuestAddress(0x100), 16).unwrap();
            let bufs = [IoBuf::from_volatile(slice)];
            GuestBufs::new(mem.clone(), &bufs).expect("inside guest memory")
        };
        drop(mem);
        let mut out = [0u8; 16];
        IoRange::new(owned.bufs()).copy_to(&mut out);
        assert_eq!(out, [5u8; 16], "the buffers still read the guest's memory");

        let mut host = vec![0u8; 16];
        let foreign = [IoBuf::from_mut(&mut host)];
        assert!(GuestBufs::new(owned.memory().clone(), &foreign).is_none());
    }
}
