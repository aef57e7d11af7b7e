//! Two images that share most chunks: the test guest's disk, and the same
//! disk with a "package" (a 3 MiB file) added. After a guest of the first
//! boots, a guest of the second fetches only the chunks the host does not
//! have yet, and the chunk store holds every chunk once.

mod common;

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::time::Duration;

use common::guest::{build_guest, Qemu};
use common::httpstore::HttpStore;
use common::*;

const BOOT: Duration = Duration::from_secs(300);
const CHUNK: usize = 256 << 10;

/// The store path of every non-zero chunk of a raw image.
fn chunk_paths(image: &[u8]) -> Vec<Option<String>> {
    image
        .chunks(CHUNK)
        .map(|c| (!c.iter().all(|&b| b == 0)).then(|| format!("/chunks/{}", blake3::hash(c).to_hex())))
        .collect()
}

#[test]
fn a_second_image_sharing_most_chunks_fetches_only_what_the_host_lacks() {
    let guest = build_guest();
    let dir = tmpdir();
    let a_path = guest.join("rootfs.img");
    let b_path = dir.path().join("rootfs-plus.img");
    std::fs::copy(&a_path, &b_path).unwrap();
    let package = dir.path().join("package.bin");
    random_file(&package, 3 << 20, 77);
    let out = Command::new("debugfs")
        .args(["-w", "-R"])
        .arg(format!("write {} package.bin", package.display()))
        .arg(&b_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "debugfs: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let store = dir.path().join("store");
    import(&a_path, &store, "base", CHUNK as u64);
    import(&b_path, &store, "plus", CHUNK as u64);
    let (a_chunks, b_chunks) = (
        chunk_paths(&std::fs::read(&a_path).unwrap()),
        chunk_paths(&std::fs::read(&b_path).unwrap()),
    );
    let a_set: HashSet<&String> = a_chunks.iter().flatten().collect();
    let b_only: HashSet<&String> = b_chunks.iter().flatten().filter(|p| !a_set.contains(p)).collect();
    let b_changed = a_chunks.iter().zip(&b_chunks).filter(|(a, b)| a != b).count();
    assert!(!b_only.is_empty(), "the package changed no chunk");
    assert!(b_changed * 4 < b_chunks.len(), "the images do not share most chunks");

    let http = HttpStore::start(store);
    let cache = dir.path().join("cache");
    let mut args = vec![
        "--store".to_string(),
        http.url.clone(),
        "--cache-dir".into(),
        cache.display().to_string(),
        // Only what the guests read is fetched.
        "--fill-rate".into(),
        "0".into(),
    ];
    for (name, image) in [("a", "base"), ("b", "plus")] {
        args.push("--disk".into());
        args.push(format!(
            "name={name},socket={},overlay={},image={image}",
            dir.path().join(format!("{name}.sock")).display(),
            dir.path().join(format!("{name}.overlay")).display()
        ));
    }
    let mut daemon = Daemon::start(&args);
    wait_for_socket(&dir.path().join("b.sock"));

    let boot = |sock: &str| {
        let mut qemu = Qemu::boot(&guest, &dir.path().join(sock), 1, "");
        qemu.expect("GUEST-CHECK-OK", BOOT);
        qemu.expect("GUEST-DONE", BOOT);
        assert!(qemu.wait_exit(BOOT).success());
    };
    boot("a.sock");
    let after_a: HashMap<String, u64> = http.chunk_requests();
    boot("b.sock");
    let after_b = http.chunk_requests();

    let fetched_for_b: Vec<&String> = after_b.keys().filter(|p| !after_a.contains_key(*p)).collect();
    let new_in_b = fetched_for_b.iter().filter(|p| b_only.contains(**p)).count();
    eprintln!(
        "image a: {} chunks fetched for its boot; image b ({} of {} chunks differ, {} chunk digests new): {} fetched for its boot, {} of them new in b, {} shared with a but not read by a's boot",
        after_a.len(),
        b_changed,
        b_chunks.len(),
        b_only.len(),
        fetched_for_b.len(),
        new_in_b,
        fetched_for_b.len() - new_in_b
    );
    assert!(
        after_b.values().all(|&n| n == 1),
        "a chunk was fetched twice: {:?}",
        after_b.iter().filter(|(_, &n)| n > 1).collect::<Vec<_>>()
    );
    // Booting b read about as much as booting a, nearly all of it chunks
    // a's boot had brought: without sharing, b would fetch as many.
    assert!(
        fetched_for_b.len() * 4 < after_a.len(),
        "b's boot fetched {} chunks against a's {}",
        fetched_for_b.len(),
        after_a.len()
    );
    for p in &fetched_for_b {
        assert!(b_chunks.iter().flatten().any(|q| q == *p), "{p} is not a chunk of b");
    }
    let st = daemon.status();
    let hits = st["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["names"][0] == "plus")
        .map(|i| i["hits"].as_u64().unwrap())
        .unwrap();
    assert!(hits > 50, "b's guest read {hits} times from the cache");
    assert_eq!(
        st["cache"]["chunks"].as_u64().unwrap() as usize,
        after_b.len(),
        "the chunk store does not hold each fetched chunk exactly once"
    );
    assert_eq!(st["fetch"]["store_chunks"].as_u64().unwrap() as usize, after_b.len());
    assert!(daemon.terminate().success());
}
