//! Rendezvous (highest random weight) hashing: the home of a chunk is the
//! member with the highest score for (digest, member); the next ones are
//! its failover candidates. Pure functions: every host that has the same
//! membership list computes the same homes, with no coordination, and a
//! member leaving moves only the chunks it was home for.
//!
//! With zones, a chunk's candidates are ranked among the members of the
//! requester's zone, and the zone's home asks the chunk's global home (the
//! top member of the whole fleet) before the store, so a chunk crosses
//! zones about once. The global home is the top member of its own zone
//! too (scores do not depend on the zone), so it fetches from the store.

use std::net::SocketAddr;

use crate::store::Digest;

/// The score of `member` for a chunk: the first 8 bytes of
/// blake3(digest || member as text), so that every host agrees.
pub fn score(digest: &Digest, member: &SocketAddr) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(&digest.0);
    h.update(member.to_string().as_bytes());
    let out = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&out.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// The first `n` members ranked for `digest`, home first. Ties (never seen
/// in practice) go to the smaller address, so the order is total.
pub fn ranked(digest: &Digest, members: &[SocketAddr], n: usize) -> Vec<SocketAddr> {
    let mut scored: Vec<(u64, SocketAddr)> = members.iter().map(|m| (score(digest, m), *m)).collect();
    scored.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    scored.into_iter().take(n).map(|(_, m)| m).collect()
}

/// Whether `me` is the home of `digest` in its zone (`zone_of(me)`; no
/// zone is a zone of its own): it ranks first among the members of its
/// zone, as [`ranked`] and [`candidates`] rank them, whether or not
/// `members` lists it. Without zones: the top member of the fleet. Pure
/// placement, taking no member for down.
pub fn is_zone_home<'a>(
    digest: &Digest,
    members: &[SocketAddr],
    me: SocketAddr,
    zone_of: impl Fn(&SocketAddr) -> Option<&'a str>,
) -> bool {
    let my_zone = zone_of(&me);
    let mine = score(digest, &me);
    // Ties go to the smaller address, as in `ranked`.
    members
        .iter()
        .filter(|m| **m != me && zone_of(m) == my_zone)
        .all(|m| (score(digest, m), std::cmp::Reverse(*m)) < (mine, std::cmp::Reverse(me)))
}

/// Whom a host asks for a chunk, in order, before the store: the top `n`
/// members of its zone (`zone_of(me)`; no zone is a zone of its own) that
/// are `usable`, up to itself; and if it is its zone's acting home (it
/// came first among the usable), the top `n` of the whole fleet outside
/// its zone, up to itself: the global home and its failover candidates.
/// An empty answer: this host fetches from the store. `members` should
/// hold `me`; when no member shares the host's zone it asks the fleet's.
/// Without zones this is the top `n` members up to this host.
pub fn candidates<'a>(
    digest: &Digest,
    members: &[SocketAddr],
    me: Option<SocketAddr>,
    zone_of: impl Fn(&SocketAddr) -> Option<&'a str>,
    usable: impl Fn(&SocketAddr) -> bool,
    n: usize,
) -> Vec<SocketAddr> {
    let my_zone = match me {
        Some(me) => zone_of(&me),
        None => None,
    };
    let zone: Vec<SocketAddr> = members.iter().copied().filter(|m| zone_of(m) == my_zone).collect();
    let in_zone = ranked(digest, &zone, n);
    let mut out = super::policy::candidates(&in_zone, me, |m| !usable(&m));
    // Acting home of the zone only if no one usable comes before it.
    let zone_home = zone.is_empty() || (me.is_some_and(|me| in_zone.contains(&me)) && out.is_empty());
    if zone_home {
        for m in ranked(digest, members, n) {
            if Some(m) == me {
                break;
            }
            if zone_of(&m) != my_zone && usable(&m) {
                out.push(m);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// The home of `digest`: the top-ranked member.
    fn home(digest: &Digest, members: &[SocketAddr]) -> Option<SocketAddr> {
        ranked(digest, members, 1).first().copied()
    }

    fn members(n: u16) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| format!("10.0.{}.{}:7000", i / 200, i % 200 + 1).parse().unwrap())
            .collect()
    }

    fn digests(n: u32) -> Vec<Digest> {
        (0..n).map(|i| Digest::of(&i.to_le_bytes())).collect()
    }

    #[test]
    fn homes_are_spread_evenly_over_the_members() {
        for n in [3u16, 8, 50] {
            let m = members(n);
            let chunks = 20_000;
            let mut load: HashMap<SocketAddr, u32> = HashMap::new();
            for d in digests(chunks) {
                *load.entry(home(&d, &m).unwrap()).or_default() += 1;
            }
            assert_eq!(load.len(), n as usize, "a member is home for nothing");
            let mean = chunks as f64 / n as f64;
            for (member, &l) in &load {
                let off = (l as f64 - mean).abs() / mean;
                // 400 chunks a member at n = 50: 3 standard deviations is 15%.
                assert!(off < 0.2, "n={n}: {member} is home for {l} chunks, mean {mean}");
            }
        }
    }

    #[test]
    fn a_member_leaving_moves_only_its_own_chunks() {
        let m = members(10);
        let gone = m[3];
        let rest: Vec<SocketAddr> = m.iter().copied().filter(|a| *a != gone).collect();
        let mut moved = 0;
        for d in digests(10_000) {
            let before = home(&d, &m).unwrap();
            let after = home(&d, &rest).unwrap();
            if before == gone {
                moved += 1;
                // Its chunks go to what was their second candidate.
                assert_eq!(after, ranked(&d, &m, 2)[1]);
            } else {
                assert_eq!(before, after, "a chunk moved between members that stayed");
            }
        }
        assert!(
            (800..1200).contains(&moved),
            "{moved} of 10000 chunks had the leaver as home"
        );
        // And a member joining takes chunks only for itself.
        let new: SocketAddr = "10.9.9.9:7000".parse().unwrap();
        let more: Vec<SocketAddr> = m.iter().copied().chain([new]).collect();
        for d in digests(2_000) {
            let after = home(&d, &more).unwrap();
            assert!(after == new || after == home(&d, &m).unwrap());
        }
    }

    #[test]
    fn ranking_is_total_and_agrees_with_home_and_the_order_of_the_list() {
        let m = members(7);
        let mut shuffled = m.clone();
        shuffled.reverse();
        for d in digests(500) {
            let r = ranked(&d, &m, 7);
            assert_eq!(r.len(), 7);
            assert_eq!(Some(r[0]), home(&d, &m));
            assert_eq!(r, ranked(&d, &shuffled, 7), "the ranking depends on the list's order");
            assert_eq!(ranked(&d, &m, 3), r[..3]);
        }
        assert_eq!(home(&Digest::of(b"x"), &[]), None);
        assert!(ranked(&Digest::of(b"x"), &[], 3).is_empty());
    }

    /// Zones a, b, c of 12 members each; the zone of a member by its address.
    fn zoned() -> (Vec<SocketAddr>, impl Fn(&SocketAddr) -> Option<&'static str> + Copy) {
        let zone_of = |m: &SocketAddr| match m {
            SocketAddr::V4(v4) => Some(["a", "b", "c"][usize::from(v4.ip().octets()[2] % 3)]),
            SocketAddr::V6(_) => None,
        };
        let m = (0..36u8).map(|i| SocketAddr::from(([10, 0, i, 1], 7000))).collect();
        (m, zone_of)
    }

    #[test]
    fn without_zones_the_candidates_are_the_top_members_up_to_this_host() {
        let m = members(8);
        let no_zone = |_: &SocketAddr| None;
        for d in digests(500) {
            let r = ranked(&d, &m, 3);
            for me in [m[0], m[5]] {
                let want: Vec<SocketAddr> = r.iter().copied().take_while(|x| *x != me).collect();
                assert_eq!(candidates(&d, &m, Some(me), no_zone, |_| true, 3), want);
            }
            assert_eq!(candidates(&d, &m, None, no_zone, |_| true, 3), r);
            let usable = |x: &SocketAddr| *x != r[0];
            let skip_home: Vec<SocketAddr> = r.iter().copied().take_while(|x| *x != m[0]).filter(usable).collect();
            assert_eq!(candidates(&d, &m, Some(m[0]), no_zone, usable, 3), skip_home);
        }
    }

    #[test]
    fn a_chunks_zone_home_is_in_the_zone_and_only_zone_homes_ask_the_one_global_home() {
        let (m, zone_of) = zoned();
        let mut crossings = 0;
        for d in digests(300) {
            let global = ranked(&d, &m, 1)[0];
            let mut asked_across = std::collections::HashSet::new();
            for &me in &m {
                let c = candidates(&d, &m, Some(me), zone_of, |_| true, 3);
                if me == global {
                    assert!(c.is_empty(), "the global home asked {c:?} before the store");
                    continue;
                }
                let first = c
                    .first()
                    .copied()
                    .expect("a host that is not the global home asks someone");
                let zone_home = ranked(
                    &d,
                    &m.iter()
                        .copied()
                        .filter(|x| zone_of(x) == zone_of(&me))
                        .collect::<Vec<_>>(),
                    1,
                )[0];
                if me == zone_home {
                    // The zone's home asks the global home, in another zone.
                    // (then the global home's failover candidates).
                    assert_eq!(first, global, "zone home {me}");
                    assert!(
                        c.iter().all(|x| zone_of(x) != zone_of(&me)),
                        "{me} asks its own zone: {c:?}"
                    );
                    asked_across.insert(zone_of(&me));
                } else {
                    assert_eq!(first, zone_home, "{me} asks another than its zone's home");
                    assert!(
                        c.iter().all(|x| zone_of(x) == zone_of(&me)),
                        "{me} asks out of its zone: {c:?}"
                    );
                }
            }
            // One host per other zone crosses to the global home: two.
            assert_eq!(asked_across.len(), 2);
            crossings += asked_across.len();
        }
        assert_eq!(crossings, 600);
    }

    #[test]
    fn a_member_leaving_a_zone_moves_only_the_chunks_it_was_home_for() {
        let (m, zone_of) = zoned();
        let gone = m[4];
        let rest: Vec<SocketAddr> = m.iter().copied().filter(|a| *a != gone).collect();
        let me = m[7]; // same zone as m[4] (7 % 3 == 4 % 3)
        assert_eq!(zone_of(&me), zone_of(&gone));
        let mut moved = 0;
        for d in digests(3_000) {
            let before = candidates(&d, &m, Some(me), zone_of, |_| true, 3);
            let after = candidates(&d, &rest, Some(me), zone_of, |_| true, 3);
            let global_before = ranked(&d, &m, 1)[0];
            if global_before != gone {
                assert_eq!(ranked(&d, &rest, 1)[0], global_before, "a global home moved");
            }
            if before.first() == Some(&gone) {
                moved += 1;
            } else {
                assert_eq!(
                    before.first(),
                    after.first(),
                    "a chunk moved between members that stayed"
                );
            }
        }
        // 12 members in the zone: about one chunk in 12 had the leaver as home.
        assert!((150..350).contains(&moved), "{moved} of 3000");
    }

    #[test]
    fn a_host_is_zone_home_exactly_for_the_chunks_it_asks_no_one_in_its_zone_for() {
        let (m, zone_of) = zoned();
        let no_zone = |_: &SocketAddr| None;
        let plain = members(8);
        for d in digests(300) {
            // Without zones: the top member, and only it.
            let homes: Vec<_> = plain
                .iter()
                .filter(|me| is_zone_home(&d, &plain, **me, no_zone))
                .collect();
            assert_eq!(homes, vec![&ranked(&d, &plain, 1)[0]]);
            // With zones: one home per zone, the member whose candidates
            // name no one of its zone (it fetches or asks the global home).
            let mut per_zone = std::collections::HashMap::new();
            for &me in &m {
                let asks_own_zone = candidates(&d, &m, Some(me), zone_of, |_| true, 3)
                    .iter()
                    .any(|c| zone_of(c) == zone_of(&me));
                assert_eq!(is_zone_home(&d, &m, me, zone_of), !asks_own_zone, "{me}");
                if !asks_own_zone {
                    *per_zone.entry(zone_of(&me)).or_insert(0) += 1;
                }
            }
            assert_eq!(per_zone.len(), 3);
            assert!(per_zone.values().all(|&n| n == 1), "{per_zone:?}");
            // A host its own list leaves out still ranks itself.
            let without: Vec<SocketAddr> = plain[1..].to_vec();
            let me = plain[0];
            assert_eq!(is_zone_home(&d, &without, me, no_zone), ranked(&d, &plain, 1)[0] == me);
        }
    }
}
