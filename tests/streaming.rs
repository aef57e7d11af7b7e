//! Disks streamed from a store: on-demand fetch through the Local Cache,
//! shared between disks, persistent across restarts, and every fault path:
//! corrupt chunks, a failing or stalling store, bad manifests.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::httpstore::{Fault, HttpStore};
use common::*;

const MIB: usize = 1 << 20;
const CHUNK: u64 = 64 << 10;

/// A 16 MiB image: random data with some all-zero chunks.
fn make_image(path: &Path) -> Vec<u8> {
    let mut data = random_bytes(16 * MIB, 21);
    for c in (0..256).step_by(7) {
        data[c * CHUNK as usize..(c + 1) * CHUNK as usize].fill(0);
    }
    std::fs::write(path, &data).unwrap();
    data
}

fn image_disk(name: &str, dir: &Path, image: &str, extra: &str) -> String {
    format!(
        "name={name},socket={},overlay={},image={image}{extra}",
        dir.join(format!("{name}.sock")).display(),
        dir.join(format!("{name}.overlay")).display(),
    )
}

fn serve_args(store: &str, cache: &Path, disks: &[String], extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "--store".into(),
        store.into(),
        "--cache-dir".into(),
        cache.display().to_string(),
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    for d in disks {
        a.push("--disk".into());
        a.push(d.clone());
    }
    a
}

#[test]
fn streamed_disks_share_one_cache_fetch_each_chunk_once_and_keep_it() {
    let dir = tmpdir();
    let image = make_image(&dir.path().join("image.raw"));
    let store_dir = dir.path().join("store");
    import(&dir.path().join("image.raw"), &store_dir, "img", CHUNK);
    let http = HttpStore::start(store_dir);
    http.set_delay(Duration::from_millis(1));
    let cache = dir.path().join("cache");
    let disks = [
        image_disk("a", dir.path(), "img", ",queues=2"),
        image_disk("b", dir.path(), "img", ""),
    ];
    let args = serve_args(&http.url, &cache, &disks, &["--fill-rate", "0"]);
    let mut daemon = Daemon::start(&args);

    let mut a = Client::connect(&dir.path().join("a.sock"), 2, 16 * MIB);
    let mut b = Client::connect(&dir.path().join("b.sock"), 1, 16 * MIB);
    // Guest A reads half, scattered, at depth; guest B then reads everything.
    let ops: Vec<Op> = (0..64u64)
        .map(|i| Op::Read {
            offset: (i * 131 % 128) * 2 * CHUNK + 4096,
            len: 8192,
            buf: i as usize * 8192,
        })
        .collect();
    assert!(a.run(&ops).iter().all(|&r| r == 0));
    for (i, op) in ops.iter().enumerate() {
        let Op::Read { offset, len, buf } = *op else {
            unreachable!()
        };
        assert!(
            a.buf()[buf..buf + len] == image[offset as usize..offset as usize + len],
            "op {i}"
        );
    }
    assert!(b.read(0, 16 * MIB) == image, "guest B read the wrong data");
    // Writes go to each guest's own overlay.
    a.write(0, &[0xaa; 4096]);
    a.flush();
    assert!(b.read(0, 4096) == image[..4096]);

    let requests = http.chunk_requests();
    let nonzero: std::collections::HashSet<_> = (0..256).filter(|c| c % 7 != 0).collect();
    assert_eq!(
        requests.len(),
        nonzero.len(),
        "every non-zero chunk fetched, no zero chunk"
    );
    assert!(
        requests.values().all(|&n| n == 1),
        "a chunk was fetched twice: {requests:?}"
    );

    // SIGKILL after the bitmap is persisted: a new daemon fetches nothing again.
    std::thread::sleep(Duration::from_millis(800));
    daemon.kill();
    let mut daemon = Daemon::start(&args);
    let mut b = Client::connect(&dir.path().join("b.sock"), 1, 16 * MIB);
    assert!(b.read(0, 16 * MIB) == image);
    assert_eq!(
        http.chunk_requests(),
        requests,
        "chunks were fetched again after a restart"
    );
    let mut a = Client::connect(&dir.path().join("a.sock"), 1, 16 * MIB);
    assert!(a.read(0, 4096) == vec![0xaa; 4096], "guest A's flushed write was lost");
    drop((a, b));
    assert!(daemon.terminate().success());
}

#[test]
fn background_fill_brings_the_whole_image_at_a_capped_rate() {
    let dir = tmpdir();
    let image = make_image(&dir.path().join("image.raw"));
    let store_dir = dir.path().join("store");
    import(&dir.path().join("image.raw"), &store_dir, "img", CHUNK);
    let stored: u64 = std::fs::read_dir(store_dir.join("chunks"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    let http = HttpStore::start(store_dir);
    let cache = dir.path().join("cache");
    let disks = [image_disk("a", dir.path(), "img", "")];
    // 8 MB/s: about two seconds for this image.
    let start = Instant::now();
    let _daemon = Daemon::start(&serve_args(&http.url, &cache, &disks, &["--fill-rate", "8"]));
    while http.chunk_bytes() < stored {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "background fill did not finish"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(stored * 1000 / 8_000_000 / 2),
        "fill ignored the rate cap: {took:?}"
    );
    // Now the disk reads entirely from the cache, even with the store down.
    http.set_fault(Fault::Error);
    let mut a = Client::connect(&dir.path().join("a.sock"), 1, 16 * MIB);
    assert!(a.read(0, 16 * MIB) == image);
}

#[test]
fn corrupt_chunks_are_never_served_and_a_failing_store_recovers() {
    let dir = tmpdir();
    let image = make_image(&dir.path().join("image.raw"));
    let store_dir = dir.path().join("store");
    import(&dir.path().join("image.raw"), &store_dir, "img", CHUNK);
    let http = HttpStore::start(store_dir);
    let cache = dir.path().join("cache");
    let disks = [image_disk("a", dir.path(), "img", "")];
    let _daemon = Daemon::start(&serve_args(
        &http.url,
        &cache,
        &disks,
        &["--fill-rate", "0", "--fetch-deadline", "2", "--fetch-timeout", "1"],
    ));
    let mut a = Client::connect(&dir.path().join("a.sock"), 1, 16 * MIB);
    // Chunk 1 is cached while the store is healthy.
    assert!(a.read(CHUNK, CHUNK as usize) == image[CHUNK as usize..2 * CHUNK as usize]);

    // Each fault on a chunk that is not cached yet (2, 3, 4: none all-zero).
    for (chunk, fault) in [(2u64, Fault::Corrupt), (3, Fault::Error), (4, Fault::Stall)] {
        let at = (chunk * CHUNK) as usize;
        http.set_fault(fault);
        // Cached data keeps being served.
        let t = Instant::now();
        assert!(
            a.read(CHUNK, CHUNK as usize) == image[CHUNK as usize..2 * CHUNK as usize],
            "{fault:?}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "{fault:?}: a cached read waited on the store"
        );
        // A missing chunk is retried until the deadline, then fails with EIO.
        a.buf()[..4096].fill(0x77);
        let t = Instant::now();
        let r = a.run(&[Op::Read {
            offset: at as u64,
            len: 4096,
            buf: 0,
        }]);
        assert_eq!(r[0], -libc::EIO, "{fault:?}");
        assert!(
            t.elapsed() >= Duration::from_millis(1500),
            "{fault:?}: gave up after {:?}",
            t.elapsed()
        );
        assert!(
            a.buf()[..4096] != image[at..at + 4096],
            "{fault:?}: data of an unverified chunk reached the guest"
        );
        // The store comes back: the same chunk reads right.
        http.set_fault(Fault::None);
        assert!(
            a.read(at as u64 + 8192, 4096) == image[at + 8192..at + 12288],
            "{fault:?}: no recovery"
        );
    }
}

#[test]
fn a_bad_store_or_image_stops_the_daemon_with_a_clear_error() {
    let dir = tmpdir();
    make_image(&dir.path().join("image.raw"));
    let store = dir.path().join("store");
    let id = import(&dir.path().join("image.raw"), &store, "img", CHUNK);
    let cache = dir.path().join("cache");
    let store_s = store.display().to_string();
    let disk = |image: &str| vec![image_disk("a", dir.path(), image, "")];

    let err = serve_fails(&serve_args("http://127.0.0.1:9", &cache, &disk("img"), &[]));
    assert!(err.contains("image img") && err.contains("127.0.0.1:9"), "{err}");
    let err = serve_fails(&serve_args(&store_s, &cache, &disk("nope"), &[]));
    assert!(err.contains("no such name or id"), "{err}");
    let err = serve_fails(&serve_args("/nonexistent/store", &cache, &disk("img"), &[]));
    assert!(err.contains("not a directory"), "{err}");

    // A manifest that does not match its id, and one that does not parse.
    let manifest = store.join("manifests").join(&id);
    let good = std::fs::read(&manifest).unwrap();
    let mut bad = good.clone();
    let n = bad.len();
    bad[n - 3] ^= 1;
    std::fs::write(&manifest, &bad).unwrap();
    let err = serve_fails(&serve_args(&store_s, &cache, &disk("img"), &[]));
    assert!(err.contains("does not match its id"), "{err}");
    // A store whose name points at garbage stored under its own digest.
    let junk = b"{\"version\": 1, \"size\": 7}";
    let junk_id = blake3::hash(junk).to_hex().to_string();
    std::fs::write(store.join("manifests").join(&junk_id), junk).unwrap();
    std::fs::write(store.join("names/junk"), &junk_id).unwrap();
    let err = serve_fails(&serve_args(&store_s, &cache, &disk("junk"), &[]));
    assert!(err.contains("manifest"), "{err}");
    std::fs::write(&manifest, &good).unwrap();
    // No socket was left behind by the failed starts.
    assert!(!dir.path().join("a.sock").exists());
}

/// An S3-compatible server (moto) on loopback, killed on drop.
struct S3Server {
    child: std::process::Child,
    endpoint: String,
}

impl S3Server {
    fn start() -> S3Server {
        let bin =
            std::env::var("STREAMBLK_MOTO_SERVER").unwrap_or_else(|_| "/opt/streamblk-moto/bin/moto_server".into());
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {bin} (scripts/install-deps.sh installs it): {e}"));
        let endpoint = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto_server did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
        S3Server { child, endpoint }
    }

    /// Creates a bucket (moto does not check signatures).
    fn create_bucket(&self, name: &str) {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(self.endpoint.trim_start_matches("http://")).unwrap();
        write!(
            c,
            "PUT /{name} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut resp = String::new();
        c.read_to_string(&mut resp).unwrap();
        assert!(resp.starts_with("HTTP/1.1 200"), "create bucket: {resp}");
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn an_image_in_an_s3_bucket_streams_like_any_other() {
    let dir = tmpdir();
    let image = make_image(&dir.path().join("image.raw"));
    let s3 = S3Server::start();
    s3.create_bucket("sbk-images");
    let store = "s3://sbk-images/prod/images";
    let out = std::process::Command::new(BIN)
        .args(["image", "import"])
        .arg(dir.path().join("image.raw"))
        .args(["--store", store, "--name", "img", "--chunk-size", "65536"])
        .envs(s3.env())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "import to S3: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let cache = dir.path().join("cache");
    let disks = [image_disk("a", dir.path(), "img", "")];
    let mut args = vec![
        "--control-socket".to_string(),
        dir.path().join("ctl.sock").display().to_string(),
    ];
    args.extend(serve_args(store, &cache, &disks, &["--fill-rate", "0"]));
    let mut child = std::process::Command::new(BIN)
        .arg("serve")
        .args(&args)
        .envs(s3.env())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut a = Client::connect(&dir.path().join("a.sock"), 1, 16 * MIB);
    assert!(
        a.read(0, 16 * MIB) == image,
        "the disk differs from the image in the bucket"
    );
    let status = streamblk::control::read_status(&dir.path().join("ctl.sock")).unwrap();
    let nonzero = (0..256).filter(|c| c % 7 != 0).count() as u64;
    assert_eq!(status["fetch"]["store_chunks"].as_u64(), Some(nonzero), "{status}");
    drop(a);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn import_reads_qcow2_stores_each_chunk_once_and_shares_chunks_between_images() {
    let dir = tmpdir();
    let raw = dir.path().join("image.raw");
    let image = make_image(&raw);
    let store = dir.path().join("store");
    let chunks_stored = || std::fs::read_dir(store.join("chunks")).unwrap().count();
    let id = import(&raw, &store, "img", CHUNK);
    let first = chunks_stored();
    assert_eq!(
        first,
        (0..256).filter(|c| c % 7 != 0).count(),
        "one object per distinct non-zero chunk"
    );

    // The same content as qcow2: the same image, nothing new stored.
    let qcow2 = dir.path().join("image.qcow2");
    let st = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow2)
        .status()
        .unwrap();
    assert!(st.success());
    let out = std::process::Command::new(BIN)
        .args(["image", "import"])
        .arg(&qcow2)
        .arg("--store")
        .arg(&store)
        .args(["--name", "img-qcow2", "--chunk-size", &CHUNK.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        id,
        "qcow2 import gave another image"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("0 new chunks") && err.contains("already in the store"),
        "{err}"
    );
    assert_eq!(chunks_stored(), first);

    // An image that changes 3 chunks of the first shares the rest.
    let mut other = image.clone();
    for c in [1usize, 50, 200] {
        other[c * CHUNK as usize] ^= 0xff;
    }
    let other_path = dir.path().join("other.raw");
    std::fs::write(&other_path, &other).unwrap();
    let other_id = import(&other_path, &store, "other", CHUNK);
    assert_ne!(other_id, id);
    assert_eq!(chunks_stored(), first + 3);
    let inspect = streamblk(&["image", "inspect", "other", "--store", store.to_str().unwrap()]);
    assert!(
        inspect.contains(&format!("chunks:       256 ({} all-zero", 256 - first)),
        "{inspect}"
    );

    // Bad input gets a clear error.
    std::fs::write(dir.path().join("odd.raw"), vec![1u8; 1000]).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["image", "import"])
        .arg(dir.path().join("odd.raw"))
        .arg("--store")
        .arg(&store)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a positive multiple of 512"));
    let out = std::process::Command::new(BIN)
        .args(["image", "import"])
        .arg(&raw)
        .arg("--store")
        .arg(&store)
        .args(["--chunk-size", "100000"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("power of two"));
}

#[test]
fn metrics_endpoint_reports_fetches_and_cache_hits() {
    let dir = tmpdir();
    let image = make_image(&dir.path().join("image.raw"));
    let store = dir.path().join("store");
    import(&dir.path().join("image.raw"), &store, "img", CHUNK);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let disks = [image_disk("a", dir.path(), "img", "")];
    let addr = format!("127.0.0.1:{port}");
    let daemon = Daemon::start(&serve_args(
        store.to_str().unwrap(),
        &dir.path().join("cache"),
        &disks,
        &["--fill-rate", "0", "--metrics-listen", &addr],
    ));
    let mut a = Client::connect(&dir.path().join("a.sock"), 1, MIB);
    assert!(a.read(CHUNK, 4096) == image[CHUNK as usize..CHUNK as usize + 4096]);
    assert!(a.read(CHUNK + 4096, 4096) == image[CHUNK as usize + 4096..CHUNK as usize + 8192]);
    let get = || {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(&addr).unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut body = String::new();
        c.read_to_string(&mut body).unwrap();
        body
    };
    let m = get();
    assert!(m.starts_with("HTTP/1.1 200"), "{m}");
    let id = daemon.status()["images"][0]["id"].as_str().unwrap().to_string();
    assert!(m.contains("streamblk_store_chunks_total 1\n"), "{m}");
    assert!(
        m.contains(&format!("streamblk_cache_hits_total{{image=\"{id}\"}} 2\n")),
        "{m}"
    );
    assert!(
        m.contains(&format!("streamblk_cache_misses_total{{image=\"{id}\"}} 1\n")),
        "{m}"
    );
    assert!(m.contains("streamblk_disk_attached{disk=\"a\"} 1\n"), "{m}");
}

/// Two disks of two 32 MiB images (no chunk in common) on a host whose
/// cache is capped at 16 MiB: both read their whole disk, twice, in
/// scattered order, at once. Every byte read is right, the chunk store
/// never holds more than the cap (in the daemon's status and on disk),
/// chunks are evicted and fetched again, and a restart keeps the cap.
#[test]
fn the_cache_stays_under_its_cap_while_two_disks_read_images_larger_than_it() {
    const IMAGE: usize = 32 * MIB;
    const CAP_MIB: u64 = 16;
    let dir = tmpdir();
    let store_dir = dir.path().join("store");
    let images: Vec<Vec<u8>> = (0..2)
        .map(|i| {
            let path = dir.path().join(format!("image{i}.raw"));
            let data = random_bytes(IMAGE, 100 + i);
            std::fs::write(&path, &data).unwrap();
            import(&path, &store_dir, &format!("img{i}"), 256 << 10);
            data
        })
        .collect();
    let http = HttpStore::start(store_dir);
    let cache = dir.path().join("cache");
    let disks = [
        image_disk("a", dir.path(), "img0", ""),
        image_disk("b", dir.path(), "img1", ""),
    ];
    let cap = ["--cache-size-mib", &CAP_MIB.to_string()];
    let args = serve_args(&http.url, &cache, &disks, &cap);
    let mut daemon = Daemon::start(&args);
    let cap_bytes = CAP_MIB << 20;
    let slab = cache.join("chunks").join(format!("slab.{}", 256 << 10));
    let on_disk = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).map_or(0, |m| m.blocks() * 512)
    };

    let done = std::sync::atomic::AtomicBool::new(false);
    let (max_status, max_disk) = std::thread::scope(|s| {
        let readers: Vec<_> = ["a", "b"]
            .iter()
            .zip(&images)
            .enumerate()
            .map(|(i, (name, image))| {
                let sock = dir.path().join(format!("{name}.sock"));
                s.spawn(move || {
                    let mut c = Client::connect(&sock, 1, MIB);
                    for pass in 0..2u64 {
                        // 1 MiB reads in a scattered order, a different one each pass.
                        for k in 0..32u64 {
                            let at = ((k * 13 + pass * 7 + i as u64 * 3) % 32) as usize * MIB;
                            let got = c.read(at as u64, MIB);
                            assert!(
                                got == image[at..at + MIB],
                                "disk {name} pass {pass}: wrong data at {at}"
                            );
                        }
                    }
                })
            })
            .collect();
        let watcher = s.spawn(|| {
            let (mut max_status, mut max_disk) = (0u64, 0u64);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let st = daemon.status();
                max_status = max_status.max(st["cache"]["bytes"].as_u64().unwrap_or(0));
                max_disk = max_disk.max(on_disk(&slab));
                std::thread::sleep(Duration::from_millis(20));
            }
            (max_status, max_disk)
        });
        for r in readers {
            r.join().expect("a reader failed");
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        watcher.join().unwrap()
    });
    let st = daemon.status();
    let evicted = st["cache"]["evicted"].as_u64().unwrap();
    let fetched = st["fetch"]["store_bytes"].as_u64().unwrap();
    eprintln!(
        "cap {cap_bytes}: status peak {max_status}, slab on disk peak {max_disk}; {evicted} chunks evicted; store sent {fetched} bytes for {} bytes of images",
        2 * IMAGE
    );
    assert!(
        max_status > 0 && max_status <= cap_bytes,
        "status peak {max_status} over the cap"
    );
    // On disk: the cap plus the slots being written or released at that instant.
    assert!(max_disk <= cap_bytes + (4 << 20), "{max_disk} bytes on disk");
    assert_eq!(st["cache"]["limit"].as_u64(), Some(cap_bytes));
    assert!(
        evicted >= 128,
        "only {evicted} chunks evicted for 64 MiB read through a 16 MiB cache"
    );
    assert!(
        fetched as usize >= 3 * IMAGE,
        "evicted chunks were not fetched again: {fetched}"
    );

    // Restarted, the daemon keeps what is there, within the cap.
    std::thread::sleep(Duration::from_millis(600));
    assert!(daemon.terminate().success());
    let daemon = Daemon::start(&args);
    let mut a = Client::connect(&dir.path().join("a.sock"), 1, MIB);
    assert!(a.read(0, MIB) == images[0][..MIB]);
    let st = daemon.status();
    let bytes = st["cache"]["bytes"].as_u64().unwrap();
    assert!(bytes > 0 && bytes <= cap_bytes, "{bytes} bytes after a restart");
}

/// `--store-proxy`: every store request goes through the site's proxy (a
/// forward proxy the test runs), and the guest reads the right data; a
/// proxy that is down is a clear error at start; a proxy for a local
/// directory store is refused.
#[test]
fn store_requests_go_through_the_store_proxy() {
    use common::httpstore::ForwardProxy;
    let dir = tmpdir();
    let image = make_image(&dir.path().join("image.raw"));
    let store_dir = dir.path().join("store");
    import(&dir.path().join("image.raw"), &store_dir, "img", CHUNK);
    let http = HttpStore::start(store_dir.clone());
    let proxy = ForwardProxy::start();
    let cache = dir.path().join("cache");
    let disks = [image_disk("a", dir.path(), "img", "")];
    let args = serve_args(
        &http.url,
        &cache,
        &disks,
        &["--fill-rate", "0", "--store-proxy", &proxy.url],
    );
    let mut daemon = Daemon::start(&args);
    let mut a = Client::connect(&dir.path().join("a.sock"), 1, 16 * MIB);
    assert!(a.read(0, 16 * MIB) == image, "wrong data through the proxy");
    drop(a);
    assert!(daemon.terminate().success());
    let relayed = proxy.relayed();
    let served = http.chunk_requests();
    let relayed_chunks: std::collections::HashMap<_, _> = relayed
        .iter()
        .filter(|(p, _)| p.starts_with("/chunks/"))
        .map(|(p, n)| (p.clone(), *n))
        .collect();
    assert!(!served.is_empty());
    assert_eq!(relayed_chunks, served, "a chunk request bypassed the proxy");
    assert!(
        relayed.keys().any(|p| p.contains("manifest")),
        "the manifest bypassed the proxy: {relayed:?}"
    );

    // A proxy that is down: the image cannot open, and the error says so.
    let down = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let cache2 = dir.path().join("cache2");
    let e = serve_fails(&serve_args(&http.url, &cache2, &disks, &["--store-proxy", &down]));
    assert!(e.contains("image img") || e.contains("store"), "{e}");
    // A proxy for a local directory store makes no sense.
    let e = serve_fails(&serve_args(
        store_dir.to_str().unwrap(),
        &cache2,
        &disks,
        &["--store-proxy", &proxy.url],
    ));
    assert!(e.contains("--store-proxy") && e.contains("needs an http(s)"), "{e}");
}
