//! P2P on 127.0.0.1: several daemons (own ports, own caches) and one HTTP
//! store that counts what it serves. Hosts reading one image make the store
//! serve each chunk about once; a lying peer never gets a bad byte to a
//! guest; requests without the cluster token are refused; a home killed
//! mid-way costs no guest read.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::httpstore::HttpStore;
use common::*;

const MIB: usize = 1 << 20;
const CHUNK: usize = 64 << 10;
const TOKEN: &str = "fleet-token-0123456789";

/// A 16 MiB image of random data (every chunk distinct) with some all-zero
/// chunks, imported into a store served over HTTP.
struct Fixture {
    dir: tempfile::TempDir,
    image: Vec<u8>,
    http: HttpStore,
    token: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tmpdir();
        let mut image = random_bytes(16 * MIB, 77);
        for c in (0..image.len() / CHUNK).step_by(9) {
            image[c * CHUNK..(c + 1) * CHUNK].fill(0);
        }
        let raw = dir.path().join("image.raw");
        std::fs::write(&raw, &image).unwrap();
        let store = dir.path().join("store");
        import(&raw, &store, "img", CHUNK as u64);
        let http = HttpStore::start(store);
        http.set_delay(Duration::from_millis(1));
        let token = dir.path().join("token");
        std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
        Fixture {
            dir,
            image,
            http,
            token,
        }
    }

    /// Non-zero chunks: what the store should serve about once in all.
    fn chunks(&self) -> u64 {
        self.image.chunks(CHUNK).filter(|c| c.iter().any(|&b| b != 0)).count() as u64
    }

    /// Chunk GETs the store answered, in all.
    fn store_requests(&self) -> u64 {
        self.http.chunk_requests().values().sum()
    }

    /// A daemon listening for peers on `me`, with `members` as the fleet
    /// and (if `disk`) one disk of the image.
    fn host(&self, name: &str, me: SocketAddr, members: &[SocketAddr], disk: bool) -> Host {
        self.host_with(name, me, members, disk, &self.token, &[])
    }

    fn host_with(
        &self,
        name: &str,
        me: SocketAddr,
        members: &[SocketAddr],
        disk: bool,
        token: &Path,
        extra: &[&str],
    ) -> Host {
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let peers: Vec<String> = members.iter().map(ToString::to_string).collect();
        let mut args: Vec<String> = [
            "--store",
            &self.http.url,
            "--cache-dir",
            dir.join("cache").to_str().unwrap(),
            "--fill-rate",
            "0",
            "--p2p-listen",
            &me.to_string(),
            "--peers",
            &peers.join(","),
            "--p2p-token-file",
            token.to_str().unwrap(),
        ]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect();
        if disk {
            args.push("--disk".into());
            args.push(format!(
                "name={name},socket={},overlay={},image=img",
                dir.join("disk.sock").display(),
                dir.join("overlay").display()
            ));
        }
        let daemon = Daemon::start(&args);
        Host {
            daemon,
            socket: dir.join("disk.sock"),
            addr: me,
        }
    }
}

struct Host {
    daemon: Daemon,
    socket: PathBuf,
    addr: SocketAddr,
}

impl Host {
    /// Waits until the daemon answers on its control socket (its peer
    /// server listens before that).
    fn ready(&self) -> &Self {
        self.daemon.status();
        self
    }

    fn fetch_status(&self, key: &str) -> u64 {
        self.daemon.status()["fetch"][key].as_u64().unwrap_or(0)
    }

    fn p2p_status(&self, key: &str) -> u64 {
        self.daemon.status()["p2p"][key].as_u64().unwrap_or(0)
    }

    /// What this host knows of `peer` (null if it never asked it).
    fn peer(&self, peer: SocketAddr) -> serde_json::Value {
        self.daemon.status()["p2p"]["peers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["addr"] == peer.to_string())
            .cloned()
            .unwrap_or_default()
    }
}

/// Addresses on 127.0.0.1 that were free a moment ago.
fn free_addrs(n: usize) -> Vec<SocketAddr> {
    let listeners: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    listeners.iter().map(|l| l.local_addr().unwrap()).collect()
}

/// Reads the whole disk at `socket`, 1 MiB at a time, and checks it.
fn read_all(socket: &Path, image: &[u8], who: &str) {
    let mut c = Client::connect(socket, 1, MIB);
    for at in (0..image.len()).step_by(MIB) {
        let got = c.read(at as u64, MIB);
        assert!(got == image[at..at + MIB], "{who}: wrong data at {at}");
    }
}

/// Reads the disks of `hosts` at once, each whole.
fn read_all_at_once(hosts: &[&Host], image: &[u8]) {
    std::thread::scope(|s| {
        for (i, h) in hosts.iter().enumerate() {
            let socket = h.socket.clone();
            s.spawn(move || read_all(&socket, image, &format!("host {i}")));
        }
    });
}

#[test]
fn three_hosts_reading_one_image_make_the_store_serve_each_chunk_about_once() {
    let f = Fixture::new();
    let addrs = free_addrs(3);
    let hosts: Vec<Host> = (0..3)
        .map(|i| f.host(&format!("h{i}"), addrs[i], &addrs, true))
        .collect();
    for h in &hosts {
        h.ready();
    }
    // A cold storm: all three read the whole image at once.
    let t = Instant::now();
    read_all_at_once(&hosts.iter().collect::<Vec<_>>(), &f.image);
    let took = t.elapsed();

    let (chunks, store) = (f.chunks(), f.store_requests());
    let from_peers: u64 = hosts.iter().map(|h| h.fetch_status("peer_chunks")).sum();
    let from_store: u64 = hosts.iter().map(|h| h.fetch_status("store_chunks")).sum();
    let uploads: u64 = hosts.iter().map(|h| h.p2p_status("uploads")).sum();
    eprintln!(
        "3 hosts, {chunks} chunks: the store served {store} chunk requests ({:.2}x); hosts got {from_store} \
         from the store, {from_peers} from peers, uploaded {uploads}; {took:?}",
        store as f64 / chunks as f64
    );
    assert_eq!(
        f.http.chunk_requests().len() as u64,
        chunks,
        "every non-zero chunk came from the store at least once"
    );
    assert!(
        store as f64 <= 1.1 * chunks as f64,
        "the store served {store} chunk requests for {chunks} chunks"
    );
    // Each host fetched about a third itself (it is their home) and got the
    // rest from peers, which uploaded exactly what the others received.
    assert_eq!(from_store, store);
    assert!(
        from_peers as f64 >= 1.8 * chunks as f64,
        "only {from_peers} chunks came from peers"
    );
    assert_eq!(uploads, from_peers, "peers uploaded other than what was received");
    for h in &hosts {
        let s = h.daemon.status();
        assert_eq!(s["p2p"]["peer_chunks"], s["fetch"]["peer_chunks"]);
        assert!(s["p2p"]["peer_bytes"].as_u64().unwrap() > 0);
        assert_eq!(s["p2p"]["members"].as_array().unwrap().len(), 3);
        assert_eq!(s["p2p"]["is_member"], true);
        assert_eq!(s["fetch"]["bad_peer_chunks"], 0);
        assert_eq!(s["p2p"]["refused_unauthorized"], 0);
    }
}

#[test]
fn a_busy_home_redirects_requesters_to_the_hosts_it_served() {
    let f = Fixture::new();
    let addrs = free_addrs(4);
    // One upload slot at 8 MB/s: a home is busy most of the time, and
    // sends requesters to the hosts it served the chunk to.
    let slow = ["--p2p-upload-slots", "1", "--p2p-upload-rate", "8"];
    let hosts: Vec<Host> = (0..4)
        .map(|i| f.host_with(&format!("h{i}"), addrs[i], &addrs, true, &f.token, &slow))
        .collect();
    for h in &hosts {
        h.ready();
    }
    // Host 0 reads first: the homes serve it and note it as a holder of
    // every chunk. Then three read at once, and the busy homes send them
    // to host 0.
    let t = Instant::now();
    read_all(&hosts[0].socket, &f.image, "host 0");
    read_all_at_once(&hosts[1..].iter().collect::<Vec<_>>(), &f.image);
    let took = t.elapsed();
    let (chunks, store) = (f.chunks(), f.store_requests());
    let redirects: u64 = hosts.iter().map(|h| h.p2p_status("redirects")).sum();
    let from_peers: u64 = hosts.iter().map(|h| h.fetch_status("peer_chunks")).sum();
    let uploads: Vec<u64> = hosts.iter().map(|h| h.p2p_status("uploads")).collect();
    eprintln!(
        "4 hosts, 1 upload slot each: store served {store} for {chunks} chunks; {redirects} redirects; \
         {from_peers} chunks from peers; uploads per host {uploads:?}; {took:?}"
    );
    assert!(redirects > 0, "no home redirected");
    // A host that got a chunk from a holder the home named tells the home
    // once it verified it (in the background: allow it a moment).
    let told = || hosts.iter().map(|h| h.p2p_status("holders_told")).sum::<u64>();
    let until = Instant::now() + Duration::from_secs(5);
    while told() == 0 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("homes told by holders: {}", told());
    assert!(told() > 0, "no host told a home it holds a chunk a holder sent it");
    assert!(
        store as f64 <= 1.1 * chunks as f64,
        "the store served {store} chunk requests for {chunks} chunks"
    );
    assert_eq!(uploads.iter().sum::<u64>(), from_peers);
    for h in &hosts {
        assert_eq!(h.fetch_status("bad_peer_chunks"), 0);
        // The upload cap held: 8 MB/s, plus the bucket's quarter second of
        // burst and one chunk of debt.
        let sent = h.p2p_status("upload_bytes") as f64;
        let cap = 8e6 * took.as_secs_f64() + 2e6 + CHUNK as f64;
        assert!(sent <= cap, "{} uploaded {sent} bytes in {took:?}", h.addr);
    }
}

#[test]
fn a_home_without_the_image_open_fetches_each_of_its_chunks_once_for_the_others() {
    let f = Fixture::new();
    let addrs = free_addrs(3);
    let a = f.host("a", addrs[0], &addrs, true);
    let b = f.host("b", addrs[1], &addrs, true);
    // A member with a store and no disk: home for a third of the chunks.
    let c = f.host("c", addrs[2], &addrs, false);
    for h in [&a, &b, &c] {
        h.ready();
    }
    read_all_at_once(&[&a, &b], &f.image);
    let (chunks, store) = (f.chunks(), f.store_requests());
    let home_fetches = c.p2p_status("home_fetches");
    eprintln!(
        "2 hosts and a diskless home, {chunks} chunks: store served {store}; the diskless home fetched \
         {home_fetches}, uploaded {}; peer failures: a {}, b {}",
        c.p2p_status("uploads"),
        a.fetch_status("peer_failures"),
        b.fetch_status("peer_failures"),
    );
    assert!(
        store as f64 <= 1.1 * chunks as f64,
        "the store served {store} chunk requests for {chunks} chunks"
    );
    assert!(home_fetches > 0, "the diskless home fetched nothing");
    assert!(
        c.p2p_status("loose_chunks") > 0,
        "it kept no chunk for the second asker"
    );
    assert!(
        c.p2p_status("uploads") >= home_fetches,
        "every chunk it fetched was uploaded"
    );
}

/// A peer that answers every chunk request with the chunk's bytes with one
/// flipped, and counts the requests and whether they carried the token.
struct LyingPeer {
    addr: SocketAddr,
    served: Arc<AtomicU64>,
    without_token: Arc<AtomicU64>,
}

impl LyingPeer {
    fn start(image: &[u8]) -> LyingPeer {
        let chunks: Arc<HashMap<String, Vec<u8>>> = Arc::new(
            image
                .chunks(CHUNK)
                .map(|c| (blake3::hash(c).to_hex().to_string(), c.to_vec()))
                .collect(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let served = Arc::new(AtomicU64::new(0));
        let without_token = Arc::new(AtomicU64::new(0));
        let (s, w) = (served.clone(), without_token.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (chunks, s, w) = (chunks.clone(), s.clone(), w.clone());
                std::thread::spawn(move || lie(conn, &chunks, &s, &w));
            }
        });
        LyingPeer {
            addr,
            served,
            without_token,
        }
    }
}

fn lie(conn: TcpStream, chunks: &HashMap<String, Vec<u8>>, served: &AtomicU64, without_token: &AtomicU64) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut out = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let mut token_ok = false;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            if h.trim().is_empty() {
                break;
            }
            if h.to_ascii_lowercase().starts_with("authorization:")
                && h.trim_end().ends_with(&format!("Bearer {TOKEN}"))
            {
                token_ok = true;
            }
        }
        if !token_ok {
            without_token.fetch_add(1, Ordering::Relaxed);
        }
        let digest = path
            .strip_prefix("/chunks/")
            .and_then(|p| p.split('?').next())
            .unwrap_or("");
        let Some(data) = chunks.get(digest) else {
            let _ = out.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
            continue;
        };
        let mut data = data.clone();
        data[1000] ^= 0x01;
        served.fetch_add(1, Ordering::Relaxed);
        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", data.len());
        if out.write_all(head.as_bytes()).is_err() || out.write_all(&data).is_err() {
            return;
        }
    }
}

#[test]
fn a_lying_peer_is_caught_counted_and_the_guest_still_reads_the_right_data() {
    let f = Fixture::new();
    let liar = LyingPeer::start(&f.image);
    let me = free_addrs(1)[0];
    let host = f.host("h", me, &[me, liar.addr], true);
    host.ready();
    read_all(&host.socket, &f.image, "host");

    let lies = liar.served.load(Ordering::Relaxed);
    let s = host.daemon.status();
    let bad = s["fetch"]["bad_peer_chunks"].as_u64().unwrap();
    let peer = host.peer(liar.addr);
    eprintln!("the liar sent {lies} bad chunks; the host counted {bad}; peer status {peer}");
    assert!(
        lies > 0,
        "the liar was never asked (it is home for about half the chunks)"
    );
    assert_eq!(bad, lies, "a bad chunk went uncounted");
    assert_eq!(peer["bad_chunks"].as_u64().unwrap(), lies);
    assert_eq!(s["fetch"]["peer_chunks"], 0, "a chunk from the liar was taken");
    assert_eq!(
        liar.without_token.load(Ordering::Relaxed),
        0,
        "a request lacked the token"
    );
    // Every chunk came from the store once: the liar's after its lie.
    assert_eq!(f.store_requests(), f.chunks());
}

/// One HTTP/1.1 GET on a fresh connection: (status, headers, body).
fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, HashMap<String, String>, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    req += "\r\n";
    s.write_all(req.as_bytes()).unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    let split = all.windows(4).position(|w| w == b"\r\n\r\n").expect("no end of head");
    let head = String::from_utf8_lossy(&all[..split]).to_string();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, all[split + 4..].to_vec())
}

#[test]
fn peer_requests_without_the_cluster_token_are_refused() {
    let f = Fixture::new();
    let me = free_addrs(1)[0];
    let host = f.host("h", me, &[me], true);
    host.ready();
    // Chunk 1 is cached once the guest read it.
    let mut c = Client::connect(&host.socket, 1, MIB);
    assert!(c.read(CHUNK as u64, CHUNK) == f.image[CHUNK..2 * CHUNK]);
    let digest = blake3::hash(&f.image[CHUNK..2 * CHUNK]).to_hex().to_string();
    let path = format!("/chunks/{digest}");
    let bearer = format!("Bearer {TOKEN}");
    let auth = ("Authorization", bearer.as_str());

    assert_eq!(get(me, &path, &[]).0, 401, "no token");
    assert_eq!(
        get(me, &path, &[("Authorization", "Bearer wrong-token-0123456789")]).0,
        403
    );
    assert_eq!(get(me, &path, &[("Authorization", TOKEN)]).0, 401, "not a bearer token");
    assert_eq!(get(me, "/chunks/not-a-digest", &[auth]).0, 400);
    assert_eq!(get(me, &format!("{path}?len=7"), &[auth]).0, 400);
    assert_eq!(get(me, &path, &[auth, ("X-Streamblk-Class", "urgent")]).0, 400);
    let unknown = blake3::hash(b"no such chunk").to_hex().to_string();
    assert_eq!(get(me, &format!("/chunks/{unknown}"), &[auth]).0, 404);

    let (status, headers, body) = get(me, &path, &[auth, ("X-Streamblk-Class", "demand")]);
    assert_eq!(status, 200);
    assert!(
        body == f.image[CHUNK..2 * CHUNK],
        "the chunk's plaintext was not served"
    );
    assert!(headers.contains_key("x-streamblk-queue"), "{headers:?}");
    let s = host.daemon.status();
    assert_eq!(s["p2p"]["refused_unauthorized"], 3);
    assert_eq!(s["p2p"]["bad_requests"], 3);
    assert_eq!(s["p2p"]["not_found"], 1);
    assert_eq!(s["p2p"]["uploads"], 1);

    // A daemon with another token: its requests are refused, and its
    // guest still reads everything (from the store).
    let other_token = f.dir.path().join("other-token");
    std::fs::write(&other_token, "another-fleet-0123456789\n").unwrap();
    let stranger_addr = free_addrs(1)[0];
    let stranger = f.host_with("stranger", stranger_addr, &[me, stranger_addr], true, &other_token, &[]);
    stranger.ready();
    read_all(&stranger.socket, &f.image, "stranger");
    let refused = host.p2p_status("refused_unauthorized") - 3;
    assert!(refused > 0, "the stranger's requests were not refused");
    assert_eq!(stranger.fetch_status("peer_chunks"), 0);
    assert_eq!(host.p2p_status("uploads"), 1, "the host uploaded to a stranger");
}

#[test]
fn a_home_killed_mid_way_costs_no_guest_read_and_little_store_traffic() {
    let f = Fixture::new();
    let addrs = free_addrs(3);
    let a = f.host("a", addrs[0], &addrs, true);
    let b = f.host("b", addrs[1], &addrs, true);
    // The home that dies: it serves the others, its own guest reads nothing.
    let mut c = f.host("c", addrs[2], &addrs, true);
    for h in [&a, &b, &c] {
        h.ready();
    }
    let chunks = f.chunks();
    std::thread::scope(|s| {
        for h in [&a, &b] {
            let (socket, image) = (h.socket.clone(), &f.image);
            s.spawn(move || read_all(&socket, image, &format!("host {}", h.addr)));
        }
        // Kill c once the store has served about a third of the image.
        let t = Instant::now();
        while f.store_requests() < chunks / 3 {
            assert!(t.elapsed() < Duration::from_secs(60), "the reads made no progress");
            std::thread::sleep(Duration::from_millis(5));
        }
        c.daemon.kill();
    });
    let store = f.store_requests();
    // What a and b saw of the dead home.
    let dead = [a.peer(c.addr), b.peer(c.addr)];
    eprintln!(
        "home killed mid-way: store served {store} chunk requests for {chunks} chunks ({:.2}x); a got {} chunks \
         from peers, b {}; the dead home as a and b saw it: {dead:?}",
        store as f64 / chunks as f64,
        a.fetch_status("peer_chunks"),
        b.fetch_status("peer_chunks"),
    );
    assert!(
        store as f64 <= 1.1 * chunks as f64,
        "the store served {store} chunk requests for {chunks} chunks"
    );
    // The dead home served before it died, and was found dead after.
    assert!(dead.iter().any(|d| d["served"].as_u64().unwrap_or(0) > 0), "{dead:?}");
    assert!(dead.iter().any(|d| d["failures"].as_u64().unwrap_or(0) > 0), "{dead:?}");
}

#[test]
fn sighup_rereads_the_peers_file() {
    let f = Fixture::new();
    let [me, other] = free_addrs(2)[..] else { unreachable!() };
    let peers = f.dir.path().join("peers");
    std::fs::write(&peers, format!("# the fleet\n{me}\n")).unwrap();
    let peers_arg = peers.to_str().unwrap().to_string();
    let host = f.host_with("h", me, &[], false, &f.token, &["--peers-file", &peers_arg]);
    host.ready();
    assert_eq!(
        host.daemon.status()["p2p"]["members"],
        serde_json::json!([me.to_string()])
    );
    std::fs::write(&peers, format!("{me}\n{other}  # joined\n")).unwrap();
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(host.daemon.child.id() as i32, libc::SIGHUP) };
    let t = Instant::now();
    while host.daemon.status()["p2p"]["members"].as_array().unwrap().len() != 2 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "SIGHUP did not re-read the peers file"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn p2p_without_a_token_or_on_a_taken_port_does_not_start() {
    let f = Fixture::new();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let e = serve_fails(&[
        "--store".into(),
        f.http.url.clone(),
        "--p2p-listen".into(),
        addr.clone(),
    ]);
    assert!(e.contains("p2p-token-file"), "{e}");
    let e = serve_fails(&[
        "--store".into(),
        f.http.url.clone(),
        "--p2p-listen".into(),
        addr.clone(),
        "--p2p-token-file".into(),
        f.token.to_str().unwrap().into(),
    ]);
    assert!(e.contains(&format!("listen for peers on {addr}")), "{e}");
    let short = f.dir.path().join("short-token");
    std::fs::write(&short, "abc\n").unwrap();
    let e = serve_fails(&[
        "--peers".into(),
        addr,
        "--p2p-token-file".into(),
        short.to_str().unwrap().into(),
    ]);
    assert!(e.contains("shorter than 16"), "{e}");
}

#[test]
fn a_hung_peer_costs_reads_one_short_wait_now_and_then_not_ten_seconds_each() {
    let f = Fixture::new();
    // A member that accepts connections and never answers on them.
    let hung = TcpListener::bind("127.0.0.1:0").unwrap();
    let hung_addr = hung.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in hung.incoming().flatten() {
            held.push(conn);
        }
    });
    let me = free_addrs(1)[0];
    let host = f.host("h", me, &[me, hung_addr], true);
    host.ready();
    // It is home for about half the chunks; each 1 MiB read needs some.
    let t = Instant::now();
    read_all(&host.socket, &f.image, "host");
    let took = t.elapsed();
    let peer = host.peer(hung_addr);
    eprintln!("read the image past a hung home in {took:?}; the hung peer as the host saw it: {peer}");
    assert!(
        peer["failures"].as_u64().unwrap_or(0) > 0,
        "the hung peer was never asked: {peer}"
    );
    // The first-byte budget (2 s) once, then the peer is down and skipped;
    // before, the first reads that met it waited the whole 10 s timeout.
    assert!(took < Duration::from_secs(6), "reads past a hung peer took {took:?}");
    assert_eq!(peer["down"], true, "the hung peer is not marked down");
    assert_eq!(f.store_requests(), f.chunks(), "a chunk came from the store twice");
}

/// A host that read an image and no longer has a disk of it still serves
/// its chunks from its chunk store: as their home it fetches none of them
/// from the store again for a host that boots the image later.
#[test]
fn a_host_serves_the_chunks_of_an_image_it_no_longer_has_open() {
    let f = Fixture::new();
    let addrs = free_addrs(2);
    let chunks = f.chunks();
    // a alone reads the image, then stops: its chunks are in its store.
    let mut a = f.host("a", addrs[0], &addrs[..1], true);
    read_all(&a.socket, &f.image, "a");
    assert!(a.daemon.terminate().success());
    assert_eq!(f.store_requests(), chunks);
    // Back, with no disk, in a fleet with b.
    let a = f.host("a", addrs[0], &addrs, false);
    let b = f.host("b", addrs[1], &addrs, true);
    a.ready();
    b.ready();
    read_all(&b.socket, &f.image, "b");
    let (uploads, home_fetches, again) = (
        a.p2p_status("uploads"),
        a.p2p_status("home_fetches"),
        f.store_requests() - chunks,
    );
    eprintln!("{chunks} chunks: a uploaded {uploads}, fetched {home_fetches} as home; the store served {again} again (b's own)");
    assert!(uploads > chunks / 4, "a served only {uploads} of its {chunks} chunks");
    assert_eq!(home_fetches, 0, "a fetched chunks it holds from the store");
    assert!(again < chunks - uploads + 1, "the store served {again} chunks again");
}

/// The arguments of a daemon with P2P on at `me` among `members`, fill off,
/// one disk `home` of the image `img` of the store at `store_url`, and `extra`.
fn home_args(
    dir: &Path,
    store_url: &str,
    me: SocketAddr,
    members: &[SocketAddr],
    token: &Path,
    extra: &[&str],
) -> Vec<String> {
    let peers: Vec<String> = members.iter().map(ToString::to_string).collect();
    let disk = format!(
        "name=home,socket={},overlay={},image=img",
        dir.join("disk.sock").display(),
        dir.join("overlay").display()
    );
    [
        "--store",
        store_url,
        "--cache-dir",
        dir.join("cache").to_str().unwrap(),
        "--fill-rate",
        "0",
        "--p2p-listen",
        &me.to_string(),
        "--peers",
        &peers.join(","),
        "--p2p-token-file",
        token.to_str().unwrap(),
        "--disk",
        &disk,
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect()
}

/// A home that has an image open with a boot profile: the first
/// profile-class request naming the image makes it fetch from the store
/// exactly the profile's chunks it is home for (each once), and nothing
/// else; demand and background requests, an unknown image, a request that
/// names none, or a second profile request start no prefetch.
#[test]
fn a_home_fetches_exactly_the_profile_chunks_it_is_home_for_on_the_first_profile_request() {
    use streamblk::store::Digest;

    const BIG: usize = 512 << 10;
    let dir = tmpdir();
    // 64 chunks of 512 KiB, every one distinct; chunks 0 and 5 all zeros.
    let mut image = random_bytes(64 * BIG, 91);
    for c in [0, 5] {
        image[c * BIG..(c + 1) * BIG].fill(0);
    }
    let raw = dir.path().join("image.raw");
    std::fs::write(&raw, &image).unwrap();
    let store = dir.path().join("store");
    let id = import(&raw, &store, "img", BIG as u64);
    // The profile starts with the zero chunks, and records an hour-long
    // boot: the home's own profile stream (which starts 20 s after the
    // image opens, as no guest attaches) stays two chunks ahead of a clock
    // that moves a chunk every 86 s, so it fetches nothing, and every
    // store request below is the requests' or the prefetch's.
    let mut profile: Vec<u32> = vec![0, 5];
    profile.extend(
        (0..64u32)
            .map(|i| (i * 37 + 11) % 64)
            .filter(|c| *c != 0 && *c != 5)
            .take(40),
    );
    let profile_file = dir.path().join("boot.profile");
    std::fs::write(
        &profile_file,
        serde_json::json!({"version": 1, "chunk_size": BIG, "chunks": profile, "boot_ms": 3_600_000}).to_string(),
    )
    .unwrap();
    let store_s = store.to_str().unwrap();
    streamblk(&[
        "image",
        "set-profile",
        "img",
        profile_file.to_str().unwrap(),
        "--store",
        store_s,
    ]);
    let http = HttpStore::start(store);
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();

    // The home, and a member that never starts (its chunks are not the home's).
    let addrs = free_addrs(2);
    let (me, members) = (addrs[0], &addrs[..]);
    // Fill off: a peer's background request is still fetched (at profile
    // class: the home's fill rate is for its own fill).
    let args = home_args(
        dir.path(),
        &http.url,
        me,
        members,
        &token,
        &["--profile-window-mib", "1", "--p2p-prefetch"],
    );
    let home = Daemon::start(&args);
    let p2p = |key: &str| home.status()["p2p"][key].as_u64().unwrap();
    assert_eq!(p2p("prefetches"), 0);

    let digest = |c: u32| Digest::of(&image[c as usize * BIG..(c as usize + 1) * BIG]);
    let is_home = |c: u32| home_of(&digest(c), members) == me;
    // What the prefetch must fetch: the profile's non-zero chunks homed here.
    let expected: Vec<u32> = profile
        .iter()
        .copied()
        .filter(|&c| c != 0 && c != 5 && is_home(c))
        .collect();
    assert!(expected.len() >= 8, "home for only {} profile chunks", expected.len());
    let path = |c: u32| format!("/chunks/{}", digest(c).to_hex());
    // The chunks the store served, each with its count.
    let served = || {
        let mut v: Vec<(String, u64)> = http.chunk_requests().into_iter().collect();
        v.sort();
        v
    };
    let once = |chunks: &[u32]| {
        let mut v: Vec<(String, u64)> = chunks.iter().map(|&c| (path(c), 1)).collect();
        v.sort();
        v
    };
    let bearer = format!("Bearer {TOKEN}");
    let ask = |c: u32, class: &str, named: Option<&str>| {
        let mut h = vec![("Authorization", bearer.as_str()), ("X-Streamblk-Class", class)];
        if let Some(named) = named {
            h.push(("X-Streamblk-Image", named));
        }
        let (status, _, body) = get(me, &path(c), &h);
        assert_eq!(status, 200, "chunk {c}, {class}, image {named:?}");
        assert!(body == image_chunk(&image, c, BIG), "chunk {c}: wrong bytes");
    };
    // Long enough for a prefetch to have fetched something (the store
    // answers in about a millisecond).
    let settle = || std::thread::sleep(Duration::from_millis(800));
    assert_eq!(served(), vec![], "the store served chunks before any request");

    // No prefetch: demand and background requests naming the image, a
    // profile request for an id this host cannot resolve, one naming none.
    let unknown = Digest::of(b"no such image").to_hex();
    let mut asked = Vec::new();
    for (i, (class, image)) in [
        ("demand", Some(id.as_str())),
        ("background", Some(id.as_str())),
        ("profile", Some(unknown.as_str())),
        ("profile", None),
    ]
    .into_iter()
    .enumerate()
    {
        ask(expected[i], class, image);
        asked.push(expected[i]);
        settle();
        assert_eq!(
            served(),
            once(&asked),
            "a {class} request naming {image:?} started a prefetch"
        );
    }
    // A malformed image id is refused before anything is fetched.
    let bad = get(
        me,
        &path(expected[4]),
        &[
            ("Authorization", bearer.as_str()),
            ("X-Streamblk-Class", "profile"),
            ("X-Streamblk-Image", "not-an-image"),
        ],
    );
    assert_eq!(bad.0, 400);
    assert_eq!(p2p("prefetches"), 0);

    // The first profile request naming the image: the home fetches every
    // profile chunk it is home for, each once, and no other chunk.
    ask(expected[4], "profile", Some(&id));
    let t = Instant::now();
    while served() != once(&expected) && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    settle();
    assert_eq!(served(), once(&expected), "not exactly the profile chunks homed here");
    assert_eq!(p2p("prefetches"), 1);
    // The chunks it had not fetched yet (the requested one may have been
    // fetched by the request itself before the prefetch wanted it).
    let brought = p2p("prefetched_chunks");
    let left = expected.len() as u64 - 4;
    assert!((left - 1..=left).contains(&brought), "prefetched {brought} of {left}");

    // Another profile request for the image: no second prefetch; only the
    // chunk asked for (one outside the profile, or not homed here) is fetched.
    let other = (1..64u32).find(|&c| c != 5 && !expected.contains(&c)).unwrap();
    ask(other, "profile", Some(&id));
    settle();
    let mut all = expected.clone();
    all.push(other);
    assert_eq!(served(), once(&all));
    assert_eq!(p2p("prefetches"), 1);
    eprintln!(
        "home for {} of {} profile chunks: prefetched {brought}, the store served each once",
        expected.len(),
        profile.len()
    );
}

/// A chunk's home among `members`: the highest rendezvous score, the first
/// 8 bytes (little-endian) of blake3(digest || member as text), ties to
/// the smaller address (what every daemon computes, `src/p2p/hrw.rs`).
fn home_of(digest: &streamblk::store::Digest, members: &[SocketAddr]) -> SocketAddr {
    let score = |m: &SocketAddr| {
        let mut h = blake3::Hasher::new();
        h.update(&digest.0);
        h.update(m.to_string().as_bytes());
        u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().unwrap())
    };
    *members
        .iter()
        .max_by(|a, b| score(a).cmp(&score(b)).then(b.cmp(a)))
        .unwrap()
}

/// Chunk `c` of `image` in chunks of `size` bytes.
fn image_chunk(image: &[u8], c: u32, size: usize) -> &[u8] {
    &image[c as usize * size..(c as usize + 1) * size]
}

/// A home that fetches a cold chunk for a request sends it in its stored
/// (zstd) form when the requester takes it, not the plaintext: the form is
/// kept as the fetch brings it, after the request found none.
#[test]
fn a_home_sends_a_cold_chunk_it_fetched_for_the_request_in_its_stored_form() {
    let dir = tmpdir();
    // Compressible chunks: the store keeps them as zstd.
    let image: Vec<u8> = (0..4 * CHUNK).map(|i| ((i / 512) % 7) as u8 + 1).collect();
    let raw = dir.path().join("image.raw");
    std::fs::write(&raw, &image).unwrap();
    let store = dir.path().join("store");
    import(&raw, &store, "img", CHUNK as u64);
    let http = HttpStore::start(store.clone());
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    let addrs = free_addrs(2);
    let me = addrs[0];
    let args = home_args(dir.path(), &http.url, me, &addrs, &token, &[]);
    let home = Daemon::start(&args);
    home.status();

    let chunk = &image[CHUNK..2 * CHUNK];
    let digest = blake3::hash(chunk).to_hex().to_string();
    let stored = std::fs::read(store.join("chunks").join(&digest)).unwrap();
    assert!(stored.len() < CHUNK / 4, "the chunk was stored uncompressed");
    let bearer = format!("Bearer {TOKEN}");
    let (status, headers, body) = get(
        me,
        &format!("/chunks/{digest}?len={CHUNK}&stored={}&zstd=1", stored.len()),
        &[
            ("Authorization", bearer.as_str()),
            ("X-Streamblk-Class", "demand"),
            ("X-Streamblk-Form", "stored"),
        ],
    );
    assert_eq!(status, 200);
    assert_eq!(headers.get("x-streamblk-form").map(String::as_str), Some("stored"));
    assert!(body == stored, "{} bytes sent, not the stored form", body.len());
    assert_eq!(http.chunk_requests().values().sum::<u64>(), 1, "the chunk was cold");
}
