//! Profiles learned at run time: the first boot of an image with no
//! profile is recorded by itself, becomes the image's profile on the host,
//! streams ahead of the next boot from an empty chunk cache, and is
//! published to the store on request for other hosts.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

const MIB: usize = 1 << 20;
const CHUNK: u64 = 64 << 10;
/// The "boot": the chunks it reads, in this order.
const BOOT: [u32; 12] = [40, 3, 100, 7, 200, 55, 12, 250, 90, 91, 5, 180];

fn serve(store: &Path, cache: &Path, dir: &Path, disk: &str, extra: &[&str]) -> Daemon {
    let spec = format!(
        "name={disk},socket={},overlay={},image=img",
        dir.join(format!("{disk}.sock")).display(),
        dir.join(format!("{disk}.overlay")).display()
    );
    let mut args: Vec<String> = [
        "--store",
        store.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
        "--fill-rate",
        "0",
        "--learn-secs",
        "2",
        "--disk",
        &spec,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    Daemon::start(&args)
}

/// Reads the boot's chunks (a block of each, in order) and checks them.
fn boot(client: &mut Client, image: &[u8]) {
    for c in BOOT {
        let offset = u64::from(c) * CHUNK + 8192;
        let got = client.read(offset, 4096);
        assert!(got[..] == image[offset as usize..offset as usize + 4096], "chunk {c}");
    }
}

/// Waits (up to 30 s) for `f` to hold of the daemon's only image's status.
fn wait_image(daemon: &Daemon, what: &str, f: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = daemon.status();
        let image = s["images"][0].clone();
        if f(&image) {
            return image;
        }
        assert!(Instant::now() < deadline, "{what}: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_file(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        assert!(Instant::now() < deadline, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn profile_chunks(bytes: &[u8]) -> Vec<u32> {
    let v: serde_json::Value = serde_json::from_slice(bytes).unwrap();
    v["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn a_first_boot_becomes_a_learned_profile_that_streams_ahead_of_the_next_boot_and_publishes() {
    let dir = tmpdir();
    let image = random_file(&dir.path().join("image.raw"), 16 * MIB, 7);
    let store = dir.path().join("store");
    let id = import(&dir.path().join("image.raw"), &store, "img", CHUNK);
    let cache = dir.path().join("cache");
    let learned = cache.join("profiles").join(&id);

    // 1. A daemon with an empty cache serves the image, which has no
    // profile: the first boot is recorded, and its trace finishes when its
    // window ends, with the guest still attached.
    let mut a = serve(&store, &cache, dir.path(), "a", &[]);
    let mut client = Client::connect(&dir.path().join("a.sock"), 1, MIB);
    boot(&mut client, &image);
    let i = wait_image(&a, "recording", |i| i["profile"]["source"] == "none");
    assert_eq!(i["profile"]["recording"], 1, "{i}");
    wait_file(&learned.join("profile.json"));
    let i = wait_image(&a, "one boot recorded", |i| i["profile"]["learned_traces"] == 1);
    assert_eq!(i["profile"]["recording"], 0, "{i}");
    let built = std::fs::read(learned.join("profile.json")).unwrap();
    assert_eq!(profile_chunks(&built), BOOT, "chunks in first-access order");
    assert!(!store.join("profiles").join(&id).exists(), "not published unless asked");
    drop(client);
    assert!(a.terminate().success());

    let inspect = streamblk(&[
        "image",
        "inspect",
        "img",
        "--store",
        store.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
    ]);
    assert!(inspect.contains("profile:      none in the store"), "{inspect}");
    let line = inspect.lines().find(|l| l.starts_with("learned:")).unwrap();
    assert!(
        line.contains("12 chunks") && line.contains("from 1 recorded boot"),
        "{inspect}"
    );

    // 2. The chunk cache is emptied, the learned profiles kept: a new
    // daemon's fresh open of the image uses the learned profile, streams
    // its chunks once a guest attaches, and the boot finds them local.
    std::fs::remove_dir_all(cache.join("chunks")).unwrap();
    let mut b = serve(&store, &cache, dir.path(), "b", &["--publish-profiles"]);
    let i = wait_image(&b, "image open", |i| i["profile"]["source"] == "learned");
    assert_eq!(i["profile"]["chunks"], BOOT.len(), "{i}");
    let mut client = Client::connect(&dir.path().join("b.sock"), 1, MIB);
    wait_image(&b, "profile streamed", |i| i["profile"]["streamed"] == BOOT.len());
    boot(&mut client, &image);
    let i = wait_image(&b, "boot read", |i| i["profile"]["hits"] == BOOT.len());
    assert_eq!(
        (&i["profile"]["stalls"], &i["misses"]),
        (&serde_json::json!(0), &serde_json::json!(0)),
        "every boot read was local: {i}"
    );
    let s = b.status();
    assert_eq!(s["fetch"]["by_class"]["demand"], 0, "{s}");
    assert_eq!(s["fetch"]["by_class"]["profile"], BOOT.len(), "{s}");
    assert_eq!(s["fetch"]["fill_rate_now"], 0, "--fill-rate 0: {s}");

    // --publish-profiles: the profile goes to the store, next to the
    // manifest, whose id does not change.
    wait_file(&store.join("profiles").join(&id));
    let published = std::fs::read(store.join("profiles").join(&id)).unwrap();
    assert_eq!(profile_chunks(&published), BOOT);
    assert!(store.join("manifests").join(&id).exists());
    let inspect = streamblk(&["image", "inspect", "img", "--store", store.to_str().unwrap()]);
    assert!(inspect.starts_with(&format!("image:        {id}\n")), "{inspect}");
    assert!(inspect.contains("profile:      12 chunks"), "{inspect}");
    drop(client);
    assert!(b.terminate().success());

    // 3. Another host (its own empty cache) gets the published profile
    // from the store.
    let other = dir.path().join("other-cache");
    let c = serve(&store, &other, dir.path(), "c", &[]);
    let i = wait_image(&c, "image open", |i| i["profile"]["source"] == "store");
    assert_eq!(i["profile"]["chunks"], BOOT.len(), "{i}");
    // This host still calls the profile its own.
    drop(c);
    let d = serve(&store, &cache, dir.path(), "d", &[]);
    wait_image(&d, "image open", |i| i["profile"]["source"] == "learned");
}
