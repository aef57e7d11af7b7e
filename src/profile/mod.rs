//! Boot profiles: recording a disk's read trace, and merging traces into a
//! profile (the chunks a boot reads, each once, in first-access order).
//!
//! Trace format (text, one record per line, after a `#` header line):
//! `<microseconds since attach> <byte offset> <byte length>`.
//! Profile format (JSON): `{"version":1,"chunk_size":N,"chunks":[i, ...]}`.
//! [`learned`] keeps the traces and profiles a daemon learns by itself.
//! Files only: nothing here knows of virtio, the store or the daemon.

pub mod learned;

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

const TRACE_HEADER: &str = "# streamblk trace v1: usec offset length";
pub const VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("create trace {0}")]
    CreateTrace(PathBuf, #[source] io::Error),
    #[error("write trace")]
    WriteTrace(#[source] io::Error),
    #[error("read trace {0}")]
    ReadTrace(PathBuf, #[source] io::Error),
    #[error("trace {0} line {1}: {2}")]
    BadTrace(PathBuf, usize, String),
    #[error("profile does not parse")]
    ParseProfile(#[source] serde_json::Error),
    #[error("profile is invalid: {0}")]
    BadProfile(String),
    #[error("create directory {0}")]
    CreateDir(PathBuf, #[source] io::Error),
    #[error("read profile {0}")]
    ReadProfile(PathBuf, #[source] io::Error),
    #[error("write profile {0}")]
    WriteProfile(PathBuf, #[source] io::Error),
}

/// Most records one trace holds (about 25 bytes each on disk): bounds a
/// trace's size whatever the guest reads.
pub const MAX_RECORDS: u64 = 2_000_000;

/// How a recording ended, as its `on_finish` hook hears it.
#[derive(Debug, PartialEq, Eq)]
pub enum TraceEnd<'a> {
    /// The trace is complete and durable at `path`.
    Written { path: &'a Path, records: u64 },
    /// Nothing was kept: a write failed, or the recorder was dropped unfinished.
    Abandoned,
}

type OnFinish = Box<dyn FnOnce(TraceEnd<'_>) + Send>;

/// Records a disk's guest reads for a while after attach. Clones share one
/// recording. The trace is written under a temporary name (`PATH.part`)
/// and renamed to its path only when finished, so a crash never leaves a
/// half trace where a complete one is expected.
#[derive(Clone)]
pub struct TraceRecorder {
    inner: Arc<Recording>,
}

struct Recording {
    out: Mutex<Option<BufWriter<File>>>,
    part: PathBuf,
    path: PathBuf,
    attached: OnceLock<Instant>,
    window: Duration,
    max_bytes: u64,
    bytes: AtomicU64,
    records: AtomicU64,
    /// No more records are taken.
    closed: AtomicBool,
    /// `finish` ran (or is running).
    finished: AtomicBool,
    /// A write failed: the trace is not kept.
    failed: AtomicBool,
    /// Wakes `finish_on_time` at attach, at close and at finish.
    wake: tokio::sync::Notify,
    on_finish: Mutex<Option<OnFinish>>,
}

impl TraceRecorder {
    /// Records into `path` for `window` after attach, or until the guest
    /// has read `max_bytes` (or [`MAX_RECORDS`] reads).
    pub fn create(path: &Path, window: Duration, max_bytes: u64) -> Result<Self, Error> {
        let part = part_path(path);
        let f = File::create(&part).map_err(|e| Error::CreateTrace(part.clone(), e))?;
        let mut w = BufWriter::new(f);
        if let Err(e) = writeln!(w, "{TRACE_HEADER}") {
            let _ = std::fs::remove_file(&part);
            return Err(Error::WriteTrace(e));
        }
        Ok(TraceRecorder {
            inner: Arc::new(Recording {
                out: Mutex::new(Some(w)),
                part,
                path: path.to_path_buf(),
                attached: OnceLock::new(),
                window,
                max_bytes,
                bytes: AtomicU64::new(0),
                records: AtomicU64::new(0),
                closed: AtomicBool::new(false),
                finished: AtomicBool::new(false),
                failed: AtomicBool::new(false),
                wake: tokio::sync::Notify::new(),
                on_finish: Mutex::new(None),
            }),
        })
    }

    /// Calls `f` once when the recording ends, however it ends.
    pub fn on_finish(self, f: impl FnOnce(TraceEnd<'_>) + Send + 'static) -> Self {
        *lock(&self.inner.on_finish) = Some(Box::new(f));
        self
    }

    /// Where the finished trace goes.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Reads recorded so far.
    pub fn records(&self) -> u64 {
        self.inner.records.load(Ordering::Relaxed)
    }

    /// Starts the clock; the first call counts.
    pub fn attach(&self) {
        self.start_clock();
    }

    fn start_clock(&self) -> Instant {
        if let Some(&t) = self.inner.attached.get() {
            return t;
        }
        let t = *self.inner.attached.get_or_init(Instant::now);
        self.inner.wake.notify_one();
        t
    }

    /// Records a guest read.
    pub fn record(&self, offset: u64, len: u64) {
        let r = &self.inner;
        if r.closed.load(Ordering::Relaxed) {
            return;
        }
        let t = self.start_clock().elapsed();
        let total = r.bytes.fetch_add(len, Ordering::Relaxed) + len;
        if t > r.window || total > r.max_bytes || r.records.load(Ordering::Relaxed) >= MAX_RECORDS {
            // Writing the file out is left to `finish` (or `finish_on_time`):
            // not on the thread serving the guest.
            self.close();
            return;
        }
        let mut out = lock(&r.out);
        if let Some(w) = out.as_mut() {
            match writeln!(w, "{} {offset} {len}", t.as_micros()) {
                Ok(()) => {
                    r.records.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::error!(path = %r.part.display(), "trace write failed: {e}");
                    r.failed.store(true, Ordering::Relaxed);
                    *out = None;
                }
            }
        }
    }

    /// Takes no more records; the trace is written out by `finish`.
    fn close(&self) {
        if !self.inner.closed.swap(true, Ordering::AcqRel) {
            self.inner.wake.notify_one();
        }
    }

    /// Stops recording, makes the trace durable under its path and tells
    /// the `on_finish` hook. Blocks on file I/O; later calls do nothing.
    pub fn finish(&self) {
        let r = &self.inner;
        if r.finished.swap(true, Ordering::AcqRel) {
            return;
        }
        r.closed.store(true, Ordering::Release);
        r.wake.notify_one();
        let out = lock(&r.out).take();
        let written = match out {
            Some(w) if !r.failed.load(Ordering::Relaxed) => write_out(w, &r.part, &r.path),
            _ => Err(io::Error::other("an earlier write failed")),
        };
        let end = match &written {
            Ok(()) => {
                tracing::info!(path = %r.path.display(), records = self.records(), "boot trace recorded");
                TraceEnd::Written {
                    path: &r.path,
                    records: self.records(),
                }
            }
            Err(e) => {
                tracing::error!(path = %r.path.display(), "trace not kept: {e}");
                let _ = std::fs::remove_file(&r.part);
                TraceEnd::Abandoned
            }
        };
        if let Some(f) = lock(&r.on_finish).take() {
            f(end);
        }
    }

    /// Finishes the trace when its window ends (counted from attach) or
    /// when a limit closes it, whichever comes first, so a trace is
    /// complete on time even if the guest reads nothing more. Returns at
    /// once if it was finished otherwise (the disk stopped).
    pub async fn finish_on_time(&self) {
        let r = &self.inner;
        loop {
            let woken = r.wake.notified();
            if r.finished.load(Ordering::Acquire) {
                return;
            }
            if r.closed.load(Ordering::Acquire) {
                break;
            }
            match r.attached.get() {
                Some(&t0) => {
                    let end = t0 + r.window;
                    if Instant::now() >= end {
                        break;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep_until(end.into()) => {}
                        _ = woken => {}
                    }
                }
                None => woken.await,
            }
        }
        let me = self.clone();
        let _ = tokio::task::spawn_blocking(move || me.finish()).await;
    }
}

impl Drop for Recording {
    /// A recording never finished keeps nothing: its partial file goes.
    fn drop(&mut self) {
        if !*self.finished.get_mut() {
            let _ = std::fs::remove_file(&self.part);
            if let Some(f) = self.on_finish.get_mut().unwrap_or_else(|e| e.into_inner()).take() {
                f(TraceEnd::Abandoned);
            }
        }
    }
}

/// The temporary name a trace has while it is recorded.
pub fn part_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".part");
    PathBuf::from(p)
}

/// Flushes and syncs a trace, then renames it into place and syncs the
/// directory: after a crash it is either complete at `path` or absent.
fn write_out(w: BufWriter<File>, part: &Path, path: &Path) -> io::Result<()> {
    let f = w.into_inner().map_err(|e| e.into_error())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(part, path)?;
    sync_parent(path)
}

fn sync_parent(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One guest read of a trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceRecord {
    pub usec: u64,
    pub offset: u64,
    pub len: u64,
}

pub fn read_trace(path: &Path) -> Result<Vec<TraceRecord>, Error> {
    let f = File::open(path).map_err(|e| Error::ReadTrace(path.to_path_buf(), e))?;
    parse_trace(BufReader::new(f), path)
}

/// Parses a trace's text; `path` names it in errors.
pub fn parse_trace(text: impl BufRead, path: &Path) -> Result<Vec<TraceRecord>, Error> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.map_err(|e| Error::ReadTrace(path.to_path_buf(), e))?;
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let v: Vec<u64> = line
            .split_whitespace()
            .map(|x| x.parse::<u64>())
            .collect::<Result<_, _>>()
            .map_err(|e| Error::BadTrace(path.to_path_buf(), i + 1, e.to_string()))?;
        let [usec, offset, len] = v[..] else {
            return Err(Error::BadTrace(path.to_path_buf(), i + 1, "expected 3 numbers".into()));
        };
        // One guest request moves at most 4 GiB (virtio's u32 length).
        if len > u64::from(u32::MAX) || offset.checked_add(len).is_none() {
            return Err(Error::BadTrace(path.to_path_buf(), i + 1, "not a guest read".into()));
        }
        out.push(TraceRecord { usec, offset, len });
    }
    Ok(out)
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    pub version: u32,
    pub chunk_size: u32,
    /// Chunk indices in the order a boot first reads them, each once.
    pub chunks: Vec<u32>,
    /// How long the recorded boots read (median of the traces' last reads):
    /// background fill waits this long after attach, so it does not compete
    /// with the boot for the link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_ms: Option<u64>,
}

impl Profile {
    /// Merges traces: each chunk once, ordered by the median of its first
    /// access times over the traces that read it (chunks read in any trace
    /// are kept).
    pub fn build(traces: &[Vec<TraceRecord>], chunk_size: u32) -> Profile {
        let cs = chunk_size as u64;
        let mut firsts: HashMap<u32, Vec<u64>> = HashMap::new();
        for trace in traces {
            let mut first: HashMap<u32, u64> = HashMap::new();
            for r in trace {
                let Some(end) = r.offset.checked_add(r.len) else {
                    continue;
                };
                if r.len == 0 || r.len > u64::from(u32::MAX) || (end - 1) / cs > u64::from(u32::MAX) {
                    continue;
                }
                for c in r.offset / cs..=(end - 1) / cs {
                    first.entry(c as u32).or_insert(r.usec);
                }
            }
            for (c, t) in first {
                firsts.entry(c).or_default().push(t);
            }
        }
        let mut order: Vec<(u64, u32)> = firsts
            .into_iter()
            .map(|(c, mut ts)| {
                ts.sort_unstable();
                (ts[(ts.len() - 1) / 2], c)
            })
            .collect();
        order.sort_unstable();
        let mut ends: Vec<u64> = traces.iter().filter_map(|t| t.iter().map(|r| r.usec).max()).collect();
        ends.sort_unstable();
        Profile {
            version: VERSION,
            chunk_size,
            chunks: order.into_iter().map(|(_, c)| c).collect(),
            boot_ms: (!ends.is_empty()).then(|| ends[(ends.len() - 1) / 2] / 1000),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a profile always serialises")
    }

    /// Parses and checks a profile against an image of `chunk_count` chunks of `chunk_size`.
    pub fn parse(bytes: &[u8], chunk_size: u32, chunk_count: u32) -> Result<Profile, Error> {
        let p: Profile = serde_json::from_slice(bytes).map_err(Error::ParseProfile)?;
        if p.version != VERSION {
            return Err(Error::BadProfile(format!("version {}", p.version)));
        }
        if p.chunk_size != chunk_size {
            return Err(Error::BadProfile(format!(
                "chunk size {} but the image's is {chunk_size}",
                p.chunk_size
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for &c in &p.chunks {
            if c >= chunk_count || !seen.insert(c) {
                return Err(Error::BadProfile(format!("chunk {c} out of range or repeated")));
            }
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(usec: u64, offset: u64, len: u64) -> TraceRecord {
        TraceRecord { usec, offset, len }
    }

    #[test]
    fn one_trace_gives_chunks_in_first_access_order_each_once() {
        let t = vec![
            rec(0, 5 * 4096, 4096),
            rec(10, 0, 8192),
            rec(20, 5 * 4096, 512),
            rec(30, 4096 * 3, 4096 * 4),
        ];
        // chunk size 8 KiB: blocks 5 -> chunk 2; 0..2 -> chunk 0; 3..7 -> chunks 1, 2, 3.
        let p = Profile::build(&[t], 8192);
        assert_eq!(p.chunks, vec![2, 0, 1, 3]);
        assert_eq!(p.boot_ms, Some(0));
    }

    #[test]
    fn traces_merge_by_median_first_access_and_keep_every_chunk() {
        let cs = 65536;
        let a = vec![rec(1, 0, 1), rec(2, cs, 1), rec(3, 2 * cs, 1)];
        let b = vec![rec(1, 2 * cs, 1), rec(2, 0, 1), rec(9, 5 * cs, 1)];
        let c = vec![rec(1, 2 * cs, 1), rec(5, 0, 1), rec(6, cs, 1)];
        // medians: chunk0 {1,2,5}->2, chunk1 {2,6}->2, chunk2 {3,1,1}->1, chunk5 {9}->9
        let secs = |t: &[TraceRecord]| -> Vec<TraceRecord> {
            t.iter().map(|r| rec(r.usec * 1_000_000, r.offset, r.len)).collect()
        };
        // The boots read until 3 s, 9 s and 6 s: background fill waits 6 s.
        let p = Profile::build(&[secs(&a), secs(&b), secs(&c)], cs as u32);
        assert_eq!(p.boot_ms, Some(6000));
        let p = Profile::build(&[a, b, c], cs as u32);
        assert_eq!(p.chunks, vec![2, 0, 1, 5]);
        let back = Profile::parse(&p.to_bytes(), cs as u32, 6).unwrap();
        assert_eq!(back, p);
        assert!(Profile::parse(&p.to_bytes(), cs as u32, 5).is_err());
        assert!(Profile::parse(&p.to_bytes(), 2 * cs as u32, 6).is_err());
    }

    #[test]
    fn recorder_writes_a_trace_that_reads_back_and_stops_at_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        let r = TraceRecorder::create(&path, Duration::from_secs(60), 10_000).unwrap();
        r.attach();
        r.record(4096, 4096);
        r.record(0, 512);
        r.record(8192, 8192); // crosses the byte limit: not recorded, stops
        r.record(0, 512);
        r.finish();
        let t = read_trace(&path).unwrap();
        assert_eq!(
            t.iter().map(|r| (r.offset, r.len)).collect::<Vec<_>>(),
            vec![(4096, 4096), (0, 512)]
        );
        std::fs::write(&path, "# x\n1 2\n").unwrap();
        assert!(read_trace(&path).is_err());
    }

    #[tokio::test]
    async fn a_trace_finishes_when_its_window_ends_without_another_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        let (tx, rx) = std::sync::mpsc::channel();
        let r = TraceRecorder::create(&path, Duration::from_millis(200), u64::MAX)
            .unwrap()
            .on_finish(move |end| {
                if let TraceEnd::Written { path, records } = end {
                    tx.send((path.to_path_buf(), records)).unwrap();
                }
            });
        let timer = tokio::spawn({
            let r = r.clone();
            async move { r.finish_on_time().await }
        });
        // Before attach the clock has not started: nothing finishes.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(!timer.is_finished());
        r.attach();
        r.record(0, 4096);
        assert!(!path.exists(), "recorded under a temporary name");
        tokio::time::timeout(Duration::from_secs(10), timer)
            .await
            .expect("finished at the window's end")
            .unwrap();
        assert_eq!(rx.try_recv().unwrap(), (path.clone(), 1));
        assert_eq!(read_trace(&path).unwrap().len(), 1);
        assert!(!part_path(&path).exists());
    }

    #[tokio::test]
    async fn a_trace_closed_by_its_byte_limit_is_finished_by_its_timer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        let r = TraceRecorder::create(&path, Duration::from_secs(3600), 8192).unwrap();
        let timer = tokio::spawn({
            let r = r.clone();
            async move { r.finish_on_time().await }
        });
        r.record(0, 4096);
        r.record(4096, 8192);
        tokio::time::timeout(Duration::from_secs(10), timer)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(read_trace(&path).unwrap().len(), 1);
        // A disk stopping first ends the timer at once.
        let r = TraceRecorder::create(&dir.path().join("u"), Duration::from_secs(3600), u64::MAX).unwrap();
        let timer = tokio::spawn({
            let r = r.clone();
            async move { r.finish_on_time().await }
        });
        r.finish();
        tokio::time::timeout(Duration::from_secs(10), timer)
            .await
            .unwrap()
            .unwrap();
        assert!(dir.path().join("u").exists());
    }
}
