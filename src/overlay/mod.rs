//! The per-guest redirect-on-write overlay: the guest's writes at 4 KiB
//! granularity in a sparse data file at disk offsets, and the state of every
//! block (base, data, zero) in memory and in a journal.
//!
//! Durability: a write lands in the data file and flips its block's state at
//! once; `flush` makes the data durable first and only then journals the new
//! states, so a crash at any point loses no flushed write and never points a
//! block at data that is not on disk. The base is never touched here.

mod blockmap;
mod journal;

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

pub use blockmap::{BlockMap, BlockState};
use journal::{Header, Journal, MAX_BASE_ID};

use crate::storage::IoRange;
use crate::units::{BlockIdx, BLOCK_SIZE};

/// Lock stripes for read-modify-write of partially written blocks.
const STRIPES: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("create overlay directory {0}")]
    CreateDir(PathBuf, #[source] io::Error),
    #[error("open overlay data file {0}")]
    OpenData(PathBuf, #[source] io::Error),
    #[error("read overlay journal {0}")]
    ReadJournal(PathBuf, #[source] io::Error),
    #[error("overlay journal {0} is damaged: {1}")]
    BadJournal(PathBuf, String),
    #[error("overlay {path} belongs to another disk: it has {found}, this disk has {expected}")]
    Mismatch {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("base identity longer than {MAX_BASE_ID} bytes")]
    BaseIdTooLong,
    #[error("write overlay journal {0}")]
    WriteJournal(PathBuf, #[source] io::Error),
    #[error("read overlay data")]
    ReadData(#[source] io::Error),
    #[error("write overlay data")]
    WriteData(#[source] io::Error),
    #[error("sync overlay data")]
    SyncData(#[source] io::Error),
}

pub struct Overlay {
    data: File,
    map: BlockMap,
    journal: Mutex<Journal>,
    /// Block ranges whose state changed since the last flush took them.
    dirty: Mutex<Vec<(BlockIdx, u64)>>,
    /// Data written since the last flush started: a flush without it skips the fsync.
    written: AtomicBool,
    stripes: [Mutex<()>; STRIPES],
}

impl Overlay {
    /// Opens the overlay in directory `dir`, creating it if absent. An
    /// existing overlay must have been made for the same size and base.
    pub fn open(dir: &Path, disk_size: u64, base_id: &str) -> Result<Self, Error> {
        if base_id.len() > MAX_BASE_ID {
            return Err(Error::BaseIdTooLong);
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::CreateDir(dir.to_path_buf(), e))?;
        let header = Header {
            block_size: BLOCK_SIZE as u32,
            disk_size,
            base_id: base_id.to_string(),
        };
        let map = BlockMap::new(disk_size.div_ceil(BLOCK_SIZE));
        let journal_path = dir.join("journal");
        let data_path = dir.join("data");
        let journal = if journal_path.exists() {
            Journal::open_existing(&journal_path, &header, &map)?
        } else {
            // The data file comes first: a journal without it would be a
            // half-made overlay.
            let data = File::create(&data_path).map_err(|e| Error::OpenData(data_path.clone(), e))?;
            data.sync_all().map_err(|e| Error::OpenData(data_path.clone(), e))?;
            Journal::create(&journal_path, header)?
        };
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&data_path)
            .map_err(|e| Error::OpenData(data_path.clone(), e))?;
        Ok(Overlay {
            data,
            map,
            journal: Mutex::new(journal),
            dirty: Mutex::new(Vec::new()),
            written: AtomicBool::new(false),
            stripes: std::array::from_fn(|_| Mutex::new(())),
        })
    }

    pub fn map(&self) -> &BlockMap {
        &self.map
    }

    pub fn state(&self, b: BlockIdx) -> BlockState {
        self.map.get(b)
    }

    /// Sets the state of `count` blocks from `start`, after their data (if
    /// any) is written; remembers the change for the next flush.
    pub fn set_state(&self, start: BlockIdx, count: u64, state: BlockState) {
        let mut changed = false;
        for b in start.0..start.0 + count {
            changed |= self.map.set(BlockIdx(b), state) != state;
        }
        if changed {
            lock(&self.dirty).push((start, count));
        }
    }

    /// Serialises read-modify-write of one block.
    pub fn lock_block(&self, b: BlockIdx) -> MutexGuard<'_, ()> {
        lock(&self.stripes[(b.0 % STRIPES as u64) as usize])
    }

    pub fn read(&self, offset: u64, dst: IoRange) -> Result<(), Error> {
        dst.read_from(&self.data, offset).map_err(Error::ReadData)
    }

    pub fn write(&self, offset: u64, src: IoRange) -> Result<(), Error> {
        self.written.store(true, Ordering::Release);
        src.write_to(&self.data, offset).map_err(Error::WriteData)
    }

    /// Makes every write and state change that completed before the call durable.
    pub fn flush(&self) -> Result<(), Error> {
        // One flush at a time: a flush must not return before an earlier one
        // that took its dirty ranges has journalled them.
        let mut journal = lock(&self.journal);
        let dirty = std::mem::take(&mut *lock(&self.dirty));
        // Snapshot the states before syncing the data: a state read here was
        // set after its data write, so the sync below covers that data.
        let compact = journal.wants_compaction(dirty.len() as u64);
        let mut runs = Vec::new();
        if !compact {
            // `runs` leaves out base blocks: a block never returns to base.
            for (start, count) in &dirty {
                runs.extend(self.map.runs(*start, *count));
            }
        }
        if self.written.swap(false, Ordering::AcqRel) {
            self.data.sync_data().map_err(Error::SyncData)?;
        }
        if compact {
            journal.compact(&self.map)
        } else {
            journal.append(&runs)
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind;
    // the data stays consistent, so carry on.
    m.lock().unwrap_or_else(|e| e.into_inner())
}
