//! `image import`: cut a raw or qcow2 image into chunks, store each distinct
//! chunk once under its digest (zstd-compressed where that saves space),
//! skip all-zero chunks, and write the manifest.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::task::JoinSet;

use super::manifest::{ChunkEntry, Digest, Manifest, DEFAULT_CHUNK, MAX_CHUNK, MIN_CHUNK, VERSION};
use super::{Error as StoreError, ImageId, ImageStore};

/// Uploads in flight at once.
const UPLOADS: usize = 16;
const ZSTD_LEVEL: i32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("chunk size {0}: must be a power of two from 64 KiB to 4 MiB")]
    ChunkSize(u64),
    #[error("read {0}")]
    Read(PathBuf, #[source] io::Error),
    #[error("{0}: image size {1} is not a positive multiple of 512")]
    Size(PathBuf, u64),
    #[error("convert qcow2 {0} with qemu-img: {1}")]
    Convert(PathBuf, String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug)]
pub struct ImportReport {
    pub id: ImageId,
    pub manifest: Manifest,
    /// Chunks and bytes this import added to the store.
    pub new_chunks: usize,
    pub new_bytes: u64,
    pub new_manifest: bool,
}

/// Imports `src` into `store`; `progress` gets (bytes done, bytes total).
pub async fn import(
    src: &Path,
    store: &ImageStore,
    name: Option<&str>,
    chunk_size: Option<u64>,
    mut progress: impl FnMut(u64, u64),
) -> Result<ImportReport, Error> {
    let chunk_size = chunk_size.unwrap_or(DEFAULT_CHUNK as u64);
    if !chunk_size.is_power_of_two() || !(MIN_CHUNK as u64..=MAX_CHUNK as u64).contains(&chunk_size) {
        return Err(Error::ChunkSize(chunk_size));
    }
    let read_err = |e| Error::Read(src.to_path_buf(), e);
    let mut file = File::open(src).map_err(read_err)?;
    let mut magic = [0u8; 4];
    let is_qcow2 = file.read_exact(&mut magic).is_ok() && &magic == b"QFI\xfb";
    // qcow2 goes through qemu-img into a temporary raw file.
    let _converted;
    if is_qcow2 {
        let tmp = tempfile::NamedTempFile::new().map_err(read_err)?;
        let out = std::process::Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw"])
            .arg(src)
            .arg(tmp.path())
            .output()
            .map_err(|e| Error::Convert(src.to_path_buf(), e.to_string()))?;
        if !out.status.success() {
            return Err(Error::Convert(
                src.to_path_buf(),
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ));
        }
        file = File::open(tmp.path()).map_err(read_err)?;
        _converted = tmp;
    }
    let size = file.metadata().map_err(read_err)?.len();
    if size == 0 || !size.is_multiple_of(512) {
        return Err(Error::Size(src.to_path_buf(), size));
    }

    let count = size.div_ceil(chunk_size) as usize;
    let mut chunks = Vec::with_capacity(count);
    let mut uploads: JoinSet<Result<u64, StoreError>> = JoinSet::new();
    let mut seen = std::collections::HashSet::new();
    let (mut new_chunks, mut new_bytes) = (0usize, 0u64);
    let mut buf = vec![0u8; chunk_size as usize];
    let mut last_report = Instant::now();
    for i in 0..count {
        let len = (size - i as u64 * chunk_size).min(chunk_size) as usize;
        let data = &mut buf[..len];
        std::os::unix::fs::FileExt::read_exact_at(&file, data, i as u64 * chunk_size).map_err(read_err)?;
        if data.iter().all(|&b| b == 0) {
            chunks.push(None);
        } else {
            let digest = Digest::of(data);
            let z = zstd::bulk::compress(data, ZSTD_LEVEL).map_err(read_err)?;
            let (stored, zstd) = if z.len() < len {
                (z, true)
            } else {
                (data.to_vec(), false)
            };
            chunks.push(Some(ChunkEntry {
                digest,
                stored_len: stored.len() as u32,
                zstd,
            }));
            if seen.insert(digest) {
                while uploads.len() >= UPLOADS {
                    if let Some(n) = uploads.join_next().await {
                        count_upload(n, &mut new_chunks, &mut new_bytes)?;
                    }
                }
                let store = store.clone();
                uploads.spawn(async move {
                    if store.has_chunk(&digest).await? {
                        return Ok(0);
                    }
                    let n = stored.len() as u64;
                    store.put_chunk(&digest, Bytes::from(stored)).await?;
                    Ok(n)
                });
            }
        }
        // Count new chunks as uploads finish.
        while let Some(n) = uploads.try_join_next() {
            count_upload(n, &mut new_chunks, &mut new_bytes)?;
        }
        if last_report.elapsed() >= Duration::from_secs(1) || i + 1 == count {
            progress(((i as u64 + 1) * chunk_size).min(size), size);
            last_report = Instant::now();
        }
    }
    while let Some(n) = uploads.join_next().await {
        count_upload(n, &mut new_chunks, &mut new_bytes)?;
    }
    // Chunks first, manifest last: a manifest never names a missing chunk.
    let manifest = Manifest {
        version: VERSION,
        size,
        chunk_size: chunk_size as u32,
        chunks,
    };
    let (id, new_manifest) = store.put_manifest(&manifest).await?;
    if let Some(name) = name {
        store.put_name(name, &id).await?;
    }
    Ok(ImportReport {
        id,
        manifest,
        new_chunks,
        new_bytes,
        new_manifest,
    })
}

/// Adds a finished upload (bytes stored; 0 if the chunk was there already).
fn count_upload(
    res: Result<Result<u64, StoreError>, tokio::task::JoinError>,
    chunks: &mut usize,
    bytes: &mut u64,
) -> Result<(), Error> {
    let n = res.expect("upload task panicked")?;
    *chunks += usize::from(n > 0);
    *bytes += n;
    Ok(())
}
