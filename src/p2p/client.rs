//! The peer client: which peers to ask for a chunk (its home by HRW, then
//! the failover candidates, up to this host, which ranks itself whether or
//! not its peer list names it; then the one after this host, asked only
//! whether it holds the chunk), and the request itself,
//! following a busy home's redirect to holders (and back to the home, told
//! not to redirect, if none of them serves: never to the store). A
//! peer that cannot be reached is skipped for a few seconds, so a dead
//! home costs one failed connect, not one per chunk; a peer that sent a
//! bad chunk is not asked for that chunk again for a while. With zones,
//! the candidates are those of this host's zone, and a zone's home asks
//! the chunk's global home (`hrw::candidates`). Also, for a host the store
//! fails: a chunk from the members that hold it (asked as holders: they
//! never fetch or redirect), and an image's manifest by id, checked
//! against the id and validated as a store's before it is used.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;

use super::directory::REDIRECT_TO;
use super::membership::Membership;
use super::policy::{self, Hop, Reply, Requester, Step, CANDIDATES};
use super::{
    hrw, lock, PeerTimeouts, Token, HEADER_CLASS, HEADER_FORM, HEADER_FROM, HEADER_HOLDERS, HEADER_HOP, HEADER_IMAGE,
    HEADER_QUEUE, HEADER_WAIT,
};
use crate::fetch::{Class, PeerChunk, PeerError, Peers, StillBusy};
use crate::store::{check_manifest, ChunkEntry, Digest, ImageId, Manifest, MAX_MANIFEST_BYTES};

/// Members asked for a manifest, at most (best by HRW of the image id).
const MANIFEST_PEERS: usize = 4;
/// How long a peer whose host refused the connection is skipped.
pub(crate) const REFUSED_DOWN_FOR: Duration = Duration::from_millis(250);
/// How long a peer that sent a bad chunk is not asked for it again.
const BAD_FOR: Duration = Duration::from_secs(300);
/// (peer, chunk) pairs remembered as bad; the oldest go beyond it.
const MAX_BAD: usize = 4096;
/// Requests in flight to one peer; more wait their turn here. With the
/// idle pooled connections (8) it stays under the connections a server
/// takes from one member (32), so a burst is queued, never refused.
const MAX_IN_FLIGHT: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("request chunk {digest} from peer {peer}")]
    Send {
        peer: SocketAddr,
        digest: Digest,
        #[source]
        source: reqwest::Error,
    },
    #[error("peer {peer} answered {status} for chunk {digest}")]
    Status {
        peer: SocketAddr,
        digest: Digest,
        status: reqwest::StatusCode,
    },
    #[error("{peer} is not a member: not asked (it would get the cluster token)")]
    NotMember { peer: SocketAddr },
    #[error("peer {peer} sent more than the {len} bytes of chunk {digest}")]
    TooLong { peer: SocketAddr, digest: Digest, len: u64 },
    #[error("peer {peer} went {within:?} without answering for chunk {digest}")]
    NoAnswer {
        peer: SocketAddr,
        digest: Digest,
        within: Duration,
    },
    #[error("home {peer} answered busy for chunk {digest} until the time for peers was up")]
    StillBusy { peer: SocketAddr, digest: Digest },
}

/// Why a peer did not serve a manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("no peer to ask (no member up but this host)")]
    NoPeers,
    #[error("request manifest {id} from peer {peer}")]
    Send {
        peer: SocketAddr,
        id: ImageId,
        #[source]
        source: reqwest::Error,
    },
    #[error("peer {peer} answered {status} for manifest {id}")]
    Status {
        peer: SocketAddr,
        id: ImageId,
        status: reqwest::StatusCode,
    },
    #[error("peer {peer} sent more than {MAX_MANIFEST_BYTES} bytes for manifest {id}")]
    TooLarge { peer: SocketAddr, id: ImageId },
    #[error("peer {peer} went {within:?} without answering for manifest {id}")]
    NoAnswer {
        peer: SocketAddr,
        id: ImageId,
        within: Duration,
    },
    #[error("peer {peer} sent a bad manifest for {id}")]
    Bad {
        peer: SocketAddr,
        id: ImageId,
        #[source]
        source: crate::store::Error,
    },
}

impl RequestError {
    /// The peer could not be reached, or is hung: it is skipped for a while.
    fn is_unreachable(&self) -> bool {
        match self {
            RequestError::Send { source, .. } => source.is_connect() || source.is_timeout(),
            RequestError::NoAnswer { .. } => true,
            RequestError::Status { .. }
            | RequestError::TooLong { .. }
            | RequestError::NotMember { .. }
            | RequestError::StillBusy { .. } => false,
        }
    }

    /// The peer's host answered that nothing listens there: its daemon is
    /// down, starting or restarting, and asking again costs a round trip.
    fn is_refused(&self) -> bool {
        let RequestError::Send { source, .. } = self else {
            return false;
        };
        let mut e: Option<&(dyn std::error::Error + 'static)> = Some(source);
        while let Some(err) = e {
            if err
                .downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
            {
                return true;
            }
            e = err.source();
        }
        false
    }
}

/// One peer as this host sees it.
#[derive(Debug, Default)]
pub struct PeerStats {
    pub requests: AtomicU64,
    /// Answers with a chunk (verified or not) and their bytes.
    pub served: AtomicU64,
    pub bytes: AtomicU64,
    pub failures: AtomicU64,
    /// Chunks it sent that failed verification.
    pub bad_chunks: AtomicU64,
    /// Times it redirected this host to holders.
    pub redirects: AtomicU64,
    /// Its upload queue depth at its last answer.
    pub queue: AtomicU64,
    down_until: Mutex<Option<Instant>>,
    /// When it was last logged as unreachable.
    warned: Mutex<Option<Instant>>,
    in_flight: InFlight,
}

/// Turns to send a request to one peer ([`MAX_IN_FLIGHT`]).
#[derive(Debug)]
struct InFlight(tokio::sync::Semaphore);

impl Default for InFlight {
    fn default() -> Self {
        InFlight(tokio::sync::Semaphore::new(MAX_IN_FLIGHT))
    }
}

impl PeerStats {
    pub fn is_down(&self) -> bool {
        lock(&self.down_until).is_some_and(|t| t > Instant::now())
    }
}

/// Cheap to clone: a request in flight holds its own.
#[derive(Clone)]
pub struct PeerClient {
    http: reqwest::Client,
    token: Arc<Token>,
    membership: Arc<Membership>,
    peers: Arc<Mutex<HashMap<SocketAddr, Arc<PeerStats>>>>,
    bad: Arc<Mutex<HashMap<(SocketAddr, Digest), Instant>>>,
    /// Bounds asking one home for a chunk, busy answers included: the
    /// fetch's deadline.
    timeout: Duration,
    timeouts: PeerTimeouts,
}

impl PeerClient {
    /// `timeout` bounds a request whole; `timeouts` its steps.
    pub fn new(
        token: Arc<Token>,
        membership: Arc<Membership>,
        timeout: Duration,
        timeouts: PeerTimeouts,
    ) -> Result<Self, super::Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(timeouts.connect)
            .timeout(timeout)
            .pool_max_idle_per_host(8)
            // Shorter than the server's idle limit (its head timeout, 10 s):
            // a pooled connection is never reused just as the server drops it.
            .pool_idle_timeout(Duration::from_secs(5))
            // A home's 307 names holders in a header; get_chunk follows it.
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .map_err(super::Error::HttpClient)?;
        Ok(PeerClient {
            http,
            token,
            membership,
            peers: Arc::default(),
            bad: Arc::default(),
            timeout,
            timeouts,
        })
    }

    pub fn membership(&self) -> &Arc<Membership> {
        &self.membership
    }

    pub fn stats(&self, peer: SocketAddr) -> Arc<PeerStats> {
        lock(&self.peers).entry(peer).or_default().clone()
    }

    /// Every peer asked so far, with its numbers.
    pub fn all_stats(&self) -> Vec<(SocketAddr, Arc<PeerStats>)> {
        let mut v: Vec<_> = lock(&self.peers).iter().map(|(a, s)| (*a, s.clone())).collect();
        v.sort_by_key(|(a, _)| *a);
        v
    }

    /// This host ranks before `peer` for the chunk: it is the chunk's
    /// (acting) home as far as `peer` goes.
    fn ranks_after_me(&self, peer: SocketAddr, digest: &Digest) -> bool {
        self.membership
            .self_addr()
            .is_some_and(|me| (hrw::score(digest, &me), peer) > (hrw::score(digest, &peer), me))
    }

    /// The members other than this host.
    fn others(&self) -> Vec<SocketAddr> {
        let me = self.membership.self_addr();
        self.membership
            .members()
            .iter()
            .copied()
            .filter(|m| Some(*m) != me)
            .collect()
    }

    fn is_bad(&self, peer: SocketAddr, digest: &Digest) -> bool {
        lock(&self.bad)
            .get(&(peer, *digest))
            .is_some_and(|t| t.elapsed() < BAD_FOR)
    }

    /// Asks `peer` for the chunk: its bytes, or the holders it redirects to.
    /// A peer that cannot be reached, or does not answer within the time
    /// budgets, is skipped for a while.
    async fn request(&self, peer: SocketAddr, ask: &Ask, hop: Hop) -> Result<Answer, RequestError> {
        let stats = self.stats(peer);
        let Ok(_turn) = stats.in_flight.0.acquire().await else {
            unreachable!("the semaphore is never closed")
        };
        let r = self.send(&stats, peer, ask, hop).await;
        if let Err(e) = &r {
            stats.failures.fetch_add(1, Ordering::Relaxed);
            if e.is_unreachable() {
                // A refusing host is skipped only briefly: a member that
                // starts (or restarts) mid-storm is its chunks' home again
                // at once, instead of the next candidate fetching them too.
                let down_for = if e.is_refused() {
                    REFUSED_DOWN_FOR
                } else {
                    self.timeouts.down_for
                };
                let mut down = lock(&stats.down_until);
                let mut warned = lock(&stats.warned);
                // One warning per `timeouts.down_for`, however often it refuses.
                if !warned.is_some_and(|t| t.elapsed() < self.timeouts.down_for) {
                    tracing::warn!(%peer, "peer unreachable, skipped for {down_for:?}: {}", crate::DisplayChain(e));
                    *warned = Some(Instant::now());
                }
                *down = Some(Instant::now() + down_for);
            }
        }
        r
    }

    /// Asks the chunk's home, following its answers as `policy::Requester`
    /// decides: the holders a busy home names, least loaded first, then the
    /// home again, told not to redirect; a home that answers busy (503) is
    /// asked again after a pause until `deadline` (the fetch's), since the
    /// next candidate would fetch the chunk from the store a second time;
    /// busy until then, it is [`RequestError::StillBusy`] (the store, not
    /// the next candidate). Only a home that cannot be reached, or answers
    /// otherwise, is given up at once. Returns who sent the bytes.
    async fn get_chunk(self, home: SocketAddr, ask: Ask) -> Result<(SocketAddr, PeerChunk), RequestError> {
        let digest = ask.entry.digest;
        // Room for one last request before the scheduler's own timeout.
        let last = self.timeouts.first_byte + self.timeouts.idle;
        let deadline = Instant::now() + self.timeout.saturating_sub(last);
        let (mut requester, mut step) = Requester::new(home, self.membership.self_addr());
        // What the home last answered, if it was not the chunk.
        let mut home_err = None;
        loop {
            if step == Step::Store {
                return Err(RequestError::StillBusy { peer: home, digest });
            }
            let Step::Ask { peer, hop, after } = step else {
                return Err(home_err.unwrap_or(RequestError::Status {
                    peer: home,
                    digest,
                    status: reqwest::StatusCode::TEMPORARY_REDIRECT,
                }));
            };
            if !after.is_zero() {
                tokio::time::sleep(after).await;
            }
            let reply = match self.request(peer, &ask, hop).await {
                Ok(Answer::Chunk(b)) => return Ok((peer, b)),
                Ok(Answer::Redirect(holders)) => {
                    self.stats(home).redirects.fetch_add(1, Ordering::Relaxed);
                    Reply::Redirect(holders)
                }
                Err(e) => {
                    let busy = matches!(&e, RequestError::Status { status, .. } if *status == reqwest::StatusCode::SERVICE_UNAVAILABLE);
                    if hop == Hop::Redirected {
                        tracing::debug!("holder did not serve: {}", crate::DisplayChain(&e));
                    } else {
                        home_err = Some(e);
                    }
                    if busy {
                        Reply::Busy
                    } else {
                        Reply::Failed
                    }
                }
            };
            step = requester.on_reply(
                peer,
                hop,
                reply,
                deadline.saturating_duration_since(Instant::now()),
                |h| self.stats(h).queue.load(Ordering::Relaxed),
                |h| self.stats(h).is_down() || self.is_bad(h, &digest),
            );
        }
    }

    /// Image `id`'s manifest from the first peer that sends one that
    /// hashes to the id and validates, as a store's must: a lying peer is
    /// logged and the next is asked. Peers are asked in HRW order of the
    /// id, so hosts opening one image spread over a few members. Returns
    /// the manifest, its bytes and who sent them; if none did, the last
    /// peer's failure.
    pub async fn manifest(&self, id: &ImageId) -> Result<(Manifest, Bytes, SocketAddr), ManifestError> {
        let mut last = ManifestError::NoPeers;
        for peer in hrw::ranked(id, &self.others(), MANIFEST_PEERS) {
            let stats = self.stats(peer);
            if stats.is_down() {
                continue;
            }
            match self.send_manifest(&stats, peer, id).await {
                Ok(bytes) => match check_manifest(&id.to_hex(), id, &bytes) {
                    Ok(m) => return Ok((m, bytes, peer)),
                    Err(source) => {
                        stats.bad_chunks.fetch_add(1, Ordering::Relaxed);
                        let e = ManifestError::Bad { peer, id: *id, source };
                        tracing::warn!("{}; asking the next peer", crate::DisplayChain(&e));
                        last = e;
                    }
                },
                Err(e) => {
                    stats.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!("{}", crate::DisplayChain(&e));
                    last = e;
                }
            }
        }
        Err(last)
    }

    /// One manifest request, each step within its time budget, its body
    /// capped at [`MAX_MANIFEST_BYTES`] as it comes.
    async fn send_manifest(&self, stats: &PeerStats, peer: SocketAddr, id: &ImageId) -> Result<Bytes, ManifestError> {
        let id = *id;
        let send_err = |source| ManifestError::Send { peer, id, source };
        let no_answer = |within| ManifestError::NoAnswer { peer, id, within };
        let Ok(_turn) = stats.in_flight.0.acquire().await else {
            unreachable!("the semaphore is never closed")
        };
        stats.requests.fetch_add(1, Ordering::Relaxed);
        let req = self
            .http
            .get(format!("http://{peer}/manifests/{id}"))
            .header(reqwest::header::AUTHORIZATION, self.token.header())
            .header(HEADER_CLASS, Class::Demand.name());
        let first_byte = self.timeouts.first_byte;
        let mut resp = tokio::time::timeout(first_byte, req.send())
            .await
            .map_err(|_| no_answer(first_byte))?
            .map_err(send_err)?;
        let status = resp.status();
        if status != reqwest::StatusCode::OK {
            return Err(ManifestError::Status { peer, id, status });
        }
        if resp.content_length().is_some_and(|n| n > MAX_MANIFEST_BYTES) {
            return Err(ManifestError::TooLarge { peer, id });
        }
        let idle = self.timeouts.idle;
        let buf = read_capped(&mut resp, MAX_MANIFEST_BYTES, idle)
            .await
            .map_err(|e| match e {
                Capped::Idle => no_answer(idle),
                Capped::Send(e) => send_err(e),
                Capped::TooLong => ManifestError::TooLarge { peer, id },
            })?;
        stats.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(buf)
    }

    /// Tells `home` this host (`me`) holds the chunk: one small request
    /// within the first-byte budget, under the per-peer request cap. A
    /// failure costs nothing but the home's knowledge.
    async fn tell_home(&self, home: SocketAddr, me: SocketAddr, digest: &Digest) -> Result<(), String> {
        if !self.membership.members().contains(&home) {
            return Err("not a member".into());
        }
        let stats = self.stats(home);
        let Ok(_turn) = stats.in_flight.0.acquire().await else {
            unreachable!("the semaphore is never closed")
        };
        let req = self
            .http
            .post(format!("http://{home}/holders/{digest}"))
            .header(reqwest::header::AUTHORIZATION, self.token.header())
            .header(HEADER_FROM, me.to_string());
        let resp = tokio::time::timeout(self.timeouts.first_byte, req.send())
            .await
            .map_err(|_| "no answer in time".to_string())?
            .map_err(|e| crate::DisplayChain(&e).to_string())?;
        match resp.status() {
            reqwest::StatusCode::NO_CONTENT => Ok(()),
            status => Err(format!("answered {status}")),
        }
    }

    /// One request and its answer, each step within its time budget.
    async fn send(&self, stats: &PeerStats, peer: SocketAddr, ask: &Ask, hop: Hop) -> Result<Answer, RequestError> {
        let Ask {
            entry,
            len,
            class,
            image,
        } = *ask;
        let digest = entry.digest;
        let members = self.membership.members();
        if !members.contains(&peer) {
            return Err(RequestError::NotMember { peer });
        }
        let url = format!(
            "http://{peer}/chunks/{digest}?len={len}&stored={}&zstd={}",
            entry.stored_len,
            u8::from(entry.zstd)
        );
        let send_err = |source| RequestError::Send { peer, digest, source };
        let no_answer = |within| RequestError::NoAnswer { peer, digest, within };
        stats.requests.fetch_add(1, Ordering::Relaxed);
        let mut req = self
            .http
            .get(url)
            .header(reqwest::header::AUTHORIZATION, self.token.header())
            .header(HEADER_CLASS, class.name())
            .header(HEADER_FORM, "stored")
            .header(HEADER_WAIT, self.timeouts.server_wait().as_millis().to_string());
        if let Some(me) = self.membership.self_addr() {
            req = req.header(HEADER_FROM, me.to_string());
        }
        if let Some(hop) = hop.name() {
            req = req.header(HEADER_HOP, hop);
        }
        if let Some(image) = image {
            req = req.header(HEADER_IMAGE, image.to_hex());
        }
        let first_byte = self.timeouts.first_byte;
        let resp = tokio::time::timeout(first_byte, req.send())
            .await
            .map_err(|_| no_answer(first_byte))?
            .map_err(send_err)?;
        if let Some(q) = resp
            .headers()
            .get(HEADER_QUEUE)
            .and_then(|v| v.to_str().ok()?.parse().ok())
        {
            stats.queue.store(q, Ordering::Relaxed);
        }
        let status = resp.status();
        if status == reqwest::StatusCode::TEMPORARY_REDIRECT && hop == Hop::Home {
            // Members only, and no more than a home names: a home's word
            // sends this host's token nowhere else, and costs little.
            let holders = resp
                .headers()
                .get(HEADER_HOLDERS)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .split(',')
                .take(REDIRECT_TO)
                .filter_map(|h| h.trim().parse().ok())
                .filter(|h| members.contains(h))
                .collect();
            return Ok(Answer::Redirect(holders));
        }
        if status != reqwest::StatusCode::OK {
            return Err(RequestError::Status { peer, digest, status });
        }
        // The stored form is no longer than the manifest says; the
        // plaintext no longer than the chunk.
        let stored = resp.headers().get(HEADER_FORM).is_some_and(|v| v == "stored");
        let len = if stored { u64::from(entry.stored_len) } else { len };
        let too_long = || RequestError::TooLong { peer, digest, len };
        if resp.content_length().is_some_and(|n| n > len) {
            return Err(too_long());
        }
        // Count as it comes: a peer may send more than it announced.
        let mut resp = resp;
        let idle = self.timeouts.idle;
        let data = read_capped(&mut resp, len, idle).await.map_err(|e| match e {
            Capped::Idle => no_answer(idle),
            Capped::Send(e) => send_err(e),
            Capped::TooLong => too_long(),
        })?;
        stats.served.fetch_add(1, Ordering::Relaxed);
        stats.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(Answer::Chunk(if stored {
            PeerChunk::Stored(data)
        } else {
            PeerChunk::Plain(data)
        }))
    }
}

/// Why an answer's body was not read whole.
enum Capped {
    /// Nothing came for the idle budget.
    Idle,
    Send(reqwest::Error),
    /// More than the cap came.
    TooLong,
}

/// An answer's body, at most `cap` bytes, counted as it comes (a peer may
/// send more than it announced), with at most `idle` between frames.
async fn read_capped(resp: &mut reqwest::Response, cap: u64, idle: Duration) -> Result<Bytes, Capped> {
    let mut buf = BytesMut::with_capacity(resp.content_length().unwrap_or(0).min(cap) as usize);
    while let Some(part) = tokio::time::timeout(idle, resp.chunk())
        .await
        .map_err(|_| Capped::Idle)?
        .map_err(Capped::Send)?
    {
        if (buf.len() + part.len()) as u64 > cap {
            return Err(Capped::TooLong);
        }
        buf.extend_from_slice(&part);
    }
    Ok(buf.freeze())
}

/// What is asked of peers: a chunk, its length, the requester's class,
/// and the image it is for (if known).
#[derive(Clone, Copy)]
struct Ask {
    entry: ChunkEntry,
    len: u64,
    class: Class,
    image: Option<ImageId>,
}

/// What a peer answered.
enum Answer {
    Chunk(PeerChunk),
    /// A busy home named holders of the chunk.
    Redirect(Vec<SocketAddr>),
}

impl Peers for PeerClient {
    fn fleet_size(&self) -> usize {
        let members = self.membership.members();
        let me = self.membership.self_addr().filter(|me| !members.contains(me));
        members.len() + usize::from(me.is_some())
    }

    fn candidates(&self, digest: &Digest) -> Vec<SocketAddr> {
        let m = &self.membership;
        let view = m.view();
        let members = view.addrs();
        let me = m.self_addr();
        // A host ranks itself even when its list forgets it: peers whose
        // lists name it ask it as home, and if it did not rank itself it
        // would ask them in turn (a wait cycle until timeouts).
        let with_me;
        let all = match me.filter(|me| !members.contains(me)) {
            Some(me) => {
                with_me = [&members[..], &[me]].concat();
                &with_me[..]
            }
            None => &members[..],
        };
        // This host's zone is its own --zone, whatever a list says of it.
        let zone_of = |a: &SocketAddr| {
            if Some(*a) == me {
                m.self_zone().map(|z| z.as_str())
            } else {
                view.zone(a).map(|z| z.as_str())
            }
        };
        // A peer down or bad for the chunk: the next one acts as home.
        let usable = |a: &SocketAddr| !self.stats(*a).is_down() && !self.is_bad(*a, digest);
        let mut out = hrw::candidates(digest, all, me, zone_of, usable, CANDIDATES);
        // If this host ranks among the chunk's candidates in its zone, the
        // zone's candidates after it are asked too, only whether they hold
        // the chunk (see `get` and `policy::holders_after`).
        if let Some(me) = me {
            let my_zone = zone_of(&me);
            let zone: Vec<SocketAddr> = all.iter().copied().filter(|a| zone_of(a) == my_zone).collect();
            let ranked = hrw::ranked(digest, &zone, CANDIDATES);
            out.extend(policy::holders_after(&ranked, me, |a| !usable(&a)));
        }
        out
    }

    fn get(
        &self,
        peer: SocketAddr,
        entry: ChunkEntry,
        len: u64,
        class: Class,
        image: Option<ImageId>,
    ) -> BoxFuture<'static, Result<(SocketAddr, PeerChunk), PeerError>> {
        let this = self.clone();
        let ask = Ask {
            entry,
            len,
            class,
            image,
        };
        let holder_only = self.ranks_after_me(peer, &entry.digest);
        Box::pin(async move {
            let got = if holder_only {
                // As a holder: it serves only a chunk it has, never fetches
                // it as home for this host (which is the home), nor redirects.
                match this.request(peer, &ask, Hop::Redirected).await {
                    Ok(Answer::Chunk(b)) => Ok((peer, b)),
                    // Only a request to a home is read as a redirect.
                    Ok(Answer::Redirect(_)) => Err(RequestError::Status {
                        peer,
                        digest: entry.digest,
                        status: reqwest::StatusCode::TEMPORARY_REDIRECT,
                    }),
                    Err(e) => Err(e),
                }
            } else {
                this.get_chunk(peer, ask).await
            };
            got.map_err(|e| match e {
                RequestError::StillBusy { peer, .. } => Box::new(StillBusy {
                    peer,
                    source: Box::new(e),
                }) as PeerError,
                e => Box::new(e) as PeerError,
            })
        })
    }

    fn holders(&self, digest: &Digest) -> Vec<SocketAddr> {
        hrw::ranked(digest, &self.others(), CANDIDATES)
            .into_iter()
            .filter(|m| !self.stats(*m).is_down() && !self.is_bad(*m, digest))
            .collect()
    }

    fn get_held(
        &self,
        peer: SocketAddr,
        entry: ChunkEntry,
        len: u64,
        class: Class,
    ) -> BoxFuture<'static, Result<(SocketAddr, PeerChunk), PeerError>> {
        let this = self.clone();
        Box::pin(async move {
            // As a holder a home named: it serves what it holds, or 404.
            let ask = Ask {
                entry,
                len,
                class,
                image: None,
            };
            match this.request(peer, &ask, Hop::Redirected).await {
                Ok(Answer::Chunk(b)) => Ok((peer, b)),
                Ok(Answer::Redirect(_)) => Err(Box::new(RequestError::Status {
                    peer,
                    digest: entry.digest,
                    status: reqwest::StatusCode::TEMPORARY_REDIRECT,
                }) as PeerError),
                Err(e) => Err(Box::new(e) as PeerError),
            }
        })
    }

    /// A chunk a holder sent, verified: the home that redirected this
    /// host there is told (`POST /holders/<digest>`), in the background,
    /// so that it names this host to later requesters too and the chunk
    /// fans out below the members the home served itself.
    fn verified(&self, asked: SocketAddr, sender: SocketAddr, digest: &Digest) {
        let (Some(home), Some(me)) = (policy::announce_to(asked, sender), self.membership.self_addr()) else {
            return;
        };
        let this = self.clone();
        let digest = *digest;
        tokio::spawn(async move {
            if let Err(e) = this.tell_home(home, me, &digest).await {
                tracing::debug!(%home, %digest, "telling the home this host holds the chunk failed: {e}");
            }
        });
    }

    fn bad_chunk(&self, peer: SocketAddr, digest: &Digest, why: &str) {
        self.stats(peer).bad_chunks.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%peer, %digest, "peer sent a bad chunk ({why}); not asked for it again, fetching elsewhere");
        let mut bad = lock(&self.bad);
        if bad.len() >= MAX_BAD {
            bad.retain(|_, t| t.elapsed() < BAD_FOR);
            if bad.len() >= MAX_BAD {
                if let Some(oldest) = bad.iter().min_by_key(|(_, t)| **t).map(|(k, _)| *k) {
                    bad.remove(&oldest);
                }
            }
        }
        bad.insert((peer, *digest), Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    use super::*;

    const CHUNK: &[u8] = b"the chunk's bytes";

    /// An answer without a form header is the plaintext.
    fn plain(c: PeerChunk) -> bytes::Bytes {
        match c {
            PeerChunk::Plain(b) => b,
            PeerChunk::Stored(_) => panic!("a plain answer was taken for a stored form"),
        }
    }

    fn entry() -> ChunkEntry {
        ChunkEntry {
            digest: Digest::of(CHUNK),
            stored_len: CHUNK.len() as u32,
            zstd: false,
        }
    }

    fn ask() -> Ask {
        Ask {
            entry: entry(),
            len: CHUNK.len() as u64,
            class: Class::Demand,
            image: None,
        }
    }

    fn timeouts() -> PeerTimeouts {
        PeerTimeouts {
            connect: Duration::from_millis(500),
            first_byte: Duration::from_millis(300),
            idle: Duration::from_millis(300),
            down_for: Duration::from_secs(60),
        }
    }

    /// A peer on 127.0.0.1 that reads each request's head and hands the
    /// connection to `answer`, one thread a connection.
    fn fake_peer(answer: impl Fn(TcpStream) + Send + Sync + 'static) -> SocketAddr {
        fake_peer_with_head(move |_, conn| answer(conn))
    }

    /// Like `fake_peer`, showing `answer` the request's head too.
    fn fake_peer_with_head(answer: impl Fn(&str, TcpStream) + Send + Sync + 'static) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let answer = Arc::new(answer);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let answer = answer.clone();
                std::thread::spawn(move || {
                    let mut head = Vec::new();
                    let mut byte = [0u8];
                    while !head.ends_with(b"\r\n\r\n") {
                        if conn.read(&mut byte).unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    answer(&String::from_utf8_lossy(&head), conn);
                });
            }
        });
        addr
    }

    fn client(members: &[SocketAddr], me: Option<SocketAddr>) -> PeerClient {
        client_within(members, me, Duration::from_secs(10))
    }

    fn client_within(members: &[SocketAddr], me: Option<SocketAddr>, timeout: Duration) -> PeerClient {
        let token = Arc::new(Token::new(b"0123456789abcdef".to_vec()));
        let membership = Arc::new(Membership::new(members.to_vec(), None, me).unwrap());
        PeerClient::new(token, membership, timeout, timeouts()).unwrap()
    }

    #[tokio::test]
    async fn a_hung_peer_costs_one_time_budget_and_is_then_skipped() {
        // Accepts, reads the request, never answers.
        let hung = fake_peer(|conn| {
            std::thread::sleep(Duration::from_secs(30));
            drop(conn);
        });
        // Sends its head and part of the body, then nothing.
        let stalls = fake_peer(|mut conn| {
            let _ = conn.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\nthe", CHUNK.len()).as_bytes());
            std::thread::sleep(Duration::from_secs(30));
        });
        let c = client(&[hung, stalls], None);
        for peer in [hung, stalls] {
            let t = Instant::now();
            let r = c.clone().get_chunk(peer, ask()).await;
            let took = t.elapsed();
            assert!(matches!(r, Err(RequestError::NoAnswer { .. })), "{peer}: {r:?}");
            assert!(
                took < Duration::from_secs(2),
                "{peer}: a hung peer held a read {took:?}"
            );
            assert!(c.stats(peer).is_down(), "{peer}: a hung peer was not marked down");
        }
        // Neither is a candidate now: reads go straight to the store.
        for i in 0..50u32 {
            assert!(c.candidates(&Digest::of(&i.to_le_bytes())).is_empty());
        }
    }

    /// A peer answering every request with `body` (and its length).
    fn serving(body: Vec<u8>) -> SocketAddr {
        fake_peer(move |mut conn| {
            let _ = conn.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes());
            let _ = conn.write_all(&body);
        })
    }

    fn manifest_of(chunks: usize) -> Manifest {
        Manifest {
            version: crate::store::manifest::VERSION,
            size: chunks as u64 * 65536,
            chunk_size: 65536,
            chunks: vec![None; chunks],
        }
    }

    #[tokio::test]
    async fn a_peer_manifest_that_is_not_the_ids_is_refused_and_the_next_peer_asked() {
        let good = manifest_of(2);
        let id = Digest::of(&good.to_bytes());
        // Another image's valid manifest, sent for this id.
        let other = serving(manifest_of(3).to_bytes());
        // Hashes to its own id, but is no valid manifest (version 99).
        let mut bad = manifest_of(2);
        bad.version = 99;
        let invalid_bytes = bad.to_bytes();
        let invalid_id = Digest::of(&invalid_bytes);
        let invalid = serving(invalid_bytes);
        let honest = serving(good.to_bytes());

        let e = client(&[other], None).manifest(&id).await.unwrap_err();
        assert!(
            matches!(
                &e,
                ManifestError::Bad {
                    source: crate::store::Error::ManifestDigest(_),
                    ..
                }
            ),
            "{e:?}"
        );
        let e = client(&[invalid], None).manifest(&invalid_id).await.unwrap_err();
        assert!(
            matches!(
                &e,
                ManifestError::Bad {
                    source: crate::store::Error::BadManifest { .. },
                    ..
                }
            ),
            "{e:?}"
        );

        // With a liar and an honest peer, whichever is asked first: the
        // honest one's manifest, and the liar counted if it was asked.
        let c = client(&[other, honest], None);
        let (m, bytes, from) = c.manifest(&id).await.unwrap();
        assert_eq!((m, from), (good, honest));
        assert_eq!(Digest::of(&bytes), id);
        let lied = c.stats(other).bad_chunks.load(Ordering::Relaxed);
        assert_eq!(
            lied,
            c.stats(other).requests.load(Ordering::Relaxed),
            "the liar was not counted"
        );

        // This host itself is never asked; with no one else, no peers.
        let e = client(&[honest], Some(honest)).manifest(&id).await.unwrap_err();
        assert!(matches!(e, ManifestError::NoPeers), "{e:?}");
    }

    #[tokio::test]
    async fn a_peer_manifest_past_the_cap_is_refused_unread() {
        let huge = fake_peer(|mut conn| {
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", MAX_MANIFEST_BYTES + 1);
            let _ = conn.write_all(head.as_bytes());
        });
        let e = client(&[huge], None).manifest(&Digest::of(b"x")).await.unwrap_err();
        assert!(matches!(e, ManifestError::TooLarge { .. }), "{e:?}");
    }

    #[tokio::test]
    async fn a_refusing_peer_is_skipped_briefly_and_asked_again_once_it_listens() {
        // A port nothing listens on, then a peer on it.
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let c = client(&[port], None);
        let r = c.clone().get_chunk(port, ask()).await;
        assert!(r.as_ref().is_err_and(RequestError::is_refused), "{:?}", r.err());
        assert!(c.stats(port).is_down(), "a refusing peer was asked again at once");
        let listener = TcpListener::bind(port).unwrap();
        std::thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                let mut head = [0u8; 1024];
                let _ = conn.read(&mut head);
                let ok = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", CHUNK.len());
                let _ = conn.write_all(ok.as_bytes());
                let _ = conn.write_all(CHUNK);
            }
        });
        // Well before the down time of an unreachable peer (60 s here).
        std::thread::sleep(REFUSED_DOWN_FOR + Duration::from_millis(100));
        assert_eq!(c.candidates(&entry().digest), vec![port]);
        let (from, data) = c.clone().get_chunk(port, ask()).await.unwrap();
        assert_eq!((from, &plain(data)[..]), (port, CHUNK));
    }

    #[test]
    fn a_host_missing_from_its_peer_list_still_ranks_itself() {
        let me: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let others: Vec<SocketAddr> = (1..4).map(|i| SocketAddr::from(([127, 0, 0, 1], 7000 + i))).collect();
        let c = client(&others, Some(me));
        let everyone = [&others[..], &[me]].concat();
        let mut home_here = 0;
        for i in 0..200u32 {
            let d = Digest::of(&i.to_le_bytes());
            // What a peer that lists this host computes.
            let ranked = hrw::ranked(&d, &everyone, CANDIDATES);
            // Those before it as homes, then those after it (of the
            // candidates) as holders: all the candidates but itself.
            let asked: Vec<SocketAddr> = ranked.iter().copied().filter(|m| *m != me).collect();
            assert_eq!(c.candidates(&d), asked, "chunk {i}");
            home_here += usize::from(ranked[0] == me);
        }
        // The chunks its peers ask it for as home: it fetches them itself.
        assert!(home_here > 20, "home for {home_here} of 200 chunks");
    }

    #[tokio::test]
    async fn a_home_asks_the_member_after_it_only_whether_it_holds_the_chunk() {
        // Records each request's hop and serves the chunk.
        let hops = Arc::new(Mutex::new(Vec::new()));
        let seen = hops.clone();
        let other = fake_peer_with_head(move |head, mut conn| {
            let hop = head.lines().find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("x-streamblk-hop: ")
                    .map(str::to_string)
            });
            seen.lock().unwrap().push(hop);
            let _ = conn.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", CHUNK.len()).as_bytes());
            let _ = conn.write_all(CHUNK);
        });
        let d = entry().digest;
        // A host address that ranks before `other` for the chunk, and one after.
        let me_at = |first: bool| {
            (1..200u16)
                .map(|p| SocketAddr::from(([127, 0, 0, 2], 7000 + p)))
                .find(|me| (hrw::ranked(&d, &[*me, other], 2)[0] == *me) == first)
                .unwrap()
        };
        for (home_here, hop) in [(true, Some("redirected".to_string())), (false, None)] {
            let me = me_at(home_here);
            let c = client(&[me, other], Some(me));
            // Either way `other` is asked before the store...
            assert_eq!(c.candidates(&d), vec![other], "home here: {home_here}");
            let (from, data) = c
                .get(other, entry(), CHUNK.len() as u64, Class::Demand, None)
                .await
                .unwrap();
            assert_eq!((from, &plain(data)[..]), (other, CHUNK));
            // ...as a holder when this host is the home (it would not fetch
            // the chunk for this host), as the home otherwise.
            assert_eq!(hops.lock().unwrap().pop(), Some(hop), "home here: {home_here}");
        }
    }

    #[tokio::test]
    async fn a_chunk_request_names_the_image_it_is_for_when_the_fetch_knows_it() {
        // Records each request's image header and serves the chunk.
        let images = Arc::new(Mutex::new(Vec::new()));
        let seen = images.clone();
        let home = fake_peer_with_head(move |head, mut conn| {
            let image = head.lines().find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("x-streamblk-image: ")
                    .map(str::to_string)
            });
            seen.lock().unwrap().push(image);
            let _ = conn.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", CHUNK.len()).as_bytes());
            let _ = conn.write_all(CHUNK);
        });
        let id = Digest::of(b"an image's manifest");
        for (image, header) in [(Some(id), Some(id.to_hex())), (None, None)] {
            // A client each: the fake peer closes its connections.
            let c = client(&[home], None);
            let (from, _) = c
                .get(home, entry(), CHUNK.len() as u64, Class::Profile, image)
                .await
                .unwrap();
            assert_eq!(from, home);
            assert_eq!(images.lock().unwrap().pop(), Some(header), "image {image:?}");
        }
    }

    #[tokio::test]
    async fn a_busy_home_is_asked_again_not_given_up() {
        // Busy twice, then the chunk.
        let asked = Arc::new(AtomicU64::new(0));
        let n = asked.clone();
        let home = fake_peer(move |mut conn| {
            let answer = if n.fetch_add(1, Ordering::Relaxed) < 2 {
                "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n".to_string()
            } else {
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", CHUNK.len())
            };
            let _ = conn.write_all(answer.as_bytes());
            let _ = conn.write_all(if answer.contains("200") { CHUNK } else { b"" });
        });
        let c = client(&[home], None);
        let (from, data) = c.clone().get_chunk(home, ask()).await.unwrap();
        assert_eq!((from, &plain(data)[..]), (home, CHUNK));
        assert_eq!(asked.load(Ordering::Relaxed), 3);
        assert!(!c.stats(home).is_down(), "a busy home was taken for dead");

        // Busy for good: asked until the request's time is up, never marked
        // down, and said to be busy to the end (no other candidate is asked).
        let always = fake_peer(|mut conn| {
            let _ = conn.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n");
        });
        let c = client_within(&[always], None, Duration::from_millis(1500));
        let t = Instant::now();
        let r = c.clone().get_chunk(always, ask()).await;
        assert!(
            matches!(r, Err(RequestError::StillBusy { peer, .. }) if peer == always),
            "{r:?}"
        );
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "asked past the request's time"
        );
        assert!(c.stats(always).requests.load(Ordering::Relaxed) > 2);
        assert!(!c.stats(always).is_down());
    }

    /// A peer that counts its connections and answers each with `answer`.
    fn counting_peer(answer: String) -> (SocketAddr, Arc<AtomicU64>) {
        let n = Arc::new(AtomicU64::new(0));
        let count = n.clone();
        let addr = fake_peer(move |mut conn| {
            count.fetch_add(1, Ordering::Relaxed);
            let _ = conn.write_all(answer.as_bytes());
        });
        (addr, n)
    }

    #[tokio::test]
    async fn redirects_name_only_members_and_the_token_goes_to_no_one_else() {
        let ok = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{}",
            CHUNK.len(),
            String::from_utf8_lossy(CHUNK)
        );
        let (stranger, stranger_asked) = counting_peer(ok.clone());
        let (holder, holder_asked) = counting_peer(ok.clone());
        let (late_holder, late_asked) = counting_peer(ok);
        let redirect_to = |names: Vec<String>| {
            counting_peer(format!(
                "HTTP/1.1 307 Temporary Redirect
x-streamblk-holders: {}
Content-Length: 0

",
                names.join(",")
            ))
            .0
        };
        // A stranger, then a member: the member serves.
        let home = redirect_to(vec![stranger.to_string(), holder.to_string()]);
        // Many names, a member beyond what a home names: not followed.
        let mut names: Vec<String> = (1..200).map(|p| format!("127.0.0.1:{p}")).collect();
        names.push(late_holder.to_string());
        let flooding_home = redirect_to(names);
        let c = client(&[home, flooding_home, holder, late_holder], None);
        let (from, data) = c.clone().get_chunk(home, ask()).await.unwrap();
        assert_eq!((from, &plain(data)[..]), (holder, CHUNK));
        assert_eq!(holder_asked.load(Ordering::Relaxed), 1);
        assert_eq!(stranger_asked.load(Ordering::Relaxed), 0, "a non-member was asked");
        assert!(c.clone().get_chunk(flooding_home, ask()).await.is_err());
        assert_eq!(
            late_asked.load(Ordering::Relaxed),
            0,
            "more holders followed than a home names"
        );
        // Nor is a non-member asked directly.
        let r = c.request(stranger, &ask(), Hop::Home).await;
        assert!(matches!(r, Err(RequestError::NotMember { .. })), "{:?}", r.err());
        assert_eq!(stranger_asked.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn requests_to_one_peer_stay_under_its_connection_cap() {
        let (now, most) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (n, m) = (now.clone(), most.clone());
        let peer = fake_peer(move |mut conn| {
            m.fetch_max(n.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(100));
            n.fetch_sub(1, Ordering::SeqCst);
            let head = format!(
                "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
                CHUNK.len()
            );
            let _ = conn.write_all(head.as_bytes());
            let _ = conn.write_all(CHUNK);
        });
        // Budgets far over the peer's 100 ms: this is about the cap, and a
        // loaded machine that answered late would have the peer taken for
        // hung (and skipped) instead.
        let c = PeerClient::new(
            Arc::new(Token::new(b"0123456789abcdef".to_vec())),
            Arc::new(Membership::new(vec![peer], None, None).unwrap()),
            Duration::from_secs(30),
            PeerTimeouts {
                first_byte: Duration::from_secs(10),
                idle: Duration::from_secs(10),
                ..timeouts()
            },
        )
        .unwrap();
        let asks: Vec<_> = (0..3 * MAX_IN_FLIGHT)
            .map(|_| tokio::spawn(c.clone().get_chunk(peer, ask())))
            .collect();
        for a in asks {
            let r = a.await.unwrap();
            assert!(r.is_ok(), "{:?}", r.err());
        }
        let most = most.load(Ordering::SeqCst);
        assert!(most <= MAX_IN_FLIGHT as u64, "{most} requests at once");
        assert!(most > 1, "requests did not overlap at all");
    }
}
