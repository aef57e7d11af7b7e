//! The fleet benchmark (`scripts/bench-fleet.sh`): N hosts in network
//! namespaces of their own, each with a daemon and an empty cache, replay a
//! recorded boot trace of the real Debian guest at once, through their own
//! daemon with the blkio client; the store (nginx) is in its own namespace
//! behind a shaped link. Every byte read is checked against the raw image.
//!
//! Reports, per N: store egress against one host alone (the boot's working
//! set as stored), each host's replay time against one host alone (median
//! and max), upload max/mean across hosts, p99 read latency, and bytes by
//! source.
//!
//! Environment: `FLEET_STORE` (a store directory holding the image),
//! `FLEET_IMAGE` (its name), `FLEET_RAW` (the raw image, for checking),
//! `FLEET_TRACE` (a `streamblk` boot trace), `FLEET_HOSTS` (default "1 8";
//! the first is the baseline), `FLEET_STORE_RATE` (default 100mbit),
//! `FLEET_HOST_RATE` (default 1gbit). Needs root (namespaces, tc).

#[path = "../tests/common/mod.rs"]
mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::fleet::Fleet;
use common::*;

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn fail(why: &str) -> ! {
    eprintln!("bench-fleet: {why}");
    std::process::exit(1);
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

/// What one host saw.
struct Host {
    time: Duration,
    latencies: Vec<Duration>,
    store_bytes: u64,
    peer_bytes: u64,
    upload_bytes: u64,
    /// Peer requests that failed (the chunk came from elsewhere).
    peer_failures: u64,
}

/// One storm of `n` hosts; P2P on if `n > 1`.
fn storm(dir: &Path, store: &Path, image: &str, raw: &Path, reads: &[(u64, usize)], n: usize) -> (Vec<Host>, u64) {
    let fleet = Fleet::start(
        store,
        &env("FLEET_STORE_RATE", "100mbit"),
        n,
        &env("FLEET_HOST_RATE", "1gbit"),
    );
    let run = dir.join(format!("n{n}"));
    std::fs::create_dir_all(&run).unwrap();
    let token = run.join("token");
    std::fs::write(&token, "fleet-bench-token\n").unwrap();
    let peers: Vec<String> = fleet.hosts.iter().map(|(_, ip)| format!("{ip}:7070")).collect();
    let mut daemons = Vec::new();
    let mut sockets = Vec::new();
    for (i, (ns, ip)) in fleet.hosts.iter().enumerate() {
        let host = run.join(format!("h{i}"));
        std::fs::create_dir_all(&host).unwrap();
        let socket = host.join("d.sock");
        let mut args = vec![
            "--store".to_string(),
            fleet.store_url.clone(),
            "--cache-dir".into(),
            host.join("cache").display().to_string(),
            // The boot's reads only: no fill, no profile learning.
            "--fill-rate".into(),
            "0".into(),
            "--learn-boots".into(),
            "0".into(),
            "--disk".into(),
            format!(
                "name=d,socket={},overlay={},image={image}",
                socket.display(),
                host.join("overlay").display()
            ),
        ];
        if n > 1 {
            args.extend([
                "--p2p-listen".into(),
                format!("{ip}:7070"),
                "--peers".into(),
                peers.join(","),
                "--p2p-token-file".into(),
                token.display().to_string(),
            ]);
        }
        daemons.push(Daemon::start_in(Some(ns), &args));
        sockets.push(socket);
    }
    for s in &sockets {
        wait_for_socket(s);
    }
    let region = reads.iter().map(|r| r.1).max().unwrap_or(4096).next_power_of_two();
    let start = Instant::now();
    let replays: Vec<_> = sockets
        .into_iter()
        .enumerate()
        .map(|(i, socket)| {
            let (reads, raw) = (reads.to_vec(), raw.to_path_buf());
            std::thread::spawn(move || {
                let file = std::fs::File::open(&raw).unwrap();
                let mut c = Client::connect(&socket, 1, region);
                let mut latencies = Vec::with_capacity(reads.len());
                let mut want = vec![0u8; region];
                for (offset, len) in reads {
                    let at = Instant::now();
                    let got = c.read(offset, len);
                    latencies.push(at.elapsed());
                    file.read_exact_at(&mut want[..len], offset).unwrap();
                    assert!(got == want[..len], "host {i} read wrong bytes at {offset}+{len}");
                }
                (start.elapsed(), latencies)
            })
        })
        .collect();
    let done: Vec<(Duration, Vec<Duration>)> = replays
        .into_iter()
        .map(|r| r.join().unwrap_or_else(|_| fail("a host's replay failed")))
        .collect();
    let hosts = done
        .into_iter()
        .zip(&daemons)
        .map(|((time, latencies), d)| {
            let st = d.status();
            let get = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
            Host {
                time,
                latencies,
                store_bytes: get(&st["fetch"]["store_bytes"]),
                peer_bytes: get(&st["p2p"]["peer_bytes"]),
                upload_bytes: get(&st["p2p"]["upload_bytes"]),
                peer_failures: get(&st["fetch"]["peer_failures"]),
            }
        })
        .collect();
    let egress = fleet.store_chunk_bytes();
    drop(daemons);
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
    let work = PathBuf::from(env("BENCH_DIR", "/var/tmp/streamblk-bench"));
    let store = PathBuf::from(env("FLEET_STORE", &work.join("store").display().to_string()));
    let image = env("FLEET_IMAGE", "debian");
    let raw = PathBuf::from(env("FLEET_RAW", &work.join("guest/debian.raw").display().to_string()));
    let trace_path = PathBuf::from(env(
        "FLEET_TRACE",
        &work.join("runs/record/boot-until-complete.trace").display().to_string(),
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
    let counts: Vec<usize> = env("FLEET_HOSTS", "1 8")
        .split_whitespace()
        .map(|n| n.parse().unwrap_or_else(|_| fail("FLEET_HOSTS: numbers")))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    println!(
        "Fleet boot storm: each host replays {} reads of a recorded Debian boot ({}), caches empty, store {} (nginx), hosts {}; every byte checked.\n",
        reads.len(),
        trace_path.display(),
        env("FLEET_STORE_RATE", "100mbit"),
        env("FLEET_HOST_RATE", "1gbit"),
    );
    println!("| hosts | store egress | vs one host | replay median | max | vs one host (median / max) | upload max / mean | p99 read | from store | from peers | peer failures |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut base: Option<(u64, f64)> = None;
    for n in counts {
        let (hosts, egress) = storm(dir.path(), &store, &image, &raw, &reads, n);
        let times: Vec<f64> = hosts.iter().map(|h| h.time.as_secs_f64()).collect();
        let (med, max) = (median(times.clone()), times.iter().cloned().fold(0.0, f64::max));
        let (base_egress, base_time) = *base.get_or_insert((egress, med));
        let uploads: Vec<f64> = hosts.iter().map(|h| h.upload_bytes as f64).collect();
        let mean_up = uploads.iter().sum::<f64>() / uploads.len() as f64;
        let max_up = uploads.iter().cloned().fold(0.0, f64::max);
        let mut lat: Vec<Duration> = hosts.iter().flat_map(|h| h.latencies.iter().copied()).collect();
        lat.sort();
        let p99 = lat[(lat.len() * 99 / 100).min(lat.len() - 1)];
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        println!(
            "| {n} | {:.1} MiB | {:.2}x | {med:.1} s | {max:.1} s | {:.2}x / {:.2}x | {} | {:.1} ms | {:.1} MiB | {:.1} MiB | {} |",
            mib(egress),
            egress as f64 / base_egress as f64,
            med / base_time,
            max / base_time,
            if mean_up > 0.0 { format!("{:.2}", max_up / mean_up) } else { "-".into() },
            p99.as_secs_f64() * 1e3,
            mib(hosts.iter().map(|h| h.store_bytes).sum()),
            mib(hosts.iter().map(|h| h.peer_bytes).sum()),
            hosts.iter().map(|h| h.peer_failures).sum::<u64>(),
        );
    }
    println!(
        "\nstore egress: chunk bytes nginx sent (its access log); the first row is one host alone: its egress is the boot's working set as stored."
    );
}
