//! streamblk: serves VM disks to QEMU over vhost-user-blk, each a per-guest
//! redirect-on-write overlay over a shared base.

#![deny(clippy::all, clippy::undocumented_unsafe_blocks, clippy::dbg_macro)]

pub mod cli;
pub mod engine;
pub mod overlay;
pub mod vhost;
pub mod virtio_blk;
