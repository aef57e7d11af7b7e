//! The overlay's index on disk: a header, then fixed-size slots, each holding
//! one record: a block-state change (written when the change is made, before
//! the request completes, so a restarted daemon finds it in the page cache)
//! or a commit (written at flush, after the data it covers is synced).
//!
//! Replay trusts every record when the machine has not restarted since the
//! journal was written (the page cache survived; only the daemon died), and
//! after a power cut only the records a commit covers. Every open rewrites
//! the journal as a snapshot (a new generation), so records a power cut made
//! untrustworthy are never looked at again.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::blockmap::{BlockMap, BlockState};
use super::Error;
use crate::storage::{parent_of, Storage, StorageFile};
use crate::units::BlockIdx;

const MAGIC: &[u8; 8] = b"SBLKOVL\0";
const VERSION: u32 = 2;
pub const HEADER_LEN: u64 = 4096;
pub const RECORD_LEN: u64 = 32;
/// Longest base identity the header stores.
pub const MAX_BASE_ID: usize = 3000;
const MAX_BOOT_ID: usize = 128;
/// Slots reserved on the device ahead of use, so that appending a record
/// rarely meets a full device: a quarter of the journal, within these bounds.
const ALLOCATE_MIN: u64 = 128;
const ALLOCATE_MAX: u64 = 32 * 1024;

fn allocate_ahead(slots: u64) -> u64 {
    (slots / 4).clamp(ALLOCATE_MIN, ALLOCATE_MAX)
}

const KIND_DATA: u8 = BlockState::Data as u8;
const KIND_ZERO: u8 = BlockState::Zero as u8;
const KIND_COMMIT: u8 = b'C';

/// What an overlay was made for; opening it for anything else is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub block_size: u32,
    pub disk_size: u64,
    pub base_id: String,
}

/// The journal file's header: the identity, the generation its records are
/// sealed with, and the boot it was written in.
#[derive(Clone, Debug)]
struct Header {
    identity: Identity,
    generation: u64,
    boot_id: String,
}

impl Header {
    fn encode(&self) -> Vec<u8> {
        let mut h = vec![0u8; HEADER_LEN as usize];
        h[0..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&self.identity.block_size.to_le_bytes());
        h[16..24].copy_from_slice(&self.identity.disk_size.to_le_bytes());
        h[24..32].copy_from_slice(&self.generation.to_le_bytes());
        let boot = self.boot_id.as_bytes();
        h[32] = boot.len() as u8;
        h[33..33 + boot.len()].copy_from_slice(boot);
        let id = self.identity.base_id.as_bytes();
        let at = 33 + MAX_BOOT_ID;
        h[at..at + 2].copy_from_slice(&(id.len() as u16).to_le_bytes());
        h[at + 2..at + 2 + id.len()].copy_from_slice(id);
        let n = h.len();
        let crc = crc32fast::hash(&h[..n - 4]);
        h[n - 4..].copy_from_slice(&crc.to_le_bytes());
        h
    }

    fn decode(h: &[u8]) -> Result<Self, String> {
        let n = HEADER_LEN as usize;
        if h.len() < n {
            return Err("header is short".into());
        }
        let h = &h[..n];
        if &h[0..8] != MAGIC {
            return Err("not a streamblk overlay journal (bad magic)".into());
        }
        let version = u32::from_le_bytes(h[8..12].try_into().unwrap());
        if version != VERSION {
            return Err(format!(
                "journal version {version}; this streamblk reads version {VERSION}"
            ));
        }
        if u32::from_le_bytes(h[n - 4..].try_into().unwrap()) != crc32fast::hash(&h[..n - 4]) {
            return Err("header checksum mismatch".into());
        }
        let boot_len = h[32] as usize;
        let at = 33 + MAX_BOOT_ID;
        let id_len = u16::from_le_bytes(h[at..at + 2].try_into().unwrap()) as usize;
        if boot_len > MAX_BOOT_ID || id_len > MAX_BASE_ID {
            return Err("header field too long".into());
        }
        Ok(Header {
            identity: Identity {
                block_size: u32::from_le_bytes(h[12..16].try_into().unwrap()),
                disk_size: u64::from_le_bytes(h[16..24].try_into().unwrap()),
                base_id: String::from_utf8_lossy(&h[at + 2..at + 2 + id_len]).into_owned(),
            },
            generation: u64::from_le_bytes(h[24..32].try_into().unwrap()),
            boot_id: String::from_utf8_lossy(&h[33..33 + boot_len]).into_owned(),
        })
    }
}

/// One slot's content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Record {
    State {
        start: BlockIdx,
        count: u64,
        state: BlockState,
    },
    /// Every slot below `upto` is durable, and so is the data its records describe.
    Commit { upto: u64 },
}

fn encode(generation: u64, slot: u64, r: Record) -> [u8; RECORD_LEN as usize] {
    let mut b = [0u8; RECORD_LEN as usize];
    b[0..8].copy_from_slice(&slot.to_le_bytes());
    match r {
        Record::State { start, count, state } => {
            b[8..16].copy_from_slice(&start.0.to_le_bytes());
            b[16..24].copy_from_slice(&count.to_le_bytes());
            b[24] = state as u8;
        }
        Record::Commit { upto } => {
            b[8..16].copy_from_slice(&upto.to_le_bytes());
            b[24] = KIND_COMMIT;
        }
    }
    let crc = seal(generation, &b[..28]);
    b[28..32].copy_from_slice(&crc.to_le_bytes());
    b
}

/// A record's checksum covers its generation, so a record of an older
/// generation never passes for a current one.
fn seal(generation: u64, body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&generation.to_le_bytes());
    h.update(body);
    h.finalize()
}

enum Slot {
    /// Never written: a write that reserved the slot did not finish.
    Empty,
    Valid(Record),
    Bad(&'static str),
}

fn decode(generation: u64, slot: u64, b: &[u8], blocks: u64) -> Slot {
    if b.iter().all(|&x| x == 0) {
        return Slot::Empty;
    }
    if u32::from_le_bytes(b[28..32].try_into().unwrap()) != seal(generation, &b[..28]) {
        return Slot::Bad("checksum mismatch");
    }
    if u64::from_le_bytes(b[0..8].try_into().unwrap()) != slot {
        return Slot::Bad("sequence number out of place");
    }
    let a = u64::from_le_bytes(b[8..16].try_into().unwrap());
    let count = u64::from_le_bytes(b[16..24].try_into().unwrap());
    match b[24] {
        KIND_COMMIT if a <= slot => Slot::Valid(Record::Commit { upto: a }),
        KIND_DATA | KIND_ZERO if a.checked_add(count).is_some_and(|end| end <= blocks) && count > 0 => {
            Slot::Valid(Record::State {
                start: BlockIdx(a),
                count,
                state: BlockState::from_bits(b[24]).unwrap(),
            })
        }
        _ => Slot::Bad("invalid record"),
    }
}

/// The journal of an open overlay. Callers serialise access (a lock).
pub struct Journal {
    storage: Arc<dyn Storage>,
    path: PathBuf,
    file: Arc<dyn StorageFile>,
    header: Header,
    /// The next free slot.
    next: u64,
    /// Slots backed by space reserved on the device.
    allocated: u64,
    /// Slots covered by the last durable commit.
    committed: u64,
    /// `next` when the journal was last synced.
    synced: u64,
    /// Slots the last snapshot wrote; growth past it triggers compaction.
    snapshot: u64,
}

/// What replay found, for the open's log line.
#[derive(Debug, Default)]
pub struct Replay {
    pub records: u64,
    /// Records a power cut made untrustworthy (written after the last commit).
    pub dropped: u64,
    pub after_restart_of_machine: bool,
}

impl Journal {
    /// Creates a journal for an empty overlay, durably (file and name).
    pub fn create(storage: Arc<dyn Storage>, path: &Path, identity: Identity) -> Result<Self, Error> {
        let boot_id = boot_id(&*storage, path)?;
        let header = Header {
            identity,
            generation: 1,
            boot_id,
        };
        Self::write_snapshot(storage, path, header, &BlockMap::new(0))
    }

    /// Opens a journal, checks it is for `expect`, replays it into `map`,
    /// and rewrites it as a snapshot. `sync_data` must make the overlay's
    /// data durable: it runs before the snapshot claims that data is.
    pub fn open(
        storage: Arc<dyn Storage>,
        path: &Path,
        expect: &Identity,
        map: &BlockMap,
        sync_data: impl FnOnce() -> io::Result<()>,
    ) -> Result<(Self, Replay), Error> {
        let read_err = |e| Error::ReadJournal(path.to_path_buf(), e);
        let file = storage.open(path, false).map_err(read_err)?;
        let len = file.len().map_err(read_err)?;
        let mut head = vec![0u8; HEADER_LEN as usize];
        file.read_exact_at(&mut head, 0).map_err(read_err)?;
        let bad = |why| Error::BadJournal(path.to_path_buf(), why);
        let len_body = len.saturating_sub(HEADER_LEN);
        let mut body = vec![0u8; len_body as usize];
        file.read_exact_at(&mut body, HEADER_LEN).map_err(read_err)?;
        if u32::from_le_bytes(head[8..12].try_into().unwrap()) == 1 && &head[0..8] == MAGIC {
            let found = v1::replay(&head, &body, map, expect).map_err(bad)?;
            tracing::info!(path = %path.display(), records = found, "overlay journal: migrated from version 1");
            sync_data().map_err(Error::SyncData)?;
            let header = Header {
                identity: expect.clone(),
                generation: 1,
                boot_id: boot_id(&*storage, path)?,
            };
            let journal = Self::write_snapshot(storage, path, header, map)?;
            let replay = Replay {
                records: found,
                ..Replay::default()
            };
            return Ok((journal, replay));
        }
        let header = Header::decode(&head).map_err(bad)?;
        if header.identity != *expect {
            let describe = |i: &Identity| {
                format!(
                    "disk size {} block size {} base {:?}",
                    i.disk_size, i.block_size, i.base_id
                )
            };
            return Err(Error::Mismatch {
                path: path.to_path_buf(),
                found: describe(&header.identity),
                expected: describe(expect),
            });
        }
        body.truncate((len_body / RECORD_LEN * RECORD_LEN) as usize);
        let same_boot = boot_id(&*storage, path)? == header.boot_id;
        let replay = replay(&header, &body, map, same_boot)
            .map_err(|(slot, why)| Error::BadJournal(path.to_path_buf(), format!("slot {slot}: {why}")))?;
        // The replayed states are now the truth: make their data durable,
        // then seal them in a new generation.
        sync_data().map_err(Error::SyncData)?;
        let header = Header {
            generation: header.generation + 1,
            boot_id: boot_id(&*storage, path)?,
            ..header
        };
        let journal = Self::write_snapshot(storage, path, header, map)?;
        Ok((journal, replay))
    }

    /// Writes `map` as the whole journal of a new generation, then installs
    /// it over `path` atomically and durably.
    fn write_snapshot(storage: Arc<dyn Storage>, path: &Path, header: Header, map: &BlockMap) -> Result<Self, Error> {
        let tmp = path.with_extension("new");
        let err = |e| Error::WriteJournal(tmp.clone(), e);
        let file = storage.open(&tmp, true).map_err(err)?;
        file.set_len(0).map_err(err)?;
        let mut buf = header.encode();
        let mut slot = 0u64;
        let mut at = 0u64;
        for (start, count, state) in map.runs(BlockIdx(0), map.blocks()) {
            buf.extend_from_slice(&encode(header.generation, slot, Record::State { start, count, state }));
            slot += 1;
            if buf.len() >= 1 << 20 {
                file.write_all_at(&buf, at).map_err(err)?;
                at += buf.len() as u64;
                buf.clear();
            }
        }
        buf.extend_from_slice(&encode(header.generation, slot, Record::Commit { upto: slot }));
        slot += 1;
        file.write_all_at(&buf, at).map_err(err)?;
        let allocated = slot + allocate_ahead(slot);
        file.allocate(HEADER_LEN, allocated * RECORD_LEN).map_err(err)?;
        file.sync_data().map_err(err)?;
        storage.rename(&tmp, path).map_err(err)?;
        storage
            .sync_dir(&parent_of(path))
            .map_err(|e| Error::WriteJournal(path.to_path_buf(), e))?;
        Ok(Journal {
            storage,
            path: path.to_path_buf(),
            file,
            header,
            next: slot,
            allocated,
            committed: slot,
            synced: slot,
            snapshot: slot,
        })
    }

    /// Slots used so far: every record appended before is below it.
    pub fn next_slot(&self) -> u64 {
        self.next
    }

    /// Appends a state change (not synced: a flush's commit makes it durable).
    pub fn append_state(&mut self, start: BlockIdx, count: u64, state: BlockState) -> Result<(), AppendError> {
        self.append(Record::State { start, count, state })
    }

    /// Appends a commit of every slot below `upto` and makes the journal
    /// durable. The caller has synced the data those slots describe.
    pub fn commit(&mut self, upto: u64) -> Result<(), AppendError> {
        if upto > self.committed {
            self.append(Record::Commit { upto })?;
        }
        if self.next != self.synced {
            self.file.sync_data().map_err(AppendError::Io)?;
            self.synced = self.next;
        }
        self.committed = self.committed.max(upto);
        Ok(())
    }

    fn append(&mut self, r: Record) -> Result<(), AppendError> {
        if self.next == self.allocated {
            let more = allocate_ahead(self.allocated);
            self.file
                .allocate(HEADER_LEN + self.allocated * RECORD_LEN, more * RECORD_LEN)
                .map_err(AppendError::from_io)?;
            self.allocated += more;
        }
        let slot = self.next;
        // The slot is used even if the write fails: a failed write leaves it
        // empty (replay skips empty slots) and the next record goes after it.
        self.next += 1;
        self.file
            .write_all_at(&encode(self.header.generation, slot, r), HEADER_LEN + slot * RECORD_LEN)
            .map_err(AppendError::from_io)
    }

    /// True when the journal has grown well past its last snapshot: a new
    /// snapshot then costs no more than the appends since the last one.
    pub fn wants_compaction(&self) -> bool {
        self.next - self.snapshot > (2 * self.snapshot).max(1 << 20)
    }

    /// Replaces the journal by a snapshot of `map`. The caller has synced
    /// the data of every Data block in `map`, and holds off state changes.
    pub fn compact(&mut self, map: &BlockMap) -> Result<(), Error> {
        let header = Header {
            generation: self.header.generation + 1,
            ..self.header.clone()
        };
        *self = Self::write_snapshot(self.storage.clone(), &self.path, header, map)?;
        Ok(())
    }
}

/// Journals of streamblk before version 2: records written only at flush,
/// after their data was synced, so every whole record is trusted; a torn
/// tail is dropped.
mod v1 {
    use super::{BlockMap, BlockState, Identity, HEADER_LEN};
    use crate::units::BlockIdx;

    const RECORD_LEN: usize = 24;

    /// Replays a version 1 journal into `map`; returns the records applied.
    pub fn replay(head: &[u8], body: &[u8], map: &BlockMap, expect: &Identity) -> Result<u64, String> {
        let n = HEADER_LEN as usize;
        if u32::from_le_bytes(head[n - 4..n].try_into().unwrap()) != crc32fast::hash(&head[..n - 4]) {
            return Err("version 1 header checksum mismatch".into());
        }
        let block_size = u32::from_le_bytes(head[12..16].try_into().unwrap());
        let disk_size = u64::from_le_bytes(head[16..24].try_into().unwrap());
        let id_len = (u16::from_le_bytes(head[24..26].try_into().unwrap()) as usize).min(n - 30);
        let base_id = String::from_utf8_lossy(&head[26..26 + id_len]);
        // Version 1 named a file base by path and size only: that prefix of
        // today's identity is the same base.
        let same_base = base_id == expect.base_id || expect.base_id.starts_with(&format!("{base_id}:"));
        if block_size != expect.block_size || disk_size != expect.disk_size || !same_base {
            return Err(format!(
                "version 1 overlay of another disk (size {disk_size}, base {base_id:?}); this disk has size {}, base {:?}",
                expect.disk_size, expect.base_id
            ));
        }
        let mut records = 0;
        for r in body.chunks_exact(RECORD_LEN) {
            if u32::from_le_bytes(r[16..20].try_into().unwrap()) != crc32fast::hash(&r[..16]) {
                break;
            }
            let start = u64::from_le_bytes(r[0..8].try_into().unwrap());
            let count = u32::from_le_bytes(r[8..12].try_into().unwrap()) as u64;
            let Some(state) = BlockState::from_bits(r[12]) else {
                break;
            };
            if start.checked_add(count).is_none_or(|end| end > map.blocks()) {
                break;
            }
            for b in start..start + count {
                map.set(BlockIdx(b), state);
            }
            records += 1;
        }
        Ok(records)
    }
}

/// Why an append failed: a full device is the write's failure; anything
/// else is the journal's.
#[derive(Debug)]
pub enum AppendError {
    NoSpace(io::Error),
    Io(io::Error),
}

impl AppendError {
    fn from_io(e: io::Error) -> Self {
        if e.raw_os_error() == Some(libc::ENOSPC) {
            AppendError::NoSpace(e)
        } else {
            AppendError::Io(e)
        }
    }
}

fn boot_id(storage: &dyn Storage, path: &Path) -> Result<String, Error> {
    let mut id = storage
        .boot_id()
        .map_err(|e| Error::ReadJournal(path.to_path_buf(), e))?;
    id.truncate(MAX_BOOT_ID);
    Ok(id)
}

/// Applies the trusted records of `body` to `map`; on damage, the slot and why.
fn replay(header: &Header, body: &[u8], map: &BlockMap, same_boot: bool) -> Result<Replay, (u64, &'static str)> {
    let generation = header.generation;
    let slots: Vec<Slot> = body
        .chunks_exact(RECORD_LEN as usize)
        .enumerate()
        .map(|(i, b)| decode(generation, i as u64, b, map.blocks()))
        .collect();
    // After a power cut only what a commit covers is known to be whole:
    // the data of later records may never have reached the device.
    let trusted = if same_boot {
        slots.len() as u64
    } else {
        slots
            .iter()
            .filter_map(|s| match s {
                Slot::Valid(Record::Commit { upto }) => Some(*upto),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    };
    let mut out = Replay {
        after_restart_of_machine: !same_boot,
        ..Replay::default()
    };
    for (i, s) in slots.iter().enumerate() {
        let i = i as u64;
        if i >= trusted {
            if matches!(s, Slot::Valid(Record::State { .. })) {
                out.dropped += 1;
            }
            continue;
        }
        match *s {
            Slot::Empty | Slot::Valid(Record::Commit { .. }) => {}
            Slot::Valid(Record::State { start, count, state }) => {
                for b in start.0..start.0 + count {
                    map.set(BlockIdx(b), state);
                }
                out.records += 1;
            }
            // A damaged record inside the trusted part is not a torn tail:
            // cutting there would silently drop acknowledged writes.
            Slot::Bad(why) => return Err((i, why)),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::sim::SimStorage;

    fn identity() -> Identity {
        Identity {
            block_size: 4096,
            disk_size: 1 << 20,
            base_id: "test".into(),
        }
    }

    fn setup() -> (SimStorage, Arc<dyn Storage>, PathBuf) {
        let sim = SimStorage::new(1);
        let storage: Arc<dyn Storage> = Arc::new(sim.clone());
        storage.create_dir_all(Path::new("/ov")).unwrap();
        (sim, storage, PathBuf::from("/ov/journal"))
    }

    fn reopen(storage: &Arc<dyn Storage>, path: &Path) -> Result<(BlockMap, Journal, Replay), Error> {
        let map = BlockMap::new(256);
        let (j, r) = Journal::open(storage.clone(), path, &identity(), &map, || Ok(()))?;
        Ok((map, j, r))
    }

    #[test]
    fn records_survive_a_process_crash_and_only_committed_ones_a_power_cut() {
        let (sim, storage, path) = setup();
        let mut j = Journal::create(storage.clone(), &path, identity()).unwrap();
        j.append_state(BlockIdx(3), 2, BlockState::Data).unwrap();
        let upto = j.next_slot();
        j.commit(upto).unwrap();
        j.append_state(BlockIdx(9), 1, BlockState::Zero).unwrap();
        drop(j);

        sim.process_crash();
        let (map, j, r) = reopen(&storage, &path).unwrap();
        assert_eq!((r.records, r.dropped, r.after_restart_of_machine), (2, 0, false));
        assert_eq!(map.get(BlockIdx(4)), BlockState::Data);
        assert_eq!(map.get(BlockIdx(9)), BlockState::Zero);
        drop(j);

        let (_, mut j, _) = reopen(&storage, &path).unwrap();
        j.append_state(BlockIdx(20), 1, BlockState::Data).unwrap();
        j.file.sync_data().unwrap(); // durable, but no commit covers it
        drop(j);
        sim.power_cut();
        let (map, _, r) = reopen(&storage, &path).unwrap();
        assert!(r.after_restart_of_machine);
        assert_eq!(r.dropped, 1);
        assert_eq!(
            map.get(BlockIdx(20)),
            BlockState::Base,
            "an uncommitted record was trusted"
        );
        assert_eq!(
            map.get(BlockIdx(9)),
            BlockState::Zero,
            "the snapshot lost a committed state"
        );
    }

    #[test]
    fn damage_inside_the_trusted_part_is_an_error_not_a_cut() {
        let (sim, storage, path) = setup();
        let mut j = Journal::create(storage.clone(), &path, identity()).unwrap();
        for b in 0..4 {
            j.append_state(BlockIdx(b), 1, BlockState::Data).unwrap();
        }
        let upto = j.next_slot();
        j.commit(upto).unwrap();
        drop(j);
        let f = storage.open(&path, false).unwrap();
        // Slot 0 is the snapshot's commit; damage the second state record.
        f.write_all_at(&[0xff; 4], HEADER_LEN + 2 * RECORD_LEN + 8).unwrap();
        f.sync_data().unwrap();
        sim.power_cut();
        let err = reopen(&storage, &path).err().unwrap();
        assert!(matches!(err, Error::BadJournal(..)), "{err}");
        // An empty slot (a write that never finished) is skipped.
        let (_, storage, path) = setup();
        let mut j = Journal::create(storage.clone(), &path, identity()).unwrap();
        j.append_state(BlockIdx(1), 1, BlockState::Data).unwrap();
        j.append_state(BlockIdx(2), 1, BlockState::Data).unwrap();
        drop(j);
        let f = storage.open(&path, false).unwrap();
        f.write_all_at(&[0; RECORD_LEN as usize], HEADER_LEN + RECORD_LEN)
            .unwrap();
        let (map, _, r) = reopen(&storage, &path).unwrap();
        assert_eq!(r.records, 1);
        assert_eq!(map.get(BlockIdx(2)), BlockState::Data);
    }

    #[test]
    fn a_version_1_journal_is_migrated() {
        let (_, storage, path) = setup();
        let mut head = vec![0u8; HEADER_LEN as usize];
        head[0..8].copy_from_slice(MAGIC);
        head[8..12].copy_from_slice(&1u32.to_le_bytes());
        head[12..16].copy_from_slice(&4096u32.to_le_bytes());
        head[16..24].copy_from_slice(&(1u64 << 20).to_le_bytes());
        head[24..26].copy_from_slice(&4u16.to_le_bytes());
        head[26..30].copy_from_slice(b"test");
        let crc = crc32fast::hash(&head[..4092]);
        head[4092..].copy_from_slice(&crc.to_le_bytes());
        let mut rec = [0u8; 24];
        rec[0..8].copy_from_slice(&7u64.to_le_bytes());
        rec[8..12].copy_from_slice(&2u32.to_le_bytes());
        rec[12] = BlockState::Zero as u8;
        let crc = crc32fast::hash(&rec[..16]);
        rec[16..20].copy_from_slice(&crc.to_le_bytes());
        head.extend_from_slice(&rec);
        head.extend_from_slice(&[0xab; 10]); // a torn tail
        let f = storage.open(&path, true).unwrap();
        f.write_all_at(&head, 0).unwrap();
        let (map, _, r) = reopen(&storage, &path).unwrap();
        assert_eq!(r.records, 1);
        assert_eq!(map.get(BlockIdx(8)), BlockState::Zero);
        // Reopened again, it is a version 2 journal with the same states.
        let (map, _, _) = reopen(&storage, &path).unwrap();
        assert_eq!(map.get(BlockIdx(7)), BlockState::Zero);
        assert_eq!(map.get(BlockIdx(9)), BlockState::Base);
    }

    #[test]
    fn open_refuses_an_overlay_of_another_base() {
        let (_, storage, path) = setup();
        Journal::create(storage.clone(), &path, identity()).unwrap();
        let other = Identity {
            base_id: "other".into(),
            ..identity()
        };
        let err = Journal::open(storage, &path, &other, &BlockMap::new(256), || Ok(()))
            .err()
            .unwrap();
        assert!(matches!(err, Error::Mismatch { .. }), "{err}");
    }

    #[test]
    fn compaction_keeps_the_states_and_starts_a_new_generation() {
        let (sim, storage, path) = setup();
        let map = BlockMap::new(256);
        let mut j = Journal::create(storage.clone(), &path, identity()).unwrap();
        for b in 0..100 {
            let state = if b % 3 == 0 { BlockState::Zero } else { BlockState::Data };
            j.append_state(BlockIdx(b), 1, state).unwrap();
            map.set(BlockIdx(b), state);
        }
        let generation = j.header.generation;
        j.compact(&map).unwrap();
        assert_eq!(j.header.generation, generation + 1);
        drop(j);
        sim.power_cut();
        let (map2, _, _) = reopen(&storage, &path).unwrap();
        for b in 0..256 {
            assert_eq!(map2.get(BlockIdx(b)), map.get(BlockIdx(b)), "block {b}");
        }
    }
}
