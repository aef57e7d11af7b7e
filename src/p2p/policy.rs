//! The P2P decisions, as pure functions and state machines: which members
//! a requester asks for a chunk and in what order, what a home does with a
//! request (redirect it to holders, serve it, fetch the chunk once, or say
//! it is not here), and what a requester does with each answer (follow a
//! redirect least loaded first, ask a busy home again after a pause, give
//! up on a home that cannot be reached). Inputs are the membership, the
//! digest, a clock and what was counted; outputs are actions. The server
//! and client carry them out over HTTP; the simulator (`sim`) carries out
//! the very same ones over simulated links, so what it reports is about
//! this code. Nothing here does I/O, sleeps or reads the time.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::directory::Directory;
pub use super::directory::Moment;
use crate::fetch::Class;
use crate::store::{Digest, ImageId};

/// Members examined per chunk: its home and two failover candidates.
pub const CANDIDATES: usize = 3;
/// The first pause before asking a busy home again, doubled up to the last.
pub const BUSY_PAUSE: Duration = Duration::from_millis(50);
pub const BUSY_PAUSE_MAX: Duration = Duration::from_millis(800);

/// How far a request has gone (see [`super::HEADER_HOP`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hop {
    /// To the chunk's home: it may fetch the chunk, or redirect.
    Home,
    /// To a holder the home named: only a chunk held is served.
    Redirected,
    /// To the home again, the holders having failed: it serves or queues.
    Direct,
}

impl Hop {
    pub fn name(self) -> Option<&'static str> {
        match self {
            Hop::Home => None,
            Hop::Redirected => Some("redirected"),
            Hop::Direct => Some("direct"),
        }
    }
}

/// The peers a host asks for a chunk, best first, from the chunk's
/// members ranked by HRW (`hrw::ranked`, home first): up to this host,
/// which fetches from the store itself when it comes first (it is the
/// acting home); members `skip` says are down or bad for the chunk are
/// passed over, so the next one acts as home. Empty: the store.
pub fn candidates(ranked: &[SocketAddr], me: Option<SocketAddr>, skip: impl Fn(SocketAddr) -> bool) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for &m in ranked {
        if Some(m) == me {
            break;
        }
        if skip(m) {
            continue;
        }
        out.push(m);
    }
    out
}

/// The members of `ranked` after `me` (if it ranks there) that `skip` does
/// not rule out, asked only whether they hold the chunk before this host,
/// its acting home, fetches it: one of them acted as home while this host
/// was away (not yet started, restarting, taken for down), the first that
/// was up then, which need not be the next (hosts join a fleet together).
pub fn holders_after(ranked: &[SocketAddr], me: SocketAddr, skip: impl Fn(SocketAddr) -> bool) -> Vec<SocketAddr> {
    ranked
        .iter()
        .copied()
        .skip_while(|a| *a != me)
        .skip(1)
        .filter(|a| !skip(*a))
        .collect()
}

/// A server's load, as its redirects and its answers' queue depth count
/// it: the chunk requests it is handling, each from its arrival until its
/// guard drops, which an answer with a chunk holds until the chunk's last
/// byte is sent (the server's upload body holds it), not only until the
/// answer's head is out: a home whose slots are all uploading redirects
/// the next request, instead of taking it as if idle.
#[derive(Debug, Default)]
pub struct Load(Arc<AtomicU64>);

/// One request counted in a [`Load`] until dropped.
#[derive(Debug)]
pub struct LoadGuard(Arc<AtomicU64>);

impl Load {
    /// A request arrives: the requests before it (what [`redirect`]
    /// takes as `before`), and its guard.
    pub fn arrive(&self) -> (u64, LoadGuard) {
        let before = self.0.fetch_add(1, Ordering::Relaxed);
        (before, LoadGuard(self.0.clone()))
    }

    /// Requests counted now.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A home's answer to a request on its arrival: the holders to redirect
/// it to, or None to take it (serve, fetch or queue). Only a request that
/// came to the home as such (`Hop::Home`) and found at least as many
/// requests `before` it as there are upload `slots` is redirected, and
/// only if the directory knows a live holder other than the asker.
pub fn redirect<M: Moment>(
    directory: &mut Directory<M>,
    digest: &Digest,
    hop: Hop,
    from: Option<SocketAddr>,
    before: u64,
    slots: usize,
    now: M,
) -> Option<Vec<SocketAddr>> {
    if hop != Hop::Home || before < slots as u64 {
        return None;
    }
    let holders = directory.pick(digest, from, now);
    (!holders.is_empty()).then_some(holders)
}

/// Where a server gets a chunk it took a request for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// It holds it: serve it.
    Held,
    /// Fetch it (single flight: join the fetch under way, if any), then serve it.
    Fetch,
    /// Not here: 404.
    NotHere,
}

/// A server that does not hold a chunk fetches it for a requester that
/// asked it as a home (once more when directed back), never for one a home
/// redirected to it: a holder that is not one yet says so, and the
/// requester asks the next holder, so a redirect never costs a store fetch.
pub fn source(held: bool, hop: Hop, can_fetch: bool) -> Source {
    match (held, hop, can_fetch) {
        (true, _, _) => Source::Held,
        (false, Hop::Redirected, _) | (false, _, false) => Source::NotHere,
        (false, _, true) => Source::Fetch,
    }
}

/// The class a home fetches a requester's chunk at: the requester's, but a
/// peer's background fill at profile class. The requester's own fill rate
/// paced that request; the home's (0 with its fill off, or throttled while
/// its own guests boot) is for its own fill, and would hold the peer's
/// request until it timed out (and the peer went to the store). Demand
/// still overtakes it.
pub fn home_fetch_class(asked: Class) -> Class {
    match asked {
        Class::Background => Class::Profile,
        c => c,
    }
}

/// The server has sent a chunk's last byte to `from`, or `from` told it
/// that it verified the chunk ([`announce_to`]): the home names it to
/// later requesters. Not when the upload starts: a member named while it
/// is still receiving answers a redirected request 404 (it never fetches
/// for one), and the requester goes on to the next holder, then back to
/// the home. Members only.
pub fn served<M: Moment>(
    directory: &mut Directory<M>,
    digest: Digest,
    from: Option<SocketAddr>,
    is_member: bool,
    now: M,
) {
    if let (Some(from), true) = (from, is_member) {
        directory.record(digest, from, now);
    }
}

/// A requester verified a chunk it asked `asked` (its acting home) for and
/// got from `sender`: the home to tell that this host holds it now, if the
/// home did not send it itself (a holder it redirected to did). Else a
/// home would know only the members it served, and a chunk could fan out
/// only one level below them.
pub fn announce_to(asked: SocketAddr, sender: SocketAddr) -> Option<SocketAddr> {
    (asked != sender).then_some(asked)
}

/// How long a home remembers that it prefetched an image's profile: a
/// storm of one image is answered by one prefetch; a storm hours later
/// (whose chunks the cache may have evicted) by another.
pub const PREFETCH_MEMORY: Duration = Duration::from_secs(600);
/// Images remembered at most; beyond it the expired go, then the oldest.
pub const PREFETCH_IMAGES: usize = 1024;
/// Chunks a home's profile prefetch wants at a time: the scheduler's
/// low-class slots and rate decide how fast they come; this only bounds
/// how many sit in its queue ahead of the host's own profile stream.
pub const PREFETCH_WINDOW: usize = 8;

/// Whether a request may start a home's profile prefetch: a profile-class
/// request that names its image and came to this host as a home (a holder
/// a home redirected to, or that a home asks whether it holds a chunk, is
/// not the chunks' home).
pub fn starts_prefetch(class: Class, hop: Hop, image: Option<ImageId>) -> Option<ImageId> {
    image.filter(|_| class == Class::Profile && hop != Hop::Redirected)
}

/// The images a home prefetched the profile of lately: soft state,
/// bounded, entries expire.
#[derive(Debug)]
pub struct Prefetched<M = Instant> {
    seen: HashMap<ImageId, M>,
}

impl<M> Default for Prefetched<M> {
    fn default() -> Self {
        Prefetched { seen: HashMap::new() }
    }
}

impl<M: Moment> Prefetched<M> {
    /// Notes a prefetch of image `id` at `now`: true if none was noted in
    /// the last [`PREFETCH_MEMORY`] (the caller prefetches then).
    pub fn first(&mut self, id: ImageId, now: M) -> bool {
        if self.seen.get(&id).is_some_and(|t| now.since(*t) < PREFETCH_MEMORY) {
            return false;
        }
        if self.seen.len() >= PREFETCH_IMAGES && !self.seen.contains_key(&id) {
            self.seen.retain(|_, t| now.since(*t) < PREFETCH_MEMORY);
            if self.seen.len() >= PREFETCH_IMAGES {
                if let Some(oldest) = self.seen.iter().max_by_key(|(_, t)| now.since(**t)).map(|(k, _)| *k) {
                    self.seen.remove(&oldest);
                }
            }
        }
        self.seen.insert(id, now);
        true
    }
}

/// The chunks of a boot profile (chunk indices, in profile order) that a
/// home prefetches: those `digest` gives a digest (not all zeros) that
/// `is_home` says this host is home for, in profile order, each digest once.
pub fn home_profile_chunks(
    profile: &[u32],
    digest: impl Fn(u32) -> Option<Digest>,
    is_home: impl Fn(&Digest) -> bool,
) -> Vec<u32> {
    let mut seen = std::collections::HashSet::new();
    profile
        .iter()
        .copied()
        .filter(|&c| digest(c).is_some_and(|d| is_home(&d) && seen.insert(d)))
        .collect()
}

/// What a peer answered, as the requester's decisions need it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// The chunk's bytes (checked by the caller afterwards).
    Chunk,
    /// A home named holders (only heeded on `Hop::Home`).
    Redirect(Vec<SocketAddr>),
    /// 503: alive, busy or still fetching.
    Busy,
    /// Anything else: unreachable, 404, a bad answer.
    Failed,
}

/// What the requester does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Ask `peer` with `hop`, after a pause of `after`.
    Ask {
        peer: SocketAddr,
        hop: Hop,
        after: Duration,
    },
    /// `peer` sent the chunk.
    Got(SocketAddr),
    /// This candidate could not be reached or refused: the next
    /// candidate, or the store.
    GiveUp,
    /// The home answered busy until the time for peers was up: it is
    /// alive and will have the chunk, and the next candidate would fetch
    /// it from the store a second time, so none is asked: the store.
    Store,
}

/// One requester asking one candidate (its acting home) for a chunk: the
/// home; if it redirects, the holders it names (not this host, not the
/// home, none `skip` rules out; least loaded first by the queue depth
/// their last answers gave, ties in the home's order), then the home
/// again, told not to redirect. A busy home is asked again, as its home
/// (it may redirect by then, having learnt holders), after a pause
/// (50 ms, doubling to 800 ms) while time is left (the fetch's, not one
/// request's): a busy home is alive and will have the chunk, and the next
/// candidate would fetch it from the store a second time; if it is still
/// busy when time is up, the store ([`Step::Store`]), not the next
/// candidate. Only a home that fails otherwise (unreachable, hung, or an
/// answer that is neither the chunk, a redirect nor busy) is given up for
/// the next candidate.
#[derive(Clone, Debug)]
pub struct Requester {
    home: SocketAddr,
    me: Option<SocketAddr>,
    /// Holders not asked yet, in the order to ask them.
    holders: Vec<SocketAddr>,
    pause: Duration,
}

impl Requester {
    /// The requester and its first step (ask the home).
    pub fn new(home: SocketAddr, me: Option<SocketAddr>) -> (Requester, Step) {
        let r = Requester {
            home,
            me,
            holders: Vec::new(),
            pause: BUSY_PAUSE,
        };
        let first = Step::Ask {
            peer: home,
            hop: Hop::Home,
            after: Duration::ZERO,
        };
        (r, first)
    }

    /// The next step after `peer`, asked with `hop`, answered `reply`.
    /// `time_left`: until the fetch's time for peers is up (busy homes are
    /// asked again only within it). `queue`: a peer's queue depth at its
    /// last answer. `skip`: a peer down or bad for the chunk.
    pub fn on_reply(
        &mut self,
        peer: SocketAddr,
        hop: Hop,
        reply: Reply,
        time_left: Duration,
        queue: impl Fn(SocketAddr) -> u64,
        skip: impl Fn(SocketAddr) -> bool,
    ) -> Step {
        match (hop, reply) {
            (_, Reply::Chunk) => Step::Got(peer),
            (Hop::Home | Hop::Direct, Reply::Busy) if self.pause < time_left => {
                let after = self.pause;
                self.pause = (self.pause * 2).min(BUSY_PAUSE_MAX);
                // As its home again, even after holders failed: by then it
                // may know holders to send this host to, and a request
                // told not to redirect would only queue at a busy home.
                Step::Ask {
                    peer,
                    hop: Hop::Home,
                    after,
                }
            }
            (Hop::Home | Hop::Direct, Reply::Busy) => Step::Store,
            (Hop::Home, Reply::Redirect(mut holders)) => {
                // Stable: the home's turn order among equals.
                holders.sort_by_key(|h| queue(*h));
                holders.reverse();
                self.holders = holders;
                self.next_holder(skip)
            }
            (Hop::Redirected, _) => self.next_holder(skip),
            (Hop::Home | Hop::Direct, _) => Step::GiveUp,
        }
    }

    /// The next holder worth asking, or the home again (direct).
    fn next_holder(&mut self, skip: impl Fn(SocketAddr) -> bool) -> Step {
        while let Some(h) = self.holders.pop() {
            if Some(h) == self.me || h == self.home || skip(h) {
                continue;
            }
            return Step::Ask {
                peer: h,
                hop: Hop::Redirected,
                after: Duration::ZERO,
            };
        }
        self.pause = BUSY_PAUSE;
        Step::Ask {
            peer: self.home,
            hop: Hop::Direct,
            after: Duration::ZERO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::p2p::hrw;

    fn addr(i: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], 7000 + i))
    }

    const LONG: Duration = Duration::from_secs(6);

    #[test]
    fn a_home_asks_every_candidate_after_it_whether_it_holds_the_chunk_not_only_the_next() {
        let ranked = [addr(3), addr(1), addr(4), addr(2)];
        // The home's stand-in was the first of those after it that was up:
        // with the next one away too, the one after that.
        assert_eq!(holders_after(&ranked, addr(1), |_| false), vec![addr(4), addr(2)]);
        assert_eq!(holders_after(&ranked, addr(1), |m| m == addr(4)), vec![addr(2)]);
        assert_eq!(holders_after(&ranked, addr(2), |_| false), vec![]);
        // Not a candidate: no holder to ask.
        assert_eq!(holders_after(&ranked, addr(9), |_| false), vec![]);
    }

    #[test]
    fn candidates_stop_at_this_host_and_pass_over_skipped_members() {
        let members: Vec<SocketAddr> = (0..10).map(addr).collect();
        let d = Digest::of(b"chunk");
        let ranked = hrw::ranked(&d, &members, CANDIDATES);
        assert_eq!(candidates(&ranked, None, |_| false), ranked);
        // This host second: only the home is asked; first: the store.
        assert_eq!(candidates(&ranked, Some(ranked[1]), |_| false), vec![ranked[0]]);
        assert!(candidates(&ranked, Some(ranked[0]), |_| false).is_empty());
        // The home down: the next candidate acts as home.
        assert_eq!(candidates(&ranked, None, |m| m == ranked[0]), ranked[1..].to_vec());
        assert!(candidates(&ranked, Some(ranked[1]), |m| m == ranked[0]).is_empty());
    }

    #[test]
    fn a_home_redirects_only_home_requests_beyond_its_slots_and_only_to_known_holders() {
        let mut dir: Directory<Duration> = Directory::default();
        let d = Digest::of(b"c");
        let t = Duration::from_secs(1);
        assert_eq!(
            redirect(&mut dir, &d, Hop::Home, Some(addr(9)), 10, 4, t),
            None,
            "no holders known"
        );
        served(&mut dir, d, Some(addr(1)), true, t);
        served(&mut dir, d, Some(addr(2)), false, t);
        assert_eq!(
            redirect(&mut dir, &d, Hop::Home, Some(addr(9)), 3, 4, t),
            None,
            "redirected with a slot free"
        );
        assert_eq!(
            redirect(&mut dir, &d, Hop::Home, Some(addr(9)), 4, 4, t),
            Some(vec![addr(1)]),
            "a non-member was recorded"
        );
        for hop in [Hop::Direct, Hop::Redirected] {
            assert_eq!(
                redirect(&mut dir, &d, hop, Some(addr(9)), 100, 4, t),
                None,
                "{hop:?} redirected"
            );
        }
        assert_eq!(
            redirect(&mut dir, &d, Hop::Home, Some(addr(1)), 100, 4, t),
            None,
            "sent to itself"
        );
    }

    #[test]
    fn a_chunk_from_a_holder_is_announced_to_the_home_asked_not_one_from_the_home() {
        let (home, holder) = (addr(0), addr(1));
        assert_eq!(announce_to(home, holder), Some(home));
        assert_eq!(announce_to(home, home), None, "the home that sent it was told");
    }

    #[test]
    fn a_server_fetches_only_for_a_home_request_never_for_a_redirected_one() {
        assert_eq!(source(true, Hop::Redirected, false), Source::Held);
        assert_eq!(source(false, Hop::Redirected, true), Source::NotHere);
        assert_eq!(source(false, Hop::Home, true), Source::Fetch);
        assert_eq!(source(false, Hop::Direct, true), Source::Fetch);
        assert_eq!(source(false, Hop::Home, false), Source::NotHere);
    }

    #[test]
    fn a_redirect_is_followed_least_loaded_first_skipping_self_home_and_bad_then_home_direct() {
        let (home, me) = (addr(0), addr(9));
        let (mut r, first) = Requester::new(home, Some(me));
        assert_eq!(
            first,
            Step::Ask {
                peer: home,
                hop: Hop::Home,
                after: Duration::ZERO
            }
        );
        let queue = |h: SocketAddr| match h.port() - 7000 {
            1 => 5,
            2 => 0,
            3 => 2,
            _ => 1,
        };
        let skip = |h: SocketAddr| h == addr(4);
        let named = vec![addr(1), me, addr(4), addr(3), home, addr(2)];
        let ask = |h| Step::Ask {
            peer: h,
            hop: Hop::Redirected,
            after: Duration::ZERO,
        };
        assert_eq!(
            r.on_reply(home, Hop::Home, Reply::Redirect(named), LONG, queue, skip),
            ask(addr(2))
        );
        assert_eq!(
            r.on_reply(addr(2), Hop::Redirected, Reply::Failed, LONG, queue, skip),
            ask(addr(3))
        );
        assert_eq!(
            r.on_reply(addr(3), Hop::Redirected, Reply::Busy, LONG, queue, skip),
            ask(addr(1))
        );
        let direct = Step::Ask {
            peer: home,
            hop: Hop::Direct,
            after: Duration::ZERO,
        };
        assert_eq!(
            r.on_reply(addr(1), Hop::Redirected, Reply::Failed, LONG, queue, skip),
            direct
        );
        assert_eq!(
            r.on_reply(home, Hop::Direct, Reply::Chunk, LONG, queue, skip),
            Step::Got(home)
        );
        // A direct request is not redirected again.
        let (mut r, _) = Requester::new(home, Some(me));
        r.on_reply(home, Hop::Home, Reply::Redirect(vec![]), LONG, queue, skip);
        assert_eq!(
            r.on_reply(home, Hop::Direct, Reply::Redirect(vec![addr(1)]), LONG, queue, skip),
            Step::GiveUp
        );
    }

    #[test]
    fn a_busy_home_is_asked_again_with_doubling_pauses_while_time_is_left_never_given_up_early() {
        let home = addr(0);
        let (mut r, _) = Requester::new(home, None);
        let mut pauses = Vec::new();
        while let Step::Ask {
            after, hop: Hop::Home, ..
        } = r.on_reply(home, Hop::Home, Reply::Busy, LONG, |_| 0, |_| false)
        {
            pauses.push(after.as_millis());
            if pauses.len() == 7 {
                break;
            }
        }
        assert_eq!(pauses, [50, 100, 200, 400, 800, 800, 800]);
        assert_eq!(
            r.on_reply(
                home,
                Hop::Home,
                Reply::Busy,
                Duration::from_millis(100),
                |_| 0,
                |_| false
            ),
            Step::Store,
            "a home busy to the end was failed over to the next candidate"
        );
        let (mut r, _) = Requester::new(home, None);
        assert_eq!(
            r.on_reply(home, Hop::Home, Reply::Failed, LONG, |_| 0, |_| false),
            Step::GiveUp,
            "an unreachable home was asked again"
        );
    }

    #[test]
    fn a_busy_home_is_asked_again_as_home_and_busy_until_time_is_up_sends_the_fetch_to_the_store() {
        let home = addr(0);
        for hop in [Hop::Home, Hop::Direct] {
            let (mut r, _) = Requester::new(home, None);
            if hop == Hop::Direct {
                r.on_reply(home, Hop::Home, Reply::Redirect(vec![]), LONG, |_| 0, |_| false);
            }
            // Asked again as its home, even after holders failed: by then
            // it may redirect to holders rather than queue this request.
            assert!(
                matches!(
                    r.on_reply(home, hop, Reply::Busy, LONG, |_| 0, |_| false),
                    Step::Ask { peer, hop: Hop::Home, .. } if peer == home
                ),
                "{hop:?}: a busy home with time left was not asked again as home"
            );
            assert_eq!(
                r.on_reply(home, hop, Reply::Busy, Duration::ZERO, |_| 0, |_| false),
                Step::Store,
                "{hop:?}: a home busy to the end was failed over to the next candidate"
            );
        }
        // Unreachable (or any other failure): the next candidate.
        let (mut r, _) = Requester::new(home, None);
        assert_eq!(
            r.on_reply(home, Hop::Home, Reply::Failed, LONG, |_| 0, |_| false),
            Step::GiveUp
        );
    }

    #[test]
    fn a_request_stays_in_the_load_until_its_upload_guard_drops_so_the_next_is_redirected() {
        let mut dir: Directory<Duration> = Directory::default();
        let d = Digest::of(b"c");
        let t = Duration::from_secs(1);
        served(&mut dir, d, Some(addr(1)), true, t);
        let load = Load::default();
        // One slot: the first request is taken.
        let (before, first) = load.arrive();
        assert_eq!(redirect(&mut dir, &d, Hop::Home, Some(addr(9)), before, 1, t), None);
        // Its answer's head is out; its body (holding the guard) is not.
        struct Body(#[allow(dead_code)] LoadGuard);
        let body = Body(first);
        let (before, second) = load.arrive();
        assert_eq!(
            redirect(&mut dir, &d, Hop::Home, Some(addr(9)), before, 1, t),
            Some(vec![addr(1)]),
            "a home uploading on its only slot took another request"
        );
        drop(second);
        assert_eq!(load.get(), 1);
        drop(body);
        assert_eq!(load.get(), 0);
        let (before, _third) = load.arrive();
        assert_eq!(redirect(&mut dir, &d, Hop::Home, Some(addr(9)), before, 1, t), None);
    }

    #[test]
    fn only_a_profile_request_to_a_home_that_names_its_image_starts_a_prefetch() {
        let id = Some(Digest::of(b"image"));
        assert_eq!(starts_prefetch(Class::Profile, Hop::Home, id), id);
        assert_eq!(starts_prefetch(Class::Profile, Hop::Direct, id), id);
        assert_eq!(
            starts_prefetch(Class::Profile, Hop::Redirected, id),
            None,
            "a holder prefetched"
        );
        assert_eq!(starts_prefetch(Class::Demand, Hop::Home, id), None);
        assert_eq!(starts_prefetch(Class::Background, Hop::Home, id), None);
        assert_eq!(starts_prefetch(Class::Profile, Hop::Home, None), None);
    }

    #[test]
    fn an_image_is_prefetched_once_while_remembered_and_memory_is_bounded() {
        let mut p: Prefetched<Duration> = Prefetched::default();
        let id = |i: u32| Digest::of(&i.to_le_bytes());
        let t = Duration::from_secs(1);
        assert!(p.first(id(0), t));
        assert!(!p.first(id(0), t + PREFETCH_MEMORY / 2), "prefetched twice in a storm");
        assert!(p.first(id(0), t + PREFETCH_MEMORY), "remembered for ever");
        // Past the cap the oldest goes, and the map stays bounded.
        let t2 = t + PREFETCH_MEMORY;
        for i in 1..=PREFETCH_IMAGES as u32 {
            assert!(p.first(id(i), t2 + Duration::from_millis(u64::from(i))));
        }
        assert!(p.seen.len() <= PREFETCH_IMAGES);
        assert!(
            p.first(id(0), t2 + Duration::from_secs(2)),
            "the oldest was kept past the cap"
        );
        assert!(!p.first(id(PREFETCH_IMAGES as u32), t2 + Duration::from_secs(2)));
    }

    #[test]
    fn a_home_prefetches_the_profile_chunks_it_is_home_for_in_order_each_once() {
        let members: Vec<SocketAddr> = (0..4).map(addr).collect();
        let me = members[2];
        // Chunk i has digest d(i % 6); chunk 3 is all zeros.
        let d = |i: u32| Digest::of(&(i % 6).to_le_bytes());
        let digest = |i: u32| (i != 3).then(|| d(i));
        let is_home = |x: &Digest| hrw::ranked(x, &members, 1)[0] == me;
        let profile = [9, 3, 0, 4, 1, 6, 2, 5, 7, 8];
        let got = home_profile_chunks(&profile, digest, is_home);
        let mut want = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for &c in &profile {
            if c != 3 && is_home(&d(c)) && seen.insert(d(c)) {
                want.push(c);
            }
        }
        assert_eq!(got, want);
        assert!(!got.is_empty() && got.len() < 6, "{got:?}: pick another host");
        assert!(!got.contains(&3), "an all-zero chunk was prefetched");
        assert_eq!(home_profile_chunks(&profile, digest, |_| false), Vec::<u32>::new());
    }
}
