//! A host that cannot reach the store boots a real guest from its peers.
//! Two hosts in network namespaces of their own share a switch with the
//! store (nginx); from host B's namespace the store's address is
//! unreachable (a route says so, and a connect from there is seen to
//! fail). Host A reads the whole image from the store; then a guest boots
//! under QEMU from B's daemon, which gets the image's manifest (the image
//! is given by id) and every chunk from A, each checked against its digest.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::fleet::Fleet;
use common::guest::{build_guest, Qemu};
use common::netns::run;
use common::*;

const BOOT: Duration = Duration::from_secs(300);
const CHUNK: u64 = 256 << 10;

/// Whether a TCP connect to `addr` succeeds from namespace `ns` (bash's
/// /dev/tcp, bounded by `timeout`).
fn connects_from(ns: &str, addr: &str) -> bool {
    let (ip, port) = addr.split_once(':').unwrap();
    Command::new("ip")
        .args(["netns", "exec", ns, "timeout", "5", "bash", "-c"])
        .arg(format!("exec 3<>/dev/tcp/{ip}/{port}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Starts a daemon in `ns` serving disk `name` of image `id`, a member of
/// `peers`; its socket.
fn start_host(
    fleet: &Fleet,
    dir: &std::path::Path,
    (ns, ip): &(String, String),
    peers: &str,
    id: &str,
    name: &str,
) -> (Daemon, std::path::PathBuf) {
    let host = dir.join(name);
    std::fs::create_dir_all(&host).unwrap();
    let socket = host.join("disk.sock");
    let args: Vec<String> = vec![
        "--store".into(),
        fleet.store_url.clone(),
        "--cache-dir".into(),
        host.join("cache").display().to_string(),
        "--p2p-listen".into(),
        format!("{ip}:7070"),
        "--peers".into(),
        peers.into(),
        "--p2p-token-file".into(),
        dir.join("token").display().to_string(),
        "--disk".into(),
        format!(
            "name={name},socket={},overlay={},image={id}",
            socket.display(),
            host.join("overlay").display()
        ),
    ];
    let daemon = Daemon::start_in(Some(ns), &args);
    wait_for_socket(&socket);
    (daemon, socket)
}

#[test]
fn a_guest_boots_on_a_host_without_store_access_from_a_peer() {
    let guest = build_guest();
    let dir = tmpdir();
    let store = dir.path().join("store");
    let id = import(&guest.join("rootfs.img"), &store, "guest", CHUNK);
    let fleet = Fleet::start(&store, "1gbit", 2, "1gbit");
    let (a, b) = (fleet.hosts[0].clone(), fleet.hosts[1].clone());
    let store_addr = fleet.store_url.strip_prefix("http://").unwrap().to_string();
    let store_ip = store_addr.split(':').next().unwrap();

    // Cut B off from the store, and see that it is: A connects, B cannot.
    run(&[
        "ip",
        "netns",
        "exec",
        &b.0,
        "ip",
        "route",
        "add",
        "unreachable",
        &format!("{store_ip}/32"),
    ]);
    assert!(connects_from(&a.0, &store_addr), "A cannot reach the store");
    assert!(!connects_from(&b.0, &store_addr), "B reaches the store");

    std::fs::write(dir.path().join("token"), "guest-p2p-test-token\n").unwrap();
    let peers = format!("{}:7070,{}:7070", a.1, b.1);

    // A reads the whole disk from the store, and the bytes are the image's.
    let (daemon_a, socket_a) = start_host(&fleet, dir.path(), &a, &peers, &id, "a");
    // B is cut off from the store only: it reaches A's peer server.
    assert!(connects_from(&b.0, &format!("{}:7070", a.1)), "B cannot reach A");
    let image = std::fs::read(guest.join("rootfs.img")).unwrap();
    {
        let mut c = Client::connect(&socket_a, 1, 1 << 20);
        for (n, expect) in image.chunks(1 << 20).enumerate() {
            assert!(
                c.read((n << 20) as u64, expect.len()) == expect,
                "A read wrong bytes at MiB {n}"
            );
        }
    }
    let from_a = fleet.store_requests_from(&a.1);
    assert!(
        from_a > 0,
        "the store logged no request from A: its log would not show B's either"
    );

    // B: the guest boots, checks its files, writes, syncs, powers off.
    let (mut daemon_b, socket_b) = start_host(&fleet, dir.path(), &b, &peers, &id, "b");
    let start = Instant::now();
    let mut qemu = Qemu::boot(&guest, &socket_b, 1, "");
    qemu.expect("GUEST-BOOTED", BOOT);
    qemu.expect("GUEST-CHECK-OK", BOOT);
    qemu.expect("GUEST-WRITE-OK", BOOT);
    qemu.expect("GUEST-DONE", BOOT);
    assert!(qemu.wait_exit(BOOT).success(), "QEMU did not exit cleanly");
    let booted = start.elapsed();

    // Then the rest of the image fills in (after the boot's quiet time):
    // every chunk of it came from A, none from the store.
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        let s = daemon_b.status();
        let img = &s["images"][0];
        let (filled, chunks) = (img["filled"].as_u64().unwrap(), img["chunks"].as_u64().unwrap());
        let f = &s["fetch"];
        let got = f["peer_chunks"].as_u64().unwrap() + f["store_chunks"].as_u64().unwrap();
        if filled == chunks && got >= filled {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "B's cache did not fill: {filled}/{chunks} chunks, fetch: {f}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let f = &status["fetch"];
    let chunks = status["images"][0]["chunks"].as_u64().unwrap();
    eprintln!(
        "guest booted on B in {booted:.1?}; B fetched {} chunks ({} bytes) from peers, {} from the store, \
         {} failed store attempts; the store answered {from_a} requests from A, {} from B",
        f["peer_chunks"],
        f["peer_bytes"],
        f["store_chunks"],
        f["failed_attempts"],
        fleet.store_requests_from(&b.1),
    );
    assert_eq!(status["images"][0]["id"].as_str(), Some(id.as_str()));
    assert_eq!(
        f["store_chunks"].as_u64(),
        Some(0),
        "B fetched chunks from the store: {f}"
    );
    assert_eq!(
        f["peer_chunks"].as_u64(),
        Some(chunks),
        "B's chunks did not all come from peers: {f}"
    );
    assert_eq!(f["bad_peer_chunks"].as_u64(), Some(0), "{f}");
    assert_eq!(fleet.store_requests_from(&b.1), 0, "the store answered B");
    let uploads = daemon_a.status()["p2p"]["uploads"].as_u64().unwrap();
    assert!(uploads >= chunks, "A uploaded {uploads} chunks for B's {chunks}");

    // What B cannot open, and says why: a name (it needs the store), and
    // an id neither the store nor any peer has.
    let add_fails = |image: &str| {
        let spec = format!(
            "name=x,socket={},overlay={},image={image}",
            dir.path().join("x.sock").display(),
            dir.path().join("x.overlay").display()
        );
        let control = daemon_b.control.display().to_string();
        let out = Command::new(BIN)
            .args(["disk", "add", &spec, "--control-socket", &control])
            .output()
            .unwrap();
        assert!(!out.status.success(), "B opened {image}");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let e = add_fails("guest");
    eprintln!("B, given a name: {}", e.trim());
    assert!(e.contains("give the image by its id"), "{e}");
    let e = add_fails(&"ab".repeat(32));
    eprintln!("B, given an id nobody has: {}", e.trim());
    assert!(e.contains("the store failed") && e.contains("no peer served it"), "{e}");
    assert!(daemon_b.terminate().success());
}
