//! The file I/O under the overlay and the Local Cache: a small interface
//! (read, write, sync, truncate, allocate, rename, directory sync, punch hole)
//! with the real file system behind it in production and a simulated disk in
//! tests ([`sim::SimStorage`]) that loses unsynced data on a power cut and
//! injects errors. Knows nothing of virtio, disks or chunks.

mod iobuf;
pub mod sched;
pub mod sim;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use iobuf::{GuestBufs, IoBuf, IoBufs, IoRange};

/// A file system: the real one ([`RealStorage`]) or a simulated one.
pub trait Storage: Send + Sync {
    /// Creates a directory and its parents (durably: directories are not
    /// part of what a power cut may undo here).
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;

    /// Opens a file for reading and writing, creating it (empty) if `create`.
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn StorageFile>>;

    fn exists(&self, path: &Path) -> io::Result<bool>;

    /// Renames `from` to `to`, replacing `to`; durable once the directories
    /// of both are synced.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;

    fn remove_file(&self, path: &Path) -> io::Result<()>;

    /// Removes a directory and everything in it.
    fn remove_dir_all(&self, dir: &Path) -> io::Result<()>;

    /// Makes the creates, renames and removals in `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;

    /// Names of the entries of `dir`, sorted.
    fn read_dir(&self, dir: &Path) -> io::Result<Vec<String>>;

    /// Bytes a file, or a directory tree, takes on the device.
    fn usage(&self, path: &Path) -> io::Result<u64>;

    /// Takes an exclusive lock named by `path` for as long as the returned
    /// guard lives; `None` if another holder (process) has it.
    fn try_lock(&self, path: &Path) -> io::Result<Option<LockGuard>>;

    /// Names the current boot of the machine: the page cache (written but
    /// unsynced data) survives exactly as long as this does not change.
    fn boot_id(&self) -> io::Result<String>;
}

/// An open file.
#[allow(clippy::len_without_is_empty)] // `len` is an I/O call, not a container's size
pub trait StorageFile: Send + Sync {
    /// Reads `dst.len()` bytes at `offset`; bytes past the end read as zeros.
    fn read_at(&self, dst: IoRange, offset: u64) -> io::Result<()>;

    /// Writes all of `src` at `offset`.
    fn write_at(&self, src: IoRange, offset: u64) -> io::Result<()>;

    /// Makes every write that returned before the call durable (fdatasync).
    fn sync_data(&self) -> io::Result<()>;

    /// The file's size in bytes.
    fn len(&self) -> io::Result<u64>;

    fn set_len(&self, len: u64) -> io::Result<()>;

    /// Reserves space for `offset..offset+len` so that writes there do not
    /// fail for lack of space (fallocate); may extend the file.
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Frees the space of `offset..offset+len`, which then reads as zeros.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
}

impl dyn StorageFile {
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_at(IoRange::from_slice(buf), offset)
    }

    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        // SAFETY: `write_at` only reads its source.
        self.write_at(unsafe { IoRange::for_reading(buf) }, offset)
    }
}

/// Held while a [`Storage::try_lock`] lock is.
pub struct LockGuard(#[allow(dead_code)] Box<dyn Send + Sync>);

impl LockGuard {
    pub fn new(inner: impl Send + Sync + 'static) -> Self {
        LockGuard(Box::new(inner))
    }
}

/// The real file system.
#[derive(Clone, Copy, Debug, Default)]
pub struct RealStorage;

impl RealStorage {
    pub fn shared() -> Arc<dyn Storage> {
        Arc::new(RealStorage)
    }
}

struct RealFile(File);

impl Storage for RealStorage {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        // Each directory made here is durable before anything goes in it:
        // its entry in its parent is synced.
        let missing: Vec<&Path> = dir
            .ancestors()
            .filter(|d| !d.as_os_str().is_empty())
            .take_while(|d| !d.is_dir())
            .collect();
        for d in missing.into_iter().rev() {
            match std::fs::create_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && d.is_dir() => continue,
                Err(e) => return Err(e),
            }
            self.sync_dir(&parent_of(d))?;
        }
        Ok(())
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn StorageFile>> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(path)?;
        if !f.metadata()?.is_file() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
        }
        Ok(Arc::new(RealFile(f)))
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        path.try_exists()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn remove_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::remove_dir_all(dir)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        File::open(dir)?.sync_all()
    }

    fn read_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = std::fs::read_dir(dir)?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<io::Result<Vec<_>>>()?;
        names.sort();
        Ok(names)
    }

    fn usage(&self, path: &Path) -> io::Result<u64> {
        let meta = std::fs::symlink_metadata(path)?;
        if !meta.is_dir() {
            return Ok(meta.blocks() * 512);
        }
        let mut total = 0;
        for e in std::fs::read_dir(path)? {
            total += self.usage(&e?.path()).unwrap_or(0);
        }
        Ok(total)
    }

    fn try_lock(&self, path: &Path) -> io::Result<Option<LockGuard>> {
        let f = OpenOptions::new().write(true).create(true).truncate(false).open(path)?;
        // SAFETY: flock(2) on a file descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                Ok(None)
            } else {
                Err(e)
            };
        }
        Ok(Some(LockGuard::new(f)))
    }

    fn boot_id(&self) -> io::Result<String> {
        Ok(std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?
            .trim()
            .to_string())
    }
}

impl StorageFile for RealFile {
    fn read_at(&self, dst: IoRange, offset: u64) -> io::Result<()> {
        dst.read_from(&self.0, offset)
    }

    fn write_at(&self, src: IoRange, offset: u64) -> io::Result<()> {
        src.write_to(&self.0, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate(2) on a file descriptor we own; no memory is passed.
        let r = unsafe { libc::fallocate(self.0.as_raw_fd(), 0, offset as libc::off_t, len as libc::off_t) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
            // tmpfs and friends: writing zeros would defeat sparseness; the
            // write itself reports a full device instead.
            let end = offset + len;
            if self.len()? < end {
                self.set_len(end)?;
            }
            return Ok(());
        }
        Err(e)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate(2) on a file descriptor we own; no memory is passed.
        let r = unsafe {
            libc::fallocate(
                self.0.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// The parent directory of a path (`.` for a bare name).
pub fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// An `io::Error` with the given errno.
pub fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_storage_round_trips_and_locks_exclusively() {
        let dir = tempfile::tempdir().unwrap();
        let s = RealStorage;
        let p = dir.path().join("f");
        let f = s.open(&p, true).unwrap();
        f.write_all_at(b"hello", 4096).unwrap();
        f.sync_data().unwrap();
        let mut buf = [1u8; 8];
        f.read_exact_at(&mut buf, 4094).unwrap();
        assert_eq!(&buf, b"\0\0hello\0");
        f.punch_hole(4096, 4096).unwrap();
        f.read_exact_at(&mut buf, 4094).unwrap();
        assert_eq!(buf, [0u8; 8]);
        let lock = s.try_lock(&dir.path().join("lock")).unwrap();
        assert!(lock.is_some());
        assert!(s.try_lock(&dir.path().join("lock")).unwrap().is_none());
        drop(lock);
        assert!(s.try_lock(&dir.path().join("lock")).unwrap().is_some());
        s.rename(&p, &dir.path().join("g")).unwrap();
        s.sync_dir(dir.path()).unwrap();
        assert_eq!(s.read_dir(dir.path()).unwrap(), vec!["g", "lock"]);
        assert!(!s.boot_id().unwrap().is_empty());
    }
}
