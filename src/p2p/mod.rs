//! P2P: hosts serve each other the chunks their Local Caches hold, so N
//! hosts booting one image make the store serve each chunk about once.
//! Each chunk has a home, chosen by rendezvous hashing of its digest over
//! the membership (`hrw`); a host that misses a chunk asks its home, which
//! serves it from its cache or fetches it from the store once (single
//! flight) and serves every requester from that copy. A home that cannot
//! be reached is replaced by the next candidate; if no peer serves, the
//! store does. This module owns the peer server and client, the membership
//! and the digest index; the fetch scheduler decides when peers are asked
//! and verifies every byte they send. It knows nothing of virtio.

mod client;
mod conn;
mod directory;
pub mod etcd;
pub mod hrw;
mod index;
pub mod membership;
pub mod policy;
mod server;
#[doc(hidden)]
pub mod sim;
mod slots;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

pub use client::{ManifestError, PeerClient};
pub use index::ChunkIndex;
pub use server::{Server, ServerLimits};

use crate::cache::ImageCache;
use crate::control::status::{P2pStatus, PeerStatus};
use crate::fetch::{Fetcher, Peers};

/// The requester's class: demand, profile or background.
pub const HEADER_CLASS: &str = "x-streamblk-class";
/// The server's upload queue depth (uploads in progress and waiting).
pub const HEADER_QUEUE: &str = "x-streamblk-queue";
/// The requester's own `--p2p-listen` address: the home records it as a
/// holder of the chunk it serves it.
pub const HEADER_FROM: &str = "x-streamblk-from";
/// How far a request has gone: absent (to the home, which may redirect),
/// `redirected` (to a holder: serve only a chunk held, never redirect),
/// `direct` (to the home again after the holders failed: never redirect).
pub const HEADER_HOP: &str = "x-streamblk-hop";
/// In a request, `stored`: the requester takes a chunk's stored form
/// (as the store keeps it, zstd-compressed) as well as its plaintext. In an
/// answer: which of the two the body is (`stored` or `plain`).
pub const HEADER_FORM: &str = "x-streamblk-form";
/// In a 307 answer: the holders to ask, comma-separated.
pub const HEADER_HOLDERS: &str = "x-streamblk-holders";
/// How long the requester waits for the answer's head, in milliseconds:
/// the server answers within it, with the chunk or a 503 (busy), so that
/// only a hung peer makes a requester wait longer.
pub const HEADER_WAIT: &str = "x-streamblk-wait-ms";
/// The id of the image (64 hex digits) whose chunk the requester wants:
/// a home with that image open prefetches the boot profile chunks it is
/// home for on the image's first profile-class request. Absent (an older
/// daemon, a chunk of no known image): no prefetch.
pub const HEADER_IMAGE: &str = "x-streamblk-image";
/// Largest token file read.
const MAX_TOKEN_BYTES: u64 = 4096;
/// Bytes of chunks a home keeps in memory for images it does not have open.
pub const LOOSE_CACHE_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("read token file {0}")]
    ReadToken(PathBuf, #[source] std::io::Error),
    #[error("token file {0}: {1}")]
    BadToken(PathBuf, &'static str),
    #[error("read peers file {0}")]
    ReadPeersFile(PathBuf, #[source] std::io::Error),
    #[error("peers file {path}, line {line}: {why}")]
    PeersFile { path: PathBuf, line: usize, why: String },
    #[error("{0} members, more than {max}", max = membership::MAX_MEMBERS)]
    TooManyMembers(usize),
    #[error("listen for peers on {0}")]
    Listen(SocketAddr, #[source] std::io::Error),
    #[error("make the peer HTTP client")]
    HttpClient(#[source] reqwest::Error),
}

/// Locks a mutex, whether or not a holder panicked: what it guards is
/// soft state that stays consistent at every unlock.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The cluster token every peer request carries.
pub struct Token {
    bytes: Vec<u8>,
    /// `Bearer <token>`, marked sensitive (never logged, never indexed by HPACK).
    header: hyper::header::HeaderValue,
}

impl Token {
    /// `bytes` are visible ASCII (checked by [`Token::read`]).
    fn from_checked(bytes: Vec<u8>) -> Token {
        let mut header = hyper::header::HeaderValue::from_bytes(&[b"Bearer ", &bytes[..]].concat())
            .expect("a token is visible ASCII");
        header.set_sensitive(true);
        Token { bytes, header }
    }

    #[cfg(test)]
    pub fn new(bytes: Vec<u8>) -> Token {
        Token::from_checked(bytes)
    }

    /// Reads a token file: one line of visible ASCII (surrounding white
    /// space ignored), at least 16 characters.
    pub fn read(path: &Path) -> Result<Token, Error> {
        let err = |e| Error::ReadToken(path.to_path_buf(), e);
        let meta = std::fs::metadata(path).map_err(err)?;
        let len = meta.len();
        if std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o077 != 0 {
            tracing::warn!(file = %path.display(), "the cluster token file is readable by others than its owner");
        }
        if len > MAX_TOKEN_BYTES {
            return Err(Error::BadToken(path.to_path_buf(), "larger than 4 KiB"));
        }
        let text = std::fs::read(path).map_err(err)?;
        let token = text.trim_ascii();
        if token.len() < 16 {
            return Err(Error::BadToken(path.to_path_buf(), "shorter than 16 characters"));
        }
        if !token.iter().all(u8::is_ascii_graphic) {
            return Err(Error::BadToken(
                path.to_path_buf(),
                "not one line of visible ASCII characters",
            ));
        }
        Ok(Token::from_checked(token.to_vec()))
    }

    /// Compares in constant time: the digests of both sides are compared,
    /// and blake3's `Hash` equality is constant-time (so neither the
    /// token's bytes nor its length leak through timing).
    pub fn matches(&self, given: &[u8]) -> bool {
        blake3::hash(&self.bytes) == blake3::hash(given)
    }

    /// The `Authorization` header's value.
    pub fn header(&self) -> hyper::header::HeaderValue {
        self.header.clone()
    }
}

/// The P2P settings (`--p2p-listen`, `--peers`, `--peers-file`,
/// `--membership`, `--zone`, `--p2p-token-file`, `--p2p-upload-rate`,
/// `--p2p-upload-slots`).
#[derive(Clone, Debug, PartialEq)]
pub struct P2pConfig {
    pub listen: Option<SocketAddr>,
    pub peers: Vec<SocketAddr>,
    pub peers_file: Option<PathBuf>,
    /// Members kept in etcd instead of `peers` and `peers_file`.
    pub membership: Option<etcd::EtcdUrl>,
    /// This host's zone: homes are chosen in it first.
    pub zone: Option<membership::Zone>,
    pub token_file: PathBuf,
    /// Upload cap, bytes per second (None: no cap).
    pub upload_rate: Option<u64>,
    pub upload_slots: usize,
    /// As a home, prefetch an open image's profile chunks on its first
    /// profile request (`--p2p-prefetch`).
    pub prefetch: bool,
    pub timeouts: PeerTimeouts,
}

/// Time budgets of one peer request. A live peer answers within them, if
/// only to say it is busy; one that does not is hung or gone, and is
/// skipped for `down_for` so that later reads go straight to the next
/// candidate or the store.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PeerTimeouts {
    pub connect: Duration,
    /// From sending a request to its answer's head.
    pub first_byte: Duration,
    /// Longest pause while an answer's body arrives.
    pub idle: Duration,
    pub down_for: Duration,
}

impl Default for PeerTimeouts {
    fn default() -> Self {
        PeerTimeouts {
            connect: Duration::from_secs(1),
            first_byte: Duration::from_secs(2),
            idle: Duration::from_secs(2),
            down_for: Duration::from_secs(5),
        }
    }
}

impl PeerTimeouts {
    /// How long the server may take before it answers ([`HEADER_WAIT`]):
    /// a margin under `first_byte` for the network and the scheduler.
    pub fn server_wait(&self) -> Duration {
        self.first_byte * 3 / 4
    }
}

/// A running P2P node: client, server (if listening), index.
pub struct P2p {
    client: Arc<PeerClient>,
    server: Option<Arc<Server>>,
    index: Arc<ChunkIndex>,
    listen: Option<SocketAddr>,
    etcd: Option<etcd::Etcd>,
}

impl P2p {
    /// Reads the token and the peers file, and starts the server (if
    /// `listen` is set) on `runtime`. `timeout` bounds asking one home for a
    /// chunk, busy answers included (the fetch's deadline).
    pub fn start(config: &P2pConfig, timeout: Duration, runtime: &tokio::runtime::Handle) -> Result<P2p, Error> {
        let token = Arc::new(Token::read(&config.token_file)?);
        let membership = Arc::new(match &config.membership {
            Some(url) => membership::Membership::dynamic(url.to_string(), config.listen, config.zone.clone()),
            None => membership::Membership::with_zone(
                config.peers.iter().copied().map(membership::Member::from).collect(),
                config.peers_file.clone(),
                config.listen,
                config.zone.clone(),
            )?,
        });
        let client = Arc::new(PeerClient::new(
            token.clone(),
            membership.clone(),
            timeout,
            config.timeouts,
        )?);
        let index = Arc::new(ChunkIndex::default());
        let server = match config.listen {
            Some(addr) => {
                let std = std::net::TcpListener::bind(addr).map_err(|e| Error::Listen(addr, e))?;
                std.set_nonblocking(true).map_err(|e| Error::Listen(addr, e))?;
                let listener = {
                    let _guard = runtime.enter();
                    tokio::net::TcpListener::from_std(std).map_err(|e| Error::Listen(addr, e))?
                };
                let server = Arc::new(Server::new(
                    token,
                    index.clone(),
                    membership.clone(),
                    config.upload_slots,
                    config.upload_rate,
                    LOOSE_CACHE_BYTES,
                    ServerLimits::default(),
                ));
                server.set_prefetch(config.prefetch);
                runtime.spawn(server::serve(listener, server.clone()));
                Some(server)
            }
            None => None,
        };
        let etcd = config.membership.clone().map(|url| {
            let me = config.listen.map(|addr| etcd::Registration {
                addr,
                zone: config.zone.clone(),
                load: match &server {
                    Some(s) => {
                        let s = s.clone();
                        Arc::new(move || s.queue_depth())
                    }
                    None => Arc::new(|| 0),
                },
            });
            etcd::Etcd::start(url, membership.clone(), me, runtime)
        });
        let members = membership.members();
        let is_member = config.listen.is_some_and(|a| members.contains(&a));
        tracing::info!(
            listen = ?config.listen,
            members = members.len(),
            membership = %membership.source_name(),
            zone = ?config.zone.as_ref().map(|z| z.as_str()),
            is_member,
            "P2P on"
        );
        if config.listen.is_some() && !is_member && etcd.is_none() {
            tracing::warn!(
                "this host's --p2p-listen address is not in its peer list: it ranks itself as a home all the same, \
                 so peers whose lists name it agree with it"
            );
        }
        Ok(P2p {
            client,
            server,
            index,
            listen: config.listen,
            etcd,
        })
    }

    /// Leaves the fleet on the way out: with etcd, revokes this host's
    /// lease so the others drop it at once (bounded in time).
    pub async fn leave(&self) {
        if let Some(e) = &self.etcd {
            e.leave().await;
        }
    }

    /// The peers, as a source for the fetch scheduler.
    pub fn peers(&self) -> Arc<dyn Peers> {
        self.client.clone()
    }

    /// The scheduler this host fetches chunks it is home for through.
    pub fn set_fetcher(&self, fetcher: Fetcher) {
        if let Some(s) = &self.server {
            s.set_fetcher(fetcher);
        }
    }

    /// Makes every chunk of the host's chunk store servable by digest.
    pub fn set_chunk_store(&self, store: Arc<crate::cache::ChunkStore>) {
        self.index.set_store(store);
    }

    /// Makes the manifests this host keeps copies of servable by image id.
    pub fn set_manifests(&self, copies: Arc<crate::store::ManifestCopies>) {
        if let Some(s) = &self.server {
            s.set_manifests(copies);
        }
    }

    /// Image `id`'s manifest from a peer, verified as a store's is.
    pub async fn manifest(
        &self,
        id: &crate::store::ImageId,
    ) -> Result<(crate::store::Manifest, bytes::Bytes, SocketAddr), ManifestError> {
        self.client.manifest(id).await
    }

    /// Makes an opened image's chunks servable by digest, and its boot
    /// profile (chunk indices in order) known to the home's prefetch.
    pub fn add_image(&self, cache: &Arc<ImageCache>, profile: Option<Arc<[u32]>>) {
        self.index.add(cache, profile);
    }

    /// Re-reads the peers file (SIGHUP).
    pub fn reload(&self) {
        let m = self.client.membership();
        if m.file().is_none() {
            return;
        }
        match m.reload() {
            Ok(n) => tracing::info!(members = n, "peers file re-read"),
            Err(e) => tracing::error!("peers file not re-read, members unchanged: {}", crate::DisplayChain(&e)),
        }
    }

    pub fn status(&self) -> P2pStatus {
        let members = self.client.membership().members();
        let peers = self
            .client
            .all_stats()
            .into_iter()
            .map(|(addr, s)| PeerStatus {
                addr: addr.to_string(),
                requests: s.requests.load(Ordering::Relaxed),
                served: s.served.load(Ordering::Relaxed),
                bytes: s.bytes.load(Ordering::Relaxed),
                failures: s.failures.load(Ordering::Relaxed),
                bad_chunks: s.bad_chunks.load(Ordering::Relaxed),
                redirects: s.redirects.load(Ordering::Relaxed),
                queue: s.queue.load(Ordering::Relaxed),
                down: s.is_down(),
            })
            .collect();
        let m = self.client.membership();
        let mut st = P2pStatus {
            membership: m.source_name(),
            membership_connected: m.is_etcd().then(|| m.connected()),
            membership_changes: m.changes(),
            zone: m.self_zone().map(ToString::to_string),
            listen: self.listen.map(|a| a.to_string()),
            members: members.iter().map(ToString::to_string).collect(),
            is_member: self.listen.is_some_and(|a| members.contains(&a)),
            peers,
            indexed_chunks: self.index.len() as u64,
            ..P2pStatus::default()
        };
        if let Some(s) = &self.server {
            let c = &s.counters;
            st.uploads = c.uploads.load(Ordering::Relaxed);
            st.upload_bytes = c.upload_bytes.load(Ordering::Relaxed);
            st.upload_queue = s.queue_depth();
            st.home_fetches = c.home_fetches.load(Ordering::Relaxed);
            st.redirects = c.redirects.load(Ordering::Relaxed);
            st.prefetches = c.prefetches.load(Ordering::Relaxed);
            st.prefetched_chunks = c.prefetched_chunks.load(Ordering::Relaxed);
            st.holders_told = c.holders_told.load(Ordering::Relaxed);
            st.refused_unauthorized = c.unauthorized.load(Ordering::Relaxed);
            st.bad_requests = c.bad_requests.load(Ordering::Relaxed);
            st.not_found = c.not_found.load(Ordering::Relaxed);
            st.busy = c.busy.load(Ordering::Relaxed);
            st.failed = c.failed.load(Ordering::Relaxed);
            let (n, bytes) = s.loose_usage();
            st.loose_chunks = n as u64;
            st.loose_bytes = bytes;
        }
        st
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_read_trimmed_and_compared_whole() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "  0123456789abcdef-xyz\n").unwrap();
        let t = Token::read(&f).unwrap();
        assert!(t.matches(b"0123456789abcdef-xyz"));
        assert!(!t.matches(b"0123456789abcdef-xy"));
        assert!(!t.matches(b""));
        assert_eq!(t.header(), "Bearer 0123456789abcdef-xyz");
        assert!(t.header().is_sensitive(), "the token could be logged");
        for bad in ["short\n", "0123456789abcdef with space\n", ""] {
            std::fs::write(&f, bad).unwrap();
            assert!(Token::read(&f).is_err(), "{bad:?}");
        }
        assert!(Token::read(&dir.path().join("missing")).is_err());
    }
}
