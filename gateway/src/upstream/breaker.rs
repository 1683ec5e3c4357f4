//! A circuit breaker per target (a model version on a backend pool).
//!
//! States, in the usual sense of the words:
//! * `Closed`: traffic flows; consecutive upstream failures are counted, and reaching
//!   `consecutive_failures` opens the breaker.
//! * `Open`: requests are refused until the cooldown ends. The cooldown is
//!   `base_ejection × n` where n counts openings that follow each other (the target failed
//!   again within `max_ejection` of recovering), capped at `max_ejection` (Envoy's
//!   outlier-detection rule).
//! * `HalfOpen`: after the cooldown, up to `half_open_probes` requests are let through;
//!   that many successes close the breaker, one failure opens it again.
//!
//! Only upstream failures count (connect errors, timeouts, UNAVAILABLE/INTERNAL and the
//! like); a client's bad request is a success as far as the backend's health goes.
//! All state is atomics: the request path never takes a lock. Time comes from
//! `tokio::time::Instant`, so tests drive it with paused time.

use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering::AcqRel, Ordering::Acquire};
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use crate::metrics::BreakerMetrics;

/// Breaker settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BreakerSettings {
    /// Consecutive failures that open the breaker.
    pub(crate) consecutive_failures: u32,
    /// First cooldown.
    pub(crate) base_ejection: Duration,
    /// Longest cooldown.
    pub(crate) max_ejection: Duration,
    /// Probes admitted while half-open, and successes needed to close.
    pub(crate) half_open_probes: u32,
}

/// The breaker's state, as metrics and the admin API report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Traffic flows.
    Closed = 0,
    /// Rejecting until the cooldown ends.
    Open = 1,
    /// Letting probes through.
    HalfOpen = 2,
}

impl State {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Open,
            2 => Self::HalfOpen,
            _ => Self::Closed,
        }
    }

    /// Lowercase name for logs, metrics and JSON.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

/// A request the breaker let through. It holds a probe slot while the breaker is
/// half-open; [`Admission::record`] reports the outcome, and dropping it unrecorded (the
/// deadline ran out before sending, the client's own fault, or a strategy dropped the
/// call mid-flight) gives the slot back without saying anything of the target's health.
#[derive(Debug)]
#[must_use = "an admission says nothing until it is recorded or dropped"]
pub(crate) struct Admission<'a> {
    breaker: &'a Breaker,
    /// Whether this holds a half-open probe slot (not yet given back).
    probe: bool,
}

impl Admission<'_> {
    /// Whether this is a half-open probe, whose outcome decides the state.
    #[cfg(test)]
    pub(crate) fn is_probe(&self) -> bool {
        self.probe
    }

    /// Reports the outcome: `true` when the upstream was healthy.
    pub(crate) fn record(mut self, healthy: bool) {
        let probe = std::mem::take(&mut self.probe);
        self.breaker.outcome(probe, healthy);
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if self.probe {
            self.breaker.probes_in_flight.fetch_sub(1, AcqRel);
        }
    }
}

/// One breaker.
#[derive(Debug)]
pub(crate) struct Breaker {
    name: String,
    settings: BreakerSettings,
    epoch: Instant,
    state: AtomicU8,
    failures: AtomicU32,
    /// Openings in the current streak.
    streak: AtomicU32,
    /// Milliseconds since `epoch`: end of the cooldown while open; when it last closed
    /// while closed.
    mark_ms: AtomicU64,
    probes_in_flight: AtomicU32,
    probe_successes: AtomicU32,
    metrics: Option<BreakerMetrics>,
}

impl Breaker {
    /// A closed breaker without metrics.
    #[cfg(test)]
    pub(crate) fn new(name: impl Into<String>, settings: BreakerSettings) -> Self {
        Self::with_metrics(name, settings, None)
    }

    pub(crate) fn with_metrics(
        name: impl Into<String>,
        settings: BreakerSettings,
        metrics: Option<BreakerMetrics>,
    ) -> Self {
        if let Some(m) = &metrics {
            m.state.set(State::Closed as i64);
        }
        Self {
            name: name.into(),
            settings,
            epoch: Instant::now(),
            state: AtomicU8::new(State::Closed as u8),
            failures: AtomicU32::new(0),
            streak: AtomicU32::new(0),
            mark_ms: AtomicU64::new(0),
            probes_in_flight: AtomicU32::new(0),
            probe_successes: AtomicU32::new(0),
            metrics,
        }
    }

    fn now_ms(&self) -> u64 {
        Instant::now()
            .saturating_duration_since(self.epoch)
            .as_millis() as u64
    }

    /// The current state (an Open breaker whose cooldown has ended reports HalfOpen).
    pub(crate) fn state(&self) -> State {
        let s = State::from_u8(self.state.load(Acquire));
        if s == State::Open && self.now_ms() >= self.mark_ms.load(Acquire) {
            State::HalfOpen
        } else {
            s
        }
    }

    /// Whether a request could be admitted now (what routing uses to skip targets).
    pub(crate) fn available(&self) -> bool {
        match self.state() {
            State::Closed => true,
            State::Open => false,
            State::HalfOpen => self.probes_in_flight.load(Acquire) < self.settings.half_open_probes,
        }
    }

    /// Asks to send a request; `None` means refused.
    pub(crate) fn admit(&self) -> Option<Admission<'_>> {
        loop {
            match State::from_u8(self.state.load(Acquire)) {
                State::Closed => {
                    return Some(Admission {
                        breaker: self,
                        probe: false,
                    });
                }
                State::Open => {
                    if self.now_ms() < self.mark_ms.load(Acquire) {
                        return None;
                    }
                    // Cooldown over: the first to notice moves the breaker to HalfOpen.
                    if self
                        .state
                        .compare_exchange(State::Open as u8, State::HalfOpen as u8, AcqRel, Acquire)
                        .is_ok()
                    {
                        self.probes_in_flight
                            .store(0, std::sync::atomic::Ordering::Release);
                        self.probe_successes
                            .store(0, std::sync::atomic::Ordering::Release);
                        self.transition(State::HalfOpen);
                    }
                }
                State::HalfOpen => {
                    let limit = self.settings.half_open_probes;
                    let got = self
                        .probes_in_flight
                        .fetch_update(AcqRel, Acquire, |n| (n < limit).then_some(n + 1));
                    return got.ok().map(|_| Admission {
                        breaker: self,
                        probe: true,
                    });
                }
            }
        }
    }

    /// An admitted request's outcome: `true` when the upstream was healthy.
    fn outcome(&self, probe: bool, healthy: bool) {
        match probe {
            false => {
                if healthy {
                    self.failures.store(0, std::sync::atomic::Ordering::Release);
                } else {
                    let n = self.failures.fetch_add(1, AcqRel) + 1;
                    if n >= self.settings.consecutive_failures {
                        self.open(State::Closed);
                    }
                }
            }
            true => {
                self.probes_in_flight.fetch_sub(1, AcqRel);
                if !healthy {
                    self.open(State::HalfOpen);
                } else if self.probe_successes.fetch_add(1, AcqRel) + 1
                    >= self.settings.half_open_probes
                    && self
                        .state
                        .compare_exchange(
                            State::HalfOpen as u8,
                            State::Closed as u8,
                            AcqRel,
                            Acquire,
                        )
                        .is_ok()
                {
                    self.failures.store(0, std::sync::atomic::Ordering::Release);
                    self.mark_ms
                        .store(self.now_ms(), std::sync::atomic::Ordering::Release);
                    self.transition(State::Closed);
                }
            }
        }
    }

    fn open(&self, from: State) {
        if self
            .state
            .compare_exchange(from as u8, State::Open as u8, AcqRel, Acquire)
            .is_err()
        {
            return; // another request already moved it
        }
        let now = self.now_ms();
        let closed_at = self.mark_ms.load(Acquire);
        let max = self.settings.max_ejection;
        // A target that fails again soon after recovering gets a longer cooldown.
        let streak = if from == State::Closed
            && Duration::from_millis(now.saturating_sub(closed_at)) > max
        {
            self.streak.store(1, std::sync::atomic::Ordering::Release);
            1
        } else {
            self.streak.fetch_add(1, AcqRel) + 1
        };
        let cooldown = self.settings.base_ejection.saturating_mul(streak).min(max);
        self.mark_ms.store(
            now + cooldown.as_millis() as u64,
            std::sync::atomic::Ordering::Release,
        );
        self.failures.store(0, std::sync::atomic::Ordering::Release);
        warn!(target = %self.name, ?cooldown, openings = streak, "circuit breaker opened");
        self.transition(State::Open);
    }

    fn transition(&self, to: State) {
        if to != State::Open {
            info!(target = %self.name, state = to.name(), "circuit breaker state");
        }
        if let Some(m) = &self.metrics {
            m.state.set(to as i64);
            match to {
                State::Open => m.opened.inc(),
                State::HalfOpen => m.half_opened.inc(),
                State::Closed => m.closed.inc(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> BreakerSettings {
        BreakerSettings {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            half_open_probes: 2,
        }
    }

    fn fail(b: &Breaker, n: u32) {
        for _ in 0..n {
            b.admit().expect("admitted").record(false);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_only() {
        let b = Breaker::new("t", settings());
        fail(&b, 2);
        b.admit().unwrap().record(true); // a success resets the count
        fail(&b, 2);
        assert_eq!(b.state(), State::Closed);
        fail(&b, 1);
        assert_eq!(b.state(), State::Open);
        assert!(b.admit().is_none());
        assert!(!b.available());
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_admits_bounded_probes_and_closes_on_success() {
        let b = Breaker::new("t", settings());
        fail(&b, 3);
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(b.admit().is_none(), "still cooling down");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(b.state(), State::HalfOpen);
        let p1 = b.admit().unwrap();
        let p2 = b.admit().unwrap();
        assert!(p1.is_probe() && p2.is_probe());
        assert!(b.admit().is_none(), "only two probes at a time");
        p1.record(true);
        assert_eq!(b.state(), State::HalfOpen);
        p2.record(true);
        assert_eq!(b.state(), State::Closed);
        assert!(!b.admit().expect("closed").is_probe());
    }

    #[tokio::test(start_paused = true)]
    async fn repeated_openings_grow_the_cooldown_up_to_the_cap() {
        let b = Breaker::new("t", settings());
        fail(&b, 3);
        let mut expected = Duration::from_secs(30);
        for _ in 0..12 {
            tokio::time::advance(expected - Duration::from_millis(1)).await;
            assert!(b.admit().is_none(), "open for {expected:?}");
            tokio::time::advance(Duration::from_millis(1)).await;
            let probe = b.admit().expect("half-open after the cooldown");
            probe.record(false); // the probe fails: open again, longer
            expected = (expected + Duration::from_secs(30)).min(Duration::from_secs(300));
        }
        assert_eq!(expected, Duration::from_secs(300));
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_healthy_period_resets_the_streak() {
        let b = Breaker::new("t", settings());
        fail(&b, 3);
        tokio::time::advance(Duration::from_secs(30)).await;
        for _ in 0..2 {
            b.admit().unwrap().record(true);
        }
        assert_eq!(b.state(), State::Closed);
        tokio::time::advance(Duration::from_secs(301)).await;
        fail(&b, 3);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(b.state(), State::HalfOpen, "back to the base cooldown");
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_dropped_unrecorded_gives_its_slot_back() {
        // An ensemble that reaches quorum drops its unfinished members' calls, and with
        // them their admissions: the half-open slot must come back, or the breaker stays
        // half-open with no slot free until the process restarts.
        let b = Breaker::new("t", settings());
        fail(&b, 3);
        tokio::time::advance(Duration::from_secs(30)).await;
        let probes = [b.admit().unwrap(), b.admit().unwrap()];
        assert!(!b.available(), "both slots taken");
        drop(probes);
        assert!(b.available(), "dropped probes gave their slots back");
        assert_eq!(b.state(), State::HalfOpen, "and said nothing of health");
        for _ in 0..2 {
            b.admit().expect("a free slot").record(true);
        }
        assert_eq!(b.state(), State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_dropped_inside_a_cancelled_call_gives_its_slot_back() {
        let b = std::sync::Arc::new(Breaker::new("t", settings()));
        fail(&b, 3);
        tokio::time::advance(Duration::from_secs(30)).await;
        let held = b.clone();
        let call = tokio::spawn(async move {
            let admission = held.admit().expect("probe");
            std::future::pending::<()>().await;
            admission.record(true);
        });
        tokio::task::yield_now().await;
        let _other = b.admit().expect("the second slot");
        assert!(!b.available());
        call.abort();
        let _ = call.await;
        assert!(b.available(), "the aborted call's probe slot is free again");
    }
}
