//! The per-guest redirect-on-write overlay: the guest's writes at 4 KiB
//! granularity in a sparse data file at disk offsets, and the state of every
//! block (base, data, zero) in memory and in a journal. Does its file I/O
//! through [`crate::storage`]; never touches the base.
//!
//! Ordering, the whole durability argument:
//! - a write puts its data in the data file, and only then journals the
//!   block's new state and publishes it in memory; so a state never points at
//!   data that was not written first, and a completed write is in the page
//!   cache (data and state) where a restarted daemon finds it;
//! - a flush notes the journal's end, syncs the data file (every write that
//!   completed before the flush started is below that end and in the data
//!   file), then appends a commit of that end and syncs the journal;
//! - after a power cut, replay trusts only what a commit covers.
//!
//! A failed sync or journal write makes the overlay fail-stop: every later
//! write and flush fails, reads keep working, and nothing acknowledged is
//! dropped. A full device fails the write that met it, and nothing else.

mod blockmap;
mod journal;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, MutexGuard};

pub use blockmap::{BlockMap, BlockState};
use journal::{AppendError, Identity, Journal, MAX_BASE_ID};

use crate::storage::sched::Mutex;
use crate::storage::{parent_of, IoRange, RealStorage, Storage, StorageFile};
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
    #[error("no space left for the overlay")]
    NoSpace(#[source] io::Error),
    #[error("sync overlay data")]
    SyncData(#[source] io::Error),
    #[error("overlay stopped after an earlier sync or journal failure; restart the daemon once the device is healthy")]
    Failed,
}

impl Error {
    /// True if this error was already logged once for the overlay (fail-stop)
    /// and must not be logged again per request.
    pub fn is_repeat(&self) -> bool {
        matches!(self, Error::Failed)
    }
}

pub struct Overlay {
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    data: Arc<dyn StorageFile>,
    map: BlockMap,
    journal: Mutex<Journal>,
    /// One flush (or compaction) at a time.
    flush: Mutex<FlushState>,
    /// Data writes that have returned; a flush with none since its last
    /// sync skips the sync.
    written: AtomicU64,
    failed: AtomicBool,
    /// Set while writes meet a full device, to log that once.
    full: AtomicBool,
    stripes: [Mutex<()>; STRIPES],
}

struct FlushState {
    /// `written` when the last data sync started.
    synced: u64,
}

impl Overlay {
    /// Opens the overlay in directory `dir` on the real file system.
    pub fn open(dir: &Path, disk_size: u64, base_id: &str) -> Result<Self, Error> {
        Self::open_on(RealStorage::shared(), dir, disk_size, base_id)
    }

    /// Opens the overlay in directory `dir`, creating it if absent. An
    /// existing overlay must have been made for the same size and base.
    pub fn open_on(storage: Arc<dyn Storage>, dir: &Path, disk_size: u64, base_id: &str) -> Result<Self, Error> {
        if base_id.len() > MAX_BASE_ID {
            return Err(Error::BaseIdTooLong);
        }
        storage
            .create_dir_all(dir)
            .map_err(|e| Error::CreateDir(dir.to_path_buf(), e))?;
        let identity = Identity {
            block_size: BLOCK_SIZE as u32,
            disk_size,
            base_id: base_id.to_string(),
        };
        let map = BlockMap::new(disk_size.div_ceil(BLOCK_SIZE));
        let journal_path = dir.join("journal");
        let data_path = dir.join("data");
        let data_err = |e| Error::OpenData(data_path.clone(), e);
        let journal_exists = storage
            .exists(&journal_path)
            .map_err(|e| Error::ReadJournal(journal_path.clone(), e))?;
        let (data, journal) = if journal_exists {
            let data = storage.open(&data_path, false).map_err(data_err)?;
            let (journal, replay) =
                Journal::open(storage.clone(), &journal_path, &identity, &map, || data.sync_data())?;
            tracing::debug!(
                dir = %dir.display(),
                records = replay.records,
                machine_restarted = replay.after_restart_of_machine,
                "overlay journal replayed"
            );
            if replay.dropped > 0 {
                tracing::warn!(
                    dir = %dir.display(),
                    dropped = replay.dropped,
                    "overlay: the machine restarted since the last flush; unflushed writes are gone, as after any power cut"
                );
            }
            (data, journal)
        } else {
            // The data file is durable before the journal exists: a journal
            // without its data would be a half-made overlay.
            let data = storage.open(&data_path, true).map_err(data_err)?;
            data.set_len(0).map_err(data_err)?;
            data.sync_data().map_err(data_err)?;
            storage.sync_dir(&parent_of(&data_path)).map_err(data_err)?;
            (data, Journal::create(storage.clone(), &journal_path, identity)?)
        };
        Ok(Overlay {
            storage,
            dir: dir.to_path_buf(),
            data,
            map,
            journal: Mutex::new(journal),
            flush: Mutex::new(FlushState { synced: 0 }),
            written: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            full: AtomicBool::new(false),
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
    /// any) is written: journals the change, then publishes it.
    pub fn set_state(&self, start: BlockIdx, count: u64, state: BlockState) -> Result<(), Error> {
        self.check()?;
        if (start.0..start.0 + count).all(|b| self.map.get(BlockIdx(b)) == state) {
            return Ok(());
        }
        {
            let mut journal = self.journal.lock();
            self.check()?;
            match journal.append_state(start, count, state) {
                Ok(()) => {}
                Err(AppendError::NoSpace(e)) => return Err(self.no_space(e)),
                Err(AppendError::Io(e)) => {
                    return Err(self.fail(Error::WriteJournal(self.dir.join("journal"), e)));
                }
            }
            // Published under the journal's lock, so the journal's order of
            // changes is the order readers saw.
            for b in start.0..start.0 + count {
                self.map.set(BlockIdx(b), state);
            }
            if !journal.wants_compaction() {
                self.full.store(false, Ordering::Relaxed);
                return Ok(());
            }
        }
        // A guest that never flushes still gets its journal compacted.
        let mut flush = self.flush.lock();
        self.compact_if_wanted(&mut flush)
    }

    /// Serialises read-modify-write of one block.
    pub fn lock_block(&self, b: BlockIdx) -> MutexGuard<'_, ()> {
        self.stripes[(b.0 % STRIPES as u64) as usize].lock()
    }

    pub fn read(&self, offset: u64, dst: IoRange) -> Result<(), Error> {
        self.data.read_at(dst, offset).map_err(Error::ReadData)
    }

    /// Writes data for blocks whose state the caller sets afterwards (or
    /// that are already Data).
    pub fn write(&self, offset: u64, src: IoRange) -> Result<(), Error> {
        self.check()?;
        match self.data.write_at(src, offset) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return Err(self.no_space(e)),
            Err(e) => return Err(Error::WriteData(e)),
        }
        // Counted after the data is in the file: a flush that sees the count
        // syncs this data.
        self.written.fetch_add(1, Ordering::Release);

        Ok(())
    }

    /// Makes every write and state change that completed before the call durable.
    pub fn flush(&self) -> Result<(), Error> {
        let mut flush = self.flush.lock();
        self.check()?;
        // Every change that completed before this call is journalled below
        // `upto`, and its data was written before `written` was read.
        let upto = self.journal.lock().next_slot();
        self.sync_data(&mut flush)?;
        let mut journal = self.journal.lock();
        match journal.commit(upto) {
            Ok(()) => {}
            // No commit was written: this flush fails, nothing is lost, and
            // a later one may succeed.
            Err(AppendError::NoSpace(e)) => return Err(self.no_space(e)),
            Err(AppendError::Io(e)) => {
                return Err(self.fail(Error::WriteJournal(self.dir.join("journal"), e)));
            }
        }
        drop(journal);
        self.compact_if_wanted(&mut flush)
    }

    fn sync_data(&self, flush: &mut FlushState) -> Result<(), Error> {
        let written = self.written.load(Ordering::Acquire);
        if written != flush.synced {
            if let Err(e) = self.data.sync_data() {
                // After a failed sync the kernel may have dropped the pages:
                // retrying could "succeed" without the data (fsyncgate).
                return Err(self.fail(Error::SyncData(e)));
            }
            flush.synced = written;
        }
        Ok(())
    }

    fn compact_if_wanted(&self, flush: &mut FlushState) -> Result<(), Error> {
        let mut journal = self.journal.lock();
        if !journal.wants_compaction() {
            return Ok(());
        }
        self.check()?;
        // The snapshot claims every Data block's data is durable: sync it
        // with state changes held off.
        self.sync_data(flush)?;
        if let Err(e) = journal.compact(&self.map) {
            // Until the rename, the old journal stands; after it, the
            // directory sync failed and nothing can be trusted to stay.
            return Err(self.fail(e));
        }
        Ok(())
    }

    fn check(&self) -> Result<(), Error> {
        if self.failed.load(Ordering::Acquire) {
            Err(Error::Failed)
        } else {
            Ok(())
        }
    }

    /// Stops the overlay (fail-stop) and logs why, once.
    fn fail(&self, e: Error) -> Error {
        if !self.failed.swap(true, Ordering::AcqRel) {
            tracing::error!(
                dir = %self.dir.display(),
                error = %crate::DisplayChain(&e),
                "overlay failed: later writes and flushes of this disk get IOERR; reads and other disks go on"
            );
        }
        e
    }

    /// A write met a full device: that write fails, the overlay goes on.
    fn no_space(&self, e: io::Error) -> Error {
        if !self.full.swap(true, Ordering::Relaxed) {
            tracing::warn!(dir = %self.dir.display(), "overlay: device full; writes fail with IOERR until space is freed");
        }
        Error::NoSpace(e)
    }

    /// The storage the overlay lives on.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }
}
