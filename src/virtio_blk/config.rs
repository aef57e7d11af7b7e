//! Features and the config space the device offers.

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::engine::{BLOCK_SIZE, SECTOR_SIZE};

/// Most data segments in one request: the queue size we size for, less the
/// header and status descriptors.
pub const SEG_MAX: u32 = 126;
/// Largest data segment (one descriptor's data), advertised as `size_max`.
/// 128 KiB: twice Linux's default segment limit, so guests never split for
/// it, and the largest single buffer the hot-path benchmark uses.
pub const SIZE_MAX: u32 = 128 << 10;
/// Largest request, in data bytes. A driver that honours SEG_MAX and
/// SIZE_MAX cannot exceed their product (libblkio reports it as
/// `max-transfer`, Linux splits requests to fit it), so this refuses only
/// requests no honest driver makes. The host memory a request costs does not
/// grow with its size (its data stays in guest memory); the chunks it may
/// want fetched are bounded by the disk's cap on bytes waiting.
pub const MAX_REQUEST_BYTES: u32 = SEG_MAX * SIZE_MAX;
/// Largest discard or write-zeroes range, in sectors (32 MiB).
pub const MAX_DISCARD_SECTORS: u32 = 32 << 11;
/// Most ranges in one discard or write-zeroes request.
pub const MAX_DISCARD_SEG: u32 = 16;
/// Config space length offered: through `write_zeroes_may_unmap` and its padding.
const CONFIG_LEN: usize = 60;

/// The virtio features of a disk.
pub fn features(readonly: bool) -> u64 {
    let mut f = 1u64 << VIRTIO_F_VERSION_1
        | 1 << VIRTIO_RING_F_EVENT_IDX
        | 1 << VIRTIO_RING_F_INDIRECT_DESC
        | 1 << VIRTIO_BLK_F_SEG_MAX
        | 1 << VIRTIO_BLK_F_SIZE_MAX
        | 1 << VIRTIO_BLK_F_BLK_SIZE
        | 1 << VIRTIO_BLK_F_TOPOLOGY
        | 1 << VIRTIO_BLK_F_FLUSH
        | 1 << VIRTIO_BLK_F_MQ;
    if readonly {
        f |= 1 << VIRTIO_BLK_F_RO;
    } else {
        f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
    }
    f
}

/// The config space, laid out as virtio 1.2, 5.2.4 says (little endian).
#[derive(Clone, Debug)]
pub struct BlkConfig {
    bytes: [u8; CONFIG_LEN],
}

impl BlkConfig {
    pub fn new(size: u64, queues: u16) -> Self {
        let mut b = [0u8; CONFIG_LEN];
        let capacity = size / SECTOR_SIZE;
        b[0..8].copy_from_slice(&capacity.to_le_bytes());
        b[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        b[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        b[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        // 4 KiB physical blocks: guests align to the overlay's unit and avoid
        // read-modify-write.
        b[24] = (BLOCK_SIZE / SECTOR_SIZE).trailing_zeros() as u8;
        b[26..28].copy_from_slice(&((BLOCK_SIZE / SECTOR_SIZE) as u16).to_le_bytes());
        b[34..36].copy_from_slice(&queues.to_le_bytes());
        b[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        b[40..44].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
        b[44..48].copy_from_slice(&((BLOCK_SIZE / SECTOR_SIZE) as u32).to_le_bytes());
        b[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        b[52..56].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
        b[56] = 1;
        BlkConfig { bytes: b }
    }

    /// `size` bytes of config from `offset`; bytes past the end read as zero.
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(CONFIG_LEN);
        let end = (offset as usize).saturating_add(size as usize).min(CONFIG_LEN);
        out[..end - start].copy_from_slice(&self.bytes[start..end]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reports_capacity_in_sectors_and_queue_count() {
        let c = BlkConfig::new(1 << 30, 4);
        assert_eq!(c.read(0, 8), (2u64 << 20).to_le_bytes().to_vec());
        assert_eq!(c.read(34, 2), 4u16.to_le_bytes().to_vec());
        assert_eq!(c.read(20, 4), 512u32.to_le_bytes().to_vec());
        assert_eq!(c.read(8, 4), SIZE_MAX.to_le_bytes().to_vec());
        assert_eq!(c.read(12, 4), SEG_MAX.to_le_bytes().to_vec());
        assert_ne!(features(false) & 1 << VIRTIO_BLK_F_SIZE_MAX, 0);
        // Reads past the end are zero-filled, never a panic.
        assert_eq!(c.read(58, 8), vec![0; 8]);
        assert_eq!(c.read(u32::MAX, 4), vec![0; 4]);
    }

    #[test]
    fn readonly_disks_offer_ro_and_no_discard() {
        let f = features(true);
        assert_ne!(f & 1 << VIRTIO_BLK_F_RO, 0);
        assert_eq!(f & 1 << VIRTIO_BLK_F_DISCARD, 0);
        let f = features(false);
        assert_eq!(f & 1 << VIRTIO_BLK_F_RO, 0);
        assert_ne!(f & 1 << VIRTIO_BLK_F_WRITE_ZEROES, 0);
    }
}
