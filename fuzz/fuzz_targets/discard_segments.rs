//! Discard and write-zeroes segments: any bytes, any capacity; every
//! segment returned lies inside the disk.
#![no_main]

use libfuzzer_sys::fuzz_target;
use streamblk::engine::IoBuf;
use streamblk::virtio_blk::{self, RequestType};

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    // Any disk a u64 of bytes can address.
    let capacity = u64::from_le_bytes(data[..8].try_into().unwrap()) >> 9;
    let kind = if data[8] & 1 == 0 {
        RequestType::Discard
    } else {
        RequestType::WriteZeroes
    };
    let mut body = data[9..].to_vec();
    // Split the body into buffers of fuzzed sizes, as guest descriptors would.
    let cut = (data[8] as usize >> 1).min(body.len());
    let (a, b) = body.split_at_mut(cut);
    let bufs = [IoBuf::from_mut(a), IoBuf::from_mut(b)];
    if let Ok(segments) = virtio_blk::discard_segments(kind, &bufs, capacity) {
        for s in segments {
            let end = s.offset.checked_add(s.len).expect("segment end overflows");
            assert!(end <= capacity.saturating_mul(512), "segment beyond the disk");
        }
    }
});
