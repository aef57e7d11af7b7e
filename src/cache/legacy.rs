//! Caches made by earlier versions: one directory per image under the
//! cache root, a sparse data file at image offsets and a presence bitmap.
//! When its image is next opened, such a directory's chunks are checked
//! against the manifest, moved into the chunk store, made durable there,
//! and only then is the directory removed.

use std::io;
use std::path::Path;

use bitvec::prelude::*;

use super::{Error, ImageCache};
use crate::storage::{IoRange, Storage};
use crate::store::{verify_plain, ChunkIdx, Digest, ImageId};

const MAGIC: &[u8; 8] = b"SBLKBMP2";
const HEADER_LEN: usize = 64;
const BITMAP: &str = "bitmap";
/// An image directory being evicted: its bitmap renamed so nothing uses it.
const TOMBSTONE: &str = "bitmap.evicting";
const LOCK: &str = "lock";
const DATA_PREFIX: &str = "data.";

/// Moves the chunks of image `cache`'s old directory, if there is one,
/// into the chunk store; returns how many. Chunks that fail their digest
/// are dropped: they would be fetched again.
pub(super) fn migrate(cache: &ImageCache) -> Result<u64, Error> {
    let storage = cache.store().storage().clone();
    let root = cache.store().root().to_path_buf();
    let dir = root.join(cache.id().to_hex());
    if !storage.exists(&dir).map_err(|e| Error::Open(dir.clone(), e))? {
        return Ok(0);
    }
    let _lock = match storage.try_lock(&dir.join(LOCK)) {
        Ok(Some(lock)) => lock,
        Ok(None) => return Err(Error::Locked(dir)),
        Err(e) => return Err(Error::Lock(dir, e)),
    };
    let m = cache.manifest().clone();
    let mut moved = 0;
    if let Some(Bitmap { generation, present }) = load(&*storage, &dir, *cache.id(), m.chunks.len())? {
        let data_path = dir.join(data_name(generation));
        let data = storage.open(&data_path, false).map_err(|e| Error::Open(data_path, e))?;
        for (i, entry) in m.chunks.iter().enumerate() {
            let (Some(entry), true) = (entry, present[i]) else {
                continue;
            };
            let c = ChunkIdx(i as u32);
            let mut buf = vec![0u8; m.chunk_len(c) as usize];
            data.read_at(IoRange::from_slice(&mut buf), m.chunk_offset(c))
                .map_err(Error::ReadCacheFile)?;
            if verify_plain(entry, buf.len() as u64, &buf).is_ok() {
                cache.write_chunk(c, &buf)?;
                moved += 1;
            }
        }
    }
    // Durable in the store before the old copy goes.
    cache.persist()?;
    remove_image(&*storage, &root, &dir).map_err(|e| Error::Reset(dir.clone(), e))?;
    Ok(moved)
}

/// A bitmap file's header: its chunk count and image, and the generation
/// that names the data file its bits describe.
struct Header {
    chunks: u32,
    id: ImageId,
    generation: u64,
}

/// A usable bitmap: the chunks it claims, and the data file's generation.
struct Bitmap {
    generation: u64,
    present: BitVec<u8, Lsb0>,
}

/// Reads the bitmap of `dir` if it belongs to image `id` of `n` chunks and
/// the data file of its generation exists.
fn load(storage: &dyn Storage, dir: &Path, id: ImageId, n: usize) -> Result<Option<Bitmap>, Error> {
    let path = dir.join(BITMAP);
    let file = match storage.open(&path, false) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::Open(path, e)),
    };
    let len = file.len().map_err(Error::ReadCacheFile)?;
    if len < HEADER_LEN as u64 {
        return Ok(None);
    }
    let mut b = [0u8; HEADER_LEN];
    file.read_exact_at(&mut b, 0).map_err(Error::ReadCacheFile)?;
    if &b[..8] != MAGIC {
        return Ok(None);
    }
    let header = Header {
        chunks: u32::from_le_bytes(b[8..12].try_into().unwrap()),
        id: Digest(b[16..48].try_into().unwrap()),
        generation: u64::from_le_bytes(b[48..56].try_into().unwrap()),
    };
    if header.id != id || header.chunks as usize != n || len < (HEADER_LEN + n.div_ceil(8)) as u64 {
        return Ok(None);
    }
    let data_path = dir.join(data_name(header.generation));
    if !storage.exists(&data_path).map_err(|e| Error::Open(data_path, e))? {
        return Ok(None);
    }
    let mut present = bitvec![u8, Lsb0; 0; n];
    file.read_exact_at(present.as_raw_mut_slice(), HEADER_LEN as u64)
        .map_err(Error::ReadCacheFile)?;
    Ok(Some(Bitmap {
        generation: header.generation,
        present,
    }))
}

fn data_name(generation: u64) -> String {
    format!("{DATA_PREFIX}{generation}")
}

/// Removes the files of `dir` other than `keep` and the lock.
fn remove_all_but(storage: &dyn Storage, dir: &Path, keep: &[&str]) -> io::Result<()> {
    for name in storage.read_dir(dir)? {
        if name != LOCK && !keep.contains(&name.as_str()) {
            storage.remove_file(&dir.join(name))?;
        }
    }
    Ok(())
}

/// Deletes an image directory, first making it unusable: the bitmap becomes
/// a tombstone (durably) before any data goes, and is deleted last, so a
/// crash part way through never leaves a bitmap whose chunks are gone.
fn remove_image(storage: &dyn Storage, root: &Path, dir: &Path) -> io::Result<()> {
    let bitmap = dir.join(BITMAP);
    if storage.exists(&bitmap)? {
        storage.rename(&bitmap, &dir.join(TOMBSTONE))?;
        storage.sync_dir(dir)?;
    }
    // File by file, as remove_dir_all does on a real file system, so the
    // order is ours (and a simulated disk sees the states between).
    remove_all_but(storage, dir, &[TOMBSTONE])?;
    if storage.exists(&dir.join(TOMBSTONE))? {
        storage.remove_file(&dir.join(TOMBSTONE))?;
    }
    storage.remove_dir_all(dir)?;
    storage.sync_dir(root)
}

/// The images of `root` that still have a directory in the old layout.
pub(crate) fn old_images(storage: &dyn Storage, root: &Path) -> Vec<ImageId> {
    storage
        .read_dir(root)
        .unwrap_or_default()
        .iter()
        .filter_map(|name| ImageId::from_hex(name))
        .collect()
}
