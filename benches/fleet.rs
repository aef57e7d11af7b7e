//! The fleet benchmark (`scripts/bench-fleet.sh`): N hosts in network
//! namespaces of their own, each with a daemon, replay a recorded boot
//! trace of the real Debian guest through their own daemon with the blkio
//! client; the store (nginx) is in its own namespace behind a shaped link.
//! Every byte read is checked against the raw image.
//!
//! Scenarios (`FLEET_SCENARIOS`, default all, in this order):
//! - `cold`: every cache empty, every host starts at once.
//! - `warm`: host 0 replays the boot first, alone; then the others at once.
//! - `kill`: as cold; host 0 (a home for ~1/N of the chunks) is SIGKILLed
//!   when the fleet has done 30% of its reads.
//! - `liar`: host 0 replays the boot first without P2P, stops, has a byte
//!   of every chunk in its chunk store flipped on disk, and restarts as a
//!   peer that serves corrupt chunks; then the others replay at once.
//! - `join`: half the hosts start at once; the others start when those
//!   have done 30% of their reads (every host's member list names all).
//!
//! Reports, per scenario and N: store egress during the storm against one
//! host alone (the boot's working set as stored), the replay time of each
//! host that replayed in the storm against one host alone (median and max;
//! each host timed from its own start), upload max/mean across the live
//! hosts, p99 read latency, bytes by source, peer requests that failed and
//! corrupt chunks refused.
//!
//! Environment: `FLEET_STORE` (a store directory holding the image),
//! `FLEET_IMAGE` (its name), `FLEET_RAW` (the raw image, for checking),
//! `FLEET_TRACE` (a `streamblk` boot trace), `FLEET_HOSTS` (default "1 8";
//! the first is the baseline, run cold), `FLEET_SCENARIOS` (default
//! "cold warm kill liar join"), `FLEET_STORE_RATE` (default 100mbit),
//! `FLEET_HOST_RATE` (default 1gbit). Needs root (namespaces, tc).

#[path = "../tests/common/mod.rs"]
mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::fleet::Fleet;
use common::*;

/// Longest one read may take before its host is taken for failed.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a storm may take to reach the point where a scenario acts.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(600);

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn fail(why: &str) -> ! {
    eprintln!("bench-fleet: {why}");
    std::process::exit(1);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    Cold,
    Warm,
    Kill,
    Liar,
    Join,
}

impl Scenario {
    const ALL: [Scenario; 5] = [
        Scenario::Cold,
        Scenario::Warm,
        Scenario::Kill,
        Scenario::Liar,
        Scenario::Join,
    ];

    fn name(self) -> &'static str {
        match self {
            Scenario::Cold => "cold",
            Scenario::Warm => "warm",
            Scenario::Kill => "kill",
            Scenario::Liar => "liar",
            Scenario::Join => "join",
        }
    }

    fn parse(s: &str) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|x| x.name() == s)
    }
}

/// The reads of a trace: (offset, length), in order.
fn trace(path: &Path) -> Vec<(u64, usize)> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| fail(&format!("{}: {e}", path.display())));
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<u64> = l.split_whitespace().filter_map(|x| x.parse().ok()).collect();
            if f.len() != 3 {
                fail(&format!("{}: bad trace line {l:?}", path.display()));
            }
            (f[1], f[2] as usize)
        })
        .collect()
}

/// What one storm replays, and against what.
struct Workload {
    store: PathBuf,
    image: String,
    raw: PathBuf,
    reads: Arc<Vec<(u64, usize)>>,
    /// The client's buffer: room for the largest read.
    region: usize,
}

/// What one host saw.
#[derive(Default)]
struct Host {
    /// It replayed in the storm (not beforehand, and was not killed): its
    /// time, latencies and fetches count.
    measured: bool,
    /// Its daemon ran to the end (not killed).
    live: bool,
    time: Duration,
    latencies: Vec<Duration>,
    store_bytes: u64,
    peer_bytes: u64,
    upload_bytes: u64,
    /// Peer requests that failed (the chunk came from elsewhere).
    peer_failures: u64,
    /// Chunks from peers that failed verification (refused).
    bad_chunks: u64,
}

/// One host's replay: its time from its own start and its read latencies,
/// or why it stopped.
type Replay = JoinHandle<Result<(Duration, Vec<Duration>), String>>;

/// The fleet of one storm: its hosts' daemons (None: not started, or killed).
struct Storm<'a> {
    fleet: Fleet,
    dir: PathBuf,
    work: &'a Workload,
    p2p: bool,
    daemons: Vec<Option<Daemon>>,
    sockets: Vec<PathBuf>,
    /// Reads done, fleet-wide.
    done: Arc<AtomicU64>,
}

impl Storm<'_> {
    /// Starts host `i`'s daemon and waits for its disk's socket.
    fn start(&mut self, i: usize, p2p: bool) {
        self.launch(i, p2p);
        wait_for_socket(&self.sockets[i]);
    }

    /// Starts host `i`'s daemon (its socket is there a moment later).
    fn launch(&mut self, i: usize, p2p: bool) {
        let (ns, ip) = self.fleet.hosts[i].clone();
        let host = self.dir.join(format!("h{i}"));
        std::fs::create_dir_all(&host).unwrap();
        let socket = host.join("d.sock");
        let _ = std::fs::remove_file(&socket);
        let token = self.dir.join("token");
        if !token.exists() {
            // Once: rewriting it under daemons that are starting would let
            // one of them read it half written.
            std::fs::write(&token, "fleet-bench-token\n").unwrap();
        }
        let mut args = vec![
            "--store".to_string(),
            self.fleet.store_url.clone(),
            "--cache-dir".into(),
            host.join("cache").display().to_string(),
            // The boot's reads only: no fill, no profile learning.
            "--fill-rate".into(),
            "0".into(),
            "--learn-boots".into(),
            "0".into(),
            "--disk".into(),
            format!(
                "name=d,socket={},overlay={},image={}",
                socket.display(),
                host.join("overlay").display(),
                self.work.image
            ),
        ];
        if p2p {
            let peers: Vec<String> = self.fleet.hosts.iter().map(|(_, ip)| format!("{ip}:7070")).collect();
            args.extend([
                "--p2p-listen".into(),
                format!("{ip}:7070"),
                "--peers".into(),
                peers.join(","),
                "--p2p-token-file".into(),
                token.display().to_string(),
            ]);
        }
        self.daemons[i] = Some(Daemon::start_in(Some(&ns), &args));
        self.sockets[i] = socket;
    }

    /// Host `i` replays the trace in a thread of its own, every byte checked.
    fn replay(&self, i: usize, stop: Arc<AtomicBool>) -> Replay {
        let (socket, reads, raw, region, done) = (
            self.sockets[i].clone(),
            self.work.reads.clone(),
            self.work.raw.clone(),
            self.work.region,
            self.done.clone(),
        );
        std::thread::spawn(move || {
            let file = std::fs::File::open(&raw).map_err(|e| e.to_string())?;
            let start = Instant::now();
            let mut c = Client::connect(&socket, 1, region);
            let mut latencies = Vec::with_capacity(reads.len());
            let mut want = vec![0u8; region];
            for &(offset, len) in reads.iter() {
                if stop.load(Ordering::Relaxed) {
                    return Err(format!("host {i} stopped"));
                }
                let at = Instant::now();
                let op = Op::Read { offset, len, buf: 0 };
                match c.run_timeout(&[op], READ_TIMEOUT)[0] {
                    Some(0) => {}
                    r => return Err(format!("host {i}: read at {offset}+{len}: {r:?}")),
                }
                latencies.push(at.elapsed());
                file.read_exact_at(&mut want[..len], offset)
                    .map_err(|e| e.to_string())?;
                if c.buf()[..len] != want[..len] {
                    fail(&format!("host {i} read wrong bytes at {offset}+{len}"));
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok((start.elapsed(), latencies))
        })
    }

    /// Waits until the fleet has done `reads` reads (or every replay ended).
    fn wait_for_reads(&self, reads: u64, replays: &[Option<Replay>]) {
        let deadline = Instant::now() + PROGRESS_TIMEOUT;
        while self.done.load(Ordering::Relaxed) < reads && !replays.iter().flatten().all(|r| r.is_finished()) {
            if Instant::now() > deadline {
                fail(&format!("the fleet did not do {reads} reads in {PROGRESS_TIMEOUT:?}"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// One storm of `n` hosts (P2P on if `n > 1`) in `scenario`: each host's
/// numbers and the store's egress during the storm.
fn storm(dir: &Path, work: &Workload, n: usize, scenario: Scenario) -> (Vec<Host>, u64) {
    let fleet = Fleet::start(
        &work.store,
        &env("FLEET_STORE_RATE", "100mbit"),
        n,
        &env("FLEET_HOST_RATE", "1gbit"),
    );
    let run = dir.join(format!("{}-n{n}", scenario.name()));
    std::fs::create_dir_all(&run).unwrap();
    let mut s = Storm {
        fleet,
        dir: run,
        work,
        p2p: n > 1,
        daemons: (0..n).map(|_| None).collect(),
        sockets: vec![PathBuf::new(); n],
        done: Arc::default(),
    };
    let p2p = s.p2p;
    let stops: Vec<Arc<AtomicBool>> = (0..n).map(|_| Arc::default()).collect();
    // Host 0 replays beforehand: warm as a peer; the liar without P2P, its
    // chunk store then corrupted and served.
    let prepared = matches!(scenario, Scenario::Warm | Scenario::Liar) && n > 1;
    if prepared {
        s.start(0, scenario == Scenario::Warm);
        let r = s.replay(0, stops[0].clone());
        r.join().unwrap().unwrap_or_else(|e| fail(&e));
        if scenario == Scenario::Liar {
            let mut d = s.daemons[0].take().unwrap();
            if !d.terminate().success() {
                fail("the liar-to-be did not stop cleanly");
            }
            if common::fleet::corrupt_chunk_store(&s.dir.join("h0/cache")) == 0 {
                fail("the liar's chunk store holds nothing");
            }
            s.start(0, true);
        }
    }
    let before = s.fleet.store_chunk_bytes();
    s.done.store(0, Ordering::Relaxed);
    let first: Vec<usize> = match scenario {
        _ if prepared => (1..n).collect(),
        Scenario::Join => (0..n.div_ceil(2)).collect(),
        _ => (0..n).collect(),
    };
    // All at once, as a storm starts: daemons started one after another
    // would each stream the profile before the next is up, asking homes
    // that are not there yet (stand-ins fetch from the store, the home
    // again once it is up), and replays started after them would find
    // the early hosts' caches already full.
    for &i in &first {
        s.launch(i, p2p);
    }
    for &i in &first {
        wait_for_socket(&s.sockets[i]);
    }
    let mut replays: Vec<Option<Replay>> = (0..n).map(|_| None).collect();
    for &i in &first {
        replays[i] = Some(s.replay(i, stops[i].clone()));
    }
    let at_30 = first.len() as u64 * work.reads.len() as u64 * 3 / 10;
    let mut killed = None;
    if scenario == Scenario::Kill && n > 1 {
        s.wait_for_reads(at_30, &replays);
        stops[0].store(true, Ordering::Relaxed);
        if let Some(d) = s.daemons[0].as_mut() {
            let _ = d.child.kill();
            let _ = d.child.wait();
        }
        s.daemons[0] = None;
        killed = Some(0);
    }
    if scenario == Scenario::Join && n > 1 {
        s.wait_for_reads(at_30, &replays);
        for i in first.len()..n {
            s.start(i, p2p);
            replays[i] = Some(s.replay(i, stops[i].clone()));
        }
    }
    let mut hosts: Vec<Host> = (0..n).map(|_| Host::default()).collect();
    for (i, r) in replays.into_iter().enumerate() {
        let Some(r) = r else { continue };
        if killed == Some(i) {
            // Its read in flight ends at READ_TIMEOUT; not waited for.
            continue;
        }
        match r
            .join()
            .unwrap_or_else(|_| fail(&format!("host {i}'s replay panicked")))
        {
            Ok((time, latencies)) => {
                hosts[i] = Host {
                    measured: true,
                    time,
                    latencies,
                    ..Host::default()
                }
            }
            Err(e) => fail(&e),
        }
    }
    let egress = s.fleet.store_chunk_bytes() - before;
    for (h, d) in hosts.iter_mut().zip(&s.daemons) {
        let Some(d) = d else { continue };
        let st = d.status();
        let get = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
        h.live = true;
        h.upload_bytes = get(&st["p2p"]["upload_bytes"]);
        if h.measured {
            h.store_bytes = get(&st["fetch"]["store_bytes"]);
            h.peer_bytes = get(&st["p2p"]["peer_bytes"]);
            h.peer_failures = get(&st["fetch"]["peer_failures"]);
            h.bad_chunks = get(&st["fetch"]["bad_peer_chunks"]);
        }
    }
    (hosts, egress)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let dir_of = |p: &Path| p.display().to_string();
    let work_dir = PathBuf::from(env("BENCH_DIR", "/var/tmp/streamblk-bench"));
    let store = PathBuf::from(env("FLEET_STORE", &dir_of(&work_dir.join("store"))));
    let raw = PathBuf::from(env("FLEET_RAW", &dir_of(&work_dir.join("guest/debian.raw"))));
    let trace_path = PathBuf::from(env(
        "FLEET_TRACE",
        &dir_of(&work_dir.join("runs/record/boot-until-complete.trace")),
    ));
    for p in [&store, &raw, &trace_path] {
        if !p.exists() {
            fail(&format!(
                "{} is missing: run scripts/bench-boot.sh first (it builds the guest, the store and the trace)",
                p.display()
            ));
        }
    }
    let reads = trace(&trace_path);
    let region = reads.iter().map(|r| r.1).max().unwrap_or(4096).next_power_of_two();
    let work = Workload {
        store,
        image: env("FLEET_IMAGE", "debian"),
        raw,
        reads: Arc::new(reads),
        region,
    };
    let counts: Vec<usize> = env("FLEET_HOSTS", "1 8")
        .split_whitespace()
        .map(|n| n.parse().unwrap_or_else(|_| fail("FLEET_HOSTS: numbers")))
        .collect();
    let scenarios: Vec<Scenario> = env("FLEET_SCENARIOS", "cold warm kill liar join")
        .split_whitespace()
        .map(|s| Scenario::parse(s).unwrap_or_else(|| fail(&format!("FLEET_SCENARIOS: unknown scenario {s:?}"))))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    println!(
        "Fleet boot storm: each host replays {} reads of a recorded Debian boot ({}), store {} (nginx), hosts {}; every byte checked.\n",
        work.reads.len(),
        trace_path.display(),
        env("FLEET_STORE_RATE", "100mbit"),
        env("FLEET_HOST_RATE", "1gbit"),
    );
    println!("| scenario | hosts | store egress | vs one host | replay median | max | vs one host (median / max) | upload max / mean | p99 read | from store | from peers | peer failures | bad chunks |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut base: Option<(u64, f64)> = None;
    let runs = counts.iter().enumerate().flat_map(|(k, &n)| {
        // The first count is the baseline: one cold storm.
        let these = if k == 0 {
            vec![Scenario::Cold]
        } else {
            scenarios.clone()
        };
        these.into_iter().map(move |s| (n, s))
    });
    for (n, scenario) in runs {
        let (hosts, egress) = storm(dir.path(), &work, n, scenario);
        let measured: Vec<&Host> = hosts.iter().filter(|h| h.measured).collect();
        let times: Vec<f64> = measured.iter().map(|h| h.time.as_secs_f64()).collect();
        let (med, max) = (median(times.clone()), times.iter().cloned().fold(0.0, f64::max));
        let (base_egress, base_time) = *base.get_or_insert((egress, med));
        let uploads: Vec<f64> = hosts.iter().filter(|h| h.live).map(|h| h.upload_bytes as f64).collect();
        let mean_up = uploads.iter().sum::<f64>() / uploads.len() as f64;
        let max_up = uploads.iter().cloned().fold(0.0, f64::max);
        let mut lat: Vec<Duration> = measured.iter().flat_map(|h| h.latencies.iter().copied()).collect();
        lat.sort();
        let p99 = lat[(lat.len() * 99 / 100).min(lat.len() - 1)];
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        println!(
            "| {} | {n} | {:.1} MiB | {:.2}x | {med:.1} s | {max:.1} s | {:.2}x / {:.2}x | {} | {:.1} ms | {:.1} MiB | {:.1} MiB | {} | {} |",
            scenario.name(),
            mib(egress),
            egress as f64 / base_egress as f64,
            med / base_time,
            max / base_time,
            if mean_up > 0.0 { format!("{:.2}", max_up / mean_up) } else { "-".into() },
            p99.as_secs_f64() * 1e3,
            mib(measured.iter().map(|h| h.store_bytes).sum()),
            mib(measured.iter().map(|h| h.peer_bytes).sum()),
            measured.iter().map(|h| h.peer_failures).sum::<u64>(),
            measured.iter().map(|h| h.bad_chunks).sum::<u64>(),
        );
    }
    println!(
        "\nstore egress: chunk bytes nginx sent during the storm (its access log; not host 0's replay beforehand in warm and liar); \
         the first row is one host alone: its egress is the boot's working set as stored. \
         Replay, latency, bytes by source, failures and bad chunks: the hosts that replayed in the storm \
         (not host 0 in warm, kill and liar); uploads: every live host."
    );
}
