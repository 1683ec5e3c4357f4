//! Canary rollouts in the data plane: a route's candidate takes a growing share of its
//! baseline's requests step by step, judged against the baseline on live traffic and on
//! shadow agreement, and is rolled back at the first failed gate.
//!
//! # Design
//! * The request path reads one atomic (the phase) to know the share and the response
//!   header, both precomputed, and adds to the counters of its side: atomics only.
//! * The controller ([`drive`]) ticks off the request path: it reads the counters, judges
//!   the gates over the step ([`judge`], pure), moves between phases and writes the state
//!   file (`state_dir/<route>.rollout.json`, atomically) at every transition.
//! * A [`Rollout`] lives as long as its generation: reloads that keep the rollout section
//!   and what its candidate and baseline mean keep it (and its step); any other edit of
//!   them starts a new one at the first step.
//! * A restarted gateway resumes the step of the state file of the same generation; an
//!   unreadable file is reported and the rollout starts at step 1, never further.
//! * With `shared_state` in gateway.yaml the replicas move together ([`shared`]): each adds
//!   its counts to the shared ones and judges the step over all of them; a step is taken
//!   by one compare-and-set on the server, which every replica then follows. A replica
//!   that cannot reach the server keeps its step and never promotes; it still rolls back
//!   on what it sees, and tells the others once it can.

pub(crate) mod shared;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::HeaderValue;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::{info, warn};

use crate::Shared;
use crate::metrics::{ROLLOUT_GATES, RolloutMetrics};
use crate::routing::rollout::{ALL, Arm, OnFailure, RolloutSpec};
use crate::strategy::shadow::Agreement;

/// How often the controller judges the rollouts in force.
pub(crate) const TICK: Duration = Duration::from_millis(10);

/// Latency buckets: 8 per power of two of microseconds (12.5% wide), up to 2^36 µs.
const BUCKETS: usize = 36 * 8;

fn bucket(micros: u64) -> usize {
    let us = micros.max(1);
    let msb = 63 - us.leading_zeros() as usize;
    let sub = if msb >= 3 {
        (us >> (msb - 3)) & 7
    } else {
        (us << (3 - msb)) & 7
    } as usize;
    (msb * 8 + sub).min(BUCKETS - 1)
}

/// The upper bound of bucket `i`, in seconds.
fn bucket_upper(i: usize) -> f64 {
    let (msb, sub) = (i / 8, i % 8);
    (8 + sub + 1) as f64 * 2f64.powi(msb as i32 - 3) / 1e6
}

/// The request counters of one side of a rollout.
#[derive(Debug)]
struct ArmCounters {
    requests: AtomicU64,
    errors: AtomicU64,
    latency: Box<[AtomicU64]>,
}

impl ArmCounters {
    fn new() -> Self {
        Self {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn read(&self) -> Counts {
        Counts {
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            latency: self
                .latency
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
        }
    }
}

/// What one side of a rollout counted (over a step: the difference of two readings).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Counts {
    pub(crate) requests: u64,
    pub(crate) errors: u64,
    /// Answered requests by latency bucket.
    pub(crate) latency: Vec<u64>,
}

impl Counts {
    fn minus(&self, before: &Counts) -> Counts {
        Counts {
            requests: self.requests.saturating_sub(before.requests),
            errors: self.errors.saturating_sub(before.errors),
            latency: self
                .latency
                .iter()
                .enumerate()
                .map(|(i, n)| n.saturating_sub(before.latency.get(i).copied().unwrap_or(0)))
                .collect(),
        }
    }

    fn answered(&self) -> u64 {
        self.latency.iter().sum()
    }

    fn error_rate(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.errors as f64 / self.requests as f64)
    }

    /// The 99th percentile of answered requests' latency, in seconds (bucket upper bound).
    fn p99(&self) -> Option<f64> {
        let n = self.answered();
        if n == 0 {
            return None;
        }
        let rank = (n as f64 * 0.99).ceil() as u64;
        let mut seen = 0;
        for (i, c) in self.latency.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(bucket_upper(i));
            }
        }
        Some(bucket_upper(BUCKETS - 1))
    }
}

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub(crate) enum Phase {
    /// At step `step` (0-based), judged at every tick.
    Ramping { step: usize },
    /// Held at step `step` by an operator or a failed gate with `on_failure: pause`.
    Paused { step: usize },
    /// Past the last step: the candidate keeps its share until the policy changes.
    Complete,
    /// The candidate gets nothing until the policy changes.
    RolledBack,
}

impl Phase {
    fn encode(self, steps: usize) -> u32 {
        match self {
            Phase::Ramping { step } => (step * 2) as u32,
            Phase::Paused { step } => (step * 2 + 1) as u32,
            Phase::Complete => (steps * 2) as u32,
            Phase::RolledBack => (steps * 2 + 1) as u32,
        }
    }

    fn decode(x: u32, steps: usize) -> Phase {
        let x = x as usize;
        if x == steps * 2 {
            Phase::Complete
        } else if x > steps * 2 {
            Phase::RolledBack
        } else if x.is_multiple_of(2) {
            Phase::Ramping { step: x / 2 }
        } else {
            Phase::Paused { step: x / 2 }
        }
    }

    /// Its index in `ROLLOUT_STATES`.
    fn state_index(self) -> usize {
        match self {
            Phase::Ramping { .. } => 0,
            Phase::Paused { .. } => 1,
            Phase::Complete => 2,
            Phase::RolledBack => 3,
        }
    }

    /// `step-2`, `paused-2`, `complete`, `rolled_back` (metric labels, history).
    fn label(self) -> String {
        match self {
            Phase::Ramping { step } => format!("step-{}", step + 1),
            Phase::Paused { step } => format!("paused-{}", step + 1),
            Phase::Complete => "complete".into(),
            Phase::RolledBack => "rolled_back".into(),
        }
    }

    fn state(self) -> &'static str {
        crate::metrics::ROLLOUT_STATES[self.state_index()]
    }

    fn step(self) -> Option<usize> {
        match self {
            Phase::Ramping { step } | Phase::Paused { step } => Some(step),
            _ => None,
        }
    }
}

/// How one gate stands over the step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Verdict {
    Pass,
    Fail,
    /// Fewer than `min_requests` so far: not judged yet.
    Waiting,
    /// Cannot be measured at this step (agreement when the baseline gets no requests).
    NotApplicable,
}

/// One gate's value against its threshold.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct GateReport {
    pub(crate) gate: &'static str,
    pub(crate) value: Option<f64>,
    pub(crate) threshold: f64,
    pub(crate) verdict: Verdict,
    /// Requests (comparisons) it has, and needs to be judged.
    pub(crate) have: u64,
    pub(crate) need: u64,
}

/// What the gates see of one step.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepView<'a> {
    pub(crate) candidate: &'a Counts,
    pub(crate) baseline: &'a Counts,
    /// The baseline since the rollout began: compared with when the step gave the
    /// baseline too few requests (at 100% it gets none).
    pub(crate) baseline_total: &'a Counts,
    pub(crate) agreed: u64,
    pub(crate) disagreed: u64,
    /// Whether this step gives the candidate all of the baseline's requests.
    pub(crate) all: bool,
}

/// Judges every gate of `spec` over a step. Pure: the controller and the tests call it.
pub(crate) fn judge(spec: &RolloutSpec, v: StepView<'_>) -> Vec<GateReport> {
    let need = spec.min_requests;
    let base = |min: u64, has: &dyn Fn(&Counts) -> u64| {
        if has(v.baseline) >= min {
            v.baseline
        } else {
            v.baseline_total
        }
    };
    let mut out = Vec::with_capacity(3);
    if let Some(max) = spec.gates.error_rate {
        let b = base(need, &|c| c.requests);
        let value = v
            .candidate
            .error_rate()
            .map(|c| c - b.error_rate().unwrap_or(0.0));
        let have = v.candidate.requests;
        out.push(GateReport {
            gate: "error_rate",
            value,
            threshold: max,
            verdict: match value {
                _ if have < need => Verdict::Waiting,
                Some(x) if x > max + 1e-12 => Verdict::Fail,
                _ => Verdict::Pass,
            },
            have,
            need,
        });
    }
    if let Some(max) = spec.gates.latency_p99 {
        let b = base(need, &|c| c.answered());
        let value = match (v.candidate.p99(), b.p99()) {
            (Some(c), Some(b)) if b > 0.0 => Some(c / b),
            _ => None,
        };
        let have = v.candidate.answered();
        out.push(GateReport {
            gate: "latency_p99",
            value,
            threshold: max,
            verdict: match value {
                _ if have < need => Verdict::Waiting,
                None => Verdict::Waiting,
                Some(x) if x > max => Verdict::Fail,
                Some(_) => Verdict::Pass,
            },
            have,
            need,
        });
    }
    if let Some(min) = spec.gates.shadow_agreement {
        let have = v.agreed + v.disagreed;
        let value = (have > 0).then(|| v.agreed as f64 / have as f64);
        out.push(GateReport {
            gate: "shadow_agreement",
            value,
            threshold: min,
            verdict: match value {
                _ if have < need && v.all => Verdict::NotApplicable,
                _ if have < need => Verdict::Waiting,
                Some(x) if x < min => Verdict::Fail,
                _ => Verdict::Pass,
            },
            have,
            need,
        });
    }
    out
}

/// One entry of a rollout's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Transition {
    /// Milliseconds since the Unix epoch.
    pub(crate) at_ms: u64,
    pub(crate) from: String,
    pub(crate) to: String,
    pub(crate) reason: String,
    /// What the step it left had counted.
    #[serde(default)]
    pub(crate) step: StepSummary,
}

/// A step's counts, as the history keeps them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct StepSummary {
    pub(crate) candidate_requests: u64,
    pub(crate) candidate_errors: u64,
    pub(crate) baseline_requests: u64,
    pub(crate) baseline_errors: u64,
    pub(crate) compared: u64,
    pub(crate) agreed: u64,
}

/// The state file of one route's rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StateFile {
    pub(crate) route: String,
    /// The generation, as 16 hex digits.
    pub(crate) generation: String,
    pub(crate) phase: Phase,
    /// When the current step began (milliseconds since the Unix epoch).
    pub(crate) step_started_ms: u64,
    /// Why the rollout is where it is, when something decided it (a gate, an operator).
    #[serde(default)]
    pub(crate) reason: Option<String>,
    #[serde(default)]
    pub(crate) history: Vec<Transition>,
    /// Transitions so far (what a shared rollout's replicas agree on).
    #[serde(default)]
    pub(crate) epoch: u64,
}

impl StateFile {
    /// The file of `route` under `dir`.
    pub(crate) fn path(dir: &Path, route: &str) -> PathBuf {
        dir.join(format!("{route}.rollout.json"))
    }

    /// Reads a state file: `Ok(None)` when there is none.
    pub(crate) fn read(path: &Path) -> Result<Option<StateFile>, String> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// Writes it atomically: a temporary file in the same folder, synced, renamed.
    fn write(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(self).unwrap_or_default())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What only the controller and the admin API touch.
#[derive(Debug)]
struct Control {
    step_started: SystemTime,
    step_instant: Instant,
    /// Counter readings when the step began.
    candidate_at: Counts,
    baseline_at: Counts,
    agreed_at: u64,
    disagreed_at: u64,
    gates: Vec<GateReport>,
    history: Vec<Transition>,
    reason: Option<String>,
    /// A state file that could not be read or written.
    state_error: Option<String>,
    /// Transitions so far: the shared state's count, which every replica agrees on.
    epoch: u64,
    /// A transition made here that the shared state has yet to hear of.
    pending: Option<Pending>,
    /// Counter readings last added to the shared counts.
    pushed: Readings,
    /// What the last exchange with the shared state said (shared rollouts only).
    shared: Option<shared::Seen>,
}

/// A transition made by this replica, to tell the shared state.
#[derive(Debug, Clone, PartialEq)]
struct Pending {
    to: Phase,
    reason: String,
    /// The epoch it was made at: it applies only if the shared state is still there
    /// (a rollback applies anyway).
    base_epoch: u64,
    transition: Transition,
}

/// The counters at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
struct Readings {
    candidate: Counts,
    baseline: Counts,
    agreed: u64,
    disagreed: u64,
}

/// The live rollout of one route, for one generation.
#[derive(Debug)]
pub(crate) struct Rollout {
    pub(crate) spec: RolloutSpec,
    route: Arc<str>,
    /// `Phase::encode`d; the only thing the request path reads.
    phase: AtomicU32,
    /// `x-switchyard-rollout` by encoded phase.
    headers: Box<[HeaderValue]>,
    /// Share by encoded phase, out of 2^32.
    thresholds: Box<[u64]>,
    candidate: ArmCounters,
    baseline: ArmCounters,
    consecutive_errors: AtomicU32,
    pub(crate) agreement: Arc<Agreement>,
    control: Mutex<Control>,
    metrics: RolloutMetrics,
    file: Option<PathBuf>,
    /// Whether the replicas share this rollout (`shared_state`): steps are then taken only
    /// through the shared state.
    shared: bool,
}

fn percent(p: f64) -> String {
    let s = format!("{p:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

impl Rollout {
    /// The rollout of `route` for its current generation: resumed from the state file
    /// when it holds this generation, else at step 1 (the file is then rewritten).
    pub(crate) fn start(
        route: &Arc<str>,
        spec: &RolloutSpec,
        metrics: RolloutMetrics,
        state_dir: Option<&Path>,
        shared: bool,
    ) -> Arc<Self> {
        let n = spec.steps.len();
        let mut headers = Vec::with_capacity(2 * n + 2);
        let mut thresholds = Vec::with_capacity(2 * n + 2);
        for (i, step) in spec.steps.iter().enumerate() {
            let at = format!("step={}/{n}; weight={}", i + 1, percent(*step));
            headers.push(HeaderValue::from_str(&at).unwrap_or(HeaderValue::from_static("step")));
            headers.push(
                HeaderValue::from_str(&format!("paused; {at}"))
                    .unwrap_or(HeaderValue::from_static("paused")),
            );
            thresholds.extend([spec.threshold(i); 2]);
        }
        headers.push(HeaderValue::from_static("complete; weight=100"));
        headers.push(HeaderValue::from_static("rolled-back; weight=0"));
        thresholds.extend([ALL, 0]);
        let file = state_dir.map(|d| StateFile::path(d, route));
        let generation = format!("{:016x}", spec.generation);
        let now = (SystemTime::now(), Instant::now());
        let mut state_error = None;
        let resumed = match file.as_deref().map(StateFile::read) {
            None | Some(Ok(None)) => None,
            Some(Ok(Some(s))) if s.generation != generation || s.route != **route => None,
            Some(Ok(Some(s))) => match s.phase.step() {
                Some(step) if step >= n => {
                    state_error = Some(format!(
                        "the state file's step {} is past the policy's {n} steps; the rollout restarts at step 1",
                        step + 1
                    ));
                    None
                }
                _ => Some(s),
            },
            Some(Err(e)) => {
                state_error = Some(format!(
                    "cannot read the rollout state ({e}); the rollout restarts at step 1"
                ));
                None
            }
        };
        if let Some(e) = &state_error {
            warn!(route = %route, "{e}");
        }
        let this = |phase: Phase, control: Control| Self {
            spec: spec.clone(),
            route: route.clone(),
            phase: AtomicU32::new(phase.encode(n)),
            headers: headers.clone().into(),
            thresholds: thresholds.clone().into(),
            candidate: ArmCounters::new(),
            baseline: ArmCounters::new(),
            consecutive_errors: AtomicU32::new(0),
            agreement: Arc::new(Agreement::default()),
            control: Mutex::new(control),
            metrics: metrics.clone(),
            file: file.clone(),
            shared,
        };
        let zero = Counts {
            latency: vec![0; BUCKETS],
            ..Counts::default()
        };
        let control = |started: SystemTime, history: Vec<Transition>, reason, epoch| Control {
            step_started: started,
            step_instant: now
                .1
                .checked_sub(now.0.duration_since(started).unwrap_or_default())
                .unwrap_or(now.1),
            candidate_at: zero.clone(),
            baseline_at: zero.clone(),
            agreed_at: 0,
            disagreed_at: 0,
            gates: Vec::new(),
            history,
            reason,
            state_error: state_error.clone(),
            epoch,
            pending: None,
            pushed: Readings {
                candidate: zero.clone(),
                baseline: zero.clone(),
                ..Readings::default()
            },
            shared: shared.then(shared::Seen::default),
        };
        let rollout = match resumed {
            Some(s) => {
                let started = UNIX_EPOCH + Duration::from_millis(s.step_started_ms);
                info!(route = %route, phase = %s.phase.label(), "rollout resumed from its state file");
                this(
                    s.phase,
                    control(started.min(now.0), s.history, s.reason, s.epoch),
                )
            }
            None => {
                let first = Phase::Ramping { step: 0 };
                let r = this(first, control(now.0, Vec::new(), None, 0));
                {
                    let mut c = r.control.lock();
                    c.history.push(Transition {
                        at_ms: unix_ms(now.0),
                        from: "-".into(),
                        to: first.label(),
                        reason: "a new rollout generation".into(),
                        step: StepSummary::default(),
                    });
                    r.persist(&mut c);
                }
                info!(route = %route, generation, "rollout started at step 1");
                r
            }
        };
        rollout.publish(rollout.phase());
        Arc::new(rollout)
    }

    /// Where the rollout is.
    pub(crate) fn phase(&self) -> Phase {
        Phase::decode(self.phase.load(Ordering::Acquire), self.spec.steps.len())
    }

    /// The candidate's share now (out of 2^32) and the response header that says so.
    pub(crate) fn now(&self) -> (u64, &HeaderValue) {
        let i = self.phase.load(Ordering::Acquire) as usize;
        let i = i.min(self.headers.len() - 1);
        (self.thresholds[i], &self.headers[i])
    }

    /// Counts one request of a side: `Some(Ok(latency))` answered by it, `Some(Err(()))`
    /// failed (or answered by a fallback), `None`: nothing to count (the client's fault).
    pub(crate) fn record(&self, arm: Arm, outcome: Option<Result<Duration, ()>>) {
        let Some(outcome) = outcome else { return };
        let counters = match arm {
            Arm::Candidate => &self.candidate,
            Arm::Baseline => &self.baseline,
        };
        counters.requests.fetch_add(1, Ordering::Relaxed);
        match outcome {
            Ok(took) => {
                counters.latency[bucket(took.as_micros() as u64)].fetch_add(1, Ordering::Relaxed);
                if arm == Arm::Candidate {
                    self.consecutive_errors.store(0, Ordering::Relaxed);
                }
            }
            Err(()) => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                if arm == Arm::Candidate {
                    self.consecutive_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// One controller tick: judge the step and move on, roll back or pause as it says.
    pub(crate) fn tick(&self, candidate_breaker_open: bool) {
        let Phase::Ramping { step } = self.phase() else {
            return;
        };
        let mut c = self.control.lock();
        let (candidate, baseline, summary, gates) = self.judge_step(&c, step);
        for (i, name) in ROLLOUT_GATES.iter().enumerate() {
            if let Some(g) = gates.iter().find(|g| g.gate == *name)
                && let Some(v) = g.value
            {
                self.metrics.gate_value[i].set(v);
            }
        }
        let breaker_open = candidate_breaker_open;
        let in_a_row = self.consecutive_errors.load(Ordering::Relaxed);
        let failed = if breaker_open {
            Some((
                "breaker",
                "the candidate's circuit breaker opened".to_owned(),
            ))
        } else if in_a_row >= self.spec.max_consecutive_errors {
            Some((
                "consecutive_errors",
                format!("{in_a_row} candidate errors in a row"),
            ))
        } else {
            gates.iter().find(|g| g.verdict == Verdict::Fail).map(|g| {
                (
                    g.gate,
                    format!(
                        "{} {} against {} {} over {} {}",
                        g.gate,
                        g.value.map_or("-".into(), |v| format!("{v:.4}")),
                        if g.gate == "shadow_agreement" {
                            "min"
                        } else {
                            "max"
                        },
                        g.threshold,
                        g.have,
                        if g.gate == "shadow_agreement" {
                            "comparisons"
                        } else {
                            "candidate requests"
                        },
                    ),
                )
            })
        };
        c.gates = gates;
        let _ = (candidate, baseline);
        if let Some((gate, reason)) = failed {
            self.metrics.gate_failed(gate);
            let to = match self.spec.on_failure {
                OnFailure::Rollback => Phase::RolledBack,
                OnFailure::Pause => Phase::Paused { step },
            };
            warn!(route = %self.route, %reason, to = to.label(), "rollout gate failed");
            self.decide(&mut c, to, format!("gate failed: {reason}"), summary);
            return;
        }
        if self.shared {
            // Steps are taken over every replica's counts, through the shared state.
            return;
        }
        let ended = c.step_instant.elapsed() >= self.spec.interval;
        let judged = c
            .gates
            .iter()
            .all(|g| matches!(g.verdict, Verdict::Pass | Verdict::NotApplicable));
        if ended && judged {
            let to = self.next(step);
            info!(route = %self.route, to = to.label(), "rollout step passed");
            self.transition(&mut c, to, "every gate held over the step".into(), summary);
        }
    }

    fn next(&self, step: usize) -> Phase {
        if step + 1 < self.spec.steps.len() {
            Phase::Ramping { step: step + 1 }
        } else {
            Phase::Complete
        }
    }

    /// The step's counts and gates, from the counters now and at the step's start.
    fn judge_step(
        &self,
        c: &Control,
        step: usize,
    ) -> (Counts, Counts, StepSummary, Vec<GateReport>) {
        let candidate = self.candidate.read().minus(&c.candidate_at);
        let baseline_total = self.baseline.read();
        let baseline = baseline_total.minus(&c.baseline_at);
        let agreed = self.agreement.agree.load(Ordering::Relaxed) - c.agreed_at;
        let disagreed = self.agreement.disagree.load(Ordering::Relaxed) - c.disagreed_at;
        let gates = judge(
            &self.spec,
            StepView {
                candidate: &candidate,
                baseline: &baseline,
                baseline_total: &baseline_total,
                agreed,
                disagreed,
                all: self.spec.threshold(step) >= ALL,
            },
        );
        let summary = StepSummary {
            candidate_requests: candidate.requests,
            candidate_errors: candidate.errors,
            baseline_requests: baseline.requests,
            baseline_errors: baseline.errors,
            compared: agreed + disagreed,
            agreed,
        };
        (candidate, baseline, summary, gates)
    }

    /// Moves to `to`: the share changes from the next request on; the step's counters
    /// start afresh; the state file is rewritten.
    fn transition(&self, c: &mut Control, to: Phase, reason: String, step: StepSummary) {
        let from = self.phase();
        self.phase
            .store(to.encode(self.spec.steps.len()), Ordering::Release);
        let now = SystemTime::now();
        c.step_started = now;
        c.step_instant = Instant::now();
        c.candidate_at = self.candidate.read();
        c.baseline_at = self.baseline.read();
        c.agreed_at = self.agreement.agree.load(Ordering::Relaxed);
        c.disagreed_at = self.agreement.disagree.load(Ordering::Relaxed);
        self.consecutive_errors.store(0, Ordering::Relaxed);
        c.epoch += 1;
        c.history.push(Transition {
            at_ms: unix_ms(now),
            from: from.label(),
            to: to.label(),
            reason: reason.clone(),
            step,
        });
        c.reason = Some(reason);
        self.metrics.transition(&from.label(), &to.label());
        self.publish(to);
        self.persist(c);
    }

    /// A transition this replica decides (a failed gate, an operator's command): made at
    /// once, and, when the rollout is shared, told to the shared state at the next sync.
    fn decide(&self, c: &mut Control, to: Phase, reason: String, step: StepSummary) {
        let base_epoch = c.epoch;
        self.transition(c, to, reason.clone(), step);
        if self.shared
            && let Some(transition) = c.history.last().cloned()
        {
            c.pending = Some(Pending {
                to,
                reason,
                base_epoch,
                transition,
            });
        }
    }

    /// The counters now.
    fn readings(&self) -> Readings {
        Readings {
            candidate: self.candidate.read(),
            baseline: self.baseline.read(),
            agreed: self.agreement.agree.load(Ordering::Relaxed),
            disagreed: self.agreement.disagree.load(Ordering::Relaxed),
        }
    }

    /// The candidate's share in `phase`, in percent, as the policy writes it.
    fn weight(&self, phase: Phase) -> f64 {
        match phase {
            Phase::Ramping { step } | Phase::Paused { step } => self.spec.steps[step],
            Phase::Complete => 100.0,
            Phase::RolledBack => 0.0,
        }
    }

    fn publish(&self, phase: Phase) {
        let m = &self.metrics;
        m.weight.set(self.weight(phase));
        m.step.set(phase.step().map_or(
            if phase == Phase::Complete {
                self.spec.steps.len() as i64
            } else {
                0
            },
            |s| s as i64 + 1,
        ));
        for (i, g) in m.state.iter().enumerate() {
            g.set(i64::from(i == phase.state_index()));
        }
    }

    fn persist(&self, c: &mut Control) {
        let Some(path) = &self.file else { return };
        let state = StateFile {
            route: self.route.to_string(),
            generation: format!("{:016x}", self.spec.generation),
            phase: self.phase(),
            step_started_ms: unix_ms(c.step_started),
            reason: c.reason.clone(),
            history: c.history.clone(),
            epoch: c.epoch,
        };
        if let Err(e) = state.write(path) {
            let e = format!("cannot write the rollout state to {}: {e}", path.display());
            warn!(route = %self.route, "{e}");
            c.state_error = Some(e);
        }
    }

    /// An operator's command: `pause`, `resume`, `promote` (next step now) or `abort`
    /// (roll back now). Errors say why the command does not apply.
    pub(crate) fn command(&self, command: &str, who: &str) -> Result<(), String> {
        let mut c = self.control.lock();
        let phase = self.phase();
        let step = phase.step();
        let summary = step.map(|s| self.judge_step(&c, s).2).unwrap_or_default();
        let to = match (command, phase) {
            ("pause", Phase::Ramping { step }) => Phase::Paused { step },
            ("resume", Phase::Paused { step }) => Phase::Ramping { step },
            ("promote", Phase::Ramping { step } | Phase::Paused { step }) => self.next(step),
            ("abort", Phase::Ramping { .. } | Phase::Paused { .. } | Phase::Complete) => {
                Phase::RolledBack
            }
            ("pause" | "resume" | "promote" | "abort", _) => {
                return Err(format!(
                    "cannot {command} the rollout of route '{}': it is {}",
                    self.route,
                    phase.label().replace('-', " ")
                ));
            }
            _ => {
                return Err(format!(
                    "unknown rollout command '{command}': use pause, resume, promote or abort"
                ));
            }
        };
        info!(route = %self.route, command, to = to.label(), "rollout command");
        self.decide(&mut c, to, format!("{command} by {who}"), summary);
        Ok(())
    }

    /// The rollout's status, for `GET /admin/rollouts` and `switchyard rollout status`.
    pub(crate) fn status(&self, file: &str) -> serde_json::Value {
        let c = self.control.lock();
        let phase = self.phase();
        let (_, header) = self.now();
        let (counts, gates) = match phase.step() {
            Some(step) => {
                let (cand, base, summary, gates) = self.judge_step(&c, step);
                let side = |x: &Counts| {
                    json!({
                        "requests": x.requests,
                        "errors": x.errors,
                        "error_rate": x.error_rate(),
                        "p99_seconds": x.p99(),
                    })
                };
                (
                    json!({
                        "candidate": side(&cand),
                        "baseline": side(&base),
                        "compared": summary.compared,
                        "agreed": summary.agreed,
                    }),
                    gates,
                )
            }
            None => (serde_json::Value::Null, c.gates.clone()),
        };
        json!({
            "route": &*self.route,
            "file": file,
            "candidate": &*self.spec.candidate_name,
            "baseline": &*self.spec.baseline_name,
            "generation": format!("{:016x}", self.spec.generation),
            "state": phase.state(),
            "step": phase.step().map(|s| s + 1),
            "steps": &*self.spec.steps,
            "weight": self.weight(phase),
            "header": header.to_str().unwrap_or_default(),
            "interval_seconds": self.spec.interval.as_secs_f64(),
            "time_in_step_seconds": c.step_instant.elapsed().as_secs_f64(),
            "min_requests": self.spec.min_requests,
            "on_failure": match self.spec.on_failure { OnFailure::Rollback => "rollback", OnFailure::Pause => "pause" },
            "consecutive_errors": self.consecutive_errors.load(Ordering::Relaxed),
            "max_consecutive_errors": self.spec.max_consecutive_errors,
            "gates": gates,
            "counts": counts,
            "reason": c.reason,
            "history": c.history,
            "state_file": self.file.as_ref().map(|f| f.display().to_string()),
            "state_error": c.state_error,
            "epoch": c.epoch,
            "shared_state": c.shared.as_ref().map(|seen| seen.status(&c)),
        })
    }

    /// Forgets the state file: the route no longer has this rollout (a rollout added
    /// again later is a new generation).
    pub(crate) fn remove_state(&self) {
        if let Some(f) = &self.file {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// For `switchyard explain`: what the route's rollout does to a request now, as its state
/// file says (without one: its first step, where a fresh gateway starts).
pub(crate) fn explain(
    route: &crate::routing::Route,
    headers: &http::HeaderMap,
    model_version: &str,
    state_dir: Option<&Path>,
) -> Option<String> {
    use std::fmt::Write;
    let spec = route.rollout.as_ref()?;
    let n = spec.steps.len();
    let generation = format!("{:016x}", spec.generation);
    let (phase, source) = match state_dir.map(|d| (StateFile::path(d, &route.name), d)) {
        None => (
            Phase::Ramping { step: 0 },
            "no state_dir: a gateway starts at step 1".to_owned(),
        ),
        Some((file, _)) => match StateFile::read(&file) {
            Ok(Some(s)) if s.generation == generation && s.phase.step().is_none_or(|st| st < n) => {
                (s.phase, format!("from {}", file.display()))
            }
            Ok(Some(_)) => (
                Phase::Ramping { step: 0 },
                format!(
                    "{} holds another generation: the gateway starts this one at step 1",
                    file.display()
                ),
            ),
            Ok(None) => (
                Phase::Ramping { step: 0 },
                format!("no {} yet: the gateway starts at step 1", file.display()),
            ),
            Err(e) => (
                Phase::Ramping { step: 0 },
                format!("{e}: the gateway restarts at step 1"),
            ),
        },
    };
    let threshold = match phase {
        Phase::Ramping { step } | Phase::Paused { step } => spec.threshold(step),
        Phase::Complete => ALL,
        Phase::RolledBack => 0,
    };
    let weight = percent(threshold as f64 / ALL as f64 * 100.0);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "rollout: {} takes {weight}% of {}'s default-plan requests ({}{}; {source})",
        spec.candidate_name,
        spec.baseline_name,
        phase.label(),
        phase.step().map_or(String::new(), |_| format!(" of {n}")),
    );
    let Ok(decision) = route.decide(headers, model_version, 0, &|_| true) else {
        return Some(out);
    };
    let (moved, arm) = spec.divert(route, decision, headers, 0, threshold, &|_| true);
    let sticky = spec.sticky.as_ref().filter(|h| headers.contains_key(*h));
    let _ = match (arm, sticky) {
        (None, _) => writeln!(
            out,
            "  this request is not the rollout's: it was not decided to {} by the default plan",
            spec.baseline_name
        ),
        (Some(Arm::Candidate), Some(h)) => writeln!(
            out,
            "  this request goes to {} (its {h} falls in the candidate's share)",
            route.plan_name(moved.plan)
        ),
        (Some(Arm::Baseline), Some(h)) => writeln!(
            out,
            "  this request stays on {} (its {h} falls outside the candidate's share)",
            spec.baseline_name
        ),
        (Some(_), None) => writeln!(
            out,
            "  this request is drawn at random: {weight}% go to {}, the rest stay on {}",
            spec.candidate_name, spec.baseline_name
        ),
    };
    Some(out)
}

/// The rollout controller: judges every rollout in force each [`TICK`] until `stop`.
pub(crate) async fn drive(shared: Arc<Shared>, stop: tokio::sync::watch::Receiver<bool>) {
    let mut ticks = crate::ticker::Ticker::new(TICK, stop);
    while ticks.next().await {
        let snapshot = shared.snapshot.load();
        for entry in snapshot.routes.values() {
            if let Some(r) = &entry.rollout {
                r.tick(entry.rollout_candidate_open());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::rollout::Gates;

    fn spec(gates: Gates) -> RolloutSpec {
        RolloutSpec {
            candidate: crate::routing::PlanId(1),
            baseline: crate::routing::PlanId(0),
            candidate_name: "b".into(),
            baseline_name: "a".into(),
            steps: [10.0, 100.0].into(),
            thresholds: [1 << 28, ALL].into(),
            interval: Duration::from_secs(1),
            min_requests: 100,
            gates,
            on_failure: OnFailure::Rollback,
            max_consecutive_errors: 5,
            sticky: None,
            salt: b"s".as_slice().into(),
            generation: 7,
        }
    }

    fn counts(requests: u64, errors: u64, latency_us: u64) -> Counts {
        let mut latency = vec![0; BUCKETS];
        latency[bucket(latency_us)] = requests - errors;
        Counts {
            requests,
            errors,
            latency,
        }
    }

    #[test]
    fn buckets_hold_their_values() {
        for us in [1u64, 5, 9, 100, 1000, 12_345, 1 << 30] {
            let b = bucket(us);
            assert!(bucket_upper(b) * 1e6 >= us as f64, "{us}");
            assert!(
                bucket_upper(b) * 1e6 <= us as f64 * 1.26 + 1.0,
                "{us}: {}",
                bucket_upper(b)
            );
        }
        let c = counts(1000, 0, 2000);
        let p = c.p99().unwrap();
        assert!((0.002..0.0023).contains(&p), "{p}");
    }

    #[test]
    fn gates_wait_for_min_requests_then_pass_or_fail() {
        let all = Gates {
            error_rate: Some(0.01),
            latency_p99: Some(1.5),
            shadow_agreement: Some(0.95),
        };
        let s = spec(all);
        let base = counts(1000, 10, 1000);
        let view = |cand: &Counts, agreed, disagreed, all| {
            judge(
                &s,
                StepView {
                    candidate: cand,
                    baseline: &base,
                    baseline_total: &base,
                    agreed,
                    disagreed,
                    all,
                },
            )
            .iter()
            .map(|g| g.verdict)
            .collect::<Vec<_>>()
        };
        use Verdict::*;
        assert_eq!(
            view(&counts(50, 50, 1000), 10, 10, false),
            [Waiting, Waiting, Waiting]
        );
        assert_eq!(
            view(&counts(200, 2, 1100), 99, 1, false),
            [Pass, Pass, Pass]
        );
        assert_eq!(
            view(&counts(200, 10, 1100), 90, 10, false),
            [Fail, Pass, Fail]
        );
        assert_eq!(
            view(&counts(200, 0, 3000), 100, 0, false),
            [Pass, Fail, Pass]
        );
        assert_eq!(
            view(&counts(200, 0, 1000), 0, 0, true),
            [Pass, Pass, NotApplicable]
        );
    }

    #[test]
    fn phases_round_trip_through_their_encoding_and_the_state_file() {
        for p in [
            Phase::Ramping { step: 0 },
            Phase::Paused { step: 2 },
            Phase::Complete,
            Phase::RolledBack,
        ] {
            assert_eq!(Phase::decode(p.encode(3), 3), p);
        }
        let s = StateFile {
            route: "r".into(),
            generation: "00000000000000ff".into(),
            phase: Phase::Paused { step: 1 },
            step_started_ms: 5,
            reason: Some("pause by admin API".into()),
            history: vec![],
            epoch: 3,
        };
        let text = serde_json::to_string(&s).unwrap();
        assert!(
            text.contains(r#""phase":{"state":"paused","step":1}"#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<StateFile>(&text).unwrap(), s);
    }
}
