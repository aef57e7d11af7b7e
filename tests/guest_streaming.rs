//! A guest boots from an image that is not on the host yet: the store is
//! nginx in a network namespace behind a 100 Mbit/s link, the cache starts
//! empty, and only what the guest reads is fetched first.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::guest::{build_guest_with, Qemu};
use common::netns::StoreHost;
use common::*;

const BOOT: Duration = Duration::from_secs(300);

#[test]
fn guest_boots_streamed_over_a_100mbit_link_and_a_second_guest_refetches_nothing() {
    // 160 MiB disk, 96 MiB of it random data the guest never reads at boot.
    let guest = build_guest_with("guest-bulk", 160, 96);
    let dir = tmpdir();
    let store = dir.path().join("store");
    import(&guest.join("rootfs.img"), &store, "guest", 256 << 10);
    let stored: u64 = std::fs::read_dir(store.join("chunks"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    let host = StoreHost::start(&store, "100mbit");

    let disks = ["a", "b"].map(|n| {
        format!(
            "name={n},socket={},overlay={},image=guest",
            dir.path().join(format!("{n}.sock")).display(),
            dir.path().join(format!("{n}.overlay")).display()
        )
    });
    let cache = dir.path().join("cache");
    let mut args = vec![
        "--store".to_string(),
        host.url.clone(),
        "--cache-dir".into(),
        cache.display().to_string(),
        // Background fill runs, capped, while the guests boot.
        "--fill-rate".into(),
        "0.5".into(),
    ];
    for d in &disks {
        args.extend(["--disk".to_string(), d.clone()]);
    }
    let mut daemon = Daemon::start(&args);
    wait_for_socket(&dir.path().join("a.sock"));

    let start = Instant::now();
    let mut qemu = Qemu::boot(&guest, &dir.path().join("a.sock"), 1, "");
    qemu.expect("GUEST-BOOTED", BOOT);
    qemu.expect("GUEST-CHECK-OK", BOOT);
    let booted = start.elapsed();
    let at_boot = host.chunk_bytes();
    qemu.expect("GUEST-DONE", BOOT);
    assert!(qemu.wait_exit(BOOT).success());
    eprintln!(
        "streamed boot: {booted:?}; store served {at_boot} of {stored} stored bytes ({:.1}%) by the guest's data check",
        at_boot as f64 * 100.0 / stored as f64
    );
    assert!(at_boot > 0, "nothing came from the store");
    assert!(
        at_boot * 4 < stored,
        "the store served {at_boot} of {stored} bytes before boot: not lazy"
    );

    // A second guest of the same image: boots, and no chunk is fetched twice.
    let mut qemu = Qemu::boot(&guest, &dir.path().join("b.sock"), 1, "");
    qemu.expect("GUEST-CHECK-OK", BOOT);
    qemu.expect("GUEST-DONE", BOOT);
    assert!(qemu.wait_exit(BOOT).success());
    let mut per_chunk: HashMap<String, u32> = HashMap::new();
    for (path, status, _) in host.requests() {
        if path.starts_with("/chunks/") {
            assert_eq!(status, 200, "{path}");
            *per_chunk.entry(path).or_default() += 1;
        }
    }
    let twice: Vec<_> = per_chunk.iter().filter(|(_, &n)| n > 1).collect();
    assert!(twice.is_empty(), "chunks fetched more than once: {twice:?}");
    assert!(daemon.terminate().success());
}
