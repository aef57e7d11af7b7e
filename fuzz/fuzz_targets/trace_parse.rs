//! Boot trace parsing and profile building from untrusted trace text.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use streamblk::profile::{parse_trace, Profile};

fuzz_target!(|data: &[u8]| {
    if let Ok(trace) = parse_trace(data, Path::new("fuzz")) {
        let p = Profile::build(&[trace], 4 << 20);
        let bytes = p.to_bytes();
        let _ = Profile::parse(&bytes, 4 << 20, u32::MAX);
    }
});
