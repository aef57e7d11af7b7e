//! Rendezvous (highest random weight) hashing: the home of a chunk is the
//! member with the highest score for (digest, member); the next ones are
//! its failover candidates. Pure functions: every host that has the same
//! membership list computes the same homes, with no coordination, and a
//! member leaving moves only the chunks it was home for.

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
}
