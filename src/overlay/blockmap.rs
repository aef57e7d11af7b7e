//! The state of every 4 KiB block of an overlay, two bits each, readable and
//! writable from every queue's worker without a lock.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::units::BlockIdx;

/// Where a block's current content lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum BlockState {
    /// Unchanged: read it from the base.
    Base = 0,
    /// Written: read it from the overlay data file.
    Data = 1,
    /// Discarded or zeroed: reads as zeros.
    Zero = 2,
}

impl BlockState {
    pub fn from_bits(bits: u8) -> Option<Self> {
        match bits {
            0 => Some(BlockState::Base),
            1 => Some(BlockState::Data),
            2 => Some(BlockState::Zero),
            _ => None,
        }
    }
}

const PER_WORD: u64 = 32;

pub struct BlockMap {
    words: Vec<AtomicU64>,
    blocks: u64,
}

impl BlockMap {
    pub fn new(blocks: u64) -> Self {
        let words = blocks.div_ceil(PER_WORD) as usize;
        BlockMap {
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            blocks,
        }
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    pub fn get(&self, b: BlockIdx) -> BlockState {
        let (w, shift) = Self::locate(b);
        let bits = (self.words[w].load(Ordering::Acquire) >> shift) & 3;
        BlockState::from_bits(bits as u8).unwrap_or(BlockState::Base)
    }

    /// Sets the state and returns the previous one.
    pub fn set(&self, b: BlockIdx, state: BlockState) -> BlockState {
        let (w, shift) = Self::locate(b);
        let prev = self.words[w]
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some((v & !(3 << shift)) | ((state as u64) << shift))
            })
            .unwrap_or_else(|v| v);
        BlockState::from_bits(((prev >> shift) & 3) as u8).unwrap_or(BlockState::Base)
    }

    /// Runs of equal non-base state, as (first block, count, state).
    pub fn runs(&self, from: BlockIdx, count: u64) -> impl Iterator<Item = (BlockIdx, u64, BlockState)> + '_ {
        let end = (from.0 + count).min(self.blocks);
        let mut b = from.0;
        std::iter::from_fn(move || {
            while b < end {
                let state = self.get(BlockIdx(b));
                let start = b;
                while b < end && self.get(BlockIdx(b)) == state {
                    b += 1;
                }
                if state != BlockState::Base {
                    return Some((BlockIdx(start), b - start, state));
                }
            }
            None
        })
    }

    fn locate(b: BlockIdx) -> (usize, u64) {
        ((b.0 / PER_WORD) as usize, (b.0 % PER_WORD) * 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_returns_previous_state_and_leaves_neighbours_alone() {
        let m = BlockMap::new(100);
        assert_eq!(m.runs(BlockIdx(0), 100).count(), 0);
        assert_eq!(m.set(BlockIdx(33), BlockState::Data), BlockState::Base);
        assert_eq!(m.set(BlockIdx(33), BlockState::Zero), BlockState::Data);
        assert_eq!(m.get(BlockIdx(32)), BlockState::Base);
        assert_eq!(m.get(BlockIdx(34)), BlockState::Base);
        assert_eq!(m.get(BlockIdx(33)), BlockState::Zero);
        m.set(BlockIdx(34), BlockState::Zero);
        m.set(BlockIdx(99), BlockState::Data);
        let runs: Vec<_> = m.runs(BlockIdx(0), 100).collect();
        assert_eq!(
            runs,
            vec![(BlockIdx(33), 2, BlockState::Zero), (BlockIdx(99), 1, BlockState::Data)]
        );
    }
}
