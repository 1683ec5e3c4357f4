//! Weighted splits: a precomputed table of cumulative weights, sticky assignment by
//! MurmurHash2 of salt and key (nginx `split_clients`), random draws in `[0, Σw)`.
//!
//! With a sticky key, a request's point in the hash space is fixed and each member owns a
//! slice of that space in file order. Raising the last member's weight (a canary ramp)
//! grows its slice downwards, so keys only move onto it: nobody already on the canary
//! leaves it.

use http::HeaderName;

use super::PlanId;

/// A compiled split.
#[derive(Debug, Clone)]
pub struct Split {
    /// Members with their weights, in file order.
    members: Box<[(PlanId, u32)]>,
    /// Σ weights.
    total: u64,
    /// The header whose value is the sticky key, if any.
    pub(crate) sticky: Option<HeaderName>,
    salt: Box<[u8]>,
}

/// How a split picked its member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Draw {
    /// From the sticky key's hash.
    Sticky,
    /// From the request's random number.
    Random,
}

impl Split {
    /// Builds a split; members with weight 0 are rejected by validation before this.
    pub fn new(members: Vec<(PlanId, u32)>, sticky: Option<HeaderName>, salt: &str) -> Self {
        let total = members.iter().map(|(_, w)| u64::from(*w)).sum();
        Self {
            members: members.into(),
            total,
            sticky,
            salt: salt.as_bytes().into(),
        }
    }

    /// The members and weights, in order.
    pub fn members(&self) -> &[(PlanId, u32)] {
        &self.members
    }

    /// The sticky hash's salt.
    pub(crate) fn salt(&self) -> &[u8] {
        &self.salt
    }

    /// Picks a member. `key`: the sticky header's value if present; `random`: a uniformly
    /// random number used when there is no key; `healthy`: members for which this is false
    /// are skipped and the rest renormalised, unless none is healthy (the last healthy
    /// target is never ejected: then the choice ignores health).
    pub fn pick(
        &self,
        key: Option<&[u8]>,
        random: u64,
        healthy: &dyn Fn(PlanId) -> bool,
    ) -> (PlanId, Draw) {
        let (point, draw) = match key {
            // A point in [0, 1) as a 32-bit fraction, from the salted key.
            Some(k) => (u64::from(murmur2_salted(&self.salt, k)), Draw::Sticky),
            None => (random & 0xFFFF_FFFF, Draw::Random),
        };
        let alive = self
            .members
            .iter()
            .filter(|(t, _)| healthy(*t))
            .map(|(_, w)| u64::from(*w))
            .sum::<u64>();
        let (total, use_health) = if alive == 0 {
            (self.total, false)
        } else {
            (alive, alive != self.total)
        };
        // Scale the 32-bit point onto [0, total).
        let mut target = (point * total) >> 32;
        for &(member, weight) in self.members.iter() {
            if use_health && !healthy(member) {
                continue;
            }
            let w = u64::from(weight);
            if target < w {
                return (member, draw);
            }
            target -= w;
        }
        // Invariant: target < total, so the loop returned; kept total for the type checker.
        (self.members[self.members.len() - 1].0, draw)
    }
}

/// MurmurHash2 (32-bit, seed 0, the variant nginx's `split_clients` uses) of `salt ‖ key`,
/// without allocating the concatenation.
pub(crate) fn murmur2_salted(salt: &[u8], key: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    let len = salt.len() + key.len();
    let mut h: u32 = len as u32;
    let mut block = [0u8; 4];
    let mut filled = 0;
    for &b in salt.iter().chain(key) {
        block[filled] = b;
        filled += 1;
        if filled == 4 {
            let mut k = u32::from_le_bytes(block);
            k = k.wrapping_mul(M);
            k ^= k >> 24;
            k = k.wrapping_mul(M);
            h = h.wrapping_mul(M);
            h ^= k;
            filled = 0;
        }
    }
    if filled >= 3 {
        h ^= u32::from(block[2]) << 16;
    }
    if filled >= 2 {
        h ^= u32::from(block[1]) << 8;
    }
    if filled >= 1 {
        h ^= u32::from(block[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(_: PlanId) -> bool {
        true
    }

    #[test]
    fn murmur2_matches_reference_values() {
        // MurmurHash2 (seed 0) as nginx computes it; values from an independent port.
        assert_eq!(murmur2_salted(b"", b""), 0);
        assert_eq!(murmur2_salted(b"", b"a"), 0x92685f5e);
        assert_eq!(murmur2_salted(b"", b"abcd"), 0x26873021);
        assert_eq!(murmur2_salted(b"", b"hello world"), 0x44a81419);
        assert_eq!(murmur2_salted(b"ab", b"cd"), murmur2_salted(b"", b"abcd"));
        assert_eq!(
            murmur2_salted(b"", b"hello world"),
            murmur2_salted(b"hello ", b"world")
        );
    }

    #[test]
    fn random_draws_follow_the_weights() {
        let split = Split::new(vec![(PlanId(0), 90), (PlanId(1), 10)], None, "");
        let mut counts = [0u32; 2];
        let mut x = 0x1234_5678_9abc_def0u64;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            counts[split.pick(None, x, &all).0.0 as usize] += 1;
        }
        let share = f64::from(counts[1]) / 100_000.0;
        assert!((share - 0.10).abs() < 0.01, "{share}");
    }

    #[test]
    fn raising_the_canary_only_adds_keys() {
        let at = |canary: u32| {
            Split::new(
                vec![(PlanId(0), 100 - canary), (PlanId(1), canary)],
                None,
                "salt",
            )
        };
        let keys: Vec<String> = (0..5000).map(|i| format!("user-{i}")).collect();
        let on_canary = |s: &Split| -> Vec<bool> {
            keys.iter()
                .map(|k| s.pick(Some(k.as_bytes()), 0, &all).0 == PlanId(1))
                .collect()
        };
        let mut before = on_canary(&at(5));
        for pct in [10, 25, 50] {
            let after = on_canary(&at(pct));
            assert!(
                before.iter().zip(&after).all(|(b, a)| !b || *a),
                "a key left the canary at {pct}%"
            );
            let share = after.iter().filter(|x| **x).count() as f64 / keys.len() as f64;
            assert!(
                (share - f64::from(pct) / 100.0).abs() < 0.03,
                "{pct}%: {share}"
            );
            before = after;
        }
    }

    #[test]
    fn unhealthy_members_are_skipped_unless_none_is_left() {
        let split = Split::new(vec![(PlanId(0), 50), (PlanId(1), 50)], None, "");
        for r in [0u64, 1 << 31, u64::MAX] {
            assert_eq!(split.pick(None, r, &|t| t == PlanId(1)).0, PlanId(1));
        }
        let none = split.pick(None, 0, &|_| false);
        assert_eq!(
            none.0,
            PlanId(0),
            "with nothing healthy the original weights apply"
        );
    }
}
