//! Profiles learned on this host: one directory per image under the cache
//! directory (`<cache-dir>/profiles/<image id>/`) holding the boot traces
//! recorded there (`*.trace`, complete ones only: a trace being recorded is
//! `*.trace.part`), the profile built from them (`profile.json`) and, once
//! published, the digest of what went to the store (`published`). Only
//! files: the daemon decides when to record, build and publish.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use super::{read_trace, sync_parent, Error, Profile};

const PROFILE: &str = "profile.json";
const PUBLISHED: &str = "published";
const TRACE_EXT: &str = "trace";

/// The learned-profile directory of one image.
#[derive(Clone, Debug)]
pub struct LearnedDir {
    root: PathBuf,
}

impl LearnedDir {
    /// The directory for image `id` (its hex digest) under `cache_dir`.
    pub fn new(cache_dir: &Path, id: &str) -> Self {
        LearnedDir {
            root: cache_dir.join("profiles").join(id),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn profile_path(&self) -> PathBuf {
        self.root.join(PROFILE)
    }

    pub fn create(&self) -> Result<(), Error> {
        std::fs::create_dir_all(&self.root).map_err(|e| Error::CreateDir(self.root.clone(), e))
    }

    /// The complete traces, oldest first (names start with the time they
    /// were begun).
    pub fn traces(&self) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut out: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == TRACE_EXT))
            .collect();
        out.sort();
        out
    }

    /// A path for a new trace, unique in this directory.
    pub fn new_trace_path(&self) -> PathBuf {
        static N: AtomicU64 = AtomicU64::new(0);
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let n = N.fetch_add(1, Ordering::Relaxed);
        self.root
            .join(format!("{ms:015}-{}-{n}.{TRACE_EXT}", std::process::id()))
    }

    /// Removes traces a crash left half recorded. Call only while no
    /// recorder writes here.
    pub fn remove_partial(&self) {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        for p in entries.filter_map(|e| e.ok().map(|e| e.path())) {
            if p.extension().is_some_and(|x| x == "part") {
                let _ = std::fs::remove_file(&p);
            }
        }
    }

    /// The learned profile's bytes, if one was built.
    pub fn profile_bytes(&self) -> Result<Option<Vec<u8>>, Error> {
        let path = self.profile_path();
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::ReadProfile(path, e)),
        }
    }

    /// The learned profile, checked against an image of `chunk_count`
    /// chunks of `chunk_size`.
    pub fn profile(&self, chunk_size: u32, chunk_count: u32) -> Result<Option<Profile>, Error> {
        self.profile_bytes()?
            .map(|b| Profile::parse(&b, chunk_size, chunk_count))
            .transpose()
    }

    /// Merges the newest `max_traces` traces into the profile and stores it
    /// (atomically and durably). Unreadable traces are skipped. None if no
    /// trace has a read.
    pub fn build(&self, chunk_size: u32, chunk_count: u32, max_traces: usize) -> Result<Option<Built>, Error> {
        let paths = self.traces();
        let paths = &paths[paths.len().saturating_sub(max_traces)..];
        let mut traces = Vec::new();
        for p in paths {
            match read_trace(p) {
                Ok(t) if !t.is_empty() => traces.push(t),
                Ok(_) => {}
                Err(e) => tracing::warn!(trace = %p.display(), "learned trace skipped: {}", crate::DisplayChain(&e)),
            }
        }
        if traces.is_empty() {
            return Ok(None);
        }
        let mut profile = Profile::build(&traces, chunk_size);
        // A read past the image (it cannot happen through a disk) must not
        // make a profile that fails its own check.
        profile.chunks.retain(|&c| c < chunk_count);
        let bytes = profile.to_bytes();
        write_atomic(&self.profile_path(), &bytes).map_err(|e| Error::WriteProfile(self.profile_path(), e))?;
        Ok(Some(Built {
            profile,
            bytes,
            traces: traces.len(),
        }))
    }

    /// What was last published to the store (a digest of the profile's
    /// bytes, as the caller spells it).
    pub fn published(&self) -> Option<String> {
        std::fs::read_to_string(self.root.join(PUBLISHED))
            .ok()
            .map(|s| s.trim().to_string())
    }

    pub fn set_published(&self, tag: &str) -> Result<(), Error> {
        let path = self.root.join(PUBLISHED);
        write_atomic(&path, format!("{tag}\n").as_bytes()).map_err(|e| Error::WriteProfile(path, e))
    }
}

/// A profile just built from learned traces.
#[derive(Debug)]
pub struct Built {
    pub profile: Profile,
    pub bytes: Vec<u8>,
    /// Traces it merges.
    pub traces: usize,
}

/// Writes `bytes` to `path` so that after a crash `path` holds either its
/// old content or all of the new: a synced temporary file renamed over it,
/// then the directory synced.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = super::part_path(path);
    let mut f = File::create(&tmp)?;
    let written = f.write_all(bytes).and_then(|()| f.sync_all());
    drop(f);
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_parent(path)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::profile::{TraceEnd, TraceRecorder};

    const CS: u32 = 65536;

    fn record(dir: &LearnedDir, reads: &[(u64, u64)]) -> PathBuf {
        let path = dir.new_trace_path();
        let t = TraceRecorder::create(&path, Duration::from_secs(60), u64::MAX).unwrap();
        for &(o, l) in reads {
            t.record(o, l);
            // Reads a microsecond apart or more: first-access order is theirs.
            std::thread::sleep(Duration::from_millis(2));
        }
        t.finish();
        path
    }

    #[test]
    fn learned_traces_build_a_profile_that_loads_against_the_image() {
        let cache = tempfile::tempdir().unwrap();
        let dir = LearnedDir::new(cache.path(), "abc");
        dir.create().unwrap();
        assert!(dir.profile(CS, 10).unwrap().is_none());
        assert!(dir.build(CS, 10, 5).unwrap().is_none(), "no trace, no profile");
        record(&dir, &[(3 * CS as u64, 4096), (0, 4096)]);
        let built = dir.build(CS, 10, 5).unwrap().unwrap();
        assert_eq!((built.traces, &built.profile.chunks[..]), (1, &[3, 0][..]));
        assert_eq!(dir.profile(CS, 10).unwrap().unwrap(), built.profile);
        // Validated on load: not a profile of a smaller image.
        assert!(dir.profile(CS, 3).is_err());
        assert_eq!(std::fs::read(dir.profile_path()).unwrap(), built.bytes);
    }

    #[test]
    fn a_rebuild_merges_only_the_newest_traces() {
        let cache = tempfile::tempdir().unwrap();
        let dir = LearnedDir::new(cache.path(), "abc");
        dir.create().unwrap();
        record(&dir, &[(9 * CS as u64, 1)]);
        record(&dir, &[(1, 1)]);
        record(&dir, &[(2 * CS as u64, 1)]);
        assert_eq!(dir.traces().len(), 3);
        let p = dir.build(CS, 10, 2).unwrap().unwrap();
        assert_eq!(p.traces, 2);
        let mut chunks = p.profile.chunks.clone();
        chunks.sort();
        assert_eq!(chunks, vec![0, 2], "the oldest trace (chunk 9) is not merged");
    }

    #[test]
    fn a_trace_being_recorded_or_abandoned_is_never_counted() {
        let cache = tempfile::tempdir().unwrap();
        let dir = LearnedDir::new(cache.path(), "abc");
        dir.create().unwrap();
        let path = dir.new_trace_path();
        let ends = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = ends.clone();
        let t = TraceRecorder::create(&path, Duration::from_secs(60), u64::MAX)
            .unwrap()
            .on_finish(move |end| seen.lock().unwrap().push(end == TraceEnd::Abandoned));
        t.record(0, 4096);
        assert!(dir.traces().is_empty(), "half recorded: not a trace yet");
        assert!(crate::profile::part_path(&path).exists());
        drop(t);
        assert!(dir.traces().is_empty());
        assert!(
            !crate::profile::part_path(&path).exists(),
            "dropped unfinished: removed"
        );
        assert_eq!(*ends.lock().unwrap(), vec![true]);
        // What a crash leaves is cleared.
        std::fs::write(crate::profile::part_path(&dir.new_trace_path()), "# x\n1 0 1\n").unwrap();
        dir.remove_partial();
        assert_eq!(std::fs::read_dir(dir.root()).unwrap().count(), 0);
    }

    #[test]
    fn write_atomic_replaces_the_whole_file_and_leaves_no_temporary() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        write_atomic(&p, b"old").unwrap();
        write_atomic(&p, b"new content").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new content");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
        let dir = LearnedDir::new(d.path(), "x");
        dir.create().unwrap();
        assert_eq!(dir.published(), None);
        dir.set_published("beef").unwrap();
        assert_eq!(dir.published().as_deref(), Some("beef"));
    }
}
