//! Chunk sources in front of the store: other hosts (P2P). The scheduler
//! owns the order (peers, then the store) and the verification of every
//! byte; a source only places chunks and moves bytes.

use std::net::SocketAddr;

use bytes::Bytes;
use futures::future::BoxFuture;

use super::Class;
use crate::store::{ChunkEntry, Digest, ImageId};

/// What a peer sent for a chunk, unverified.
#[derive(Debug)]
pub enum PeerChunk {
    /// Its plaintext (checked with `verify_plain`).
    Plain(Bytes),
    /// Its stored form, as the store keeps it (checked with `verify_chunk`
    /// against the requester's own manifest entry).
    Stored(Bytes),
}

impl PeerChunk {
    /// Bytes on the wire.
    pub fn len(&self) -> usize {
        match self {
            PeerChunk::Plain(b) | PeerChunk::Stored(b) => b.len(),
        }
    }
}

/// Why a peer did not serve a chunk (it is asked no more for this fetch).
pub type PeerError = Box<dyn std::error::Error + Send + Sync>;

/// A peer error after which no other peer is asked for the chunk: its home
/// answered busy until the fetch's time for peers was up. It is alive and
/// will have the chunk, and the next candidate would fetch it from the
/// store a second time; the store is asked instead.
#[derive(Debug, thiserror::Error)]
#[error("home {peer} was busy until the time for peers was up: {source}")]
pub struct StillBusy {
    pub peer: SocketAddr,
    #[source]
    pub source: PeerError,
}

/// Other hosts that may serve a chunk.
pub trait Peers: Send + Sync {
    /// The peers to ask for a chunk, best first. Empty when this host
    /// should fetch it from the store itself (it is the chunk's home, or
    /// every peer before it is down or known bad for the chunk).
    fn candidates(&self, digest: &Digest) -> Vec<SocketAddr>;

    /// The chunk's bytes (its plaintext or its stored form), unverified,
    /// asked of `peer`, and the peer that sent them: `peer`, or a holder it
    /// redirected to. `image`: the image it is wanted for, if any (a home
    /// that has it open prefetches its profile on its first profile-class
    /// request).
    fn get(
        &self,
        peer: SocketAddr,
        entry: ChunkEntry,
        len: u64,
        class: Class,
        image: Option<ImageId>,
    ) -> BoxFuture<'static, Result<(SocketAddr, PeerChunk), PeerError>>;

    /// Peers that may hold a chunk the store did not serve this host (it
    /// is the chunk's home, or its peers before it failed), best first.
    /// They are asked only for what they hold ([`Peers::get_held`]).
    fn holders(&self, _digest: &Digest) -> Vec<SocketAddr> {
        Vec::new()
    }

    /// The chunk's bytes from `peer` if it holds them: it neither fetches
    /// nor redirects, so asking it waits on nothing but its disk.
    fn get_held(
        &self,
        peer: SocketAddr,
        _entry: ChunkEntry,
        _len: u64,
        _class: Class,
    ) -> BoxFuture<'static, Result<(SocketAddr, PeerChunk), PeerError>> {
        Box::pin(async move { Err(format!("{peer} is not asked for held chunks").into()) })
    }

    /// Members of the fleet, this host included.
    fn fleet_size(&self) -> usize {
        0
    }

    /// `peer` sent bytes for `digest` that failed verification: count it,
    /// log it, and ask that peer no more for the chunk.
    fn bad_chunk(&self, peer: SocketAddr, digest: &Digest, why: &str);

    /// The chunk asked of `asked` came from `sender` and was verified:
    /// the peers may tell the chunk's home that this host holds it now.
    fn verified(&self, _asked: SocketAddr, _sender: SocketAddr, _digest: &Digest) {}
}
