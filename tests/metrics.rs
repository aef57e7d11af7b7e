//! The metrics endpoint speaks Prometheus's text format well enough for
//! `promtool check metrics` (Debian package prometheus), with images, the
//! fetcher and disks in it.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const MIB: usize = 1 << 20;

fn get(addr: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut c) = TcpStream::connect(addr) {
            c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut resp = String::new();
            c.read_to_string(&mut resp).unwrap();
            let (_, body) = resp.split_once("\r\n\r\n").expect("an HTTP response");
            return body.to_string();
        }
        assert!(Instant::now() < deadline, "no metrics endpoint on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn metrics_pass_promtool_check() {
    let dir = tmpdir();
    let raw = dir.path().join("image.raw");
    random_file(&raw, 4 * MIB, 3);
    let store = dir.path().join("store");
    import(&raw, &store, "img", 64 << 10);
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let image_disk = format!(
        "name=img,socket={},overlay={},image=img",
        dir.path().join("img.sock").display(),
        dir.path().join("img.ov").display()
    );
    let daemon = Daemon::start(&[
        "--store".into(),
        store.display().to_string(),
        "--cache-dir".into(),
        dir.path().join("cache").display().to_string(),
        "--fill-rate".into(),
        "0".into(),
        "--metrics-listen".into(),
        addr.clone(),
        "--disk".into(),
        image_disk,
        "--disk".into(),
        disk_spec("raw", dir.path(), &raw, ""),
    ]);
    let mut client = Client::connect(&dir.path().join("img.sock"), 1, MIB);
    client.read(0, 65536);
    let body = get(&addr);
    for name in [
        "streamblk_cache_hits_total",
        "streamblk_store_bytes_total",
        "streamblk_disk_attached{disk=\"img\"} 1",
        "streamblk_image_fill_rate_bytes_per_second",
        "streamblk_guest_wait_seconds_total",
        "# TYPE streamblk_fetch_duration_seconds histogram",
        "streamblk_fetch_duration_seconds_bucket{class=\"demand\",source=\"store\",le=\"+Inf\"}",
        "streamblk_guest_stall_duration_seconds_count",
    ] {
        assert!(body.contains(name), "no {name} in:\n{body}");
    }
    // The guest's first read missed: one stall, one demand fetch at least.
    let stalls = body
        .lines()
        .find_map(|l| l.strip_prefix("streamblk_guest_stall_duration_seconds_count "))
        .unwrap();
    assert!(stalls.parse::<u64>().unwrap() >= 1, "{body}");
    // The disk counted that read: one request of 64 KiB, timed.
    let sample = |name: &str| -> u64 {
        body.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{body}"))
    };
    assert_eq!(sample("streamblk_disk_requests_total{disk=\"img\",op=\"read\"}"), 1);
    assert_eq!(sample("streamblk_disk_bytes_total{disk=\"img\",op=\"read\"}"), 65536);
    assert_eq!(sample("streamblk_disk_requests_total{disk=\"raw\",op=\"read\"}"), 0);
    assert_eq!(
        sample("streamblk_disk_request_duration_seconds_count{disk=\"img\",op=\"read\"}"),
        1
    );
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus)");
    promtool.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool:\n{said}\non:\n{body}"
    );
    drop(daemon);
}
