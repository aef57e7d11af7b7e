//! A home's directory: which members hold a chunk it is home for, learnt
//! when it has sent one the chunk, or when one tells it that it verified
//! the chunk a holder sent (see `policy::served`). When its upload slots are all busy, a home redirects a
//! requester to holders instead of queueing it, so a chunk fans out over a
//! tree of hosts instead of being uploaded N-1 times by its home (design
//! (c) of the design brief). Soft state: bounded, entries expire.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::store::Digest;

/// How long a holder is believed to hold a chunk (caches evict, hosts die).
pub const HOLDER_TTL: Duration = Duration::from_secs(120);
/// Holders kept per chunk (the most recent).
const MAX_HOLDERS: usize = 8;
/// Chunks with holders kept; beyond it the directory forgets expired ones,
/// then starts afresh (soft state: requesters fall back to the home).
const MAX_CHUNKS: usize = 1 << 16;
/// Holders named in one redirect.
pub const REDIRECT_TO: usize = 3;

/// A point in time: the daemon's clock, or a simulated one.
pub trait Moment: Copy {
    /// Time from `earlier` to this moment (zero if it is later).
    fn since(self, earlier: Self) -> Duration;
}

impl Moment for Instant {
    fn since(self, earlier: Self) -> Duration {
        self.saturating_duration_since(earlier)
    }
}

/// Simulated time: the time since the simulation started.
impl Moment for Duration {
    fn since(self, earlier: Self) -> Duration {
        self.saturating_sub(earlier)
    }
}

pub struct Directory<M = Instant> {
    holders: HashMap<Digest, Vec<(SocketAddr, M)>>,
    /// Turns the pick over the holders, so that redirects spread.
    turn: usize,
}

impl<M> Default for Directory<M> {
    fn default() -> Self {
        Directory {
            holders: HashMap::new(),
            turn: 0,
        }
    }
}

impl<M: Moment> Directory<M> {
    /// `holder` has `digest` as of `now`.
    pub fn record(&mut self, digest: Digest, holder: SocketAddr, now: M) {
        if self.holders.len() >= MAX_CHUNKS && !self.holders.contains_key(&digest) {
            self.holders
                .retain(|_, v| v.iter().any(|(_, t)| now.since(*t) < HOLDER_TTL));
            if self.holders.len() >= MAX_CHUNKS {
                self.holders.clear();
            }
        }
        let v = self.holders.entry(digest).or_default();
        v.retain(|(h, t)| *h != holder && now.since(*t) < HOLDER_TTL);
        v.push((holder, now));
        if v.len() > MAX_HOLDERS {
            v.remove(0);
        }
    }

    /// Up to [`REDIRECT_TO`] live holders of `digest` other than `asker`,
    /// starting at a different one each time.
    pub fn pick(&mut self, digest: &Digest, asker: Option<SocketAddr>, now: M) -> Vec<SocketAddr> {
        let Some(v) = self.holders.get(digest) else {
            return Vec::new();
        };
        let live: Vec<SocketAddr> = v
            .iter()
            .filter(|(h, t)| Some(*h) != asker && now.since(*t) < HOLDER_TTL)
            .map(|(h, _)| *h)
            .collect();
        if live.is_empty() {
            return live;
        }
        self.turn = self.turn.wrapping_add(1);
        let start = self.turn % live.len();
        live.iter()
            .cycle()
            .skip(start)
            .take(live.len().min(REDIRECT_TO))
            .copied()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(i: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 7000 + i))
    }

    #[test]
    fn holders_are_named_in_turn_never_to_themselves_and_expire() {
        let mut d: Directory = Directory::default();
        let c = Digest::of(b"c");
        let t0 = Instant::now();
        assert!(d.pick(&c, None, t0).is_empty());
        for i in 0..5 {
            d.record(c, addr(i), t0);
        }
        d.record(c, addr(0), t0);
        let firsts: std::collections::HashSet<SocketAddr> = (0..10).map(|_| d.pick(&c, None, t0)[0]).collect();
        assert_eq!(firsts.len(), 5, "redirects always start at the same holders");
        for _ in 0..10 {
            let p = d.pick(&c, Some(addr(2)), t0);
            assert_eq!(p.len(), REDIRECT_TO);
            assert!(!p.contains(&addr(2)), "a requester was sent to itself");
        }
        assert!(d.pick(&c, None, t0 + HOLDER_TTL).is_empty(), "holders never expire");
        for i in 0..20 {
            d.record(c, addr(100 + i), t0);
        }
        assert_eq!(d.holders[&c].len(), MAX_HOLDERS);
    }
}
