//! Boot profiles end to end: record a guest's boot trace, build a profile,
//! store it with the image, and boot again from an empty cache with replay.

mod common;

use std::time::{Duration, Instant};

use common::guest::{build_guest_with, Qemu};
use common::httpstore::HttpStore;
use common::*;

const BOOT: Duration = Duration::from_secs(300);

#[test]
fn a_recorded_boot_becomes_a_profile_that_streams_ahead_of_the_next_boot() {
    let guest = build_guest_with("guest-bulk", 160, 96);
    let dir = tmpdir();
    let store = dir.path().join("store");
    import(&guest.join("rootfs.img"), &store, "guest", 256 << 10);
    let http = HttpStore::start(store.clone());
    // Per-request latency, as a remote store has.
    http.set_delay(Duration::from_millis(2));
    let store_s = store.display().to_string();

    let boot = |name: &str, extra: &str, fill: &str| -> (Daemon, Qemu) {
        let spec = format!(
            "name={name},socket={},overlay={},image=guest{extra}",
            dir.path().join(format!("{name}.sock")).display(),
            dir.path().join(format!("{name}.overlay")).display()
        );
        let cache = dir.path().join(format!("cache-{name}"));
        let args: Vec<String> = [
            "--store",
            &http.url,
            "--cache-dir",
            cache.to_str().unwrap(),
            "--fill-rate",
            fill,
            "--disk",
            &spec,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let daemon = Daemon::start(&args);
        wait_for_socket(&dir.path().join(format!("{name}.sock")));
        let qemu = Qemu::boot(&guest, &dir.path().join(format!("{name}.sock")), 1, "");
        (daemon, qemu)
    };

    // 1. Record.
    let trace = dir.path().join("boot.trace");
    let (mut daemon, mut qemu) = boot("rec", &format!(",record-trace={},trace-secs=600", trace.display()), "0");
    qemu.expect("GUEST-CHECK-OK", BOOT);
    qemu.expect("GUEST-DONE", BOOT);
    assert!(qemu.wait_exit(BOOT).success());
    assert!(daemon.terminate().success());
    let records = std::fs::read_to_string(&trace)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .count();
    assert!(records > 50, "only {records} reads recorded");

    // 2. Build and store the profile.
    let profile = dir.path().join("boot.profile");
    streamblk(&[
        "profile",
        "build",
        trace.to_str().unwrap(),
        "-o",
        profile.to_str().unwrap(),
        "--chunk-size",
        "262144",
    ]);
    streamblk(&[
        "image",
        "set-profile",
        "guest",
        profile.to_str().unwrap(),
        "--store",
        &store_s,
    ]);
    let inspect = streamblk(&["image", "inspect", "guest", "--store", &store_s]);
    let profile_line = inspect.lines().find(|l| l.starts_with("profile:")).unwrap().to_string();
    assert!(
        profile_line.contains("chunks") && !profile_line.contains("none"),
        "{inspect}"
    );
    let chunks: u64 = profile_line.split_whitespace().nth(1).unwrap().parse().unwrap();

    // 3. Boot again from an empty cache: the profile streams ahead.
    let t = Instant::now();
    let (mut daemon, mut qemu) = boot("replay", "", "0");
    qemu.expect("GUEST-CHECK-OK", BOOT);
    let booted = t.elapsed();
    let status = daemon.status();
    let p = &status["images"][0]["profile"];
    eprintln!("replay boot {booted:?}; profile status {p}; fetch {}", status["fetch"]);
    assert_eq!(p["chunks"].as_u64(), Some(chunks));
    let (streamed, hits, stalls) = (
        p["streamed"].as_u64().unwrap(),
        p["hits"].as_u64().unwrap(),
        p["stalls"].as_u64().unwrap(),
    );
    assert!(streamed > 0, "nothing was streamed from the profile");
    assert!(
        hits > 0 && hits > stalls,
        "profile hits {hits} vs stalls {stalls}: replay did not keep ahead"
    );
    assert!(hits + stalls <= chunks);
    assert!(p["first_read_ms"].as_u64().is_some(), "no first read time");
    assert!(status["fetch"]["by_class"]["profile"].as_u64().unwrap() > 0);
    qemu.expect("GUEST-DONE", BOOT);
    assert!(qemu.wait_exit(BOOT).success());
    let status = daemon.status();
    assert!(
        status["images"][0]["profile"]["done_ms"].as_u64().is_some(),
        "profile stream never finished"
    );
    assert!(daemon.terminate().success());
}
