//! Host buffers the engine and storage read into and write from, and the vectored file
//! I/O on them. The caller (the vhost layer) maps guest memory into `IoBuf`s,
//! so data moves between files and guest memory with no copy in between.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

/// Largest iovec batch handed to one `preadv`/`pwritev` call.
const IOV_BATCH: usize = 64;

/// A span of host memory that stays mapped while the engine uses it.
#[derive(Clone, Copy, Debug)]
pub struct IoBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: an `IoBuf` is a plain address range; whoever creates it guarantees
// the memory stays mapped for as long as any thread uses it (`IoBuf::new`).
unsafe impl Send for IoBuf {}
// SAFETY: as above; concurrent access to guest memory is the guest's business.
unsafe impl Sync for IoBuf {}

impl Default for IoBuf {
    /// An empty buffer, never dereferenced.
    fn default() -> Self {
        IoBuf {
            ptr: std::ptr::null_mut(),
            len: 0,
        }
    }
}

impl IoBuf {
    /// # Safety
    /// `ptr..ptr+len` must be valid for reads and writes for as long as the
    /// `IoBuf`, or any `IoRange` over it, is used.
    pub unsafe fn new(ptr: *mut u8, len: usize) -> Self {
        IoBuf { ptr, len }
    }

    /// A buffer over `buf`, for writing a byte slice to a file.
    ///
    /// # Safety
    /// The buffer (and any `IoRange` over it) must only be read from, and
    /// only while `buf` is borrowed.
    pub unsafe fn for_reading(buf: &[u8]) -> Self {
        IoBuf {
            ptr: buf.as_ptr().cast_mut(),
            len: buf.len(),
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
}

/// A byte range of the concatenation of some buffers: `len` bytes starting
/// `skip` bytes into `bufs`.
#[derive(Clone, Copy, Debug)]
pub struct IoRange<'a> {
    bufs: &'a [IoBuf],
    skip: usize,
    len: usize,
}

impl<'a> IoRange<'a> {
    /// The whole of `bufs`.
    pub fn new(bufs: &'a [IoBuf]) -> Self {
        let len = bufs.iter().map(|b| b.len).sum();
        IoRange { bufs, skip: 0, len }
    }

    /// A stack or heap slice as a one-buffer range.
    pub fn from_slice(slot: &'a mut [IoBuf; 1], buf: &'a mut [u8]) -> Self {
        // SAFETY: `buf` is borrowed mutably for 'a, as long as the range lives.
        slot[0] = unsafe { IoBuf::new(buf.as_mut_ptr(), buf.len()) };
        IoRange::new(&slot[..])
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
    pub fn for_each_piece<E>(&self, mut f: impl FnMut(*mut u8, usize) -> Result<(), E>) -> Result<(), E> {
        let mut skip = self.skip;
        let mut left = self.len;
        for b in self.bufs {
            if left == 0 {
                break;
            }
            if skip >= b.len {
                skip -= b.len;
                continue;
            }
            let n = (b.len - skip).min(left);
            // SAFETY: skip < b.len, so the pointer stays inside the buffer.
            f(unsafe { b.ptr.add(skip) }, n)?;
            skip = 0;
            left -= n;
        }
        Ok(())
    }

    /// Fills the range with zeros.
    pub fn fill_zero(&self) {
        let _ = self.for_each_piece::<()>(|p, n| {
            // SAFETY: `p..p+n` is inside a buffer that `IoBuf::new` vouched for.
            unsafe { std::ptr::write_bytes(p, 0, n) };
            Ok(())
        });
    }

    /// Copies the range into `dst`, which must be as long as the range.
    pub fn copy_to(&self, dst: &mut [u8]) {
        assert_eq!(dst.len(), self.len);
        let mut at = 0;
        let _ = self.for_each_piece::<()>(|p, n| {
            // SAFETY: `p..p+n` is valid (see `IoBuf::new`); `dst[at..at+n]` is in bounds.
            unsafe { std::ptr::copy_nonoverlapping(p, dst[at..].as_mut_ptr(), n) };
            at += n;
            Ok(())
        });
    }

    /// Copies `src`, which must be as long as the range, into the range.
    pub fn copy_from(&self, src: &[u8]) {
        assert_eq!(src.len(), self.len);
        let mut at = 0;
        let _ = self.for_each_piece::<()>(|p, n| {
            // SAFETY: `p..p+n` is valid (see `IoBuf::new`); `src[at..at+n]` is in bounds.
            unsafe { std::ptr::copy_nonoverlapping(src[at..].as_ptr(), p, n) };
            at += n;
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
            let _ = rest.for_each_piece(|p, len| {
                if n == IOV_BATCH {
                    return Err(());
                }
                iov[n] = libc::iovec {
                    iov_base: p.cast(),
                    iov_len: len,
                };
                n += 1;
                Ok(())
            });
            let pos = (offset + done as u64) as libc::off_t;
            // SAFETY: every iovec points into memory valid for the range's life
            // (`IoBuf::new`), and `n` entries of `iov` are initialised.
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

    fn bufs_of(chunks: &mut [Vec<u8>]) -> Vec<IoBuf> {
        chunks
            .iter_mut()
            // SAFETY: the vectors outlive the test's use of the buffers.
            .map(|c| unsafe { IoBuf::new(c.as_mut_ptr(), c.len()) })
            .collect()
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
        let mut slot = [bufs[0]; 1];
        IoRange::from_slice(&mut slot, &mut back).read_from(&f, 1000).unwrap();
        assert!(back.iter().all(|&b| b == 9));
    }
}
