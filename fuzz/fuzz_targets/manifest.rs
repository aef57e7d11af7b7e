//! Manifest parsing and validation: store content is untrusted. A manifest
//! that parses must be internally consistent (its chunk arithmetic must not
//! overflow or panic) and survive a round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use streamblk::store::{ChunkIdx, Manifest};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::parse(data) {
        let n = m.chunk_count();
        for c in [0, n / 2, n.saturating_sub(1)] {
            if c < n {
                let off = m.chunk_offset(ChunkIdx(c));
                let len = m.chunk_len(ChunkIdx(c));
                assert!(off + len <= m.size);
                let _ = m.chunks_of(off, len);
            }
        }
        let _ = m.stored_bytes();
        let again = Manifest::parse(&m.to_bytes()).expect("a valid manifest re-parses");
        assert_eq!(again.chunk_count(), n);
    }
});
