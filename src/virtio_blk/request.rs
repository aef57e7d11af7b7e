//! Parsing a virtio-blk request out of a descriptor chain.
//!
//! The chain is read as two byte streams, as VIRTIO_F_ANY_LAYOUT allows: the
//! device-readable descriptors (header, then data for writes) followed by the
//! device-writable ones (data for reads, then the status byte, last). Every
//! length, direction and sector range is checked; data descriptors are
//! translated to host buffers so the engine reads and writes guest memory
//! directly.

use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::config::{MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, MAX_REQUEST_BYTES, SEG_MAX, SIZE_MAX};
use super::{STATUS_IOERR, STATUS_UNSUPP};
use crate::engine::{IoBuf, IoBufs, IoRange, SECTOR_SIZE};

pub const HEADER_LEN: usize = 16;
const DISCARD_SEGMENT_LEN: usize = 16;
/// Most descriptors a request may have: SEG_MAX data segments, a header
/// split into single bytes (VIRTIO_F_ANY_LAYOUT allows it) and the status.
/// Also the most the parser keeps, so a long chain grows no scratch.
const MAX_DESCS: usize = SEG_MAX as usize + HEADER_LEN + 1;

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The walk stopped at a descriptor that still points to a next one: a
    /// loop, a next index outside the table, or more than 4 GiB in all.
    #[error("descriptor chain is broken: its last descriptor has NEXT set")]
    BrokenChain,
    #[error("descriptor chain has no device-writable status byte")]
    NoStatus,
    #[error("device-readable descriptor after a device-writable one")]
    DescriptorOrder,
    #[error("descriptor {addr:#x}+{len} is not in guest memory")]
    GuestMemory { addr: u64, len: u32 },
    #[error("request header is {0} bytes, needs {HEADER_LEN}")]
    ShortHeader(usize),
    #[error("request type {0} has an unexpected buffer layout")]
    Layout(u32),
    #[error("data length {0} is not a multiple of 512")]
    Unaligned(usize),
    #[error("sectors {sector}+{count} are beyond the capacity of {capacity}")]
    OutOfRange { sector: u64, count: u64, capacity: u64 },
    #[error("{0} discard or write-zeroes segments, at most {MAX_DISCARD_SEG} allowed")]
    SegmentCount(usize),
    #[error("discard or write-zeroes of {0} sectors exceeds the limit")]
    SegmentTooLarge(u32),
    #[error("unsupported flags {0:#x} in a discard or write-zeroes segment")]
    SegmentFlags(u32),
    #[error("unsupported request type {0}")]
    UnsupportedType(u32),
    #[error("{0} descriptors in a request, at most {SEG_MAX} data segments allowed")]
    TooManySegments(usize),
    #[error("a data segment of {0} bytes, at most {SIZE_MAX} allowed")]
    SegmentTooLong(u64),
    #[error("request of {0} data bytes, at most {MAX_REQUEST_BYTES} allowed")]
    TooLarge(u64),
}

impl Error {
    /// The status the guest gets for a request that failed to parse; `None`
    /// when there is nowhere to put one.
    pub fn status(&self) -> Option<u8> {
        match self {
            // A broken chain's end is not to be trusted: nothing is written.
            Error::BrokenChain | Error::NoStatus | Error::DescriptorOrder => None,
            Error::UnsupportedType(_) | Error::SegmentFlags(_) => Some(STATUS_UNSUPP),
            _ => Some(STATUS_IOERR),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
}

/// A validated request. Its data buffers are the ones `parse` filled in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestType,
    /// Byte offset on the disk (In, Out).
    pub offset: u64,
    /// Bytes of data: what a read returns, a write carries, or GetId may fill.
    pub data_len: u32,
    /// Where the status byte goes.
    pub status_addr: GuestAddress,
}

impl Request {
    /// Bytes the device writes into the chain on success: data and status.
    pub fn used_len(&self) -> u32 {
        match self.kind {
            RequestType::In | RequestType::GetId => self.data_len + 1,
            _ => 1,
        }
    }
}

/// One range of a discard or write-zeroes request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiscardSegment {
    pub offset: u64,
    pub len: u64,
    pub unmap: bool,
}

/// Where the status byte of a chain goes, if it has one. Used to answer a
/// chain that `parse` refused.
fn status_of(last: Option<(GuestAddress, u32, bool)>) -> Result<GuestAddress, Error> {
    match last {
        Some((addr, len, true)) if len >= 1 => addr
            .checked_add(u64::from(len) - 1)
            .ok_or(Error::GuestMemory { addr: addr.0, len }),
        _ => Err(Error::NoStatus),
    }
}

fn translate<'m, M: GuestMemoryBackend>(
    mem: &'m M,
    addr: GuestAddress,
    len: u32,
    out: &mut IoBufs<'m>,
) -> Result<(), Error> {
    let bad = Error::GuestMemory { addr: addr.0, len };
    if len == 0 {
        return Ok(());
    }
    for slice in mem.get_slices(addr, len as usize) {
        out.push(IoBuf::from_volatile(slice.map_err(|_| bad.clone())?));
    }
    Ok(())
}

/// Parses the chain. On success, `data` holds the request's data buffers
/// (for Discard and WriteZeroes, its segments), and `descs` is scratch.
/// On failure the status address, if any, is returned alongside the error.
///
/// `chain` is a `virtio_queue::DescriptorChain`, or any walk of a chain's
/// descriptors (a resubmitted request's, from its head).
pub fn parse<'m, M, C>(
    chain: C,
    mem: &'m M,
    capacity_sectors: u64,
    descs: &mut Vec<(GuestAddress, u32, bool)>,
    data: &mut IoBufs<'m>,
) -> Result<Request, (Error, Option<GuestAddress>)>
where
    M: GuestMemoryBackend,
    C: IntoIterator<Item = Descriptor>,
{
    descs.clear();
    data.clear();
    let mut seen_writable = false;
    let mut misordered = false;
    let mut count = 0usize;
    let mut last = None;
    let mut last_has_next = false;
    // Walk the whole chain (the iterator bounds it) even past MAX_DESCS: its
    // end decides whether it is whole and where its status byte goes.
    for d in chain {
        if d.is_write_only() {
            seen_writable = true;
        } else if seen_writable {
            misordered = true;
        }
        let entry = (d.addr(), d.len(), d.is_write_only());
        if descs.len() < MAX_DESCS {
            descs.push(entry);
        }
        count += 1;
        last = Some(entry);
        last_has_next = d.has_next();
    }
    if last_has_next {
        return Err((Error::BrokenChain, None));
    }
    if misordered {
        return Err((Error::DescriptorOrder, None));
    }
    let status_addr = status_of(last).map_err(|e| (e, None))?;
    let fail = |e: Error| (e, Some(status_addr));
    if count > descs.len() {
        return Err(fail(Error::TooManySegments(count)));
    }
    check_segments(descs).map_err(fail)?;

    // Split the streams: readable (header + out data), writable (in data, less the status byte).
    let readable = descs.iter().take_while(|d| !d.2).count();
    let mut header = [0u8; HEADER_LEN];
    let mut readable_len = 0usize;
    for &(addr, len, _) in &descs[..readable] {
        translate(mem, addr, len, data).map_err(fail)?;
        readable_len += len as usize;
    }
    if readable_len < HEADER_LEN {
        return Err(fail(Error::ShortHeader(readable_len)));
    }
    IoRange::new(data).sub(0, HEADER_LEN).copy_to(&mut header);
    let type_ = u32::from_le_bytes(header[0..4].try_into().unwrap());
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());
    let out_len = readable_len - HEADER_LEN;

    let writable = &descs[readable..];
    let mut in_len = 0usize;
    let n = writable.len();
    let in_bufs_start = data.len();
    for (i, &(addr, len, _)) in writable.iter().enumerate() {
        // The status byte is the last byte of the last descriptor.
        let len = if i + 1 == n { len - 1 } else { len };
        translate(mem, addr, len, data).map_err(fail)?;
        in_len += len as usize;
    }

    let kind = match type_ {
        VIRTIO_BLK_T_IN => RequestType::In,
        VIRTIO_BLK_T_OUT => RequestType::Out,
        VIRTIO_BLK_T_FLUSH => RequestType::Flush,
        VIRTIO_BLK_T_GET_ID => RequestType::GetId,
        VIRTIO_BLK_T_DISCARD => RequestType::Discard,
        VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
        t => return Err(fail(Error::UnsupportedType(t))),
    };
    let layout = |ok: bool| if ok { Ok(()) } else { Err(fail(Error::Layout(type_))) };
    let data_len = match kind {
        RequestType::In => {
            layout(out_len == 0)?;
            data.drain(..in_bufs_start);
            in_len
        }
        RequestType::GetId => {
            layout(out_len == 0)?;
            data.drain(..in_bufs_start);
            in_len.min(VIRTIO_BLK_ID_BYTES as usize)
        }
        RequestType::Out | RequestType::Discard | RequestType::WriteZeroes => {
            layout(in_len == 0)?;
            data.truncate(in_bufs_start);
            // Leave only the data: drop the header's bytes from the front.
            strip_front(data, HEADER_LEN);
            out_len
        }
        RequestType::Flush => {
            layout(out_len == 0 && in_len == 0)?;
            data.clear();
            0
        }
    };
    if data_len > MAX_REQUEST_BYTES as usize {
        return Err(fail(Error::TooLarge(data_len as u64)));
    }
    let data_len = data_len as u32;

    if matches!(kind, RequestType::In | RequestType::Out) {
        if !(data_len as u64).is_multiple_of(SECTOR_SIZE) {
            return Err(fail(Error::Unaligned(data_len as usize)));
        }
        let count = data_len as u64 / SECTOR_SIZE;
        if sector.checked_add(count).is_none_or(|end| end > capacity_sectors) {
            return Err(fail(Error::OutOfRange {
                sector,
                count,
                capacity: capacity_sectors,
            }));
        }
    }
    if matches!(kind, RequestType::Discard | RequestType::WriteZeroes) {
        if !(data_len as usize).is_multiple_of(DISCARD_SEGMENT_LEN) {
            return Err(fail(Error::Layout(type_)));
        }
        let n = data_len as usize / DISCARD_SEGMENT_LEN;
        if n == 0 || n > MAX_DISCARD_SEG as usize {
            return Err(fail(Error::SegmentCount(n)));
        }
    }
    Ok(Request {
        kind,
        offset: sector.wrapping_mul(SECTOR_SIZE),
        data_len,
        status_addr,
    })
}

/// Checks the data segments against SEG_MAX and SIZE_MAX. A segment is a
/// descriptor's data: readable bytes past the header, writable bytes before
/// the status byte.
fn check_segments(descs: &[(GuestAddress, u32, bool)]) -> Result<(), Error> {
    let mut segments = 0usize;
    let mut readable = 0u64;
    let n = descs.len();
    for (i, &(_, len, writable)) in descs.iter().enumerate() {
        let len = u64::from(len);
        let bytes = if !writable {
            let header_left = (HEADER_LEN as u64).saturating_sub(readable);
            readable += len;
            len.saturating_sub(header_left)
        } else if i + 1 == n {
            len - 1
        } else {
            len
        };
        if bytes > 0 {
            segments += 1;
        }
        if bytes > u64::from(SIZE_MAX) {
            return Err(Error::SegmentTooLong(bytes));
        }
    }
    if segments > SEG_MAX as usize {
        return Err(Error::TooManySegments(n));
    }
    Ok(())
}

/// Removes the first `n` bytes of the buffer list.
fn strip_front(bufs: &mut IoBufs<'_>, mut n: usize) {
    let mut drop = 0;
    for b in bufs.iter_mut() {
        if n == 0 {
            break;
        }
        if b.len() <= n {
            n -= b.len();
            drop += 1;
        } else {
            *b = b.skip(n);
            n = 0;
        }
    }
    bufs.drain(..drop);
}

/// Reads and checks the segments of a discard or write-zeroes request.
///
/// All of them are checked before any is returned, so a request with one bad
/// segment changes nothing.
pub fn discard_segments(
    kind: RequestType,
    data: &[IoBuf<'_>],
    capacity_sectors: u64,
) -> Result<Vec<DiscardSegment>, Error> {
    let r = IoRange::new(data);
    let mut segments = Vec::with_capacity(r.len() / DISCARD_SEGMENT_LEN);
    for i in 0..r.len() / DISCARD_SEGMENT_LEN {
        let mut s = [0u8; DISCARD_SEGMENT_LEN];
        r.sub(i * DISCARD_SEGMENT_LEN, DISCARD_SEGMENT_LEN).copy_to(&mut s);
        let sector = u64::from_le_bytes(s[0..8].try_into().unwrap());
        let count = u32::from_le_bytes(s[8..12].try_into().unwrap());
        let flags = u32::from_le_bytes(s[12..16].try_into().unwrap());
        let allowed = match kind {
            RequestType::WriteZeroes => VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
            _ => 0,
        };
        if flags & !allowed != 0 {
            return Err(Error::SegmentFlags(flags));
        }
        if count > MAX_DISCARD_SECTORS {
            return Err(Error::SegmentTooLarge(count));
        }
        if sector
            .checked_add(u64::from(count))
            .is_none_or(|end| end > capacity_sectors)
        {
            return Err(Error::OutOfRange {
                sector,
                count: u64::from(count),
                capacity: capacity_sectors,
            });
        }
        segments.push(DiscardSegment {
            offset: sector * SECTOR_SIZE,
            len: u64::from(count) * SECTOR_SIZE,
            unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
        });
    }
    Ok(segments)
}

/// Writes the status byte; false if the guest gave an address outside its memory.
pub fn write_status<M: GuestMemoryBackend>(mem: &M, addr: GuestAddress, status: u8) -> bool {
    mem.write_obj(status, addr).is_ok()
}
