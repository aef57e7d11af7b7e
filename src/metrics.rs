//! Metric types shared by the modules that count (fetch and the device): a
//! lock-free latency histogram and its snapshot, and one disk's request
//! counters, which the status document carries and the Prometheus encoder
//! prints. It imports nothing from the rest of the crate.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Upper bounds of the buckets, in seconds: 100 µs to 30 s.
pub const BOUNDS: [f64; 17] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Durations, counted per bucket; observing is two relaxed atomic adds.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per bucket (not cumulative); the last one is +Inf.
    buckets: [AtomicU64; BOUNDS.len() + 1],
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BOUNDS.iter().position(|&b| secs <= b).unwrap_or(BOUNDS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut total = 0;
        let cumulative = self
            .buckets
            .iter()
            .map(|b| {
                total += b.load(Ordering::Relaxed);
                total
            })
            .collect::<Vec<_>>();
        HistogramSnapshot {
            le: BOUNDS.to_vec(),
            cumulative: cumulative[..BOUNDS.len()].to_vec(),
            count: total,
            sum_secs: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// A histogram at one moment, Prometheus-shaped: cumulative counts per
/// upper bound (seconds), the total count (the +Inf bucket) and the sum.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HistogramSnapshot {
    pub le: Vec<f64>,
    pub cumulative: Vec<u64>,
    pub count: u64,
    pub sum_secs: f64,
}

impl HistogramSnapshot {
    /// The smallest bound with at least `q` of the observations under it.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let want = (q * self.count as f64).ceil() as u64;
        self.le
            .iter()
            .zip(&self.cumulative)
            .find(|(_, &c)| c >= want)
            .map(|(&b, _)| b)
            .or(Some(f64::INFINITY))
    }
}

/// The kinds of request a disk's counters keep apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
    /// Discard, write-zeroes and get-id.
    Other,
}

impl Op {
    pub const ALL: [Op; 4] = [Op::Read, Op::Write, Op::Flush, Op::Other];

    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Other => "other",
        }
    }
}

/// One kind of request: how many, their bytes, their failures and how long
/// they took from the worker taking them to their completion.
#[derive(Debug, Default)]
struct OpStats {
    requests: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    latency: Histogram,
}

/// One disk's requests, counted by the queue workers; lock-free.
#[derive(Debug, Default)]
pub struct DiskStats {
    ops: [OpStats; 4],
    /// Requests refused before they reached the disk (malformed chains).
    bad_requests: AtomicU64,
}

impl DiskStats {
    pub fn record(&self, op: Op, bytes: u64, ok: bool, latency: Duration) {
        let s = &self.ops[op as usize];
        s.requests.fetch_add(1, Ordering::Relaxed);
        s.bytes.fetch_add(bytes, Ordering::Relaxed);
        if !ok {
            s.errors.fetch_add(1, Ordering::Relaxed);
        }
        s.latency.observe(latency);
    }

    /// Counts a refused request; returns how many there have been.
    pub fn bad_request(&self) -> u64 {
        self.bad_requests.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn snapshot(&self) -> DiskStatsSnapshot {
        let op = |op: Op| {
            let s = &self.ops[op as usize];
            OpSnapshot {
                requests: s.requests.load(Ordering::Relaxed),
                bytes: s.bytes.load(Ordering::Relaxed),
                errors: s.errors.load(Ordering::Relaxed),
                latency: s.latency.snapshot(),
            }
        };
        DiskStatsSnapshot {
            read: op(Op::Read),
            write: op(Op::Write),
            flush: op(Op::Flush),
            other: op(Op::Other),
            bad_requests: self.bad_requests.load(Ordering::Relaxed),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OpSnapshot {
    pub requests: u64,
    pub bytes: u64,
    pub errors: u64,
    /// From the worker taking the request to its completion, fetches included.
    pub latency: HistogramSnapshot,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DiskStatsSnapshot {
    pub read: OpSnapshot,
    pub write: OpSnapshot,
    pub flush: OpSnapshot,
    pub other: OpSnapshot,
    pub bad_requests: u64,
}

impl DiskStatsSnapshot {
    pub fn op(&self, op: Op) -> &OpSnapshot {
        match op {
            Op::Read => &self.read,
            Op::Write => &self.write,
            Op::Flush => &self.flush,
            Op::Other => &self.other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_counts_cumulatively_with_sum_and_quantiles() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.cumulative[0], 1);
        assert_eq!(s.cumulative[BOUNDS.iter().position(|&b| b == 0.005).unwrap()], 3);
        assert_eq!(*s.cumulative.last().unwrap(), 3, "60 s is only in +Inf");
        assert!((s.sum_secs - 60.00605).abs() < 1e-6, "{}", s.sum_secs);
        assert_eq!(s.quantile(0.5), Some(0.005));
        assert_eq!(s.quantile(1.0), Some(f64::INFINITY));
        assert_eq!(Histogram::default().snapshot().quantile(0.5), None);
    }

    #[test]
    fn disk_stats_count_each_kind_apart() {
        let d = DiskStats::default();
        d.record(Op::Read, 4096, true, Duration::from_micros(80));
        d.record(Op::Read, 512, false, Duration::from_millis(40));
        d.record(Op::Flush, 0, true, Duration::from_millis(2));
        d.bad_request();
        let s = d.snapshot();
        assert_eq!((s.read.requests, s.read.bytes, s.read.errors), (2, 4608, 1));
        assert_eq!(s.read.latency.count, 2);
        assert_eq!(s.read.latency.quantile(0.5), Some(0.0001));
        assert_eq!((s.flush.requests, s.write.requests, s.other.requests), (1, 0, 0));
        assert_eq!(s.bad_requests, 1);
        assert_eq!(s.op(Op::Flush), &s.flush);
    }
}
