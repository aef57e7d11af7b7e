//! A boot storm on a fleet: N hosts in network namespaces of their own, each
//! with a daemon and an empty cache, read the same image at once from a
//! store behind a 100 Mbit/s link. Without P2P the store serves the image N
//! times; with P2P about once, and every host still reads the right bytes,
//! also when one host serves corrupt chunks, when a home is killed
//! mid-storm, and when a host joins mid-storm.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::fleet::Fleet;
use common::*;

const HOSTS: usize = 4;
const IMAGE_MIB: usize = 32;
const CHUNK: u64 = 256 << 10;
const CHUNKS: u64 = (IMAGE_MIB as u64) << 20 >> 18;
const READ: usize = 1 << 20;
/// Longest one read may take before its host is taken for failed.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The fleet's namespaces are named after the test process, and a storm
/// wants the machine to itself: one fleet at a time.
static ONE_FLEET: Mutex<()> = Mutex::new(());

fn one_fleet() -> std::sync::MutexGuard<'static, ()> {
    ONE_FLEET.lock().unwrap_or_else(|e| e.into_inner())
}

/// A random image imported into a store directory: its bytes, the store,
/// and the bytes of its stored chunks (what one host's cold read costs).
fn image(dir: &Path, seed: u64) -> (Arc<Vec<u8>>, PathBuf, u64) {
    let raw = dir.join("fleet.raw");
    let image = random_file(&raw, IMAGE_MIB << 20, seed);
    let store = dir.join("store");
    import(&raw, &store, "fleet", CHUNK);
    let stored: u64 = std::fs::read_dir(store.join("chunks"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    (Arc::new(image), store, stored)
}

/// The peer address of the fleet's host `i`.
fn peer_addr(fleet: &Fleet, i: usize) -> String {
    format!("{}:7070", fleet.hosts[i].1)
}

/// Every host of the fleet, as the static member list all are given.
fn all_members(fleet: &Fleet) -> Vec<String> {
    (0..fleet.hosts.len()).map(|i| peer_addr(fleet, i)).collect()
}

/// One host's daemon and its disk's socket.
struct Host {
    daemon: Daemon,
    socket: PathBuf,
}

/// Starts host `i`'s daemon on the image, its cache under `dir/h<i>`
/// (kept across restarts); P2P with `members` if given.
fn start_host(fleet: &Fleet, dir: &Path, i: usize, members: Option<&[String]>) -> Host {
    let token = dir.join("token");
    std::fs::write(&token, "fleet-test-token\n").unwrap();
    let host = dir.join(format!("h{i}"));
    std::fs::create_dir_all(&host).unwrap();
    let socket = host.join("d.sock");
    let _ = std::fs::remove_file(&socket);
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
    if let Some(members) = members {
        args.extend([
            "--p2p-listen".into(),
            peer_addr(fleet, i),
            "--peers".into(),
            members.join(","),
            "--p2p-token-file".into(),
            token.display().to_string(),
        ]);
    }
    let daemon = Daemon::start_in(Some(&fleet.hosts[i].0), &args);
    wait_for_socket(&socket);
    Host { daemon, socket }
}

/// Reads the whole disk at `socket` in a thread of its own, checking every
/// byte against `image`; the time from `start` to its last read, or why
/// it failed (a read error, a read that timed out, a wrong byte).
fn read_image(i: usize, socket: PathBuf, image: Arc<Vec<u8>>, start: Instant) -> JoinHandle<Result<Duration, String>> {
    std::thread::spawn(move || {
        let mut c = Client::connect(&socket, 1, READ);
        for (n, expect) in image.chunks(READ).enumerate() {
            let op = Op::Read {
                offset: (n * READ) as u64,
                len: expect.len(),
                buf: 0,
            };
            match c.run_timeout(&[op], READ_TIMEOUT)[0] {
                Some(0) => {}
                Some(e) => return Err(format!("host {i}: read at MiB {n} failed: {e}")),
                None => return Err(format!("host {i}: read at MiB {n} took over {READ_TIMEOUT:?}")),
            }
            if c.buf()[..expect.len()] != *expect {
                return Err(format!("host {i} read wrong bytes at MiB {n}"));
            }
        }
        Ok(start.elapsed())
    })
}

/// Waits for every reader; the slowest time, or a panic naming each failure.
fn join_readers(readers: Vec<JoinHandle<Result<Duration, String>>>) -> Duration {
    let results: Vec<Result<Duration, String>> = readers
        .into_iter()
        .map(|r| r.join().unwrap_or_else(|_| Err("a reader panicked".into())))
        .collect();
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failed.is_empty(), "{failed:?}");
    results.into_iter().map(Result::unwrap).max().unwrap_or_default()
}

/// Chunks a daemon holds for its disk: fetched from the store or got from a peer.
fn chunks_held(d: &Daemon) -> u64 {
    let st = d.status();
    let get = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    get(&st["fetch"]["store_chunks"]) + get(&st["fetch"]["peer_chunks"])
}

/// Polls the daemons' status (up to 120 s) until they hold `want` chunks
/// between them; what they held then.
fn wait_for_chunks(daemons: &[&Daemon], want: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let held: u64 = daemons.iter().map(|d| chunks_held(d)).sum();
        if held >= want {
            return held;
        }
        assert!(
            Instant::now() < deadline,
            "the fleet held {held} of {want} chunks after 120 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A daemon's numbers for one peer, from its status: (requests, served,
/// failures, bad chunks).
fn peer_numbers(d: &Daemon, peer: &str) -> (u64, u64, u64, u64) {
    let st = d.status();
    let empty = vec![];
    let p = st["p2p"]["peers"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .find(|p| p["addr"] == peer)
        .cloned()
        .unwrap_or_default();
    let get = |k: &str| p[k].as_u64().unwrap_or(0);
    (get("requests"), get("served"), get("failures"), get("bad_chunks"))
}

/// Starts a daemon per host on the image (`p2p`: peers of each other),
/// reads the whole disk on every host at once; returns the time the
/// slowest host took and the daemons (for their status).
fn storm(fleet: &Fleet, dir: &Path, image: &Arc<Vec<u8>>, p2p: bool) -> (Duration, Vec<Daemon>) {
    std::fs::create_dir_all(dir).unwrap();
    let members = all_members(fleet);
    let hosts: Vec<Host> = (0..fleet.hosts.len())
        .map(|i| start_host(fleet, dir, i, p2p.then_some(&members[..])))
        .collect();
    let start = Instant::now();
    let readers = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| read_image(i, h.socket.clone(), image.clone(), start))
        .collect();
    let slowest = join_readers(readers);
    (slowest, hosts.into_iter().map(|h| h.daemon).collect())
}

#[test]
fn a_boot_storm_reads_the_store_about_once_with_p2p() {
    let _one = one_fleet();
    let dir = tmpdir();
    let (image, store, stored) = image(dir.path(), 42);
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

/// Members ranked for a chunk, home first, as `src/p2p/hrw.rs` ranks
/// them: by the first 8 bytes of blake3(digest || member).
fn ranked<'a>(chunk: &[u8], members: &'a [String]) -> Vec<&'a String> {
    let digest = blake3::hash(chunk);
    let score = |m: &str| {
        let mut h = blake3::Hasher::new();
        h.update(digest.as_bytes());
        h.update(m.as_bytes());
        u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().unwrap())
    };
    let mut v: Vec<&String> = members.iter().collect();
    v.sort_by_key(|m| std::cmp::Reverse(score(m)));
    v
}

/// The chunks of `image` whose home is `member`.
fn homed_at(image: &[u8], members: &[String], member: &str) -> u64 {
    image
        .chunks(CHUNK as usize)
        .filter(|c| ranked(c, members)[0] == member)
        .count() as u64
}

/// The chunks of `image` that `me` asks `peer` for while every member is
/// up (`src/p2p/client.rs`, `candidates`): the top three up to `me` as
/// homes, then the one after `me` as a holder.
fn asked_of(image: &[u8], members: &[String], me: &str, peer: &str) -> u64 {
    image
        .chunks(CHUNK as usize)
        .filter(|c| {
            let r = ranked(c, members);
            let at = |m: &str| r.iter().position(|x| *x == m).unwrap();
            let (me, peer) = (at(me), at(peer));
            peer < 3 && (peer < me || peer == me + 1)
        })
        .count() as u64
}

#[test]
fn a_peer_serving_corrupt_chunks_is_refused_and_every_host_reads_the_image() {
    let _one = one_fleet();
    let dir = tmpdir();
    let (image, store, stored) = image(dir.path(), 7);
    let fleet = Fleet::start(&store, "100mbit", HOSTS, "1gbit");
    let members = all_members(&fleet);
    let run = dir.path().join("run");
    std::fs::create_dir_all(&run).unwrap();

    // The liar, host 0, reads the image into its chunk store, stops, and
    // its slabs are corrupted on disk: it serves what it holds, unchecked.
    let liar = peer_addr(&fleet, 0);
    let mut h0 = start_host(&fleet, &run, 0, None);
    join_readers(vec![read_image(0, h0.socket.clone(), image.clone(), Instant::now())]);
    assert!(h0.daemon.terminate().success());
    let flipped = common::fleet::corrupt_chunk_store(&run.join("h0/cache"));
    assert_eq!(flipped, CHUNKS, "the liar's chunk store does not hold the image");
    let h0 = start_host(&fleet, &run, 0, Some(&members));
    let before = fleet.store_chunk_bytes();

    let others: Vec<Host> = (1..HOSTS)
        .map(|i| start_host(&fleet, &run, i, Some(&members)))
        .collect();
    let start = Instant::now();
    let readers = others
        .iter()
        .enumerate()
        .map(|(i, h)| read_image(i + 1, h.socket.clone(), image.clone(), start))
        .collect();
    let slowest = join_readers(readers);
    let egress = fleet.store_chunk_bytes() - before;

    let liar_homed = homed_at(&image, &members, &liar);
    let liar_uploads = h0.daemon.status()["p2p"]["uploads"].as_u64().unwrap_or(0);
    let mut refused = 0;
    for (i, h) in others.iter().enumerate() {
        let (requests, served, _, bad) = peer_numbers(&h.daemon, &liar);
        // Each chunk this host asks the liar for, it takes bad once, and
        // does not ask for again.
        let may_ask = asked_of(&image, &members, &peer_addr(&fleet, i + 1), &liar);
        let st = h.daemon.status();
        eprintln!(
            "host {}: asked the liar {requests} times, it sent {served} chunks, {bad} refused; \
             {} chunks from peers, {} from the store",
            i + 1,
            st["fetch"]["peer_chunks"],
            st["fetch"]["store_chunks"]
        );
        assert!(bad > 0, "host {} never caught the liar", i + 1);
        assert_eq!(served, bad, "host {} took a chunk from the liar", i + 1);
        assert_eq!(st["fetch"]["bad_peer_chunks"].as_u64(), Some(bad), "host {}", i + 1);
        assert!(
            bad <= may_ask,
            "host {} took {bad} bad chunks from a liar it asks for {may_ask}: asked again after one",
            i + 1
        );
        for m in members.iter().filter(|m| **m != liar) {
            assert_eq!(
                peer_numbers(&h.daemon, m).3,
                0,
                "host {} blamed {m}, not the liar",
                i + 1
            );
        }
        refused += bad;
    }
    eprintln!(
        "liar home of {liar_homed} of {CHUNKS} chunks, uploaded {liar_uploads}, {refused} refused; \
         slowest host {slowest:.1?}; store served {egress} bytes ({:.2}x the image)",
        egress as f64 / stored as f64
    );
    assert_eq!(refused, liar_uploads, "a chunk the liar sent was not refused");
}

#[test]
fn a_home_killed_mid_storm_costs_no_byte_and_little_store_egress() {
    let _one = one_fleet();
    let dir = tmpdir();
    let (image, store, stored) = image(dir.path(), 11);
    let fleet = Fleet::start(&store, "100mbit", HOSTS, "1gbit");
    let members = all_members(&fleet);
    let run = dir.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    let mut hosts: Vec<Host> = (0..HOSTS)
        .map(|i| start_host(&fleet, &run, i, Some(&members)))
        .collect();
    let start = Instant::now();
    let mut readers: Vec<_> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| read_image(i, h.socket.clone(), image.clone(), start))
        .collect();

    let daemons: Vec<&Daemon> = hosts.iter().map(|h| &h.daemon).collect();
    let held = wait_for_chunks(&daemons, HOSTS as u64 * CHUNKS * 3 / 10);
    let victim = peer_addr(&fleet, 0);
    hosts[0].daemon.child.kill().unwrap();
    let _ = hosts[0].daemon.child.wait();
    let at = start.elapsed();
    // Its reader fails with it (bounded by READ_TIMEOUT); not waited for.
    drop(readers.remove(0));

    let slowest = join_readers(readers);
    let egress = fleet.store_chunk_bytes();
    let failures: u64 = hosts[1..].iter().map(|h| peer_numbers(&h.daemon, &victim).2).sum();
    eprintln!(
        "killed {victim} (home of {} chunks) at {at:.1?}, the fleet holding {held} of {} chunks; \
         {failures} requests to it failed; slowest survivor {slowest:.1?}; \
         store served {egress} bytes ({:.2}x the image)",
        homed_at(&image, &members, &victim),
        HOSTS as u64 * CHUNKS,
        egress as f64 / stored as f64
    );
    assert!(
        held < HOSTS as u64 * CHUNKS * 9 / 10,
        "the storm was nearly over when the home was killed"
    );
    assert!(failures > 0, "no survivor noticed the dead home");
    assert!(
        egress as f64 <= 1.1 * stored as f64,
        "with a home killed the store served {egress} bytes for an image of {stored}"
    );
}

#[test]
fn a_host_joining_mid_storm_reads_the_image_and_little_store_egress() {
    let _one = one_fleet();
    let dir = tmpdir();
    let (image, store, stored) = image(dir.path(), 13);
    let fleet = Fleet::start(&store, "100mbit", HOSTS + 1, "1gbit");
    // Every list names the joiner from the start, as a static list given to all.
    let members = all_members(&fleet);
    let run = dir.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    let mut hosts: Vec<Host> = (0..HOSTS)
        .map(|i| start_host(&fleet, &run, i, Some(&members)))
        .collect();
    let start = Instant::now();
    let mut readers: Vec<_> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| read_image(i, h.socket.clone(), image.clone(), start))
        .collect();

    let daemons: Vec<&Daemon> = hosts.iter().map(|h| &h.daemon).collect();
    let held = wait_for_chunks(&daemons, HOSTS as u64 * CHUNKS * 3 / 10);
    let joiner = start_host(&fleet, &run, HOSTS, Some(&members));
    let at = start.elapsed();
    readers.push(read_image(HOSTS, joiner.socket.clone(), image.clone(), start));
    hosts.push(joiner);

    let slowest = join_readers(readers);
    let egress = fleet.store_chunk_bytes();
    let joiner_addr = peer_addr(&fleet, HOSTS);
    let st = hosts[HOSTS].daemon.status();
    eprintln!(
        "{joiner_addr} (home of {} chunks) joined at {at:.1?}, the fleet holding {held} of {} chunks; \
         it got {} chunks from peers, {} from the store, uploaded {}; slowest host {slowest:.1?}; \
         store served {egress} bytes ({:.2}x the image)",
        homed_at(&image, &members, &joiner_addr),
        HOSTS as u64 * CHUNKS,
        st["fetch"]["peer_chunks"],
        st["fetch"]["store_chunks"],
        st["p2p"]["uploads"],
        egress as f64 / stored as f64
    );
    assert!(
        held < HOSTS as u64 * CHUNKS * 9 / 10,
        "the storm was nearly over when the host joined"
    );
    assert!(
        st["fetch"]["peer_chunks"].as_u64().unwrap_or(0) > 0,
        "the joiner got nothing from its peers"
    );
    assert!(
        egress as f64 <= 1.1 * stored as f64,
        "with a host joining the store served {egress} bytes for an image of {stored}"
    );
}
