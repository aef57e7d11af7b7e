//! Overlay journal replay: any journal bytes (as a damaged or hostile file
//! would hold) must open or be refused with an error, never panic, and an
//! overlay that opens must read back and reopen.
#![no_main]

use std::path::Path;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use streamblk::engine::IoRange;
use streamblk::overlay::Overlay;
use streamblk::storage::sim::SimStorage;
use streamblk::storage::Storage;

const DISK: u64 = 256 * 1024;

fuzz_target!(|data: &[u8]| {
    let sim = SimStorage::new(1);
    let storage: Arc<dyn Storage> = Arc::new(sim.clone());
    let dir = Path::new("/ov");
    storage.create_dir_all(dir).unwrap();
    // A valid journal first, then the fuzz input written over it from a
    // fuzzed offset: damage anywhere, header included.
    drop(Overlay::open_on(storage.clone(), dir, DISK, "fuzz").unwrap());
    let (at, body) = match data.split_first() {
        Some((&a, rest)) => (u64::from(a) * 64, rest),
        None => (0, data),
    };
    let f = storage.open(&dir.join("journal"), false).unwrap();
    f.write_all_at(body, at).unwrap();
    if data.first().is_some_and(|&a| a & 1 == 1) {
        sim.power_cut();
    } else {
        sim.process_crash();
    }
    if let Ok(ov) = Overlay::open_on(storage.clone(), dir, DISK, "fuzz") {
        let mut buf = vec![0u8; 4096];
        ov.read(0, IoRange::from_slice(&mut buf)).unwrap();
        drop(ov);
        Overlay::open_on(storage, dir, DISK, "fuzz").expect("an overlay that opened must reopen");
    }
});
