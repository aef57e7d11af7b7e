//! A disk: a per-guest overlay over a shared base. Takes byte offsets and
//! host buffers; knows nothing of virtio.
//!
//! Reads and writes of local data complete synchronously on the caller's
//! thread. When some base data is not local, an operation returns
//! [`Status::Miss`] with the range to fetch; the caller awaits
//! [`Disk::fetch`] and retries. Operations are idempotent, so a retry after
//! a partial attempt is safe.

mod base;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

pub use crate::storage::{GuestBufs, IoBuf, IoBufs, IoRange};
pub use crate::units::{BlockIdx, BLOCK_SIZE, SECTOR_SIZE};
pub use base::{Base, FetchFuture, LocalBase, LocalBases};

use crate::overlay::{self, BlockState, Overlay};
use crate::profile::TraceRecorder;
use crate::storage::{RealStorage, Storage};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("open base {0}")]
    OpenBase(PathBuf, #[source] io::Error),
    #[error("read base")]
    ReadBase(#[source] io::Error),
    #[error("fetch base data")]
    FetchBase(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("overlay")]
    Overlay(#[from] overlay::Error),
    #[error("disk is read-only")]
    ReadOnly,
    #[error("range {offset}+{len} is beyond the disk's {size} bytes")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("overlay size {overlay} differs from base size {base}")]
    SizeMismatch { overlay: u64, base: u64 },
}

impl Error {
    /// True if the error was already logged once and must not be logged per request.
    pub fn is_repeat(&self) -> bool {
        matches!(self, Error::Overlay(e) if e.is_repeat())
    }
}

/// How an operation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Status {
    Done,
    /// Base data of `offset..offset+len` is not local: fetch it, then retry.
    Miss {
        offset: u64,
        len: u64,
    },
}

pub struct Disk {
    base: Arc<dyn Base>,
    overlay: Overlay,
    size: u64,
    readonly: bool,
    trace: Option<TraceRecorder>,
}

impl Disk {
    pub fn new(base: Arc<dyn Base>, overlay: Overlay, readonly: bool) -> Self {
        let size = base.size();
        Disk {
            base,
            overlay,
            size,
            readonly,
            trace: None,
        }
    }

    /// Records the guest's reads into a boot trace.
    pub fn with_trace(mut self, trace: TraceRecorder) -> Self {
        self.trace = Some(trace);
        self
    }

    /// A frontend attached: starts the clocks of the trace and of the
    /// base's boot profile.
    pub fn attach(&self) {
        if let Some(t) = &self.trace {
            t.attach();
        }
        self.base.attach();
    }

    pub fn trace(&self) -> Option<&TraceRecorder> {
        self.trace.as_ref()
    }

    /// Opens (or creates) the overlay in `dir` over `base`.
    pub fn open(base: Arc<dyn Base>, overlay_dir: &std::path::Path, readonly: bool) -> Result<Self, Error> {
        Self::open_on(RealStorage::shared(), base, overlay_dir, readonly)
    }

    /// Opens (or creates) the overlay in `dir` on `storage` over `base`.
    pub fn open_on(
        storage: Arc<dyn Storage>,
        base: Arc<dyn Base>,
        overlay_dir: &std::path::Path,
        readonly: bool,
    ) -> Result<Self, Error> {
        let overlay = Overlay::open_on(storage, overlay_dir, base.size(), &base.id())?;
        Ok(Disk::new(base, overlay, readonly))
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn readonly(&self) -> bool {
        self.readonly
    }

    pub fn overlay(&self) -> &Overlay {
        &self.overlay
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), Error> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::OutOfRange {
                offset,
                len,
                size: self.size,
            }),
        }
    }

    /// Reads `dst.len()` bytes at `offset` into `dst`. If some base data is
    /// not local, the miss spans all of it, so that one fetch brings every
    /// missing chunk of the read at once.
    pub fn read(&self, offset: u64, dst: IoRange) -> Result<Status, Error> {
        let len = dst.len() as u64;
        self.check_range(offset, len)?;
        let map = self.overlay.map();
        let mut miss: Option<(u64, u64)> = None;
        let mut at = 0u64;
        while at < len {
            // The run of blocks from here that share one state.
            let pos = offset + at;
            let state = map.get(BlockIdx::of(pos));
            let mut end = (BlockIdx::of(pos).0 + 1) * BLOCK_SIZE;
            while end < offset + len && map.get(BlockIdx::of(end)) == state {
                end += BLOCK_SIZE;
            }
            let n = end.min(offset + len) - pos;
            let part = dst.sub(at as usize, n as usize);
            match state {
                // After a miss the read is retried whole: only the rest of
                // the missing base data still matters.
                _ if miss.is_some() && state != BlockState::Base => {}
                BlockState::Data => self.overlay.read(pos, part)?,
                BlockState::Zero => part.fill_zero(),
                BlockState::Base => {
                    if !self.base.read_local(pos, part)? {
                        miss = Some((miss.map_or(pos, |(start, _)| start), pos + n));
                    }
                }
            }
            at += n;
        }
        Ok(match miss {
            Some((start, end)) => Status::Miss {
                offset: start,
                len: end - start,
            },
            None => Status::Done,
        })
    }

    /// Writes `src` at `offset`; `offset` and the length are sector multiples.
    pub fn write(&self, offset: u64, src: IoRange) -> Result<Status, Error> {
        self.write_with(offset, src.len() as u64, Source::Data(src))
    }

    /// Makes `offset..offset+len` read as zeros.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<Status, Error> {
        self.write_with(offset, len, Source::Zeros(len))
    }

    /// Drops the guest's data in the whole blocks of the range: they read as
    /// zeros afterwards. Partial blocks at the edges are left alone (discard
    /// is advisory).
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), Error> {
        if self.readonly {
            return Err(Error::ReadOnly);
        }
        self.check_range(offset, len)?;
        let first = offset.div_ceil(BLOCK_SIZE);
        let end = (offset + len) / BLOCK_SIZE;
        if end > first {
            self.overlay.set_state(BlockIdx(first), end - first, BlockState::Zero)?;
        }
        Ok(())
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> Result<(), Error> {
        Ok(self.overlay.flush()?)
    }

    /// Makes the base data of a range local (see [`Status::Miss`]) for a
    /// request the guest made at `since`.
    pub fn fetch(&self, offset: u64, len: u64, since: std::time::Instant) -> FetchFuture {
        self.base.fetch(offset, len, since)
    }

    fn write_with(&self, offset: u64, len: u64, src: Source) -> Result<Status, Error> {
        if self.readonly {
            return Err(Error::ReadOnly);
        }
        self.check_range(offset, len)?;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let b = BlockIdx::of(pos);
            let block_end = b.offset() + BLOCK_SIZE;
            if pos == b.offset() && end >= block_end {
                // A run of whole blocks: one vectored write, then flip states.
                let run_end = end - (end % BLOCK_SIZE);
                let n = run_end - pos;
                match src {
                    Source::Data(r) => {
                        self.overlay.write(pos, r.sub((pos - offset) as usize, n as usize))?;
                        self.overlay.set_state(b, n / BLOCK_SIZE, BlockState::Data)?;
                    }
                    Source::Zeros(_) => self.overlay.set_state(b, n / BLOCK_SIZE, BlockState::Zero)?,
                }
                pos = run_end;
            } else {
                let n = block_end.min(end) - pos;
                if let Status::Miss { .. } = self.write_partial(b, pos, n, src, offset)? {
                    return Ok(Status::Miss {
                        offset: b.offset(),
                        len: BLOCK_SIZE.min(self.size - b.offset()),
                    });
                }
                pos += n;
            }
        }
        Ok(Status::Done)
    }

    /// Writes `n` bytes at `pos` inside block `b`, merging with the block's
    /// current content if the block is not in the overlay yet.
    fn write_partial(&self, b: BlockIdx, pos: u64, n: u64, src: Source, src_origin: u64) -> Result<Status, Error> {
        let piece = src.sub(pos - src_origin, n);
        if self.overlay.state(b) == BlockState::Data {
            return self.write_in_place(pos, piece).map(|()| Status::Done);
        }
        let _guard = self.overlay.lock_block(b);
        let state = self.overlay.state(b);
        if state == BlockState::Data {
            return self.write_in_place(pos, piece).map(|()| Status::Done);
        }
        // Merge into the block's current content, then write it whole.
        let block_len = BLOCK_SIZE.min(self.size - b.offset()) as usize;
        let mut block = [0u8; BLOCK_SIZE as usize];
        let block = &mut block[..block_len];
        if state == BlockState::Base && !self.base.read_local(b.offset(), IoRange::from_slice(block))? {
            return Ok(Status::Miss {
                offset: b.offset(),
                len: block_len as u64,
            });
        }
        let at = (pos - b.offset()) as usize;
        let dst = &mut block[at..at + n as usize];
        match piece {
            Source::Data(r) => r.copy_to(dst),
            Source::Zeros(_) => dst.fill(0),
        }
        self.overlay.write(b.offset(), IoRange::from_slice(block))?;
        self.overlay.set_state(b, 1, BlockState::Data)?;
        Ok(Status::Done)
    }

    /// Writes a piece of a block that is already in the overlay.
    fn write_in_place(&self, pos: u64, piece: Source) -> Result<(), Error> {
        match piece {
            Source::Data(r) => Ok(self.overlay.write(pos, r)?),
            Source::Zeros(n) => {
                let mut zeros = [0u8; BLOCK_SIZE as usize];
                Ok(self.overlay.write(pos, IoRange::from_slice(&mut zeros[..n as usize]))?)
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Source<'a> {
    Data(IoRange<'a>),
    /// This many zero bytes.
    Zeros(u64),
}

impl<'a> Source<'a> {
    fn sub(&self, offset: u64, len: u64) -> Source<'a> {
        match self {
            Source::Data(r) => Source::Data(r.sub(offset as usize, len as usize)),
            Source::Zeros(_) => Source::Zeros(len),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const SIZE: usize = 64 * 1024 + 3 * 512; // not a multiple of the block size

    #[derive(Clone, Debug)]
    enum Op {
        Write { sector: u64, sectors: u64, seed: u8 },
        Zero { sector: u64, sectors: u64 },
        Discard { sector: u64, sectors: u64 },
        Flush,
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        let max = (SIZE / 512) as u64;
        let range = (0..max).prop_flat_map(move |s| (Just(s), 1..=(max - s).min(40)));
        prop_oneof![
            4 => (range.clone(), any::<u8>()).prop_map(|((sector, sectors), seed)| Op::Write { sector, sectors, seed }),
            1 => range.clone().prop_map(|(sector, sectors)| Op::Zero { sector, sectors }),
            1 => range.prop_map(|(sector, sectors)| Op::Discard { sector, sectors }),
            1 => Just(Op::Flush),
            1 => Just(Op::Reopen),
        ]
    }

    fn read_all(d: &Disk) -> Vec<u8> {
        let mut buf = vec![0u8; SIZE];
        assert_eq!(d.read(0, IoRange::from_slice(&mut buf)).unwrap(), Status::Done);
        buf
    }

    /// A base of `blocks` 4 KiB blocks of which `missing` are not local.
    struct Holes {
        blocks: u64,
        missing: Vec<u64>,
    }

    impl Base for Holes {
        fn size(&self) -> u64 {
            self.blocks * BLOCK_SIZE
        }

        fn id(&self) -> String {
            "holes".into()
        }

        fn read_local(&self, offset: u64, dst: IoRange) -> Result<bool, Error> {
            let blocks = offset / BLOCK_SIZE..(offset + dst.len() as u64).div_ceil(BLOCK_SIZE);
            if self.missing.iter().any(|b| blocks.contains(b)) {
                return Ok(false);
            }
            dst.fill_zero();
            Ok(true)
        }

        fn fetch(&self, _: u64, _: u64, _: std::time::Instant) -> FetchFuture {
            Box::pin(async { Ok(()) })
        }
    }

    #[test]
    fn a_read_misses_all_its_missing_base_data_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let base = Holes {
            blocks: 16,
            missing: vec![2, 9],
        };
        let disk = Disk::open(Arc::new(base), &dir.path().join("ov"), false).unwrap();
        let mut block = vec![7u8; BLOCK_SIZE as usize];
        assert_eq!(
            disk.write(5 * BLOCK_SIZE, IoRange::from_slice(&mut block)).unwrap(),
            Status::Done
        );
        let mut all = vec![0u8; 16 * BLOCK_SIZE as usize];
        match disk.read(0, IoRange::from_slice(&mut all)).unwrap() {
            // Both holes in one miss, whatever lies between them.
            Status::Miss { offset, len } => assert!(
                offset <= 2 * BLOCK_SIZE && offset + len >= 10 * BLOCK_SIZE && offset + len <= 16 * BLOCK_SIZE,
                "miss {offset}+{len}"
            ),
            Status::Done => panic!("a read over missing base data completed"),
        }
        // Reads of local data and of the overlay complete.
        let mut part = vec![0u8; 3 * BLOCK_SIZE as usize];
        assert_eq!(
            disk.read(3 * BLOCK_SIZE, IoRange::from_slice(&mut part)).unwrap(),
            Status::Done
        );
        assert!(part[2 * BLOCK_SIZE as usize..].iter().all(|&b| b == 7));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The disk reads back as a plain byte array with the same operations
        /// applied would, across flushes and reopens, and the base never changes.
        #[test]
        fn overlay_matches_a_byte_array_model(ops in prop::collection::vec(op(), 1..40)) {
            let dir = tempfile::tempdir().unwrap();
            let base_path = dir.path().join("base");
            let base: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8 + 1).collect();
            std::fs::write(&base_path, &base).unwrap();
            let open = || Disk::open(Arc::new(LocalBase::open(&base_path).unwrap()), &dir.path().join("ov"), false).unwrap();
            let mut disk = open();
            let mut model = base.clone();
            for op in ops {
                match op {
                    Op::Write { sector, sectors, seed } => {
                        let (o, n) = (sector as usize * 512, sectors as usize * 512);
                        let mut data: Vec<u8> = (0..n).map(|i| seed.wrapping_add(i as u8 / 7)).collect();
                        prop_assert_eq!(disk.write(o as u64, IoRange::from_slice(&mut data)).unwrap(), Status::Done);
                        model[o..o + n].copy_from_slice(&data);
                    }
                    Op::Zero { sector, sectors } => {
                        let (o, n) = (sector as usize * 512, sectors as usize * 512);
                        prop_assert_eq!(disk.write_zeroes(o as u64, n as u64).unwrap(), Status::Done);
                        model[o..o + n].fill(0);
                    }
                    Op::Discard { sector, sectors } => {
                        let (o, n) = (sector * 512, sectors * 512);
                        disk.discard(o, n).unwrap();
                        let (first, end) = (o.div_ceil(BLOCK_SIZE) * BLOCK_SIZE, (o + n) / BLOCK_SIZE * BLOCK_SIZE);
                        if end > first {
                            model[first as usize..end as usize].fill(0);
                        }
                    }
                    Op::Flush => disk.flush().unwrap(),
                    Op::Reopen => {
                        // A clean reopen keeps what was flushed; flush first so all of it is.
                        disk.flush().unwrap();
                        drop(disk);
                        disk = open();
                    }
                }
                prop_assert!(read_all(&disk) == model);
            }
            prop_assert!(std::fs::read(&base_path).unwrap() == base);
        }
    }

    #[test]
    fn an_overlay_is_refused_over_a_replaced_base_of_the_same_size() {
        let dir = tempfile::tempdir().unwrap();
        let base_path = dir.path().join("base");
        std::fs::write(&base_path, vec![1u8; 8192]).unwrap();
        let ov = dir.path().join("ov");
        drop(Disk::open(Arc::new(LocalBase::open(&base_path).unwrap()), &ov, false).unwrap());
        // The same path and size, other content: a new file put in place.
        let tmp = dir.path().join("new");
        std::fs::write(&tmp, vec![2u8; 8192]).unwrap();
        std::fs::rename(&tmp, &base_path).unwrap();
        let err = Disk::open(Arc::new(LocalBase::open(&base_path).unwrap()), &ov, false)
            .err()
            .expect("an overlay of the old base opened over the new one");
        assert!(matches!(err, Error::Overlay(overlay::Error::Mismatch { .. })), "{err}");
    }

    #[test]
    fn out_of_range_and_readonly_writes_fail() {
        let dir = tempfile::tempdir().unwrap();
        let base_path = dir.path().join("base");
        std::fs::write(&base_path, vec![1u8; 8192]).unwrap();
        let d = Disk::open(
            Arc::new(LocalBase::open(&base_path).unwrap()),
            &dir.path().join("ov"),
            true,
        )
        .unwrap();
        let mut buf = vec![0u8; 512];
        assert!(matches!(
            d.write(0, IoRange::from_slice(&mut buf)),
            Err(Error::ReadOnly)
        ));
        assert!(matches!(d.write_zeroes(0, 512), Err(Error::ReadOnly)));
        assert!(matches!(
            d.read(8192 - 256, IoRange::from_slice(&mut buf)),
            Err(Error::OutOfRange { .. })
        ));
        assert!(matches!(
            d.read(u64::MAX - 10, IoRange::from_slice(&mut buf)),
            Err(Error::OutOfRange { .. })
        ));
    }
}
