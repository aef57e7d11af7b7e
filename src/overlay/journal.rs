//! The overlay's index on disk: a header, then an append-only log of block
//! state records. Records are written only at flush, after the data they
//! describe is durable; a torn tail is cut off at open.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::blockmap::{BlockMap, BlockState};
use super::Error;
use crate::units::BlockIdx;

const MAGIC: &[u8; 8] = b"SBLKOVL\0";
const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 4096;
const RECORD_LEN: usize = 24;
/// Longest base identity the header stores.
pub const MAX_BASE_ID: usize = 3000;
/// Records cover at most this many blocks each (the count field is a u32).
const MAX_RUN: u64 = u32::MAX as u64;

/// What an overlay was made for; opening it for anything else is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub block_size: u32,
    pub disk_size: u64,
    pub base_id: String,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&self.block_size.to_le_bytes());
        h[16..24].copy_from_slice(&self.disk_size.to_le_bytes());
        let id = self.base_id.as_bytes();
        h[24..26].copy_from_slice(&(id.len() as u16).to_le_bytes());
        h[26..26 + id.len()].copy_from_slice(id);
        let crc = crc32fast::hash(&h[..HEADER_LEN - 4]);
        h[HEADER_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
        h
    }

    fn decode(h: &[u8; HEADER_LEN]) -> Result<Self, String> {
        if &h[0..8] != MAGIC {
            return Err("not a streamblk overlay journal (bad magic)".into());
        }
        let crc = u32::from_le_bytes(h[HEADER_LEN - 4..].try_into().unwrap());
        if crc != crc32fast::hash(&h[..HEADER_LEN - 4]) {
            return Err("header checksum mismatch".into());
        }
        let version = u32::from_le_bytes(h[8..12].try_into().unwrap());
        if version != VERSION {
            return Err(format!("unsupported version {version}"));
        }
        let id_len = u16::from_le_bytes(h[24..26].try_into().unwrap()) as usize;
        if id_len > MAX_BASE_ID {
            return Err("base identity too long".into());
        }
        Ok(Header {
            block_size: u32::from_le_bytes(h[12..16].try_into().unwrap()),
            disk_size: u64::from_le_bytes(h[16..24].try_into().unwrap()),
            base_id: String::from_utf8_lossy(&h[26..26 + id_len]).into_owned(),
        })
    }
}

fn encode_record(start: BlockIdx, count: u32, state: BlockState) -> [u8; RECORD_LEN] {
    let mut r = [0u8; RECORD_LEN];
    r[0..8].copy_from_slice(&start.0.to_le_bytes());
    r[8..12].copy_from_slice(&count.to_le_bytes());
    r[12] = state as u8;
    let crc = crc32fast::hash(&r[..16]);
    r[16..20].copy_from_slice(&crc.to_le_bytes());
    r
}

fn decode_record(r: &[u8]) -> Option<(BlockIdx, u64, BlockState)> {
    let crc = u32::from_le_bytes(r[16..20].try_into().unwrap());
    if crc != crc32fast::hash(&r[..16]) {
        return None;
    }
    let start = u64::from_le_bytes(r[0..8].try_into().unwrap());
    let count = u32::from_le_bytes(r[8..12].try_into().unwrap()) as u64;
    let state = BlockState::from_bits(r[12])?;
    Some((BlockIdx(start), count, state))
}

pub struct Journal {
    file: File,
    path: PathBuf,
    header: Header,
    /// Records in the file; drives compaction.
    records: u64,
}

impl Journal {
    /// Creates a new, empty journal durably (file and directory entry).
    pub fn create(path: &Path, header: Header) -> Result<Self, Error> {
        let tmp = path.with_extension("new");
        write_file(&tmp, &header, std::iter::empty()).map_err(|e| Error::WriteJournal(tmp.clone(), e))?;
        install(&tmp, path).map_err(|e| Error::WriteJournal(path.to_path_buf(), e))?;
        Self::open_existing(path, &header, &BlockMap::new(0))
    }

    /// Opens a journal, checks it against `expect`, and replays it into `map`.
    pub fn open_existing(path: &Path, expect: &Header, map: &BlockMap) -> Result<Self, Error> {
        let err = |e| Error::ReadJournal(path.to_path_buf(), e);
        let mut file = OpenOptions::new().read(true).write(true).open(path).map_err(err)?;
        let mut h = [0u8; HEADER_LEN];
        file.read_exact(&mut h).map_err(err)?;
        let header = Header::decode(&h).map_err(|why| Error::BadJournal(path.to_path_buf(), why))?;
        if header != *expect {
            return Err(Error::Mismatch {
                path: path.to_path_buf(),
                found: format!(
                    "disk size {} block size {} base {:?}",
                    header.disk_size, header.block_size, header.base_id
                ),
                expected: format!(
                    "disk size {} block size {} base {:?}",
                    expect.disk_size, expect.block_size, expect.base_id
                ),
            });
        }
        let mut body = Vec::new();
        file.read_to_end(&mut body).map_err(err)?;
        let mut records = 0u64;
        let mut valid = 0usize;
        for r in body.chunks_exact(RECORD_LEN) {
            let Some((start, count, state)) = decode_record(r) else {
                break;
            };
            if start.0.checked_add(count).is_none_or(|end| end > map.blocks()) {
                break;
            }
            for b in start.0..start.0 + count {
                map.set(BlockIdx(b), state);
            }
            records += 1;
            valid += RECORD_LEN;
        }
        if valid < body.len() {
            // A torn or partial tail from a crash mid-append: drop it so new
            // records are not appended behind garbage.
            tracing::warn!(path = %path.display(), dropped = body.len() - valid, "overlay journal: cutting torn tail");
            file.set_len((HEADER_LEN + valid) as u64).map_err(err)?;
            file.sync_all().map_err(err)?;
        }
        file.seek(SeekFrom::End(0)).map_err(err)?;
        Ok(Journal {
            file,
            path: path.to_path_buf(),
            header,
            records,
        })
    }

    /// Appends state records durably.
    pub fn append(&mut self, runs: &[(BlockIdx, u64, BlockState)]) -> Result<(), Error> {
        if runs.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(runs.len() * RECORD_LEN);
        let mut n = 0;
        for r in split_runs(runs.iter().copied()) {
            buf.extend_from_slice(&r);
            n += 1;
        }
        let err = |e| Error::WriteJournal(self.path.clone(), e);
        self.file.write_all(&buf).map_err(err)?;
        self.file.sync_data().map_err(err)?;
        self.records += n;
        Ok(())
    }

    /// True when the log holds many more records than a snapshot would.
    pub fn wants_compaction(&self, live_runs: u64) -> bool {
        self.records > 4 * live_runs + 65_536
    }

    /// Replaces the log by a snapshot of `map`, atomically.
    pub fn compact(&mut self, map: &BlockMap) -> Result<(), Error> {
        let tmp = self.path.with_extension("new");
        let runs = map.runs(BlockIdx(0), map.blocks());
        let err = |e| Error::WriteJournal(tmp.clone(), e);
        let records = write_file(&tmp, &self.header, runs).map_err(err)?;
        install(&tmp, &self.path).map_err(err)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .map_err(|e| Error::ReadJournal(self.path.clone(), e))?;
        file.seek(SeekFrom::End(0))
            .map_err(|e| Error::ReadJournal(self.path.clone(), e))?;
        self.file = file;
        self.records = records;
        Ok(())
    }
}

/// Encodes runs as records, splitting runs longer than a record can say.
fn split_runs(runs: impl Iterator<Item = (BlockIdx, u64, BlockState)>) -> impl Iterator<Item = [u8; RECORD_LEN]> {
    runs.flat_map(|(start, count, state)| {
        (0..count.div_ceil(MAX_RUN)).map(move |i| {
            let s = start.0 + i * MAX_RUN;
            let n = (count - i * MAX_RUN).min(MAX_RUN);
            encode_record(BlockIdx(s), n as u32, state)
        })
    })
}

fn write_file(
    path: &Path,
    header: &Header,
    runs: impl Iterator<Item = (BlockIdx, u64, BlockState)>,
) -> io::Result<u64> {
    let mut f = File::create(path)?;
    let mut w = io::BufWriter::new(&mut f);
    w.write_all(&header.encode())?;
    let mut n = 0;
    for r in split_runs(runs) {
        w.write_all(&r)?;
        n += 1;
    }
    w.flush()?;
    drop(w);
    f.sync_all()?;
    Ok(n)
}

/// Renames `tmp` over `path` and makes the rename durable.
fn install(tmp: &Path, path: &Path) -> io::Result<()> {
    std::fs::rename(tmp, path)?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            block_size: 4096,
            disk_size: 1 << 20,
            base_id: "test".into(),
        }
    }

    #[test]
    fn replay_restores_states_and_cuts_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let mut j = Journal::create(&path, header()).unwrap();
        j.append(&[(BlockIdx(3), 2, BlockState::Data), (BlockIdx(4), 1, BlockState::Zero)])
            .unwrap();
        drop(j);
        // Half a record, as a crash mid-append leaves it.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[0xab; 10]).unwrap();
        drop(f);

        let map = BlockMap::new(256);
        let mut j = Journal::open_existing(&path, &header(), &map).unwrap();
        assert_eq!(map.get(BlockIdx(3)), BlockState::Data);
        assert_eq!(map.get(BlockIdx(4)), BlockState::Zero);
        assert_eq!(map.get(BlockIdx(5)), BlockState::Base);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            (HEADER_LEN + 2 * RECORD_LEN) as u64
        );
        j.append(&[(BlockIdx(9), 1, BlockState::Data)]).unwrap();
        j.compact(&map).unwrap();
        drop(j);

        let map2 = BlockMap::new(256);
        Journal::open_existing(&path, &header(), &map2).unwrap();
        for b in 0..256 {
            assert_eq!(map2.get(BlockIdx(b)), map.get(BlockIdx(b)), "block {b}");
        }
    }

    #[test]
    fn open_refuses_an_overlay_of_another_base() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        Journal::create(&path, header()).unwrap();
        let other = Header {
            base_id: "other".into(),
            ..header()
        };
        let err = Journal::open_existing(&path, &other, &BlockMap::new(256))
            .err()
            .unwrap();
        assert!(matches!(err, Error::Mismatch { .. }), "{err}");
    }
}
