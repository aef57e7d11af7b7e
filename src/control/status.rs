//! The status document: what `streamblk status`, `disk list` and the
//! metrics endpoint show, one typed struct the daemon fills in.

use std::fmt::Write as _;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::metrics::{DiskStatsSnapshot, HistogramSnapshot, Op, OpSnapshot};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Status {
    pub disks: Vec<DiskStatus>,
    pub images: Vec<ImageStatus>,
    /// The fetch scheduler, once an image has been opened.
    pub fetch: Option<FetchStatus>,
    /// P2P, if this daemon takes part in a fleet.
    #[serde(default)]
    pub p2p: Option<P2pStatus>,
    /// The host's chunk store, once an image has been opened.
    #[serde(default)]
    pub cache: Option<CacheStatus>,
}

/// The host's chunk store: each chunk once, whichever images hold it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CacheStatus {
    pub dir: PathBuf,
    pub chunks: u64,
    /// Bytes of the slots that hold chunks.
    pub bytes: u64,
    /// `--cache-size-mib` in bytes; None: no cap.
    pub limit: Option<u64>,
    /// Chunks written since the daemon started.
    pub inserted: u64,
    /// Chunks evicted to stay under the cap since the daemon started.
    pub evicted: u64,
}

/// This host in its fleet: its view of the membership, what it asked of
/// each peer, and what it served.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct P2pStatus {
    /// The address peers reach this host at (`--p2p-listen`), if it serves.
    pub listen: Option<String>,
    /// The members in force (the list may name this host).
    pub members: Vec<String>,
    /// Where they come from: `static`, or the etcd URL and prefix.
    #[serde(default)]
    pub membership: String,
    /// With etcd: whether the daemon has a live session (without one it
    /// keeps its last view).
    #[serde(default)]
    pub membership_connected: Option<bool>,
    /// Times the view changed since the start.
    #[serde(default)]
    pub membership_changes: u64,
    /// This host's zone (`--zone`).
    #[serde(default)]
    pub zone: Option<String>,
    /// This host is a member: it is home for some chunks.
    pub is_member: bool,
    /// Every peer asked so far.
    pub peers: Vec<PeerStatus>,
    /// Chunks (and their bytes) this host got from peers, verified: the
    /// fetch scheduler's `peer_chunks` and `peer_bytes`.
    #[serde(default)]
    pub peer_chunks: u64,
    #[serde(default)]
    pub peer_bytes: u64,
    /// Chunks uploaded to peers, and their bytes.
    pub uploads: u64,
    pub upload_bytes: u64,
    /// Uploads in progress and waiting for a slot now.
    pub upload_queue: u64,
    /// Peer requests for chunks this host did not hold, which it fetched as their home.
    pub home_fetches: u64,
    /// Peer requests sent on to other holders while the upload slots were busy.
    #[serde(default)]
    pub redirects: u64,
    /// Profile prefetches this host started as a home (the first
    /// profile-class request for an open image), and the chunks they brought.
    #[serde(default)]
    pub prefetches: u64,
    #[serde(default)]
    pub prefetched_chunks: u64,
    /// Members that told this host (their chunks' home) they verified a
    /// chunk they got from another holder.
    #[serde(default)]
    pub holders_told: u64,
    /// Peer requests refused: no or wrong token, malformed, unknown chunk,
    /// too busy, a fetch that failed.
    pub refused_unauthorized: u64,
    pub bad_requests: u64,
    pub not_found: u64,
    pub busy: u64,
    pub failed: u64,
    /// Chunks held in memory for peers (of images this host has not open).
    pub loose_chunks: u64,
    pub loose_bytes: u64,
    /// Distinct chunks of open images servable by digest.
    pub indexed_chunks: u64,
}

/// One peer as this host sees it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PeerStatus {
    pub addr: String,
    pub requests: u64,
    /// Answers with a chunk, and their bytes (before verification).
    pub served: u64,
    pub bytes: u64,
    pub failures: u64,
    /// Chunks it sent that failed verification.
    pub bad_chunks: u64,
    /// Times it redirected this host to other holders.
    #[serde(default)]
    pub redirects: u64,
    /// Its upload queue depth at its last answer.
    pub queue: u64,
    /// Unreachable lately: skipped for a few seconds.
    pub down: bool,
}

/// Whether a disk is ready for, or serving, a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskState {
    /// Listening; no frontend connected.
    Waiting,
    /// A frontend (QEMU) is connected.
    Attached,
    /// Being removed.
    Stopping,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DiskStatus {
    pub name: String,
    pub socket: PathBuf,
    pub overlay: PathBuf,
    /// `image=NAME` or `base=PATH`.
    pub source: String,
    pub queues: u16,
    pub readonly: bool,
    pub state: DiskState,
    /// Kept for scripts that read `connected`: `state == attached`.
    pub connected: bool,
    /// Requests in flight from the frontend.
    pub inflight: u64,
    /// Where the disk came from: `config` (file or command line) or `api`.
    pub origin: String,
    /// The disk's spec, in `--disk` form.
    pub spec: String,
    /// Requests served since the disk was added, by kind.
    #[serde(default)]
    pub io: DiskStatsSnapshot,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageStatus {
    pub id: String,
    /// Names the disks use for it.
    pub names: Vec<String>,
    pub chunk_size: u64,
    /// Non-zero chunks of the image, and those in the Local Cache.
    pub chunks: u64,
    pub filled: u64,
    pub percent: f64,
    /// Average fill rate since the image was opened, bytes per second.
    pub fill_rate: f64,
    /// Seconds until the cache holds every chunk at that rate (None: no progress yet, or done).
    pub eta_secs: Option<f64>,
    pub hits: u64,
    pub misses: u64,
    /// Disks using the image.
    pub users: u64,
    /// The boot profile; `source` is `none` if the image has none.
    pub profile: Option<ProfileStatus>,
}

/// The image's boot profile and how it streams.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ProfileStatus {
    /// Where the profile came from: `store`, `learned` (built on this host
    /// from recorded boots) or `none`.
    #[serde(default = "store_profile")]
    pub source: String,
    pub chunks: u64,
    pub streamed: u64,
    pub hits: u64,
    pub stalls: u64,
    pub first_read_ms: Option<u64>,
    pub done_ms: Option<u64>,
    /// Boots of the image recorded on this host for its learned profile,
    /// and those recording now.
    #[serde(default)]
    pub learned_traces: u64,
    #[serde(default)]
    pub recording: u64,
}

/// Before `source` existed a daemon showed only profiles from the store.
fn store_profile() -> String {
    "store".into()
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ByClass {
    pub background: u64,
    pub profile: u64,
    pub demand: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FetchStatus {
    pub store: String,
    pub store_chunks: u64,
    pub store_bytes: u64,
    /// Chunks peers served (verified) and their bytes.
    #[serde(default)]
    pub peer_chunks: u64,
    #[serde(default)]
    pub peer_bytes: u64,
    /// Peer requests that brought no chunk, and chunks from peers that
    /// failed verification.
    #[serde(default)]
    pub peer_failures: u64,
    #[serde(default)]
    pub bad_peer_chunks: u64,
    pub corrupt_chunks: u64,
    pub failed_attempts: u64,
    pub guest_waits: u64,
    pub guest_wait_ms: u64,
    pub by_class: ByClass,
    /// Fetch durations (retries included) by class, of the fetches the
    /// store served (or that failed), and of those a peer served.
    #[serde(default)]
    pub latency: LatencyByClass,
    #[serde(default)]
    pub peer_latency: LatencyByClass,
    /// How long each guest read that missed waited.
    #[serde(default)]
    pub guest_wait: HistogramSnapshot,
    /// Current caps of background fill and profile streaming, bytes per second.
    #[serde(default)]
    pub fill_rate_cap: Option<u64>,
    #[serde(default)]
    pub profile_rate_cap: Option<u64>,
    /// Background fill adapts to the guests' fetches (`--fill-rate auto`).
    #[serde(default)]
    pub fill_auto: bool,
    /// The background fill and profile streaming rates in force now, bytes
    /// per second (None: no limit; fill 0: off or backed off fully).
    #[serde(default)]
    pub fill_rate_now: Option<u64>,
    #[serde(default)]
    pub profile_rate_now: Option<u64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LatencyByClass {
    pub background: HistogramSnapshot,
    pub profile: HistogramSnapshot,
    pub demand: HistogramSnapshot,
}

/// Escapes a label value for the Prometheus text format.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

impl Status {
    /// The document in Prometheus's text exposition format.
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, help: &str, kind: &str, samples: &[(String, f64)]| {
            let _ = writeln!(out, "# HELP streamblk_{name} {help}\n# TYPE streamblk_{name} {kind}");
            for (labels, v) in samples {
                // The text format spells infinity +Inf.
                if *v == f64::INFINITY {
                    let _ = writeln!(out, "streamblk_{name}{labels} +Inf");
                } else {
                    let _ = writeln!(out, "streamblk_{name}{labels} {v}");
                }
            }
        };
        let per_image = |f: &dyn Fn(&ImageStatus) -> f64| -> Vec<(String, f64)> {
            self.images
                .iter()
                .map(|i| (format!("{{image=\"{}\"}}", label(&i.id)), f(i)))
                .collect()
        };
        metric(
            "image_chunks",
            "Non-zero chunks of the image.",
            "gauge",
            &per_image(&|i| i.chunks as f64),
        );
        metric(
            "image_cached_chunks",
            "Non-zero chunks of the image in the Local Cache.",
            "gauge",
            &per_image(&|i| i.filled as f64),
        );
        metric(
            "image_fill_rate_bytes_per_second",
            "Average rate the image's Local Cache filled at since it was opened.",
            "gauge",
            &per_image(&|i| i.fill_rate),
        );
        metric(
            "image_users",
            "Disks using the image.",
            "gauge",
            &per_image(&|i| i.users as f64),
        );
        let sources: Vec<(String, f64)> = self
            .images
            .iter()
            .filter_map(|i| {
                let p = i.profile.as_ref()?;
                let l = format!("{{image=\"{}\",source=\"{}\"}}", label(&i.id), label(&p.source));
                Some((l, 1.0))
            })
            .collect();
        metric(
            "image_profile_info",
            "Where the image's boot profile came from (store, learned or none).",
            "gauge",
            &sources,
        );
        metric(
            "image_learned_traces",
            "Boots of the image recorded on this host for its learned profile.",
            "gauge",
            &per_image(&|i| i.profile.as_ref().map_or(0, |p| p.learned_traces) as f64),
        );
        metric(
            "cache_hits_total",
            "Guest reads served from the Local Cache.",
            "counter",
            &per_image(&|i| i.hits as f64),
        );
        metric(
            "cache_misses_total",
            "Guest reads that waited for a fetch.",
            "counter",
            &per_image(&|i| i.misses as f64),
        );
        if let Some(c) = &self.cache {
            let one = |v: u64| [(String::new(), v as f64)];
            metric(
                "cache_chunks",
                "Chunks in the host's chunk store (each once, whichever images hold it).",
                "gauge",
                &one(c.chunks),
            );
            metric(
                "cache_bytes",
                "Bytes of the chunk store's slots that hold chunks.",
                "gauge",
                &one(c.bytes),
            );
            metric(
                "cache_limit_bytes",
                "The chunk store's size cap (+Inf: none).",
                "gauge",
                &[(String::new(), c.limit.map_or(f64::INFINITY, |v| v as f64))],
            );
            metric(
                "cache_inserted_chunks_total",
                "Chunks written to the chunk store.",
                "counter",
                &one(c.inserted),
            );
            metric(
                "cache_evicted_chunks_total",
                "Chunks evicted, least recently used first, to stay under the cap.",
                "counter",
                &one(c.evicted),
            );
        }
        if let Some(f) = &self.fetch {
            let one = |v: u64| [(String::new(), v as f64)];
            let rate = |v: Option<u64>| [(String::new(), v.map_or(f64::INFINITY, |v| v as f64))];
            metric(
                "fill_rate_bytes_per_second",
                "Background fill rate in force now (+Inf: no limit; 0: off or backed off).",
                "gauge",
                &rate(f.fill_rate_now),
            );
            metric(
                "fill_auto",
                "1 if background fill adapts to the guests' fetches (--fill-rate auto).",
                "gauge",
                &one(u64::from(f.fill_auto)),
            );
            metric(
                "profile_rate_bytes_per_second",
                "Boot profile streaming rate in force now (+Inf: no limit).",
                "gauge",
                &rate(f.profile_rate_now),
            );
            metric(
                "store_chunks_total",
                "Chunks fetched from the store.",
                "counter",
                &one(f.store_chunks),
            );
            metric(
                "store_bytes_total",
                "Bytes fetched from the store.",
                "counter",
                &one(f.store_bytes),
            );
            metric(
                "source_chunks_total",
                "Chunks fetched, by source (store or peers).",
                "counter",
                &[
                    ("{source=\"store\"}".into(), f.store_chunks as f64),
                    ("{source=\"peer\"}".into(), f.peer_chunks as f64),
                ],
            );
            metric(
                "source_bytes_total",
                "Bytes fetched, by source (stored form from the store, plaintext from peers).",
                "counter",
                &[
                    ("{source=\"store\"}".into(), f.store_bytes as f64),
                    ("{source=\"peer\"}".into(), f.peer_bytes as f64),
                ],
            );
            metric(
                "bad_peer_chunks_total",
                "Chunks from peers that failed verification (never cached).",
                "counter",
                &one(f.bad_peer_chunks),
            );
            metric(
                "peer_failures_total",
                "Peer requests that brought no chunk (unreachable, busy, refused, timed out).",
                "counter",
                &one(f.peer_failures),
            );
            metric(
                "corrupt_chunks_total",
                "Fetched chunks that failed verification.",
                "counter",
                &one(f.corrupt_chunks),
            );
            metric(
                "fetch_failures_total",
                "Failed fetch attempts.",
                "counter",
                &one(f.failed_attempts),
            );
            metric(
                "guest_waits_total",
                "Guest reads that waited on a fetch.",
                "counter",
                &one(f.guest_waits),
            );
            metric(
                "guest_wait_seconds_total",
                "Time guests waited on fetches.",
                "counter",
                &[(String::new(), f.guest_wait_ms as f64 / 1000.0)],
            );
            metric(
                "fetched_chunks_total",
                "Chunks fetched, by priority class.",
                "counter",
                &[
                    ("{class=\"demand\"}".into(), f.by_class.demand as f64),
                    ("{class=\"profile\"}".into(), f.by_class.profile as f64),
                    ("{class=\"background\"}".into(), f.by_class.background as f64),
                ],
            );
        }
        if let Some(p) = &self.p2p {
            p2p_metrics(p, &mut metric);
        }
        let per_disk = |f: &dyn Fn(&DiskStatus) -> f64| -> Vec<(String, f64)> {
            self.disks
                .iter()
                .map(|d| (format!("{{disk=\"{}\"}}", label(&d.name)), f(d)))
                .collect()
        };
        metric(
            "disk_attached",
            "1 while a frontend is connected to the disk.",
            "gauge",
            &per_disk(&|d| u64::from(d.connected) as f64),
        );
        metric(
            "disk_inflight_requests",
            "Requests of the disk's frontend in flight.",
            "gauge",
            &per_disk(&|d| d.inflight as f64),
        );
        let per_disk_op = |f: &dyn Fn(&OpSnapshot) -> u64| -> Vec<(String, f64)> {
            self.disks
                .iter()
                .flat_map(|d| {
                    Op::ALL.map(|op| {
                        let labels = format!("{{disk=\"{}\",op=\"{}\"}}", label(&d.name), op.name());
                        (labels, f(d.io.op(op)) as f64)
                    })
                })
                .collect()
        };
        metric(
            "disk_requests_total",
            "Requests the disk's frontends made, by kind.",
            "counter",
            &per_disk_op(&|o| o.requests),
        );
        metric(
            "disk_bytes_total",
            "Bytes the disk's frontends read and wrote.",
            "counter",
            &per_disk_op(&|o| o.bytes),
        );
        metric(
            "disk_errors_total",
            "Requests of the disk that completed with an error status.",
            "counter",
            &per_disk_op(&|o| o.errors),
        );
        metric(
            "disk_bad_requests_total",
            "Malformed requests the disk's frontends made.",
            "counter",
            &per_disk(&|d| d.io.bad_requests as f64),
        );
        let labels: Vec<(String, &HistogramSnapshot)> = self
            .disks
            .iter()
            .flat_map(|d| {
                Op::ALL.map(|op| {
                    let l = format!("disk=\"{}\",op=\"{}\"", label(&d.name), op.name());
                    (l, &d.io.op(op).latency)
                })
            })
            .collect();
        let series: Vec<(&str, &HistogramSnapshot)> = labels.iter().map(|(l, h)| (l.as_str(), *h)).collect();
        histogram(
            &mut out,
            "disk_request_duration_seconds",
            "Time from the device taking a request to completing it, fetches included.",
            &series,
        );
        if let Some(f) = &self.fetch {
            let (l, p) = (&f.latency, &f.peer_latency);
            histogram(
                &mut out,
                "fetch_duration_seconds",
                "Chunk fetch time, retries included, by priority class at its start and source.",
                &[
                    ("class=\"demand\",source=\"store\"", &l.demand),
                    ("class=\"profile\",source=\"store\"", &l.profile),
                    ("class=\"background\",source=\"store\"", &l.background),
                    ("class=\"demand\",source=\"peer\"", &p.demand),
                    ("class=\"profile\",source=\"peer\"", &p.profile),
                    ("class=\"background\",source=\"peer\"", &p.background),
                ],
            );
            histogram(
                &mut out,
                "guest_stall_duration_seconds",
                "Time a guest read that missed the cache waited for its chunks.",
                &[("", &f.guest_wait)],
            );
        }
        out
    }
}

/// The P2P families: membership, uploads, refusals, and per peer.
/// Writes one metric family: name, help, type, samples (labels, value).
type MetricFn<'a> = dyn FnMut(&str, &str, &str, &[(String, f64)]) + 'a;

fn p2p_metrics(p: &P2pStatus, metric: &mut MetricFn<'_>) {
    let one = |v: u64| [(String::new(), v as f64)];
    metric(
        "p2p_members",
        "Members in this host's view of the fleet.",
        "gauge",
        &one(p.members.len() as u64),
    );
    metric(
        "p2p_membership_changes_total",
        "Times this host's view of the fleet changed.",
        "counter",
        &one(p.membership_changes),
    );
    metric(
        "p2p_uploads_total",
        "Chunks uploaded to peers.",
        "counter",
        &one(p.uploads),
    );
    metric(
        "p2p_upload_bytes_total",
        "Bytes uploaded to peers.",
        "counter",
        &one(p.upload_bytes),
    );
    metric(
        "p2p_upload_queue",
        "Uploads in progress and waiting for a slot.",
        "gauge",
        &one(p.upload_queue),
    );
    metric(
        "p2p_redirects_total",
        "Peer requests redirected to other holders while the upload slots were busy.",
        "counter",
        &one(p.redirects),
    );
    metric(
        "p2p_holders_told_total",
        "Members that told this host, a chunk's home, they verified the chunk from another holder.",
        "counter",
        &one(p.holders_told),
    );
    metric(
        "p2p_home_fetches_total",
        "Chunks fetched as their home to serve a peer.",
        "counter",
        &one(p.home_fetches),
    );
    metric(
        "p2p_prefetches_total",
        "Profile prefetches started as a home, on the first profile request for an open image.",
        "counter",
        &one(p.prefetches),
    );
    metric(
        "p2p_prefetched_chunks_total",
        "Profile chunks brought into the cache by a home's prefetch.",
        "counter",
        &one(p.prefetched_chunks),
    );
    metric(
        "p2p_refused_total",
        "Peer requests refused, by reason.",
        "counter",
        &[
            ("{reason=\"unauthorized\"}".into(), p.refused_unauthorized as f64),
            ("{reason=\"bad_request\"}".into(), p.bad_requests as f64),
            ("{reason=\"not_found\"}".into(), p.not_found as f64),
            ("{reason=\"busy\"}".into(), p.busy as f64),
            ("{reason=\"failed\"}".into(), p.failed as f64),
        ],
    );
    let per_peer = |f: &dyn Fn(&PeerStatus) -> u64| -> Vec<(String, f64)> {
        p.peers
            .iter()
            .map(|s| (format!("{{peer=\"{}\"}}", label(&s.addr)), f(s) as f64))
            .collect()
    };
    metric(
        "peer_chunks_total",
        "Chunks a peer sent this host (before verification).",
        "counter",
        &per_peer(&|s| s.served),
    );
    metric(
        "peer_bytes_total",
        "Bytes a peer sent this host.",
        "counter",
        &per_peer(&|s| s.bytes),
    );
    metric(
        "peer_request_failures_total",
        "Requests to a peer that brought no chunk.",
        "counter",
        &per_peer(&|s| s.failures),
    );
    metric(
        "peer_bad_chunks_total",
        "Chunks a peer sent that failed verification.",
        "counter",
        &per_peer(&|s| s.bad_chunks),
    );
    metric(
        "peer_down",
        "1 while a peer is skipped as unreachable.",
        "gauge",
        &per_peer(&|s| u64::from(s.down)),
    );
}

/// Appends a histogram family, one series per `(labels, snapshot)`.
fn histogram(out: &mut String, name: &str, help: &str, series: &[(&str, &HistogramSnapshot)]) {
    let _ = writeln!(out, "# HELP streamblk_{name} {help}\n# TYPE streamblk_{name} histogram");
    for (labels, h) in series {
        let sep = if labels.is_empty() { "" } else { "," };
        for (le, c) in h.le.iter().zip(&h.cumulative) {
            let _ = writeln!(out, "streamblk_{name}_bucket{{{labels}{sep}le=\"{le}\"}} {c}");
        }
        let _ = writeln!(out, "streamblk_{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", h.count);
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "streamblk_{name}_sum{braces} {}", h.sum_secs);
        let _ = writeln!(out, "streamblk_{name}_count{braces} {}", h.count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_output_has_help_type_and_escaped_labels() {
        let s = Status {
            disks: vec![DiskStatus {
                name: "a\"b".into(),
                socket: "s".into(),
                overlay: "o".into(),
                source: "base=b".into(),
                queues: 1,
                readonly: false,
                state: DiskState::Attached,
                connected: true,
                inflight: 0,
                origin: "api".into(),
                spec: String::new(),
                io: DiskStatsSnapshot::default(),
            }],
            images: vec![],
            fetch: Some(FetchStatus {
                fill_auto: true,
                fill_rate_now: Some(12_500_000),
                peer_chunks: 7,
                ..FetchStatus::default()
            }),
            cache: Some(CacheStatus {
                dir: PathBuf::from("/var/cache/streamblk"),
                chunks: 3,
                bytes: 3 << 18,
                limit: Some(1 << 30),
                inserted: 5,
                evicted: 2,
            }),
            p2p: Some(P2pStatus {
                members: vec!["127.0.0.1:7000".into(), "127.0.0.1:7001".into()],
                uploads: 5,
                peers: vec![PeerStatus {
                    addr: "127.0.0.1:7001".into(),
                    bad_chunks: 2,
                    ..PeerStatus::default()
                }],
                ..P2pStatus::default()
            }),
        };
        let text = s.prometheus();
        assert!(
            text.contains("# TYPE streamblk_fill_rate_bytes_per_second gauge"),
            "{text}"
        );
        assert!(
            text.contains("streamblk_fill_rate_bytes_per_second 12500000\n"),
            "{text}"
        );
        assert!(text.contains("streamblk_fill_auto 1\n"), "{text}");
        assert!(
            text.contains("streamblk_source_chunks_total{source=\"peer\"} 7\n"),
            "{text}"
        );
        assert!(text.contains("streamblk_p2p_members 2\n"), "{text}");
        assert!(text.contains("streamblk_p2p_membership_changes_total 0\n"), "{text}");
        assert!(text.contains("streamblk_p2p_uploads_total 5\n"), "{text}");
        assert!(
            text.contains("streamblk_peer_bad_chunks_total{peer=\"127.0.0.1:7001\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("streamblk_profile_rate_bytes_per_second +Inf\n"),
            "no limit: {text}"
        );
        assert!(text.contains("streamblk_disk_attached{disk=\"a\\\"b\"} 1"), "{text}");
        assert!(text.contains("# TYPE streamblk_store_bytes_total counter"), "{text}");
        assert!(
            text.contains("streamblk_disk_requests_total{disk=\"a\\\"b\",op=\"flush\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("streamblk_disk_request_duration_seconds_bucket{disk=\"a\\\"b\",op=\"read\",le=\"+Inf\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn prometheus_shows_where_each_images_profile_came_from() {
        let image = |id: &str, source: &str, traces: u64| ImageStatus {
            id: id.into(),
            names: vec![],
            chunk_size: 65536,
            chunks: 4,
            filled: 0,
            percent: 0.0,
            fill_rate: 0.0,
            eta_secs: None,
            hits: 0,
            misses: 0,
            users: 1,
            profile: Some(ProfileStatus {
                source: source.into(),
                learned_traces: traces,
                ..ProfileStatus::default()
            }),
        };
        let s = Status {
            images: vec![image("aa", "learned", 2), image("bb", "none", 0)],
            ..Status::default()
        };
        let text = s.prometheus();
        assert!(
            text.contains("streamblk_image_profile_info{image=\"aa\",source=\"learned\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("streamblk_image_profile_info{image=\"bb\",source=\"none\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("streamblk_image_learned_traces{image=\"aa\"} 2"),
            "{text}"
        );
        // In a status document from before `source` existed, a profile
        // came from the store.
        let old: ProfileStatus = serde_json::from_str(
            r#"{"chunks":1,"streamed":0,"hits":0,"stalls":0,"first_read_ms":null,"done_ms":null}"#,
        )
        .unwrap();
        assert_eq!(old.source, "store");
    }
}
