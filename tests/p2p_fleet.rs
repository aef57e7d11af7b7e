//! A boot storm on a fleet: N hosts in network namespaces of their own, each
//! with a daemon and an empty cache, read the same image at once from a
//! store behind a 100 Mbit/s link. Without P2P the store serves the image N
//! times; with P2P about once, and every host still reads the right bytes.

mod common;

use std::time::{Duration, Instant};

use common::fleet::Fleet;
use common::*;

const HOSTS: usize = 4;
const IMAGE_MIB: usize = 32;
const CHUNK: u64 = 256 << 10;
const READ: usize = 1 << 20;

/// Starts a daemon per host on `image` (`p2p`: peers of each other), reads
/// the whole disk on every host at once; returns the time the slowest host
/// took and the daemons (for their status).
fn storm(fleet: &Fleet, dir: &std::path::Path, image: &[u8], p2p: bool) -> (Duration, Vec<Daemon>) {
    std::fs::create_dir_all(dir).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, "fleet-test-token\n").unwrap();
    let peers: Vec<String> = fleet.hosts.iter().map(|(_, ip)| format!("{ip}:7070")).collect();
    let mut daemons = Vec::new();
    let mut sockets = Vec::new();
    for (i, (ns, ip)) in fleet.hosts.iter().enumerate() {
        let host = dir.join(format!("h{i}"));
        std::fs::create_dir_all(&host).unwrap();
        let socket = host.join("d.sock");
        let mut args = vec![
            "--store".to_string(),
            fleet.store_url.clone(),
            "--cache-dir".into(),
            host.join("cache").display().to_string(),
            // Only what the guests read: the storm, not background fill.
            "--fill-rate".into(),
            "0".into(),
            "--disk".into(),
            format!(
                "name=d,socket={},overlay={},image=fleet",
                socket.display(),
                host.join("overlay").display()
            ),
        ];
        if p2p {
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
    let start = Instant::now();
    let readers: Vec<_> = sockets
        .into_iter()
        .enumerate()
        .map(|(i, socket)| {
            let want = image.to_vec();
            std::thread::spawn(move || {
                let mut c = Client::connect(&socket, 1, READ);
                for (n, expect) in want.chunks(READ).enumerate() {
                    let got = c.read((n * READ) as u64, expect.len());
                    assert!(got == expect, "host {i} read wrong bytes at MiB {n}");
                }
                start.elapsed()
            })
        })
        .collect();
    let slowest = readers
        .into_iter()
        .map(|r| r.join().expect("a host's reader failed"))
        .max()
        .unwrap();
    (slowest, daemons)
}

#[test]
fn a_boot_storm_reads_the_store_about_once_with_p2p() {
    let dir = tmpdir();
    let image = random_file(&dir.path().join("fleet.raw"), IMAGE_MIB << 20, 42);
    let store = dir.path().join("store");
    import(&dir.path().join("fleet.raw"), &store, "fleet", CHUNK);
    let stored: u64 = std::fs::read_dir(store.join("chunks"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    let fleet = Fleet::start(&store, "100mbit", HOSTS, "1gbit");

    let (alone, daemons) = storm(&fleet, &dir.path().join("off"), &image, false);
    let off_bytes = fleet.store_chunk_bytes();
    drop(daemons);
    assert!(
        off_bytes >= HOSTS as u64 * stored,
        "without P2P the store served {off_bytes} bytes, less than {HOSTS} x {stored}"
    );

    let (together, daemons) = storm(&fleet, &dir.path().join("on"), &image, true);
    let on_bytes = fleet.store_chunk_bytes() - off_bytes;
    let peer_bytes: u64 = daemons
        .iter()
        .map(|d| d.status()["p2p"]["peer_bytes"].as_u64().unwrap_or(0))
        .sum();
    eprintln!(
        "{HOSTS} hosts, {IMAGE_MIB} MiB image ({stored} bytes stored), store 100 Mbit/s, hosts 1 Gbit/s:\n\
         without P2P: slowest host {alone:.1?}, store served {off_bytes} bytes ({:.2}x the image)\n\
         with P2P:    slowest host {together:.1?}, store served {on_bytes} bytes ({:.2}x), peers served {peer_bytes} bytes",
        off_bytes as f64 / stored as f64,
        on_bytes as f64 / stored as f64,
    );
    assert!(
        on_bytes as f64 <= 1.1 * stored as f64,
        "with P2P the store served {on_bytes} bytes for an image of {stored}"
    );
    assert!(peer_bytes > 0, "no host read a chunk from a peer");
}
