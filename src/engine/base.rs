//! What lies under an overlay: the shared, read-only base content of a disk.

use std::collections::HashMap;
use std::fs::File;
use std::future::Future;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use super::{Error, IoRange};

pub type FetchFuture = Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>;

/// The base of a disk. Reads of local data are synchronous; data that is not
/// local yet must be fetched first, asynchronously.
pub trait Base: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// Identity recorded in overlays, so an overlay is never opened over the wrong base.
    fn id(&self) -> String;

    /// Reads `dst.len()` bytes at `offset` if all of them are local and
    /// returns true; returns false, with `dst` unspecified, if some are not.
    fn read_local(&self, offset: u64, dst: IoRange) -> Result<bool, Error>;

    /// Makes `offset..offset+len` local. Resolves once it is, or with the
    /// error that stopped it; a base with a fetch deadline counts it from
    /// `since`, when the guest asked.
    fn fetch(&self, offset: u64, len: u64, since: Instant) -> FetchFuture;

    /// A guest attached to a disk over this base: its boot starts now.
    fn attach(&self) {}
}

/// A local raw file: everything is always local.
pub struct LocalBase {
    file: File,
    id: String,
    size: u64,
}

impl LocalBase {
    pub fn open(path: &Path) -> Result<Self, Error> {
        let err = |e| Error::OpenBase(path.to_path_buf(), e);
        let file = File::open(path).map_err(err)?;
        let meta = file.metadata().map_err(err)?;
        if !meta.is_file() {
            return Err(Error::OpenBase(
                path.to_path_buf(),
                io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
            ));
        }
        // Path and size do not tell a file from its replacement: the inode
        // and modification time do.
        let id = format!(
            "file:{}:{}:{}:{}.{}",
            path.display(),
            meta.len(),
            meta.ino(),
            meta.mtime(),
            meta.mtime_nsec()
        );
        Ok(LocalBase {
            file,
            id,
            size: meta.len(),
        })
    }
}

impl Base for LocalBase {
    fn size(&self) -> u64 {
        self.size
    }

    fn id(&self) -> String {
        self.id.clone()
    }

    fn read_local(&self, offset: u64, dst: IoRange) -> Result<bool, Error> {
        dst.read_from(&self.file, offset).map_err(Error::ReadBase)?;
        Ok(true)
    }

    fn fetch(&self, _offset: u64, _len: u64, _since: Instant) -> FetchFuture {
        Box::pin(std::future::ready(Ok(())))
    }
}

/// Opens each base file once, however many disks name it.
#[derive(Default)]
pub struct LocalBases {
    open: Mutex<HashMap<PathBuf, Weak<LocalBase>>>,
}

impl LocalBases {
    pub fn get(&self, path: &Path) -> Result<Arc<LocalBase>, Error> {
        let canonical = path
            .canonicalize()
            .map_err(|e| Error::OpenBase(path.to_path_buf(), e))?;
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(base) = open.get(&canonical).and_then(Weak::upgrade) {
            return Ok(base);
        }
        let base = Arc::new(LocalBase::open(&canonical)?);
        open.insert(canonical, Arc::downgrade(&base));
        Ok(base)
    }
}
