//! Fleet membership in etcd, with a real etcd (Debian's etcd-server) that
//! the test starts on 127.0.0.1 with free ports and a temporary data dir:
//! daemons find each other through it, their views follow joins, a SIGTERM
//! (lease revoked: gone at once) and a SIGKILL (gone when its lease
//! expires), and guest reads stay correct throughout; a daemon whose etcd
//! is unreachable serves its disk from the store, and joins once etcd is up.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::httpstore::HttpStore;
use common::*;

const MIB: usize = 1 << 20;
const CHUNK: usize = 64 << 10;
const TOKEN: &str = "fleet-token-0123456789";
/// The daemons' lease TTL (`p2p::etcd::LEASE_TTL`).
const LEASE_TTL: Duration = Duration::from_secs(10);

/// Addresses on 127.0.0.1 that were free a moment ago.
fn free_addrs(n: usize) -> Vec<SocketAddr> {
    let listeners: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    listeners.iter().map(|l| l.local_addr().unwrap()).collect()
}

/// A single-member etcd on 127.0.0.1, killed (and its data removed) when dropped.
struct Etcd {
    child: Child,
    client: SocketAddr,
    _dir: tempfile::TempDir,
    log: PathBuf,
}

impl Etcd {
    /// Starts etcd serving clients on `client`, and waits (up to 30 s)
    /// until it reports itself healthy.
    fn start(client: SocketAddr) -> Etcd {
        let dir = tmpdir();
        let peer = free_addrs(1)[0];
        let name = format!("sb-test-{}", std::process::id());
        let log = dir.path().join("etcd.log");
        let child = Command::new("etcd")
            .args(["--name", &name, "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &format!("http://{client}")])
            .args(["--advertise-client-urls", &format!("http://{client}")])
            .args(["--listen-peer-urls", &format!("http://{peer}")])
            .args(["--initial-advertise-peer-urls", &format!("http://{peer}")])
            .args(["--initial-cluster", &format!("{name}=http://{peer}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn etcd (Debian: etcd-server, see scripts/install-deps.sh)");
        let etcd = Etcd {
            child,
            client,
            _dir: dir,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !etcd.healthy() {
            assert!(
                Instant::now() < deadline,
                "etcd never became healthy:\n{}",
                etcd.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        etcd
    }

    fn healthy(&self) -> bool {
        let Ok(mut c) = TcpStream::connect_timeout(&self.client, Duration::from_millis(500)) else {
            return false;
        };
        let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
        let req = format!("GET /health HTTP/1.0\r\nHost: {}\r\n\r\n", self.client);
        let mut answer = String::new();
        c.write_all(req.as_bytes()).is_ok()
            && c.read_to_string(&mut answer).is_ok()
            && answer.contains("\"health\":\"true\"")
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A 16 MiB image of random data imported into a store served over HTTP.
struct Fixture {
    dir: tempfile::TempDir,
    image: Vec<u8>,
    http: HttpStore,
    token: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tmpdir();
        let image = random_bytes(16 * MIB, 11);
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

    fn chunks(&self) -> u64 {
        (self.image.len() / CHUNK) as u64
    }

    fn store_requests(&self) -> u64 {
        self.http.chunk_requests().values().sum()
    }

    /// A daemon with one disk of the image, listening for peers on `me`,
    /// its membership in etcd at `etcd` under `prefix`.
    fn host(&self, name: &str, me: SocketAddr, etcd: SocketAddr, prefix: &str) -> Host {
        self.host_in(name, me, etcd, prefix, &[])
    }

    fn host_in(&self, name: &str, me: SocketAddr, etcd: SocketAddr, prefix: &str, extra: &[&str]) -> Host {
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("disk.sock");
        let args: Vec<String> = [
            "--store",
            &self.http.url,
            "--cache-dir",
            dir.join("cache").to_str().unwrap(),
            "--fill-rate",
            "0",
            "--p2p-listen",
            &me.to_string(),
            "--membership",
            &format!("etcd://{etcd}/{prefix}"),
            "--p2p-token-file",
            self.token.to_str().unwrap(),
            "--disk",
            &format!(
                "name={name},socket={},overlay={},image=img",
                socket.display(),
                dir.join("overlay").display()
            ),
        ]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect();
        let daemon = Daemon::start(&args);
        Host {
            daemon,
            socket,
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
    fn p2p(&self) -> serde_json::Value {
        self.daemon.status()["p2p"].clone()
    }

    fn members(&self) -> Vec<SocketAddr> {
        self.p2p()["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_str().unwrap().parse().unwrap())
            .collect()
    }

    fn fetch(&self, key: &str) -> u64 {
        self.daemon.status()["fetch"][key].as_u64().unwrap_or(0)
    }
}

/// Waits (up to `within`) until every host's view is exactly `want`;
/// returns how long it took.
fn converge(hosts: &[&Host], want: &[SocketAddr], within: Duration) -> Duration {
    let mut want = want.to_vec();
    want.sort();
    let t = Instant::now();
    loop {
        let views: Vec<Vec<SocketAddr>> = hosts.iter().map(|h| h.members()).collect();
        if views.iter().all(|v| *v == want) {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < within,
            "views did not converge to {want:?} within {within:?}: {views:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads the whole disk at `socket`, 1 MiB at a time, and checks it.
fn read_all(socket: &Path, image: &[u8], who: &str) {
    wait_for_socket(socket);
    let mut c = Client::connect(socket, 1, MIB);
    for at in (0..image.len()).step_by(MIB) {
        let got = c.read(at as u64, MIB);
        assert!(got == image[at..at + MIB], "{who}: wrong data at {at}");
    }
}

#[test]
fn views_kept_in_etcd_follow_joins_a_sigterm_and_a_sigkill_while_reads_stay_correct() {
    let etcd = Etcd::start(free_addrs(1)[0]);
    let prefix = format!("sb-test-{}", std::process::id());
    let f = Fixture::new();
    let addrs = free_addrs(6);
    let mut hosts: Vec<Host> = (0..3)
        .map(|i| f.host(&format!("h{i}"), addrs[i], etcd.client, &prefix))
        .collect();
    let took = converge(&hosts.iter().collect::<Vec<_>>(), &addrs[..3], Duration::from_secs(30));
    eprintln!("3 daemons: views converged {took:?} after start");
    let p = hosts[0].p2p();
    assert_eq!(p["membership"], format!("etcd://{}/{prefix}", etcd.client));
    assert_eq!(p["membership_connected"], true);

    // A cold storm: all three read the whole image at once.
    std::thread::scope(|s| {
        for (i, h) in hosts.iter().enumerate() {
            let (socket, image) = (h.socket.clone(), &f.image);
            s.spawn(move || read_all(&socket, image, &format!("h{i}")));
        }
    });
    let from_peers: u64 = hosts.iter().map(|h| h.fetch("peer_chunks")).sum();
    let (chunks, store) = (f.chunks(), f.store_requests());
    eprintln!("3 hosts, {chunks} chunks: the store served {store}, peers {from_peers}");
    assert!(from_peers > chunks, "peers served only {from_peers} chunks");
    assert!(store <= chunks * 5 / 4, "the store served {store} of {chunks} chunks");

    // A fourth host joins: every view grows to four.
    hosts.push(f.host("h3", addrs[3], etcd.client, &prefix));
    let took = converge(&hosts.iter().collect::<Vec<_>>(), &addrs[..4], Duration::from_secs(30));
    eprintln!("a fourth daemon: views converged {took:?} after its start");

    // h3 reads the image while h1 leaves by SIGTERM: h1 revoked its lease,
    // so the others drop it at once.
    let left = std::thread::scope(|s| {
        let (socket, image) = (hosts[3].socket.clone(), &f.image);
        let reader = s.spawn(move || read_all(&socket, image, "h3"));
        std::thread::sleep(Duration::from_millis(200));
        let status = hosts[1].daemon.terminate();
        assert!(status.success(), "h1 exited {status}");
        let t = Instant::now();
        let rest = [&hosts[0], &hosts[2], &hosts[3]];
        converge(&rest, &[addrs[0], addrs[2], addrs[3]], Duration::from_secs(10));
        let left = t.elapsed();
        reader.join().unwrap();
        left
    });
    eprintln!("SIGTERM: the others dropped h1 {left:?} after it exited");
    assert!(left < Duration::from_secs(2), "h1 left the views after {left:?}");
    assert!(hosts[3].fetch("peer_chunks") > 0, "h3 got nothing from peers");

    // h2 is SIGKILLed: it stays in the views until its lease expires. A
    // fresh host reads the image meanwhile, past the dead member.
    hosts[2].daemon.kill();
    let t = Instant::now();
    hosts.push(f.host("h4", addrs[4], etcd.client, &prefix));
    read_all(&hosts[4].socket, &f.image, "h4");
    let rest = [&hosts[0], &hosts[3], &hosts[4]];
    converge(
        &rest,
        &[addrs[0], addrs[3], addrs[4]],
        LEASE_TTL + Duration::from_secs(10),
    );
    let dropped = t.elapsed();
    eprintln!("SIGKILL: the others dropped h2 {dropped:?} after it died (lease TTL {LEASE_TTL:?})");
    assert!(
        dropped < LEASE_TTL + Duration::from_secs(5),
        "h2 stayed in the views {dropped:?}"
    );
    assert!(
        dropped > LEASE_TTL / 2,
        "h2 left the views after {dropped:?}, before its lease could expire"
    );
    // Every view change was counted: 3 hosts, then 4, 3 and 4 again, 3.
    assert!(hosts[0].p2p()["membership_changes"].as_u64().unwrap() >= 4);
}

#[test]
fn a_daemon_whose_etcd_is_unreachable_serves_from_the_store_and_joins_once_etcd_is_up() {
    let f = Fixture::new();
    let [client, me]: [SocketAddr; 2] = free_addrs(2).try_into().unwrap();
    let prefix = format!("sb-down-{}", std::process::id());
    let host = f.host("h0", me, client, &prefix);
    read_all(&host.socket, &f.image, "h0");
    assert_eq!(
        host.fetch("store_chunks"),
        f.chunks(),
        "the disk was not served from the store"
    );
    let p = host.p2p();
    assert_eq!(p["membership_connected"], false);
    assert_eq!(host.members(), vec![me], "without etcd the view is this host alone");
    // Retries go on (backoff from 250 ms): one warning for the outage, not one per try.
    std::thread::sleep(Duration::from_secs(3));
    let log = std::fs::read_to_string(host.daemon.log.as_ref().unwrap()).unwrap();
    assert_eq!(log.matches("etcd unreachable").count(), 1, "{log}");

    // etcd comes up: the daemon connects (within its 5 s backoff cap) and registers.
    let etcd = Etcd::start(client);
    let t = Instant::now();
    while host.p2p()["membership_connected"] != true {
        assert!(t.elapsed() < Duration::from_secs(20), "never connected to etcd");
        std::thread::sleep(Duration::from_millis(100));
    }
    let other = f.host("h1", free_addrs(1)[0], etcd.client, &prefix);
    converge(&[&host, &other], &[me, other.addr], Duration::from_secs(20));
}

#[test]
fn with_zones_in_etcd_each_chunk_crosses_zones_about_once() {
    let etcd = Etcd::start(free_addrs(1)[0]);
    let prefix = format!("sb-zones-{}", std::process::id());
    let f = Fixture::new();
    let addrs = free_addrs(4);
    let zone = |i: usize| ["a", "b"][i / 2];
    let hosts: Vec<Host> = (0..4)
        .map(|i| f.host_in(&format!("h{i}"), addrs[i], etcd.client, &prefix, &["--zone", zone(i)]))
        .collect();
    converge(&hosts.iter().collect::<Vec<_>>(), &addrs, Duration::from_secs(30));
    for (i, h) in hosts.iter().enumerate() {
        assert_eq!(h.p2p()["zone"], zone(i));
    }
    std::thread::scope(|s| {
        for (i, h) in hosts.iter().enumerate() {
            let (socket, image) = (h.socket.clone(), &f.image);
            s.spawn(move || read_all(&socket, image, &format!("h{i}")));
        }
    });
    // Chunks each host got from a peer of the other zone.
    let mut across = 0;
    for (i, h) in hosts.iter().enumerate() {
        for p in h.p2p()["peers"].as_array().unwrap() {
            let peer: SocketAddr = p["addr"].as_str().unwrap().parse().unwrap();
            let j = addrs.iter().position(|a| *a == peer).unwrap();
            if zone(j) != zone(i) {
                across += p["served"].as_u64().unwrap();
            }
        }
    }
    let (chunks, store) = (f.chunks(), f.store_requests());
    eprintln!("2 zones of 2 hosts, {chunks} chunks: {across} crossed zones, the store served {store}");
    // Without zones about half of the 4 x 256 peer fetches would cross.
    assert!(across <= chunks * 5 / 4, "{across} chunks crossed zones");
    assert!(store <= chunks * 5 / 4, "the store served {store} of {chunks} chunks");
}
