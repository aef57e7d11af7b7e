//! Units shared by the engine, the overlay and the vhost layer, kept below
//! all of them so that none imports another for a type.

/// The overlay's unit: 4 KiB.
pub const BLOCK_SIZE: u64 = 4096;
/// The guest's unit of addressing.
pub const SECTOR_SIZE: u64 = 512;

/// Index of a 4 KiB block of a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockIdx(pub u64);

impl BlockIdx {
    pub fn of(offset: u64) -> Self {
        BlockIdx(offset / BLOCK_SIZE)
    }

    pub fn offset(self) -> u64 {
        self.0 * BLOCK_SIZE
    }
}
