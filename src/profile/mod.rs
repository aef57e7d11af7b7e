//! Boot profiles: recording a disk's read trace, and merging traces into a
//! profile (the chunks a boot reads, each once, in first-access order).
//!
//! Trace format (text, one record per line, after a `#` header line):
//! `<microseconds since attach> <byte offset> <byte length>`.
//! Profile format (JSON): `{"version":1,"chunk_size":N,"chunks":[i, ...]}`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
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
}

/// Records a disk's guest reads for a while after attach.
pub struct TraceRecorder {
    out: Mutex<Option<BufWriter<File>>>,
    path: PathBuf,
    attached: OnceLock<Instant>,
    window: Duration,
    max_bytes: u64,
    bytes: AtomicU64,
    done: AtomicBool,
}

impl TraceRecorder {
    /// Records into `path` for `window` after attach, or until the guest
    /// has read `max_bytes`.
    pub fn create(path: &Path, window: Duration, max_bytes: u64) -> Result<Self, Error> {
        let f = File::create(path).map_err(|e| Error::CreateTrace(path.to_path_buf(), e))?;
        let mut w = BufWriter::new(f);
        writeln!(w, "{TRACE_HEADER}").map_err(Error::WriteTrace)?;
        Ok(TraceRecorder {
            out: Mutex::new(Some(w)),
            path: path.to_path_buf(),
            attached: OnceLock::new(),
            window,
            max_bytes,
            bytes: AtomicU64::new(0),
            done: AtomicBool::new(false),
        })
    }

    /// Starts the clock; the first call counts.
    pub fn attach(&self) {
        self.attached.get_or_init(Instant::now);
    }

    /// Records a guest read.
    pub fn record(&self, offset: u64, len: u64) {
        if self.done.load(Ordering::Relaxed) {
            return;
        }
        let t = self.attached.get_or_init(Instant::now).elapsed();
        let total = self.bytes.fetch_add(len, Ordering::Relaxed) + len;
        if t > self.window || total > self.max_bytes {
            self.finish();
            return;
        }
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = out.as_mut() {
            if let Err(e) = writeln!(w, "{} {offset} {len}", t.as_micros()) {
                tracing::error!(path = %self.path.display(), "trace write failed: {e}");
                *out = None;
            }
        }
    }

    /// Stops recording and flushes the trace.
    pub fn finish(&self) {
        if self.done.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(mut w) = self.out.lock().unwrap_or_else(|e| e.into_inner()).take() {
            match w.flush() {
                Ok(()) => tracing::info!(path = %self.path.display(), "boot trace recorded"),
                Err(e) => tracing::error!(path = %self.path.display(), "trace write failed: {e}"),
            }
        }
    }
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
}
