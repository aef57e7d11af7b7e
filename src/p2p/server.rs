//! The peer server: `GET /chunks/<digest>` over HTTP/1.1 for members that
//! carry the cluster token, and `GET /manifests/<image id>` (the copies this
//! host keeps of the manifests it opened, for hosts with no store access). It serves a chunk its open images' caches hold;
//! as the chunk's home it fetches a chunk it does not hold once (single
//! flight, through the fetch scheduler) and serves every requester from
//! that copy. Uploads take a slot, demand before profile before
//! background, and are paced to `--p2p-upload-rate`. When every slot is
//! busy, a home redirects a requester to members it sent the chunk to, or
//! that told it they hold it (`POST /holders/<digest>`; `directory`), so a
//! chunk fans out instead of queueing at its home.
//! The first profile-class request naming an image this host has open
//! makes it prefetch that image's profile chunks it is home for.
//! Everything is bounded: connections, a request's head, waiting uploads,
//! time, and a write that makes no progress (`conn`).
//!
//! Wire form: the chunk's plaintext, the bytes its digest is of, so a
//! requester checks it with one blake3 and nothing else; a home serves
//! cached chunks with a pread and no recompression (the cache holds
//! plaintext). The cost is bytes on the wire for compressible chunks.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::conn::{ConnLimits, Refused, WriteTimeout};
use super::directory::Directory;
use super::index::{ChunkIndex, LooseChunks};
use super::membership::Membership;
use super::policy::{self, Load, LoadGuard, Source};
use super::slots::{SlotGuard, UploadSlots};
use super::{
    lock, Token, HEADER_CLASS, HEADER_FORM, HEADER_FROM, HEADER_HOLDERS, HEADER_HOP, HEADER_IMAGE, HEADER_QUEUE,
    HEADER_WAIT,
};
use crate::cache::ImageCache;
use crate::fetch::{rate::Bucket, Class, Fetcher, KeepLoose};
use crate::store::{manifest, ChunkEntry, ChunkIdx, Digest, ImageId, ManifestCopies};

/// Connections served at once; more are closed at accept. Idle ones close
/// after [`HEAD_TIMEOUT`].
const MAX_CONNECTIONS: usize = 256;
/// Connections from one address, for each member at it (see [`ConnLimits`]).
const CONNECTIONS_PER_MEMBER: usize = 32;
/// Bytes of a request head hyper buffers (its minimum).
const MAX_HEAD: usize = 8192;
/// How long a client may take to send a request's head, or sit idle
/// between requests.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a request may wait for a chunk to be fetched, and for an upload
/// slot, unless the requester said it waits less ([`HEADER_WAIT`]).
const FETCH_WAIT: Duration = Duration::from_secs(30);
const SLOT_WAIT: Duration = Duration::from_secs(10);
/// A connection is asked to close after this long (when its request in
/// flight is answered), and closed if that takes longer than
/// [`CONN_DRAIN`]: a peer that stops reading holds a connection that long
/// at most.
const CONN_LIFETIME: Duration = Duration::from_secs(300);
const CONN_DRAIN: Duration = Duration::from_secs(30);

/// Limits of the peer server (tests shrink them).
#[derive(Clone, Debug)]
pub struct ServerLimits {
    /// How long a write to a peer may make no progress: then the
    /// connection closes, and the upload slot its answer holds is free.
    pub write_idle: Duration,
    /// Connections from one address, for each member at it.
    pub conns_per_member: usize,
    /// Bytes of chunks held for answers (read, waiting for a slot, or
    /// being sent); a request that finds no room is answered busy at once.
    pub upload_buffer: u64,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            write_idle: Duration::from_secs(5),
            conns_per_member: CONNECTIONS_PER_MEMBER,
            upload_buffer: 64 << 20,
        }
    }
}

/// What the server has done, for `status`.
#[derive(Debug, Default)]
pub struct ServerCounters {
    pub uploads: AtomicU64,
    pub upload_bytes: AtomicU64,
    /// Chunks this host fetched (as a home) to serve a peer.
    pub home_fetches: AtomicU64,
    pub redirects: AtomicU64,
    /// Members that said they verified a chunk (`POST /holders/<digest>`).
    pub holders_told: AtomicU64,
    pub unauthorized: AtomicU64,
    pub bad_requests: AtomicU64,
    pub not_found: AtomicU64,
    /// Refused: too many uploads waiting, or a fetch failed.
    pub busy: AtomicU64,
    pub failed: AtomicU64,
    /// Manifests served (their bytes count in `upload_bytes`).
    pub manifests: AtomicU64,
    /// Profile prefetches started: the first profile-class request for an
    /// open image made this host fetch the profile chunks it is home for.
    pub prefetches: AtomicU64,
    /// Chunks those prefetches brought into the chunk store (or joined
    /// while in flight); chunks already local are not counted.
    pub prefetched_chunks: AtomicU64,
}

pub struct Server {
    token: Arc<Token>,
    index: Arc<ChunkIndex>,
    /// For chunks this host must fetch as a home; None without a store.
    fetcher: Mutex<Option<Fetcher>>,
    /// The manifests it serves; None until the daemon sets them.
    manifests: Mutex<Option<Arc<ManifestCopies>>>,
    loose: Arc<LooseChunks>,
    /// Held to look a loose chunk up and join (or start) its fetch, and to
    /// keep one a fetch brought: a fetch ends only after its chunk is kept,
    /// so a request never starts a second fetch of a chunk just fetched.
    loose_gate: Arc<Mutex<LooseFlights>>,
    /// Only members are recorded as holders.
    membership: Arc<Membership>,
    /// Shared with uploads, which record their requester once sent.
    directory: Arc<Mutex<Directory>>,
    slots: Arc<UploadSlots>,
    upload_slots: usize,
    /// Upload cap in bytes per second (None: no cap), and its bucket.
    rate: Option<u64>,
    bucket: Arc<Mutex<Bucket>>,
    pub counters: ServerCounters,
    warned_self: std::sync::atomic::AtomicBool,
    /// Chunk requests being handled: reading, fetching, waiting for a slot
    /// or uploading, until the upload's last byte is sent (the body holds
    /// the request's guard). The upload queue depth this server reports,
    /// and what decides a redirect (counted on arrival, so that a burst of
    /// requests does not all find the home idle).
    active: Load,
    limits: ServerLimits,
    /// [`ServerLimits::upload_buffer`], a permit a KiB.
    buffer: Arc<Semaphore>,
    /// The images whose profile this host prefetched lately.
    prefetched: Mutex<policy::Prefetched>,
    /// Whether it prefetches at all (`--p2p-prefetch`).
    prefetch: AtomicBool,
}

/// The entries of the loose chunks being fetched. A fetch is keyed by
/// digest and made with the entry of the request that started it, so a
/// request whose entry differs is refused, not joined to a fetch that
/// cannot bring what it asked for (one of the two entries is wrong).
#[derive(Default)]
struct LooseFlights(HashMap<Digest, ((ChunkEntry, u64), Instant)>);

impl LooseFlights {
    /// Notes a request for `entry`: false if the digest is being fetched
    /// with another entry. Forgets fetches older than [`FETCH_WAIT`],
    /// whose requesters all stopped waiting before they ended.
    fn join(&mut self, entry: ChunkEntry, len: u64, now: Instant) -> bool {
        self.0.retain(|_, (_, t)| now.duration_since(*t) < FETCH_WAIT);
        match self.0.entry(entry.digest) {
            Entry::Occupied(o) => o.get().0 == (entry, len),
            Entry::Vacant(v) => {
                v.insert(((entry, len), now));
                true
            }
        }
    }

    fn end(&mut self, digest: &Digest) {
        self.0.remove(digest);
    }
}

/// A request this server takes: a chunk by digest, the requester's class,
/// and the chunk's entry if the requester sent it (a home needs it to
/// fetch a chunk of an image it does not have open).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkRequest {
    pub digest: Digest,
    pub class: Class,
    pub entry: Option<(ChunkEntry, u64)>,
    /// The requester's peer address, if it serves.
    pub from: Option<SocketAddr>,
    pub hop: Hop,
    /// How long the requester waits for the answer's head (at most [`FETCH_WAIT`]).
    pub wait: Option<Duration>,
    /// The requester takes the chunk's stored form (see [`HEADER_FORM`]).
    pub stored: bool,
    /// The image the requester wants the chunk for (see [`HEADER_IMAGE`]).
    pub image: Option<ImageId>,
}

pub use super::policy::Hop;

/// Why a request is refused, and its status.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no cluster token")]
    NoToken,
    #[error("wrong cluster token")]
    WrongToken,
    #[error("only GET")]
    Method,
    #[error("bad request: {0}")]
    Bad(String),
}

impl Refusal {
    fn status(&self) -> StatusCode {
        match self {
            Refusal::NoToken => StatusCode::UNAUTHORIZED,
            Refusal::WrongToken => StatusCode::FORBIDDEN,
            Refusal::Method => StatusCode::METHOD_NOT_ALLOWED,
            Refusal::Bad(_) => StatusCode::BAD_REQUEST,
        }
    }
}

/// Checks the cluster token, then that the method is GET.
fn check_token(token: &Token, method: &Method, headers: &HeaderMap) -> Result<(), Refusal> {
    let auth = headers.get(AUTHORIZATION).ok_or(Refusal::NoToken)?;
    let given = auth
        .to_str()
        .ok()
        .and_then(|a| a.strip_prefix("Bearer "))
        .ok_or(Refusal::NoToken)?;
    if !token.matches(given.trim().as_bytes()) {
        return Err(Refusal::WrongToken);
    }
    if method != Method::GET {
        return Err(Refusal::Method);
    }
    Ok(())
}

/// Checks the token, then parses a holder's word to a chunk's home
/// (`POST /holders/<digest>`, [`HEADER_FROM`] required): the chunk, and
/// the member that verified it. Pure: unit-tested below.
pub fn parse_have_request(
    token: &Token,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<(Digest, SocketAddr), Refusal> {
    // The token first: a stranger learns nothing, not even the method.
    check_token(token, &Method::GET, headers)?;
    if method != Method::POST {
        return Err(Refusal::Method);
    }
    let bad = |why: &str| Refusal::Bad(why.to_string());
    let digest = uri
        .path()
        .strip_prefix("/holders/")
        .filter(|h| h.len() == 64)
        .and_then(Digest::from_hex)
        .ok_or_else(|| bad("path is not /holders/<digest>"))?;
    let from = headers
        .get(HEADER_FROM)
        .and_then(|v| v.to_str().ok()?.parse::<SocketAddr>().ok())
        .ok_or_else(|| bad("from is not ADDR:PORT"))?;
    Ok((digest, from))
}

/// Checks the token, then parses a manifest request: the image id asked.
pub fn parse_manifest_request(
    token: &Token,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<ImageId, Refusal> {
    check_token(token, method, headers)?;
    let hex = uri.path().strip_prefix("/manifests/").unwrap_or("");
    (hex.len() == 64 && uri.query().is_none())
        .then(|| Digest::from_hex(hex))
        .flatten()
        .ok_or_else(|| Refusal::Bad("path is not /manifests/<64 hex digits>".into()))
}

/// Checks the token, then parses the request. Pure: unit-tested below.
pub fn parse_request(token: &Token, method: &Method, uri: &Uri, headers: &HeaderMap) -> Result<ChunkRequest, Refusal> {
    check_token(token, method, headers)?;
    let bad = |why: &str| Refusal::Bad(why.to_string());
    let hex = uri
        .path()
        .strip_prefix("/chunks/")
        .ok_or_else(|| bad("path is not /chunks/<digest>"))?;
    let digest = (hex.len() == 64)
        .then(|| Digest::from_hex(hex))
        .flatten()
        .ok_or_else(|| bad("digest is not 64 hex digits"))?;
    let class = match headers.get(HEADER_CLASS) {
        None => Class::Background,
        Some(v) => v
            .to_str()
            .ok()
            .and_then(Class::from_name)
            .ok_or_else(|| bad("class is not demand, profile or background"))?,
    };
    let from = match headers.get(HEADER_FROM) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.parse::<SocketAddr>().ok())
                .ok_or_else(|| bad("from is not ADDR:PORT"))?,
        ),
    };
    let hop = match headers.get(HEADER_HOP).map(|v| v.to_str().unwrap_or("")) {
        None => Hop::Home,
        Some("redirected") => Hop::Redirected,
        Some("direct") => Hop::Direct,
        Some(_) => return Err(bad("hop is not redirected or direct")),
    };
    let wait = match headers.get(HEADER_WAIT) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .map(|ms| Duration::from_millis(ms).min(FETCH_WAIT))
                .ok_or_else(|| bad("wait is not a number of milliseconds"))?,
        ),
    };
    let image = match headers.get(HEADER_IMAGE) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .filter(|v| v.len() == 64)
                .and_then(Digest::from_hex)
                .ok_or_else(|| bad("image is not 64 hex digits"))?,
        ),
    };
    let takes_stored = match headers.get(HEADER_FORM) {
        None => false,
        Some(v) if v == "stored" => true,
        Some(_) => return Err(bad("form is not stored")),
    };
    let (mut len, mut stored, mut zstd) = (None, None, None);
    for pair in uri.query().unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| bad("query is not key=value"))?;
        let n = || v.parse::<u64>().map_err(|_| bad("query value is not a number"));
        match k {
            "len" => len = Some(n()?),
            "stored" => stored = Some(n()?),
            "zstd" => zstd = Some(n()? != 0),
            _ => return Err(bad("unknown query key")),
        }
    }
    let entry = match (len, stored, zstd) {
        (None, None, None) => None,
        (Some(len), Some(stored), Some(zstd)) => {
            let max_stored = zstd::zstd_safe::compress_bound(manifest::MAX_CHUNK as usize) as u64;
            if len == 0 || len > manifest::MAX_CHUNK as u64 || stored == 0 || stored > max_stored {
                return Err(bad("chunk length out of range"));
            }
            if !zstd && stored != len {
                return Err(bad("an uncompressed chunk's stored length is its length"));
            }
            let entry = ChunkEntry {
                digest,
                stored_len: stored as u32,
                zstd,
            };
            Some((entry, len))
        }
        _ => return Err(bad("give len, stored and zstd together")),
    };
    Ok(ChunkRequest {
        digest,
        class,
        entry,
        from,
        hop,
        wait,
        stored: takes_stored,
        image,
    })
}

type Body = BoxBody<Bytes, Infallible>;

/// Bytes of an upload given to hyper at a time.
const FRAME: usize = 64 << 10;

/// An upload's body: the chunk in frames of [`FRAME`] bytes, holding its
/// slot until dropped. Hyper asks for a frame only once it has written
/// nearly all of the last (its write buffer is [`MAX_HEAD`]), so the slot
/// is held while the bytes go out, not just until hyper has them: slots
/// bound what is on the wire, and a peer that stops reading holds its slot
/// until its connection's write times out. Each frame waits for the upload
/// cap, so the answer's head goes out at once (within the requester's
/// first-byte budget) however far behind the cap is.
struct Upload {
    data: Bytes,
    /// The server's bucket and its rate (bytes per second), if capped.
    pace: Option<(Arc<Mutex<Bucket>>, f64)>,
    /// Until the cap lets the next frame go.
    wait: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// Its slot, its room in the upload buffer, and its place in the
    /// server's load, until the last byte is sent.
    _held: (SlotGuard, OwnedSemaphorePermit, Option<LoadGuard>),
    /// Called once the last frame is handed to hyper (whose write buffer
    /// is a few KiB): the home names the requester as a holder then.
    on_sent: Option<OnSent>,
}

type OnSent = Box<dyn FnOnce() + Send + Sync>;

/// Permits of [`Server::buffer`] for `bytes`.
fn kib(bytes: u64) -> u32 {
    u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX)
}

impl hyper::body::Body for Upload {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.data.is_empty() {
            return std::task::Poll::Ready(None);
        }
        let n = this.data.len().min(FRAME);
        if let Some((bucket, rate)) = &this.pace {
            loop {
                if let Some(wait) = &mut this.wait {
                    std::task::ready!(std::future::Future::poll(wait.as_mut(), cx));
                    this.wait = None;
                }
                match lock(bucket).try_take(n as u64, *rate, Instant::now()) {
                    Ok(()) => break,
                    Err(at) => this.wait = Some(Box::pin(tokio::time::sleep_until(at))),
                }
            }
        }
        let frame = this.data.split_to(n);
        if this.data.is_empty() {
            if let Some(sent) = this.on_sent.take() {
                sent();
            }
        }
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(frame))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_empty()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.data.len() as u64)
    }
}

/// Why a chunk could not be had.
enum ChunkError {
    /// Its fetch is still running when the requester stops waiting: the
    /// requester asks again (the fetch goes on).
    TimedOut,
    /// Its loose fetch is under way with another entry ([`LooseFlights`]).
    OtherEntry,
    Failed(String),
}

impl Server {
    pub fn new(
        token: Arc<Token>,
        index: Arc<ChunkIndex>,
        membership: Arc<Membership>,
        slots: usize,
        rate: Option<u64>,
        loose_cap: u64,
        limits: ServerLimits,
    ) -> Self {
        Server {
            token,
            index,
            fetcher: Mutex::new(None),
            manifests: Mutex::new(None),
            loose: Arc::new(LooseChunks::new(loose_cap)),
            loose_gate: Arc::default(),
            membership,
            directory: Arc::default(),
            slots: UploadSlots::new(slots),
            upload_slots: slots.max(1),
            rate,
            bucket: Arc::new(Mutex::new(Bucket::new(Instant::now()))),
            counters: ServerCounters::default(),
            warned_self: Default::default(),
            active: Load::default(),
            // Room for the largest chunk at least, or it could never be served.
            buffer: Arc::new(Semaphore::new(
                kib(limits.upload_buffer.max(manifest::MAX_CHUNK as u64)) as usize,
            )),
            limits,
            prefetched: Mutex::default(),
            prefetch: AtomicBool::new(false),
        }
    }

    /// Turns the home's profile prefetch on or off.
    pub fn set_prefetch(&self, on: bool) {
        self.prefetch.store(on, Ordering::Relaxed);
    }

    /// Lets the server fetch chunks it is home for from the store.
    pub fn set_fetcher(&self, f: Fetcher) {
        *lock(&self.fetcher) = Some(f);
    }

    /// Chunk requests being handled (see [`Server::active`]).
    pub fn queue_depth(&self) -> u64 {
        self.active.get()
    }

    pub fn loose_usage(&self) -> (usize, u64) {
        self.loose.usage()
    }

    fn fetcher(&self) -> Option<Fetcher> {
        lock(&self.fetcher).clone()
    }

    /// Lets the server serve the manifests this host keeps copies of.
    pub fn set_manifests(&self, copies: Arc<ManifestCopies>) {
        *lock(&self.manifests) = Some(copies);
    }

    /// Counts a refused request and answers it.
    fn refuse(&self, refusal: Refusal) -> Response<Body> {
        let counter = match refusal {
            Refusal::NoToken | Refusal::WrongToken => &self.counters.unauthorized,
            _ => &self.counters.bad_requests,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.answer(refusal.status(), refusal.to_string())
    }

    /// A manifest this host keeps a copy of, held and paced like a chunk:
    /// room in the upload buffer first (a manifest larger than the whole
    /// buffer is never served), then a demand slot (a guest waits for
    /// its image to open). The requester checks it against the id.
    async fn handle_manifest(&self, req: &Request<Incoming>) -> Response<Body> {
        let id = match parse_manifest_request(&self.token, req.method(), req.uri(), req.headers()) {
            Ok(id) => id,
            Err(refusal) => return self.refuse(refusal),
        };
        let not_found = || {
            self.counters.not_found.fetch_add(1, Ordering::Relaxed);
            self.answer(StatusCode::NOT_FOUND, "no such manifest here".into())
        };
        let Some(copies) = lock(&self.manifests).clone() else {
            return not_found();
        };
        let Some(len) = copies.len(&id) else {
            return not_found();
        };
        let Ok(room) = self.buffer.clone().try_acquire_many_owned(kib(len)) else {
            self.counters.busy.fetch_add(1, Ordering::Relaxed);
            return self.answer(StatusCode::SERVICE_UNAVAILABLE, "upload buffer full".into());
        };
        let data = match tokio::task::spawn_blocking(move || copies.load(&id)).await {
            Ok(Ok(Some(data))) if data.len() as u64 <= len => data,
            Ok(Ok(None)) => return not_found(),
            Ok(Ok(Some(_))) => {
                // Replaced since its length was taken: ask again.
                self.counters.busy.fetch_add(1, Ordering::Relaxed);
                return self.answer(StatusCode::SERVICE_UNAVAILABLE, "manifest copy changed".into());
            }
            Ok(Err(e)) => {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                return self.answer(StatusCode::BAD_GATEWAY, crate::DisplayChain(&e).to_string());
            }
            Err(e) => {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                return self.answer(StatusCode::BAD_GATEWAY, e.to_string());
            }
        };
        let slot_wait = tokio::time::timeout(SLOT_WAIT, self.slots.acquire(Class::Demand)).await;
        let Ok(Ok(slot)) = slot_wait else {
            self.counters.busy.fetch_add(1, Ordering::Relaxed);
            return self.answer(StatusCode::SERVICE_UNAVAILABLE, "upload queue full".into());
        };
        self.counters.manifests.fetch_add(1, Ordering::Relaxed);
        self.counters
            .upload_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        // A manifest is no chunk request: not in the load.
        self.upload(data, slot, room, None, None)
    }

    /// An answer carrying `data`, paced to the upload cap, holding `slot`,
    /// `room` and a chunk request's place in the load until it is sent,
    /// then calling `on_sent`.
    fn upload(
        &self,
        data: Bytes,
        slot: SlotGuard,
        room: OwnedSemaphorePermit,
        load: Option<LoadGuard>,
        on_sent: Option<OnSent>,
    ) -> Response<Body> {
        let len = data.len();
        let body = Upload {
            data,
            pace: self.rate.map(|rate| (self.bucket.clone(), rate as f64)),
            wait: None,
            _held: (slot, room, load),
            on_sent,
        }
        .boxed();
        let mut resp = Response::new(body);
        self.headers(&mut resp);
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
        h.insert(CONTENT_LENGTH, HeaderValue::from(len));
        resp
    }

    /// A member verified a chunk another holder sent it: as the chunk's
    /// home, this host names it to later requesters (`policy::served`).
    /// Only members are recorded; nothing else is done or fetched.
    fn handle_have(&self, req: &Request<Incoming>) -> Response<Body> {
        let (digest, from) = match parse_have_request(&self.token, req.method(), req.uri(), req.headers()) {
            Ok(have) => have,
            Err(refusal) => return self.refuse(refusal),
        };
        let is_member = self.membership.members().contains(&from);
        if !is_member || Some(from) == self.membership.self_addr() {
            return self.refuse(Refusal::Bad("from is not another member".into()));
        }
        self.counters.holders_told.fetch_add(1, Ordering::Relaxed);
        policy::served(
            &mut lock(&self.directory),
            digest,
            Some(from),
            is_member,
            std::time::Instant::now(),
        );
        self.answer(StatusCode::NO_CONTENT, String::new())
    }

    async fn handle(self: &Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        if req.uri().path().starts_with("/manifests/") {
            return self.handle_manifest(&req).await;
        }
        if req.uri().path().starts_with("/holders/") {
            return self.handle_have(&req);
        }
        let r = match parse_request(&self.token, req.method(), req.uri(), req.headers()) {
            Ok(r) => r,
            Err(refusal) => return self.refuse(refusal),
        };
        if r.from.is_some() && r.from == self.membership.self_addr() {
            // The peer list names this host by another address too: answer
            // at once, or its fetch would wait on itself until it timed out.
            self.counters.bad_requests.fetch_add(1, Ordering::Relaxed);
            if !self.warned_self.swap(true, Ordering::Relaxed) {
                tracing::warn!("this host asked itself for a chunk: its peer list names it by another address too");
            }
            return self.answer(StatusCode::CONFLICT, "asked by itself".into());
        }
        self.prefetch_profile(&r);
        let (before, active) = self.active.arrive();
        if let Some(resp) = self.redirect(&r, before) {
            return resp;
        }
        // The chunk's bytes are counted from before they are read until
        // they are sent: answers waiting for a slot hold no more than this.
        let need = r.entry.map_or(manifest::MAX_CHUNK as u64, |(_, len)| len);
        let Ok(room) = self.buffer.clone().try_acquire_many_owned(kib(need)) else {
            self.counters.busy.fetch_add(1, Ordering::Relaxed);
            return self.answer(StatusCode::SERVICE_UNAVAILABLE, "upload buffer full".into());
        };
        // The requester stops waiting then: answer before, if only "busy".
        let start = Instant::now();
        let deadline = start + r.wait.unwrap_or(FETCH_WAIT);
        let (data, stored) = match self.stored_form(&r) {
            Some(form) => (form, true),
            None => match self.chunk(&r, deadline).await {
                // Fetched for this request (a cold chunk at its home): its
                // stored form was kept as it came, 3.5x smaller on the
                // wire for the boot image than the plaintext.
                Ok(Some(data)) => match self.stored_form(&r) {
                    Some(form) => (form, true),
                    None => (data, false),
                },
                Ok(None) => {
                    self.counters.not_found.fetch_add(1, Ordering::Relaxed);
                    return self.answer(StatusCode::NOT_FOUND, "no such chunk here".into());
                }
                Err(ChunkError::OtherEntry) => {
                    self.counters.bad_requests.fetch_add(1, Ordering::Relaxed);
                    return self.answer(
                        StatusCode::CONFLICT,
                        "the chunk is being fetched with another entry".into(),
                    );
                }
                Err(ChunkError::TimedOut) => {
                    self.counters.busy.fetch_add(1, Ordering::Relaxed);
                    return self.answer(StatusCode::SERVICE_UNAVAILABLE, "still fetching".into());
                }
                Err(ChunkError::Failed(why)) => {
                    self.counters.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(digest = %r.digest, "peer request failed: {why}");
                    return self.answer(StatusCode::BAD_GATEWAY, why);
                }
            },
        };
        let wrong_len = match r.entry {
            // A stored form is kept only where its length is the entry's.
            _ if stored => false,
            Some((_, len)) => data.len() as u64 != len,
            None => data.len() as u64 > need,
        };
        if wrong_len {
            // The requester's length is not the chunk's (the digest is).
            self.counters.bad_requests.fetch_add(1, Ordering::Relaxed);
            return self.answer(StatusCode::BAD_REQUEST, "len is not the chunk's length".into());
        }
        let slot_deadline = deadline.min(start + SLOT_WAIT);
        let Ok(Ok(slot)) = tokio::time::timeout_at(slot_deadline, self.slots.acquire(r.class)).await else {
            self.counters.busy.fetch_add(1, Ordering::Relaxed);
            return self.answer(StatusCode::SERVICE_UNAVAILABLE, "upload queue full".into());
        };
        self.counters.uploads.fetch_add(1, Ordering::Relaxed);
        // The requester holds the chunk once it has it all and checked it:
        // a home names it to later requesters when its slots are busy, from
        // the upload's last byte on (see `policy::served`).
        let is_member = r.from.is_some_and(|f| self.membership.members().contains(&f));
        let (directory, digest, from) = (self.directory.clone(), r.digest, r.from);
        let on_sent: OnSent = Box::new(move || {
            policy::served(
                &mut lock(&directory),
                digest,
                from,
                is_member,
                std::time::Instant::now(),
            );
        });
        self.counters
            .upload_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let mut resp = self.upload(data, slot, room, Some(active), Some(on_sent));
        resp.headers_mut().insert(
            HEADER_FORM,
            HeaderValue::from_static(if stored { "stored" } else { "plain" }),
        );
        resp
    }

    /// On the first profile-class request for an image this host has open
    /// with a boot profile (lately: [`policy::Prefetched`]), fetches the
    /// profile's chunks it is home for (in its zone, over the current
    /// membership: what peers booting the image will ask it for), in
    /// profile order at profile class, through the fetch scheduler (single
    /// flight, slots, rates, verification) into the chunk store: homes read
    /// the store in parallel, early. Only the open image's own manifest
    /// and profile say what is fetched: an id this host cannot resolve
    /// starts nothing, and is not remembered.
    fn prefetch_profile(self: &Arc<Self>, r: &ChunkRequest) {
        if !self.prefetch.load(Ordering::Relaxed) {
            return;
        }
        let Some(id) = policy::starts_prefetch(r.class, r.hop, r.image) else {
            return;
        };
        let (Some(me), Some(fetcher)) = (self.membership.self_addr(), self.fetcher()) else {
            return;
        };
        let Some((cache, profile)) = self.index.profile(&id) else {
            return;
        };
        if !lock(&self.prefetched).first(id, std::time::Instant::now()) {
            return;
        }
        self.counters.prefetches.fetch_add(1, Ordering::Relaxed);
        let (view, my_zone) = (self.membership.view(), self.membership.self_zone().cloned());
        let server = self.clone();
        tokio::spawn(async move {
            // A score per profile chunk and member of the zone: off the
            // runtime's threads, for a large fleet.
            let manifest = cache.manifest().clone();
            let select = move || {
                let zone_of = |a: &SocketAddr| {
                    if *a == me {
                        my_zone.as_ref().map(|z| z.as_str())
                    } else {
                        view.zone(a).map(|z| z.as_str())
                    }
                };
                policy::home_profile_chunks(
                    &profile,
                    |c| manifest.chunks.get(c as usize).copied().flatten().map(|e| e.digest),
                    |d| super::hrw::is_zone_home(d, view.addrs(), me, zone_of),
                )
            };
            let Ok(chunks) = tokio::task::spawn_blocking(select).await else {
                return;
            };
            tracing::info!(image = %id, chunks = chunks.len(), "prefetching the profile chunks this host is home for");
            server.prefetch(fetcher, Arc::downgrade(&cache), chunks).await;
        });
    }

    /// Wants `chunks` of the image in order, [`policy::PREFETCH_WINDOW`] at a
    /// time, until done or the image is closed.
    async fn prefetch(&self, fetcher: Fetcher, cache: std::sync::Weak<ImageCache>, chunks: Vec<u32>) {
        let mut running = futures::stream::FuturesUnordered::new();
        let mut next = chunks.into_iter();
        loop {
            while running.len() < policy::PREFETCH_WINDOW {
                let Some(c) = next.next() else { break };
                let Some(cache) = cache.upgrade() else { return };
                let c = ChunkIdx(c);
                if !cache.is_ready(c) {
                    running.push(fetcher.want(&cache, c, Class::Profile));
                }
            }
            match futures::StreamExt::next(&mut running).await {
                Some(Ok(())) => {
                    self.counters.prefetched_chunks.fetch_add(1, Ordering::Relaxed);
                }
                Some(Err(e)) => {
                    tracing::debug!("a profile prefetch failed: {}", crate::DisplayChain(&*e));
                }
                None => return,
            }
        }
    }

    /// The chunk's stored form, if the requester takes it and this host
    /// keeps one that is the requester's entry (same length and
    /// compression): sent as it is, a third of the plaintext for a typical
    /// OS image, with no compression work.
    fn stored_form(&self, r: &ChunkRequest) -> Option<Bytes> {
        let (entry, _) = r.entry.filter(|_| r.stored)?;
        let form = self.fetcher()?.stored_form(&r.digest)?;
        (form.zstd == entry.zstd && form.bytes.len() == entry.stored_len as usize).then_some(form.bytes)
    }

    /// A 307 naming holders of the chunk, if the request came to this host
    /// as the chunk's home and found at least as many requests `before` it
    /// as there are upload slots.
    fn redirect(&self, r: &ChunkRequest, before: u64) -> Option<Response<Body>> {
        let now = std::time::Instant::now();
        let holders = policy::redirect(
            &mut lock(&self.directory),
            &r.digest,
            r.hop,
            r.from,
            before,
            self.upload_slots,
            now,
        )?;
        self.counters.redirects.fetch_add(1, Ordering::Relaxed);
        let list: Vec<String> = holders.iter().map(ToString::to_string).collect();
        let mut resp = self.answer(StatusCode::TEMPORARY_REDIRECT, String::new());
        if let Ok(v) = HeaderValue::from_str(&list.join(",")) {
            resp.headers_mut().insert(HEADER_HOLDERS, v);
        }
        Some(resp)
    }

    /// The chunk's plaintext: from the host's chunk store (whatever image
    /// brought it), from an open image's cache, from the loose chunks, or
    /// fetched (a chunk this host is asked for as its home; not when a home
    /// redirected the request here). None: not here, and not fetchable.
    async fn chunk(&self, r: &ChunkRequest, deadline: Instant) -> Result<Option<Bytes>, ChunkError> {
        let failed = |e: &(dyn std::error::Error + 'static)| ChunkError::Failed(crate::DisplayChain(e).to_string());
        if let Some(store) = self.index.store().cloned() {
            let digest = r.digest;
            let read = tokio::task::spawn_blocking(move || store.get(&digest))
                .await
                .map_err(|e| failed(&e))?;
            match read {
                Ok(Some(data)) => return Ok(Some(Bytes::from(data))),
                Ok(None) => {}
                Err(e) => return Err(failed(&e)),
            }
        }
        if let Some((cache, c, ready)) = self.index.find(&r.digest) {
            if !ready {
                let fetcher = self.fetcher();
                let (Source::Fetch, Some(fetcher)) = (policy::source(false, r.hop, fetcher.is_some()), fetcher) else {
                    return Ok(None);
                };
                self.counters.home_fetches.fetch_add(1, Ordering::Relaxed);
                let class = policy::home_fetch_class(r.class);
                match tokio::time::timeout_at(deadline, fetcher.want(&cache, c, class)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(failed(&*e)),
                    Err(_) => return Err(ChunkError::TimedOut),
                }
            }
            let read = tokio::task::spawn_blocking(move || cache.read_chunk(c))
                .await
                .map_err(|e| failed(&e))?;
            return match read {
                Ok(data) => Ok(data.map(Bytes::from)),
                Err(e) => Err(failed(&e)),
            };
        }
        let want = {
            let mut flights = lock(&self.loose_gate);
            if let Some(data) = self.loose.get(&r.digest) {
                return Ok(Some(data));
            }
            let fetcher = self.fetcher().filter(|_| r.entry.is_some());
            let (Source::Fetch, Some(fetcher), Some((entry, len))) =
                (policy::source(false, r.hop, fetcher.is_some()), fetcher, r.entry)
            else {
                return Ok(None);
            };
            if !flights.join(entry, len, Instant::now()) {
                return Err(ChunkError::OtherEntry);
            }
            let (loose, gate) = (self.loose.clone(), self.loose_gate.clone());
            let keep: KeepLoose = Arc::new(move |d: &Digest, data: &Bytes| {
                let mut flights = lock(&gate);
                loose.insert(*d, data.clone());
                flights.end(d);
            });
            fetcher.want_loose(entry, len, policy::home_fetch_class(r.class), keep)
        };
        self.counters.home_fetches.fetch_add(1, Ordering::Relaxed);
        let got = tokio::time::timeout_at(deadline, want).await;
        if let Ok(Err(_)) = &got {
            // The fetch failed: a request with another entry may try its own.
            lock(&self.loose_gate).end(&r.digest);
        }
        match got {
            Ok(Ok(data)) => Ok(Some(data)),
            Ok(Err(e)) => Err(failed(&*e)),
            Err(_) => Err(ChunkError::TimedOut),
        }
    }

    fn headers(&self, resp: &mut Response<Body>) {
        resp.headers_mut()
            .insert(HEADER_QUEUE, HeaderValue::from(self.queue_depth()));
    }

    fn answer(&self, status: StatusCode, why: String) -> Response<Body> {
        let mut resp = Response::new(Full::new(Bytes::from(why)).boxed());
        *resp.status_mut() = status;
        self.headers(&mut resp);
        resp
    }
}

/// Serves peers on `listener` until the runtime stops.
pub async fn serve(listener: tokio::net::TcpListener, server: Arc<Server>) {
    let conns = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_addr = ConnLimits::new(server.limits.conns_per_member);
    let mut last_error: Option<Instant> = None;
    loop {
        let (stream, peer): (_, SocketAddr) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors, say: say so now and then, and breathe.
                if last_error.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    tracing::warn!("accepting a peer connection failed: {e}");
                    last_error = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Closed at once: a stranger, or an address with too many open.
        let counted = match per_addr.admit(peer.ip(), &server.membership.members()) {
            Ok(counted) => counted,
            Err(Refused::Stranger) => {
                server.counters.unauthorized.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, "connection from a non-member refused");
                continue;
            }
            Err(Refused::TooMany) => {
                server.counters.busy.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            server.counters.busy.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let stream = WriteTimeout::new(stream, server.limits.write_idle);
        let server = server.clone();
        tokio::spawn(async move {
            let _permits = (permit, counted);
            let svc = hyper::service::service_fn(move |req| {
                let server = server.clone();
                async move { Ok::<_, Infallible>(server.handle(req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_buf_size(MAX_HEAD)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = tokio::time::sleep(CONN_LIFETIME) => conn.as_mut().graceful_shutdown(),
            }
            let _ = tokio::time::timeout(CONN_DRAIN, conn).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> Token {
        Token::new(b"s3cret-token".to_vec())
    }

    fn req(uri: &str, headers: &[(&str, &str)]) -> Result<ChunkRequest, Refusal> {
        req_with(Method::GET, uri, headers)
    }

    fn req_with(method: Method, uri: &str, headers: &[(&str, &str)]) -> Result<ChunkRequest, Refusal> {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.insert(
                hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        parse_request(&token(), &method, &uri.parse().unwrap(), &h)
    }

    const AUTH: (&str, &str) = ("authorization", "Bearer s3cret-token");

    fn test_server(slots: usize, limits: ServerLimits, members: &[SocketAddr]) -> Arc<Server> {
        let membership = Arc::new(Membership::new(members.to_vec(), None, None).unwrap());
        let index = Arc::default();
        Arc::new(Server::new(
            Arc::new(token()),
            index,
            membership,
            slots,
            None,
            1 << 30,
            limits,
        ))
    }

    /// A loose chunk of `len` bytes the server holds, and its digest.
    fn hold_chunk(server: &Server, len: usize, byte: u8) -> Digest {
        let data = Bytes::from(vec![byte; len]);
        let d = Digest::of(&data);
        server.loose.insert(d, data);
        d
    }

    async fn listen(server: &Arc<Server>) -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve(l, server.clone()));
        addr
    }

    fn chunk_request(d: &Digest) -> String {
        format!("GET /chunks/{d} HTTP/1.1\r\nHost: peer\r\nAuthorization: Bearer s3cret-token\r\n\r\n")
    }

    /// `req` (a request head) on its own connection: the whole answer.
    async fn exchange(addr: SocketAddr, req: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let req = req.replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n");
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        conn.write_all(req.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        conn.read_to_end(&mut answer).await.unwrap();
        String::from_utf8_lossy(&answer).to_string()
    }

    /// A request for `d` telling the server to answer within `wait_ms`:
    /// the answer's status and body.
    async fn ask(addr: SocketAddr, d: Digest, wait_ms: u64) -> (u16, String) {
        let req = chunk_request(&d).replace("\r\n\r\n", &format!("\r\nx-streamblk-wait-ms: {wait_ms}\r\n\r\n"));
        let answer = exchange(addr, &req).await;
        let status = answer.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
        (status, body)
    }

    #[tokio::test]
    async fn a_kept_manifest_is_served_by_id_to_token_holders_only() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = test_server(2, ServerLimits::default(), &[addr]);
        tokio::spawn(serve(l, server.clone()));
        let dir = tempfile::tempdir().unwrap();
        let copies = Arc::new(ManifestCopies::new(dir.path()));
        let bytes = b"{\"the manifest\":1}".to_vec();
        let id = Digest::of(&bytes);
        let get = |id: String, auth: &str| format!("GET /manifests/{id} HTTP/1.1\r\nHost: peer\r\n{auth}\r\n");
        let auth = "Authorization: Bearer s3cret-token\r\n";
        // Before the daemon sets its copies, and for an id it has none of: 404.
        assert!(exchange(addr, &get(id.to_hex(), auth))
            .await
            .starts_with("HTTP/1.1 404"));
        server.set_manifests(copies.clone());
        assert!(exchange(addr, &get(id.to_hex(), auth))
            .await
            .starts_with("HTTP/1.1 404"));
        copies.save(&id, &bytes).unwrap();
        let answer = exchange(addr, &get(id.to_hex(), auth)).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("\r\n\r\n{\"the manifest\":1}"), "{answer}");
        assert_eq!(server.counters.manifests.load(Ordering::Relaxed), 1);
        // No token, a wrong one, a malformed id.
        assert!(exchange(addr, &get(id.to_hex(), "")).await.starts_with("HTTP/1.1 401"));
        let wrong = "Authorization: Bearer wrong-token-123\r\n";
        assert!(exchange(addr, &get(id.to_hex(), wrong))
            .await
            .starts_with("HTTP/1.1 403"));
        for bad in ["abc".to_string(), format!("{id}?x=1"), format!("{id}/..")] {
            let answer = exchange(addr, &get(bad.clone(), auth)).await;
            assert!(answer.starts_with("HTTP/1.1 400"), "{bad}: {answer}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn answers_waiting_for_a_slot_hold_no_more_than_the_upload_buffer() {
        let limits = ServerLimits {
            upload_buffer: manifest::MAX_CHUNK as u64 + 1024,
            ..ServerLimits::default()
        };
        let server = test_server(1, limits, &[]);
        let d = hold_chunk(&server, 1000, 3);
        let addr = listen(&server).await;
        // The only slot is taken: a first request (the largest chunk
        // reserved: it sent no length) waits for it, using the buffer.
        let taken = server.slots.acquire(Class::Demand).await.unwrap();
        let first = tokio::spawn(ask(addr, d, 5000));
        assert!(eventually(|| server.queue_depth() == 1).await);
        // A second finds no room, and is told so at once.
        let t = Instant::now();
        let (status, body) = ask(addr, d, 5000).await;
        assert_eq!((status, body.as_str()), (503, "upload buffer full"));
        assert!(t.elapsed() < Duration::from_secs(2), "it waited {:?}", t.elapsed());
        drop(taken);
        assert_eq!(first.await.unwrap().0, 200);
        // Sent: the room is free again.
        assert_eq!(ask(addr, d, 5000).await.0, 200);
    }

    #[test]
    fn a_loose_fetch_is_joined_only_with_its_own_entry() {
        let d = Digest::of(b"c");
        let e = |stored_len, zstd| ChunkEntry {
            digest: d,
            stored_len,
            zstd,
        };
        let mut f = LooseFlights::default();
        let t0 = Instant::now();
        assert!(f.join(e(500, true), 1000, t0));
        assert!(f.join(e(500, true), 1000, t0), "the same entry was refused");
        assert!(!f.join(e(400, true), 1000, t0), "joined with another stored length");
        assert!(!f.join(e(1000, false), 1000, t0), "joined with another encoding");
        assert!(!f.join(e(500, true), 999, t0), "joined with another length");
        f.end(&d);
        assert!(
            f.join(e(400, true), 1000, t0),
            "a fetch that ended still bound its entry"
        );
        assert!(
            f.join(e(500, true), 1000, t0 + FETCH_WAIT),
            "a forgotten fetch still bound its entry"
        );
    }

    #[tokio::test]
    async fn a_request_whose_length_is_not_the_chunks_is_refused() {
        let server = test_server(1, ServerLimits::default(), &[]);
        let d = hold_chunk(&server, 1000, 5);
        let addr = listen(&server).await;
        let with_len = |len: u64| {
            let req = chunk_request(&d).replace(
                &format!("/chunks/{d} "),
                &format!("/chunks/{d}?len={len}&stored={len}&zstd=0 "),
            );
            async move { exchange(addr, &req).await[..12].to_string() }
        };
        assert_eq!(with_len(999).await, "HTTP/1.1 400");
        assert_eq!(with_len(1001).await, "HTTP/1.1 400");
        assert_eq!(with_len(1000).await, "HTTP/1.1 200");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_capped_upload_sends_its_head_at_once_and_its_body_at_the_cap() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let membership = Arc::new(Membership::new(Vec::new(), None, None).unwrap());
        let limits = ServerLimits::default();
        // 1 MB/s: a 1 MiB chunk puts the cap a second behind.
        let server = Arc::new(Server::new(
            Arc::new(token()),
            Arc::default(),
            membership,
            1,
            Some(1_000_000),
            1 << 30,
            limits,
        ));
        let d = hold_chunk(&server, 1 << 20, 9);
        let addr = listen(&server).await;
        assert!(exchange(addr, &chunk_request(&d)).await.starts_with("HTTP/1.1 200"));
        let req = chunk_request(&d).replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n");
        let t = Instant::now();
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        conn.write_all(req.as_bytes()).await.unwrap();
        let (mut answer, mut buf, mut head_at) = (Vec::new(), vec![0u8; 1 << 16], None);
        loop {
            let n = conn.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
            if head_at.is_none() && answer.windows(4).any(|w| w == b"\r\n\r\n") {
                head_at = Some(t.elapsed());
            }
        }
        let (head_at, all_at) = (head_at.unwrap(), t.elapsed());
        assert!(answer.starts_with(b"HTTP/1.1 200"));
        assert!(
            head_at < Duration::from_millis(500),
            "the head waited {head_at:?} for the cap"
        );
        assert!(
            all_at > Duration::from_millis(500),
            "the body ignored the cap: {all_at:?}"
        );
    }

    /// The holders `server`'s directory would name for `d` now.
    fn named(server: &Server, d: &Digest) -> Vec<SocketAddr> {
        lock(&server.directory).pick(d, None, std::time::Instant::now())
    }

    /// A server of `members` with one upload slot paced at 1 MB/s (a 1 MiB
    /// chunk's body takes about a second after its head), holding a 1 MiB
    /// chunk, listening, its bucket's burst spent: the next body is paced.
    async fn paced_server(members: Vec<SocketAddr>) -> (Arc<Server>, Digest, SocketAddr) {
        let membership = Arc::new(Membership::new(members, None, None).unwrap());
        let server = Arc::new(Server::new(
            Arc::new(token()),
            Arc::default(),
            membership,
            1,
            Some(1_000_000),
            1 << 30,
            ServerLimits::default(),
        ));
        let d = hold_chunk(&server, 1 << 20, 7);
        let addr = listen(&server).await;
        assert!(exchange(addr, &chunk_request(&d)).await.starts_with("HTTP/1.1 200"));
        (server, d, addr)
    }

    #[tokio::test]
    async fn a_home_names_a_requester_once_its_upload_is_sent_not_when_it_starts() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let m1 = SocketAddr::from(([127, 0, 0, 1], 7001));
        // The burst was spent with no From: nobody to name.
        let (server, d, addr) = paced_server(vec![m1]).await;
        let req = chunk_request(&d).replace(
            "\r\n\r\n",
            &format!("\r\nX-Streamblk-From: {m1}\r\nConnection: close\r\n\r\n"),
        );
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        conn.write_all(req.as_bytes()).await.unwrap();
        let (mut answer, mut buf) = (Vec::new(), vec![0u8; 1 << 16]);
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before the head");
            answer.extend_from_slice(&buf[..n]);
        }
        assert!(answer.starts_with(b"HTTP/1.1 200"));
        assert!(
            named(&server, &d).is_empty(),
            "a member still receiving the chunk was named as its holder"
        );
        while conn.read(&mut buf).await.unwrap() > 0 {}
        assert!(
            eventually(|| named(&server, &d) == vec![m1]).await,
            "the member sent the whole chunk was not named"
        );
    }

    #[tokio::test]
    async fn a_member_that_tells_the_home_it_verified_a_chunk_is_named_as_its_holder() {
        let (m1, m2) = (
            SocketAddr::from(([127, 0, 0, 1], 7001)),
            SocketAddr::from(([127, 0, 0, 1], 7002)),
        );
        let server = test_server(1, ServerLimits::default(), &[m1, m2]);
        let addr = listen(&server).await;
        let d = Digest::of(b"some chunk");
        let have = |from: &str, auth: bool, method: &str| {
            let auth = if auth {
                "Authorization: Bearer s3cret-token\r\n"
            } else {
                ""
            };
            format!("{method} /holders/{d} HTTP/1.1\r\nHost: peer\r\n{auth}X-Streamblk-From: {from}\r\nContent-Length: 0\r\n\r\n")
        };
        // Refused: no token, not a POST, not a member.
        assert!(exchange(addr, &have(&m2.to_string(), false, "POST"))
            .await
            .starts_with("HTTP/1.1 401"));
        assert!(exchange(addr, &have(&m2.to_string(), true, "GET"))
            .await
            .starts_with("HTTP/1.1 405"));
        assert!(exchange(addr, &have("10.9.9.9:7070", true, "POST"))
            .await
            .starts_with("HTTP/1.1 400"));
        assert!(named(&server, &d).is_empty(), "a refused word was recorded");
        let answer = exchange(addr, &have(&m2.to_string(), true, "POST")).await;
        assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
        assert_eq!(named(&server, &d), vec![m2], "the member that told was not named");
        assert_eq!(server.counters.holders_told.load(Ordering::Relaxed), 1);
        // And a busy home's redirect names it.
        let (before, _busy) = server.active.arrive();
        let r = ChunkRequest {
            digest: d,
            class: Class::Demand,
            entry: None,
            from: Some(m1),
            hop: Hop::Home,
            wait: None,
            stored: false,
            image: None,
        };
        let resp = server.redirect(&r, before + 1).expect("a busy home did not redirect");
        assert_eq!(resp.headers()[HEADER_HOLDERS], m2.to_string().as_str());
    }

    #[tokio::test]
    async fn a_request_counts_in_the_load_until_its_uploads_last_byte_not_its_head() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (server, d, addr) = paced_server(Vec::new()).await;
        assert_eq!(server.queue_depth(), 0);
        let req = chunk_request(&d).replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n");
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        conn.write_all(req.as_bytes()).await.unwrap();
        let (mut answer, mut buf) = (Vec::new(), vec![0u8; 1 << 16]);
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before the head");
            answer.extend_from_slice(&buf[..n]);
        }
        assert!(answer.starts_with(b"HTTP/1.1 200"));
        assert_eq!(
            server.queue_depth(),
            1,
            "a request whose body is still going out left the load with its head"
        );
        while conn.read(&mut buf).await.unwrap() > 0 {}
        assert!(
            eventually(|| server.queue_depth() == 0).await,
            "the sent upload stayed in the load"
        );
    }

    /// Waits up to 5 s for `ok`; whether it came true.
    async fn eventually(ok: impl Fn() -> bool) -> bool {
        let t = Instant::now();
        while !ok() {
            if t.elapsed() > Duration::from_secs(5) {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_upload_to_a_peer_that_stops_reading_frees_its_slot() {
        let limits = ServerLimits {
            write_idle: Duration::from_millis(300),
            ..ServerLimits::default()
        };
        let server = test_server(1, limits, &[]);
        // The largest chunk: more than the socket buffers hold when the
        // receive window is 4 KiB.
        let d = hold_chunk(&server, manifest::MAX_CHUNK as usize, 7);
        let addr = listen(&server).await;
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let mut conn = sock.connect(addr).await.unwrap();
        // The write cannot stall before the request is sent.
        let t = Instant::now();
        tokio::io::AsyncWriteExt::write_all(&mut conn, chunk_request(&d).as_bytes())
            .await
            .unwrap();
        assert!(
            eventually(|| server.slots.depth() == 1).await,
            "the upload took no slot"
        );
        // The connection is open, and reads nothing.
        assert!(
            eventually(|| server.slots.depth() == 0).await,
            "a peer that reads nothing held the upload slot"
        );
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "freed before the write stalled"
        );
        drop(conn);
    }

    #[test]
    fn requests_without_the_right_token_are_refused_before_anything_else() {
        let d = Digest::of(b"c");
        let path = format!("/chunks/{d}");
        assert_eq!(req(&path, &[]), Err(Refusal::NoToken));
        assert_eq!(req(&path, &[("authorization", "Basic abc")]), Err(Refusal::NoToken));
        assert_eq!(
            req(&path, &[("authorization", "Bearer s3cret-tokeN")]),
            Err(Refusal::WrongToken)
        );
        assert_eq!(req("/../etc/passwd", &[]), Err(Refusal::NoToken));
        assert_eq!(Refusal::NoToken.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(Refusal::WrongToken.status(), StatusCode::FORBIDDEN);
    }

    #[test]
    fn a_chunk_request_parses_with_its_class_and_entry() {
        let d = Digest::of(b"c");
        let r = req(
            &format!("/chunks/{d}?len=65536&stored=1200&zstd=1"),
            &[AUTH, ("x-streamblk-class", "demand")],
        )
        .unwrap();
        assert_eq!(r.digest, d);
        assert_eq!(r.class, Class::Demand);
        assert_eq!(
            r.entry,
            Some((
                ChunkEntry {
                    digest: d,
                    stored_len: 1200,
                    zstd: true
                },
                65536
            ))
        );
        assert_eq!((r.from, r.hop, r.wait), (None, Hop::Home, None));
        let waits = req(&format!("/chunks/{d}"), &[AUTH, ("x-streamblk-wait-ms", "1500")]).unwrap();
        assert_eq!(waits.wait, Some(Duration::from_millis(1500)));
        let long = req(&format!("/chunks/{d}"), &[AUTH, ("x-streamblk-wait-ms", "99999999")]).unwrap();
        assert_eq!(
            long.wait,
            Some(FETCH_WAIT),
            "a requester made the server wait longer than its limit"
        );
        let plain = req(&format!("/chunks/{d}"), &[AUTH]).unwrap();
        assert_eq!((plain.class, plain.entry, plain.image), (Class::Background, None, None));
        let id = Digest::of(b"an image");
        let named = req(
            &format!("/chunks/{d}"),
            &[
                AUTH,
                ("x-streamblk-class", "profile"),
                ("x-streamblk-image", &id.to_hex()),
            ],
        )
        .unwrap();
        assert_eq!((named.class, named.image), (Class::Profile, Some(id)));
        let hop = req(
            &format!("/chunks/{d}"),
            &[
                AUTH,
                ("x-streamblk-hop", "redirected"),
                ("x-streamblk-from", "127.0.0.1:7001"),
            ],
        )
        .unwrap();
        assert_eq!(
            (hop.from, hop.hop),
            (Some("127.0.0.1:7001".parse().unwrap()), Hop::Redirected)
        );
    }

    #[test]
    fn malformed_requests_are_bad_requests() {
        let d = Digest::of(b"c");
        for uri in [
            "/".to_string(),
            "/chunks/".to_string(),
            "/chunks/xyz".to_string(),
            format!("/chunks/{d}/more"),
            format!("/chunks/{}", &d.to_hex()[..63]),
            format!("/blobs/{d}"),
            format!("/chunks/{d}?len=10"),
            format!("/chunks/{d}?len=0&stored=1&zstd=1"),
            format!("/chunks/{d}?len=65536&stored=99&zstd=0"),
            format!("/chunks/{d}?len=99999999&stored=10&zstd=1"),
            format!("/chunks/{d}?len=-1&stored=10&zstd=1"),
            format!("/chunks/{d}?colour=red"),
            format!("/chunks/{d}?len"),
        ] {
            let r = req(&uri, &[AUTH]);
            assert!(matches!(r, Err(Refusal::Bad(_))), "{uri}: {r:?}");
            assert_eq!(r.unwrap_err().status(), StatusCode::BAD_REQUEST);
        }
        let r = req(&format!("/chunks/{d}"), &[AUTH, ("x-streamblk-class", "urgent")]);
        assert!(matches!(r, Err(Refusal::Bad(_))), "{r:?}");
        for h in [
            ("x-streamblk-hop", "sideways"),
            ("x-streamblk-from", "somewhere"),
            ("x-streamblk-wait-ms", "soon"),
            ("x-streamblk-image", "abc"),
            ("x-streamblk-image", format!("{d}00").as_str()),
            ("x-streamblk-image", format!("{}zz", &d.to_hex()[..62]).as_str()),
            ("x-streamblk-image", format!("0x{}", &d.to_hex()[..62]).as_str()),
        ] {
            let r = req(&format!("/chunks/{d}"), &[AUTH, h]);
            assert!(matches!(r, Err(Refusal::Bad(_))), "{h:?}: {r:?}");
        }
        let r = req_with(Method::POST, &format!("/chunks/{d}"), &[AUTH]);
        assert_eq!(r, Err(Refusal::Method));
    }

    #[tokio::test]
    async fn connections_from_non_members_are_closed_before_a_request() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let elsewhere: SocketAddr = "127.0.0.2:7000".parse().unwrap();
        let here: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        for (members, served) in [(vec![elsewhere], false), (vec![elsewhere, here], true)] {
            let server = test_server(1, ServerLimits::default(), &members);
            let d = hold_chunk(&server, 1000, 1);
            let addr = listen(&server).await;
            let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
            let _ = conn.write_all(chunk_request(&d).as_bytes()).await;
            let mut answer = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                let mut buf = [0u8; 4096];
                // Until the head and the 1000-byte body, or the server closes.
                while answer.len() < 1000 {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => answer.extend_from_slice(&buf[..n]),
                    }
                }
            });
            read.await.unwrap();
            assert_eq!(answer.starts_with(b"HTTP/1.1 200"), served, "members {members:?}");
            let unauthorized = server.counters.unauthorized.load(Ordering::Relaxed);
            assert_eq!(unauthorized, u64::from(!served), "members {members:?}");
        }
    }
}
