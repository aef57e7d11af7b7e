//! streamblk: serves VM disks to QEMU over vhost-user-blk, each a per-guest
//! redirect-on-write overlay over a base streamed lazily from an image store.

#![deny(clippy::all, clippy::undocumented_unsafe_blocks, clippy::dbg_macro)]

pub(crate) mod cache;
pub mod cli;
pub mod control;
pub(crate) mod daemon;
pub mod engine;
pub(crate) mod fetch;
pub(crate) mod metrics;
pub mod overlay;
pub(crate) mod p2p;
/// The P2P fleet simulator, for `benches/p2p_sim.rs`.
#[doc(hidden)]
pub use p2p::sim as p2p_sim;
pub mod profile;
pub mod storage;
pub mod store;
pub(crate) mod units;
pub mod vhost;
pub mod virtio_blk;

/// Shows an error with its sources, one line.
pub struct DisplayChain<'a>(pub &'a dyn std::error::Error);

impl std::fmt::Display for DisplayChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut src = self.0.source();
        while let Some(s) = src {
            write!(f, ": {s}")?;
            src = s.source();
        }
        Ok(())
    }
}
