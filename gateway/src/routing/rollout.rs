//! A route's rollout as routing sees it: which plan takes a share of which, the share of
//! each step as a threshold out of 2^32, the sticky key, and the pure decision that moves
//! a request from the baseline to the candidate. The live step is the caller's (an atomic
//! the rollout controller writes); this module holds no state.

use std::time::Duration;

use http::{HeaderMap, HeaderName};

use super::split::murmur2_salted;
use super::{Decision, Plan, PlanId, Reason, Route, TargetId};

pub use switchyard_config::policy::OnFailure;

/// The gates of a rollout, thresholds as written.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Gates {
    /// Candidate error rate minus the baseline's, at most.
    pub error_rate: Option<f64>,
    /// Candidate p99 over baseline p99, at most.
    pub latency_p99: Option<f64>,
    /// Top-1 agreement of shadow comparisons, at least.
    pub shadow_agreement: Option<f64>,
}

/// A compiled rollout.
#[derive(Debug, Clone)]
pub struct RolloutSpec {
    /// The plan being rolled out.
    pub candidate: PlanId,
    /// The plan whose default-plan requests it takes a share of.
    pub baseline: PlanId,
    /// Their names, as the policy writes them.
    pub candidate_name: std::sync::Arc<str>,
    /// The baseline's name.
    pub baseline_name: std::sync::Arc<str>,
    /// Percent of the baseline's requests at each step.
    pub steps: Box<[f64]>,
    /// The same, as thresholds out of 2^32 (a request's point below it goes to the candidate).
    pub thresholds: Box<[u64]>,
    /// Time at each step.
    pub interval: Duration,
    /// Requests (or comparisons) a gate needs in a step before it is judged.
    pub min_requests: u64,
    /// The gates.
    pub gates: Gates,
    /// What a failed gate does.
    pub on_failure: OnFailure,
    /// Candidate errors in a row that roll back at once.
    pub max_consecutive_errors: u32,
    /// The header whose value keeps a client on its side (`None`: a random draw).
    pub sticky: Option<HeaderName>,
    /// Mixed into the sticky hash, so the rollout's draw is independent of the splits'.
    pub salt: Box<[u8]>,
    /// A hash of the rollout section and of what its candidate and baseline mean: a reload
    /// that changes it starts a new generation at the first step.
    pub generation: u64,
}

/// The share of the baseline's requests every candidate gets: all of them.
pub const ALL: u64 = 1 << 32;

/// Which side of a rollout a request is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arm {
    /// Decided to the baseline and left there.
    Baseline,
    /// Moved from the baseline to the candidate.
    Candidate,
}

impl RolloutSpec {
    /// Moves a default-plan request decided to the baseline onto the candidate when its
    /// point falls below `threshold` (out of 2^32). With a sticky key the point is the
    /// salted hash of the key, so a client stays on its side while the step holds, and
    /// raising the step only adds clients to the candidate. Pinned and rule-chosen
    /// requests are left alone, and so is everything when the candidate is unavailable.
    pub fn divert(
        &self,
        route: &Route,
        decision: Decision,
        headers: &HeaderMap,
        random: u64,
        threshold: u64,
        healthy: &dyn Fn(TargetId) -> bool,
    ) -> (Decision, Option<Arm>) {
        if decision.reason != Reason::Default || !self.is_baseline(route, &decision) {
            return (decision, None);
        }
        let point = match self.sticky.as_ref().and_then(|h| headers.get(h)) {
            Some(key) => u64::from(murmur2_salted(&self.salt, key.as_bytes())),
            // Independent of the bits the split and the shadow sample used.
            None => super::remix(random ^ 0x5157_4c52) & 0xFFFF_FFFF,
        };
        if point >= threshold {
            return (decision, Some(Arm::Baseline));
        }
        let target = match route.plan(self.candidate) {
            Plan::Target(t) => Some(*t),
            _ => None,
        };
        if target.is_some_and(|t| !healthy(t)) {
            return (decision, Some(Arm::Baseline));
        }
        (
            Decision {
                plan: self.candidate,
                target,
                ..decision
            },
            Some(Arm::Candidate),
        )
    }

    /// Whether a decision runs the baseline (the plan, or the target it names).
    fn is_baseline(&self, route: &Route, decision: &Decision) -> bool {
        decision.plan == self.baseline
            || matches!(
                (route.plan(self.baseline), decision.target),
                (Plan::Target(b), Some(t)) if *b == t
            )
    }

    /// The threshold of step `i` (0-based).
    pub fn threshold(&self, step: usize) -> u64 {
        self.thresholds.get(step).copied().unwrap_or(ALL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::Draw;

    fn spec(sticky: Option<&str>) -> RolloutSpec {
        RolloutSpec {
            candidate: PlanId(1),
            baseline: PlanId(0),
            candidate_name: "b".into(),
            baseline_name: "a".into(),
            steps: [10.0, 50.0, 100.0].into(),
            thresholds: [10.0, 50.0, 100.0]
                .iter()
                .map(|p| switchyard_config::rules::percent_threshold(*p).unwrap())
                .collect(),
            interval: Duration::from_secs(1),
            min_requests: 1,
            gates: Gates::default(),
            on_failure: OnFailure::Rollback,
            max_consecutive_errors: 5,
            sticky: sticky.map(|s| HeaderName::from_bytes(s.as_bytes()).unwrap()),
            salt: b"rollout:r".as_slice().into(),
            generation: 1,
        }
    }

    fn route() -> Route {
        let policy = "version: 1\nroute: r\ntargets:\n  a: { backend: stable, model: m, version: 1 }\n  b: { backend: canary, model: m, version: 2 }\nrules:\n  - match: { headers: { x-qa: { present: true } } }\n    plan: a\ndefault: a\n";
        let table = crate::routing::compile_unvalidated(policy).unwrap();
        (**table.get("r").unwrap()).clone()
    }

    fn decided(route: &Route, headers: &HeaderMap, random: u64) -> Decision {
        route.decide(headers, "", random, &|_| true).unwrap()
    }

    #[test]
    fn a_step_moves_its_share_and_raising_it_only_adds_keys() {
        let route = route();
        let s = spec(Some("x-user-id"));
        let keys: Vec<HeaderMap> = (0..4000)
            .map(|i| {
                let mut h = HeaderMap::new();
                h.insert("x-user-id", format!("user-{i}").parse().unwrap());
                h
            })
            .collect();
        let on = |step: usize| -> Vec<bool> {
            keys.iter()
                .map(|h| {
                    let d = decided(&route, h, 7);
                    s.divert(&route, d, h, 7, s.threshold(step), &|_| true).1
                        == Some(Arm::Candidate)
                })
                .collect()
        };
        let mut before = on(0);
        let share = |v: &[bool]| v.iter().filter(|x| **x).count() as f64 / v.len() as f64;
        assert!((share(&before) - 0.10).abs() < 0.02, "{}", share(&before));
        for step in [1, 2] {
            let after = on(step);
            assert!(
                before.iter().zip(&after).all(|(b, a)| !b || *a),
                "a key left the candidate at step {step}"
            );
            before = after;
        }
        assert_eq!(share(&before), 1.0);
        // The same key keeps its side at one step, whatever the random number.
        let h = &keys[3];
        let first = s
            .divert(&route, decided(&route, h, 1), h, 1, s.threshold(1), &|_| {
                true
            })
            .1;
        for r in [2, 99, u64::MAX] {
            assert_eq!(
                s.divert(&route, decided(&route, h, r), h, r, s.threshold(1), &|_| {
                    true
                })
                .1,
                first
            );
        }
    }

    #[test]
    fn rules_pins_and_an_unavailable_candidate_are_left_alone() {
        let route = route();
        let s = spec(None);
        let mut qa = HeaderMap::new();
        qa.insert("x-qa", "1".parse().unwrap());
        let d = decided(&route, &qa, 0);
        assert_eq!(s.divert(&route, d, &qa, 0, ALL, &|_| true), (d, None));
        let pinned = route.decide(&HeaderMap::new(), "1", 0, &|_| true).unwrap();
        assert_eq!(
            s.divert(&route, pinned, &HeaderMap::new(), 0, ALL, &|_| true)
                .1,
            None
        );
        let none = HeaderMap::new();
        let d = decided(&route, &none, 0);
        let (moved, arm) = s.divert(&route, d, &none, 0, ALL, &|_| true);
        assert_eq!(
            (moved.plan, moved.target, arm),
            (PlanId(1), Some(TargetId(1)), Some(Arm::Candidate))
        );
        assert_eq!(moved.draw, d.draw.or(None));
        let (kept, arm) = s.divert(&route, d, &none, 0, ALL, &|t| t != TargetId(1));
        assert_eq!((kept, arm), (d, Some(Arm::Baseline)));
        assert_eq!(
            s.divert(&route, d, &none, 0, 0, &|_| true).1,
            Some(Arm::Baseline)
        );
        let _ = Draw::Random;
    }
}
