//! This host's copies of the manifests of the images it opened, kept in
//! the cache directory (`manifests/<image id>`): so that peers with no
//! store access can be served them, and an image given by id reopens here
//! when the store is unreachable. A copy is only a copy: it is checked
//! against its id whenever it is read, and the store stays the source of
//! truth (it is asked first).

use std::io::Read;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::{Digest, Error, ImageId, MAX_MANIFEST_BYTES};

#[derive(Debug)]
pub struct ManifestCopies {
    dir: PathBuf,
}

impl ManifestCopies {
    /// Copies under `cache_dir/manifests` (made on the first save).
    pub fn new(cache_dir: &Path) -> Self {
        ManifestCopies {
            dir: cache_dir.join("manifests"),
        }
    }

    fn path(&self, id: &ImageId) -> PathBuf {
        self.dir.join(id.to_hex())
    }

    /// Keeps `bytes` (already checked against `id`) as image `id`'s copy,
    /// unless one is there. Written aside and renamed: a crash leaves the
    /// old state or the whole copy, and a torn one fails its check anyway.
    pub fn save(&self, id: &ImageId, bytes: &[u8]) -> Result<(), Error> {
        let path = self.path(id);
        if path.exists() {
            return Ok(());
        }
        let err = |e| Error::WriteCopy(path.clone(), e);
        std::fs::create_dir_all(&self.dir).map_err(err)?;
        let tmp = self.dir.join(format!(".{}.{}.tmp", id.to_hex(), std::process::id()));
        std::fs::write(&tmp, bytes).map_err(err)?;
        std::fs::rename(&tmp, &path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            err(e)
        })
    }

    /// The length of image `id`'s copy, if this host has one.
    pub fn len(&self, id: &ImageId) -> Option<u64> {
        std::fs::metadata(self.path(id)).ok().map(|m| m.len())
    }

    /// Image `id`'s copy, if this host has one that hashes to the id (a
    /// copy that does not is removed). Callers parse and validate it.
    pub fn load(&self, id: &ImageId) -> Result<Option<Bytes>, Error> {
        let path = self.path(id);
        let err = |e| Error::ReadCopy(path.clone(), e);
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(err(e)),
        };
        let len = file.metadata().map_err(err)?.len();
        if len > MAX_MANIFEST_BYTES {
            return Err(Error::TooLarge {
                key: path.display().to_string(),
                cap: MAX_MANIFEST_BYTES,
            });
        }
        let mut buf = Vec::with_capacity(len as usize);
        // No further than the cap, whatever the file grew to.
        file.take(MAX_MANIFEST_BYTES + 1).read_to_end(&mut buf).map_err(err)?;
        if Digest::of(&buf) != *id {
            tracing::warn!(copy = %path.display(), "a manifest copy does not hash to its id: removed");
            let _ = std::fs::remove_file(&path);
            return Ok(None);
        }
        Ok(Some(Bytes::from(buf)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_is_kept_and_a_corrupt_one_is_dropped_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let copies = ManifestCopies::new(dir.path());
        let bytes = b"{\"a manifest\":1}";
        let id = Digest::of(bytes);
        assert_eq!(copies.load(&id).unwrap(), None);
        copies.save(&id, bytes).unwrap();
        assert_eq!(copies.load(&id).unwrap().as_deref(), Some(&bytes[..]));
        // Flipped on disk: not served, and gone.
        let path = dir.path().join("manifests").join(id.to_hex());
        std::fs::write(&path, b"{\"a manifest\":2}").unwrap();
        assert_eq!(copies.load(&id).unwrap(), None);
        assert!(!path.exists());
    }
}
