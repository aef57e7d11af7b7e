//! virtio-blk requests and config space: parse and validate what the guest
//! put in a descriptor chain (all of it hostile), and the device's features
//! and config. Knows guest memory, not the storage behind it.

mod config;
mod request;

pub use config::{features, BlkConfig, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, MAX_REQUEST_BYTES, SEG_MAX, SIZE_MAX};
pub use request::{discard_segments, parse, write_status, DiscardSegment, Error, Request, RequestType, HEADER_LEN};

/// Status byte values (virtio 1.2, 5.2.6).
pub const STATUS_OK: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK as u8;
pub const STATUS_IOERR: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR as u8;
pub const STATUS_UNSUPP: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_UNSUPP as u8;
