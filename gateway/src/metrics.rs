//! The gateway's Prometheus metrics. Families are registered once; label sets for routes
//! and targets are resolved when a snapshot is built, so the request path only adds to
//! counters it already holds.

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

use crate::error::Outcome;

/// Protocol label values, indexed by [`Protocol`].
pub(crate) const PROTOCOLS: [&str; 2] = ["grpc", "rest"];

/// Upper bounds (seconds) of `switchyard_request_duration_seconds`' buckets.
pub(crate) const DURATION_BUCKETS: [f64; 14] = [
    0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// What one (route, target)'s handles have counted so far, both protocols together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Totals {
    pub(crate) requests: u64,
    /// Requests that failed for other reasons than the client's (neither `ok` nor
    /// `client_error`).
    pub(crate) errors: u64,
    /// Durations per bucket of [`DURATION_BUCKETS`], not cumulative; the last is +Inf.
    pub(crate) buckets: [u64; DURATION_BUCKETS.len() + 1],
}

/// The downstream protocol a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    Grpc = 0,
    Rest = 1,
}

/// How one upstream attempt ended, for `switchyard_upstream_attempts_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Attempt {
    Ok = 0,
    /// The backend answered with a client error (counted healthy).
    Rejected = 1,
    /// The backend answered UNAVAILABLE, INTERNAL and the like.
    Failed = 2,
    ConnectError = 3,
    TransportError = 4,
    Timeout = 5,
    /// Skipped: the breaker is open.
    BreakerOpen = 6,
    /// The backend answered that it is full (RESOURCE_EXHAUSTED, or UNAVAILABLE from a
    /// full queue): counted neither healthy nor unhealthy.
    Full = 7,
    /// Not sent: every endpoint of the pool was at its `max_in_flight`.
    Saturated = 8,
}

impl Attempt {
    pub(crate) const ALL: [Attempt; 9] = [
        Attempt::Ok,
        Attempt::Rejected,
        Attempt::Failed,
        Attempt::ConnectError,
        Attempt::TransportError,
        Attempt::Timeout,
        Attempt::BreakerOpen,
        Attempt::Full,
        Attempt::Saturated,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Rejected => "rejected",
            Self::Failed => "failed",
            Self::ConnectError => "connect_error",
            Self::TransportError => "transport_error",
            Self::Timeout => "timeout",
            Self::BreakerOpen => "breaker_open",
            Self::Full => "full",
            Self::Saturated => "saturated",
        }
    }
}

/// All metric families.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    attempts: IntCounterVec,
    retries: IntCounterVec,
    overflow: IntCounterVec,
    priority_shed: IntCounterVec,
    pub(crate) retry_budget_exhausted: IntCounter,
    /// Access log lines handed to its writer, and dropped because its queue was full.
    pub(crate) access_log_lines: IntCounter,
    pub(crate) access_log_dropped: IntCounter,
    breaker_state: IntGaugeVec,
    breaker_transitions: IntCounterVec,
    pub(crate) endpoint_healthy: IntGaugeVec,
    /// Upstream h2 connections opened, by backend and endpoint.
    pub(crate) upstream_connects: IntCounterVec,
    /// Upstream calls in flight (h2 streams), by backend and endpoint.
    pub(crate) upstream_streams: IntGaugeVec,
    /// Calls made to a backend endpoint, by backend and endpoint: each replica's share.
    pub(crate) upstream_requests: IntCounterVec,
    /// An endpoint's queue depth as last scraped from its `/metrics`, by backend and endpoint.
    pub(crate) endpoint_queue: IntGaugeVec,
    /// Endpoints of each pool now (DNS names count once per address).
    pub(crate) pool_endpoints: IntGaugeVec,
    /// Failed DNS resolutions and `/metrics` scrapes, by backend and what failed.
    pub(crate) discovery_errors: IntCounterVec,
    pub(crate) target_ready: IntGaugeVec,
    reloads: IntCounterVec,
    pub(crate) policy_version: IntGauge,
    /// Whether the last exchange with the shared state (`shared_state`) succeeded.
    pub(crate) shared_state_up: IntGauge,
    /// Exchanges with the shared state that failed, by kind (`connect`, `sync`, `transition`).
    pub(crate) shared_state_errors: IntCounterVec,
    /// By protocol, resolved once.
    pub(crate) in_flight: [IntGauge; 2],
    /// Requests refused over `limits.max_in_flight`, by protocol.
    pub(crate) shed: [IntCounter; 2],
    /// Client connections open, by listener (`rest`, `grpc`, `admin`).
    pub(crate) connections: IntGaugeVec,
    /// Client connections closed at once over `limits.max_connections`, by listener.
    pub(crate) connections_refused: IntCounterVec,
    shadow_requests: IntCounterVec,
    shadow_agreement: IntCounterVec,
    shadow_diff: HistogramVec,
    shadow_latency_delta: HistogramVec,
    cascade_stages: IntCounterVec,
    ensembles: IntCounterVec,
    pipeline_steps: IntCounterVec,
    pipeline_step_seconds: HistogramVec,
    switches: IntCounterVec,
    cache_requests: IntCounterVec,
    cache_evictions: IntCounterVec,
    cache_bytes: IntGaugeVec,
    rollout_weight: GaugeVec,
    rollout_step: IntGaugeVec,
    rollout_state: IntGaugeVec,
    rollout_transitions: IntCounterVec,
    rollout_gate_value: GaugeVec,
    rollout_gate_failures: IntCounterVec,
}

fn float_gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let v = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(v.clone()))
        .expect("unique metric");
    v
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let v = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(v.clone()))
        .expect("unique metric");
    v
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let v = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(v.clone()))
        .expect("unique metric");
    v
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> HistogramVec {
    let v = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("valid metric");
    registry
        .register(Box::new(v.clone()))
        .expect("unique metric");
    v
}

impl Metrics {
    /// Registers every family in a fresh registry.
    pub fn new() -> Self {
        let r = Registry::new();
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "switchyard_request_duration_seconds",
                "Time from request to response, by route, target, protocol and result",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["route", "target", "protocol", "result"],
        )
        .expect("valid metric");
        r.register(Box::new(duration.clone()))
            .expect("unique metric");
        let budget = IntCounter::new(
            "switchyard_retry_budget_exhausted_total",
            "Retries not made because the retry budget was spent",
        )
        .expect("valid metric");
        r.register(Box::new(budget.clone())).expect("unique metric");
        let plain = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            r.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let access_log_lines = plain(
            "switchyard_access_log_lines_total",
            "Access log lines handed to the writer (access_log in gateway.yaml)",
        );
        let access_log_dropped = plain(
            "switchyard_access_log_dropped_total",
            "Access log lines dropped because the writer's queue was full",
        );
        let version = IntGauge::new(
            "switchyard_policy_version",
            "Version of the policy snapshot in force",
        )
        .expect("valid metric");
        r.register(Box::new(version.clone()))
            .expect("unique metric");
        Self {
            requests: counter(
                &r,
                "switchyard_requests_total",
                "Requests by route, target, protocol and result",
                &["route", "target", "protocol", "result"],
            ),
            attempts: counter(
                &r,
                "switchyard_upstream_attempts_total",
                "Upstream attempts by route, target and outcome",
                &["route", "target", "outcome"],
            ),
            retries: counter(
                &r,
                "switchyard_retries_total",
                "Retries and fallbacks by route and reason",
                &["route", "reason"],
            ),
            overflow: counter(
                &r,
                "switchyard_overflow_total",
                "Requests a full target sent to its overflow plan, by route and target",
                &["route", "target"],
            ),
            priority_shed: counter(
                &r,
                "switchyard_priority_shed_total",
                "Requests refused because their target's pool was full, by route and priority class",
                &["route", "class"],
            ),
            breaker_state: gauge(
                &r,
                "switchyard_breaker_state",
                "Circuit breaker state per target: 0 closed, 1 open, 2 half-open",
                &["target"],
            ),
            breaker_transitions: counter(
                &r,
                "switchyard_breaker_transitions_total",
                "Circuit breaker transitions per target",
                &["target", "to"],
            ),
            upstream_connects: counter(
                &r,
                "switchyard_upstream_connections_opened_total",
                "HTTP/2 connections the gateway opened to a backend endpoint, by backend and endpoint; steady under steady load when connections are reused",
                &["backend", "endpoint"],
            ),
            upstream_streams: gauge(
                &r,
                "switchyard_upstream_streams",
                "Calls in flight to a backend endpoint (HTTP/2 streams over its connections, at most 100 each), by backend and endpoint",
                &["backend", "endpoint"],
            ),
            upstream_requests: counter(
                &r,
                "switchyard_upstream_requests_total",
                "Calls the gateway made to a backend endpoint (inference and control), by backend and endpoint: how the pool's balance spreads load",
                &["backend", "endpoint"],
            ),
            endpoint_queue: gauge(
                &r,
                "switchyard_endpoint_queue",
                "Requests waiting at a backend endpoint (its nv_inference_pending_request_count summed over models) as last scraped, for balance: queue_aware; -1 when the reading is stale",
                &["backend", "endpoint"],
            ),
            pool_endpoints: gauge(
                &r,
                "switchyard_pool_endpoints",
                "Endpoints in each backend pool (a DNS name counts once per address it resolves to)",
                &["backend"],
            ),
            discovery_errors: counter(
                &r,
                "switchyard_discovery_errors_total",
                "Failed DNS resolutions of endpoint names (the last addresses stay in force) and failed /metrics scrapes, by backend and kind (resolve, scrape)",
                &["backend", "kind"],
            ),
            endpoint_healthy: gauge(
                &r,
                "switchyard_endpoint_healthy",
                "Health-check state per backend endpoint: 1 in rotation",
                &["backend", "endpoint"],
            ),
            target_ready: gauge(
                &r,
                "switchyard_target_ready",
                "ModelReady of each target on its backend pool",
                &["target"],
            ),
            reloads: counter(
                &r,
                "switchyard_policy_reload_total",
                "Policy reloads by result",
                &["result"],
            ),
            in_flight: {
                let v = gauge(
                    &r,
                    "switchyard_requests_in_flight",
                    "Requests being served, by protocol",
                    &["protocol"],
                );
                PROTOCOLS.map(|p| v.with_label_values(&[p]))
            },
            shed: {
                let v = counter(
                    &r,
                    "switchyard_requests_shed_total",
                    "Requests refused at once because limits.max_in_flight were being served, by protocol",
                    &["protocol"],
                );
                PROTOCOLS.map(|p| v.with_label_values(&[p]))
            },
            connections: gauge(
                &r,
                "switchyard_connections",
                "Client connections open, by listener (rest, grpc, admin)",
                &["port"],
            ),
            connections_refused: counter(
                &r,
                "switchyard_connections_refused_total",
                "Client connections closed as soon as accepted because the listener held limits.max_connections, by listener",
                &["port"],
            ),
            shadow_requests: counter(
                &r,
                "switchyard_shadow_requests_total",
                "Shadow copies by route, shadow and result (ok, error, dropped)",
                &["route", "shadow", "result"],
            ),
            shadow_agreement: counter(
                &r,
                "switchyard_shadow_agreement_total",
                "Compared shadow answers by whether their top-1 agrees with the primary's",
                &["route", "shadow", "agree"],
            ),
            shadow_diff: histogram(
                &r,
                "switchyard_shadow_max_abs_difference",
                "Largest absolute difference between shadow and primary outputs",
                &["route", "shadow"],
                vec![
                    1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0,
                ],
            ),
            shadow_latency_delta: histogram(
                &r,
                "switchyard_shadow_latency_delta_seconds",
                "Shadow latency minus primary latency",
                &["route", "shadow"],
                vec![
                    -0.1, -0.01, -0.001, -0.0001, 0.0, 0.0001, 0.001, 0.01, 0.1, 1.0,
                ],
            ),
            cascade_stages: counter(
                &r,
                "switchyard_cascade_stage_total",
                "Cascade stages (1-based) by route, plan, stage and outcome (answered, escalated, skipped_deadline, failed)",
                &["route", "plan", "stage", "outcome"],
            ),
            ensembles: counter(
                &r,
                "switchyard_ensemble_total",
                "Ensemble runs by route, plan and result (ok, below_quorum, error)",
                &["route", "plan", "result"],
            ),
            pipeline_steps: counter(
                &r,
                "switchyard_pipeline_step_total",
                "Pipeline steps by route, plan, step and outcome (ok, error, deadline: the step timed out or could not fit in the time left)",
                &["route", "plan", "step", "outcome"],
            ),
            pipeline_step_seconds: histogram(
                &r,
                "switchyard_pipeline_step_seconds",
                "Latency of pipeline steps that answered, by route, plan and step",
                &["route", "plan", "step"],
                vec![
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0, 2.5,
                ],
            ),
            switches: counter(
                &r,
                "switchyard_switch_total",
                "Switch decisions by route, plan and case (1-based case number, default, or error when the first answer could not be read)",
                &["route", "plan", "case"],
            ),
            cache_requests: counter(
                &r,
                "switchyard_cache_requests_total",
                "Cached routes' requests by result (hit, miss, coalesced, bypass)",
                &["route", "result"],
            ),
            cache_evictions: counter(
                &r,
                "switchyard_cache_evictions_total",
                "Cache entries evicted (expired or over max_bytes)",
                &["route"],
            ),
            cache_bytes: gauge(
                &r,
                "switchyard_cache_bytes",
                "Bytes held by the route's cache",
                &["route"],
            ),
            rollout_weight: float_gauge(
                &r,
                "switchyard_rollout_weight",
                "Percent of the baseline's default-plan requests the rollout's candidate gets now",
                &["route"],
            ),
            rollout_step: gauge(
                &r,
                "switchyard_rollout_step",
                "The rollout's current step, 1-based (0 once rolled back)",
                &["route"],
            ),
            rollout_state: gauge(
                &r,
                "switchyard_rollout_state",
                "1 for the rollout's current state (ramping, paused, complete, rolled_back), 0 for the others",
                &["route", "state"],
            ),
            rollout_transitions: counter(
                &r,
                "switchyard_rollout_transitions_total",
                "Rollout transitions by route, from and to (step-N, paused-N, complete, rolled_back)",
                &["route", "from", "to"],
            ),
            rollout_gate_value: float_gauge(
                &r,
                "switchyard_rollout_gate_value",
                "Each gate's last value over the current step (error_rate: increase over the baseline; latency_p99: ratio; shadow_agreement: share)",
                &["route", "gate"],
            ),
            rollout_gate_failures: counter(
                &r,
                "switchyard_rollout_gate_failures_total",
                "Gate failures that rolled back or paused a rollout, by route and gate (breaker and consecutive_errors included)",
                &["route", "gate"],
            ),
            shared_state_up: gauge(
                &r,
                "switchyard_shared_state_up",
                "1 when the last exchange with the shared state (shared_state.redis) succeeded, 0 when it failed",
                &[],
            )
            .with_label_values(&[] as &[&str]),
            shared_state_errors: counter(
                &r,
                "switchyard_shared_state_errors_total",
                "Failed exchanges with the shared state, by kind (connect, sync, transition)",
                &["kind"],
            ),
            duration,
            retry_budget_exhausted: budget,
            access_log_lines,
            access_log_dropped,
            policy_version: version,
            registry: r,
        }
    }

    /// The registry, for `/metrics`.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        prometheus::TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# encoding failed: {e}\n"))
    }

    pub(crate) fn reload(&self, ok: bool) {
        self.reloads
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
    }

    pub(crate) fn breaker(&self, target: &str) -> BreakerMetrics {
        BreakerMetrics {
            state: self.breaker_state.with_label_values(&[target]),
            opened: self
                .breaker_transitions
                .with_label_values(&[target, "open"]),
            half_opened: self
                .breaker_transitions
                .with_label_values(&[target, "half_open"]),
            closed: self
                .breaker_transitions
                .with_label_values(&[target, "closed"]),
        }
    }

    pub(crate) fn shadow(&self, route: &str, shadow: &str) -> ShadowMetrics {
        let req = |r: &str| self.shadow_requests.with_label_values(&[route, shadow, r]);
        ShadowMetrics {
            ok: req("ok"),
            error: req("error"),
            dropped: req("dropped"),
            uncomparable: req("uncomparable"),
            agree: self
                .shadow_agreement
                .with_label_values(&[route, shadow, "true"]),
            disagree: self
                .shadow_agreement
                .with_label_values(&[route, shadow, "false"]),
            max_abs_diff: self.shadow_diff.with_label_values(&[route, shadow]),
            latency_delta: self
                .shadow_latency_delta
                .with_label_values(&[route, shadow]),
        }
    }

    pub(crate) fn cascade(&self, route: &str, plan: &str, stages: usize) -> CascadeMetrics {
        CascadeMetrics::new(stages, &|i, outcome| {
            self.cascade_stages
                .with_label_values(&[route, plan, &(i + 1).to_string(), outcome])
        })
    }

    pub(crate) fn ensemble(&self, route: &str, plan: &str) -> EnsembleMetrics {
        let c = |r: &str| self.ensembles.with_label_values(&[route, plan, r]);
        EnsembleMetrics {
            ok: c("ok"),
            below_quorum: c("below_quorum"),
            error: c("error"),
        }
    }

    pub(crate) fn pipeline(&self, route: &str, plan: &str, steps: &[&str]) -> PipelineMetrics {
        let c = |step: &str, outcome: &str| {
            self.pipeline_steps
                .with_label_values(&[route, plan, step, outcome])
        };
        PipelineMetrics {
            ok: steps.iter().map(|s| c(s, "ok")).collect(),
            error: steps.iter().map(|s| c(s, "error")).collect(),
            deadline: steps.iter().map(|s| c(s, "deadline")).collect(),
            seconds: steps
                .iter()
                .map(|s| {
                    self.pipeline_step_seconds
                        .with_label_values(&[route, plan, s])
                })
                .collect(),
        }
    }

    pub(crate) fn switch(&self, route: &str, plan: &str, cases: usize) -> SwitchMetrics {
        let c = |case: &str| self.switches.with_label_values(&[route, plan, case]);
        SwitchMetrics {
            cases: (0..cases)
                .map(|i| c(&(i + 1).to_string()))
                .chain(std::iter::once(c("default")))
                .collect(),
            error: c("error"),
        }
    }

    pub(crate) fn cache(&self, route: &str) -> CacheMetrics {
        let req = |r: &str| self.cache_requests.with_label_values(&[route, r]);
        CacheMetrics {
            hits: req("hit"),
            misses: req("miss"),
            coalesced: req("coalesced"),
            bypass: req("bypass"),
            evictions: self.cache_evictions.with_label_values(&[route]),
            bytes: self.cache_bytes.with_label_values(&[route]),
        }
    }

    pub(crate) fn rollout(&self, route: &str) -> RolloutMetrics {
        RolloutMetrics {
            weight: self.rollout_weight.with_label_values(&[route]),
            step: self.rollout_step.with_label_values(&[route]),
            state: ROLLOUT_STATES.map(|s| self.rollout_state.with_label_values(&[route, s])),
            gate_value: ROLLOUT_GATES
                .map(|g| self.rollout_gate_value.with_label_values(&[route, g])),
            transitions: self.rollout_transitions.clone(),
            gate_failures: self.rollout_gate_failures.clone(),
            route: route.to_owned(),
        }
    }

    /// Handles for one (route, target) pair; `target` is `-` before a target is chosen.
    pub(crate) fn target(&self, route: &str, target: &str) -> TargetMetrics {
        TargetMetrics {
            requests: PROTOCOLS.map(|p| {
                Outcome::ALL.map(|o| {
                    self.requests
                        .with_label_values(&[route, target, p, o.label()])
                })
            }),
            duration: PROTOCOLS.map(|p| {
                Outcome::ALL.map(|o| {
                    self.duration
                        .with_label_values(&[route, target, p, o.label()])
                })
            }),
            attempts: Attempt::ALL
                .map(|a| self.attempts.with_label_values(&[route, target, a.label()])),
            overflow: self.overflow.with_label_values(&[route, target]),
        }
    }

    /// Handles of one route; `classes` are its priority classes (`default` when it has
    /// none).
    pub(crate) fn route(&self, route: &str, classes: &[&str]) -> RouteMetrics {
        RouteMetrics {
            shed: classes
                .iter()
                .map(|c| self.priority_shed.with_label_values(&[route, c]))
                .collect(),
            unrouted: self.target(route, "-"),
            retry_connect: self.retries.with_label_values(&[route, "connect_failure"]),
            retry_after_send: self.retries.with_label_values(&[route, "after_send"]),
            fallback_breaker: self.retries.with_label_values(&[route, "breaker_open"]),
            budget_exhausted: self.retry_budget_exhausted.clone(),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Handles of one (route, target).
#[derive(Debug, Clone)]
pub(crate) struct TargetMetrics {
    requests: [[IntCounter; 6]; 2],
    duration: [[Histogram; 6]; 2],
    /// Requests this target sent to its overflow plan.
    pub(crate) overflow: IntCounter,
    attempts: [IntCounter; 9],
}

impl TargetMetrics {
    pub(crate) fn finish(&self, protocol: Protocol, outcome: Outcome, seconds: f64) {
        self.requests[protocol as usize][outcome as usize].inc();
        self.duration[protocol as usize][outcome as usize].observe(seconds);
    }

    pub(crate) fn attempt(&self, a: Attempt) {
        self.attempts[a as usize].inc();
    }

    /// What these handles have counted so far (the dashboard's sampler, once a second;
    /// it reads each histogram's buckets, so it is kept off the request path).
    pub(crate) fn totals(&self) -> Totals {
        use prometheus::core::Metric as _;
        let mut t = Totals::default();
        for (counters, histograms) in self.requests.iter().zip(&self.duration) {
            for (o, (c, h)) in counters.iter().zip(histograms).enumerate() {
                let n = c.get();
                t.requests += n;
                if o != Outcome::Ok as usize && o != Outcome::ClientError as usize {
                    t.errors += n;
                }
                // Most (protocol, result) pairs never happen: reading their buckets
                // (metric() builds the labels and buckets) would be most of the cost.
                if h.get_sample_count() == 0 {
                    continue;
                }
                let m = h.metric();
                let m = m.get_histogram();
                let mut below = 0;
                for (slot, b) in t.buckets.iter_mut().zip(m.get_bucket()) {
                    let cumulative = b.cumulative_count();
                    *slot += cumulative - below;
                    below = cumulative;
                }
                t.buckets[DURATION_BUCKETS.len()] += m.get_sample_count() - below;
            }
        }
        t
    }
}

/// Metric handles of one breaker.
#[derive(Debug, Clone)]
pub(crate) struct BreakerMetrics {
    pub(crate) state: IntGauge,
    pub(crate) opened: IntCounter,
    pub(crate) half_opened: IntCounter,
    pub(crate) closed: IntCounter,
}

/// Counters of one route's cache.
#[derive(Debug, Clone)]
pub(crate) struct CacheMetrics {
    pub(crate) hits: IntCounter,
    pub(crate) misses: IntCounter,
    pub(crate) coalesced: IntCounter,
    pub(crate) bypass: IntCounter,
    pub(crate) evictions: IntCounter,
    pub(crate) bytes: IntGauge,
}

/// Rollout states, as the `state` label writes them.
pub(crate) const ROLLOUT_STATES: [&str; 4] = ["ramping", "paused", "complete", "rolled_back"];
/// Rollout gates, as the `gate` label writes them.
pub(crate) const ROLLOUT_GATES: [&str; 3] = ["error_rate", "latency_p99", "shadow_agreement"];

/// The metrics of one route's rollout (written by the rollout controller only).
#[derive(Debug, Clone)]
pub(crate) struct RolloutMetrics {
    pub(crate) weight: Gauge,
    pub(crate) step: IntGauge,
    /// By `ROLLOUT_STATES`.
    pub(crate) state: [IntGauge; 4],
    /// By `ROLLOUT_GATES`.
    pub(crate) gate_value: [Gauge; 3],
    transitions: IntCounterVec,
    gate_failures: IntCounterVec,
    route: String,
}

impl RolloutMetrics {
    pub(crate) fn transition(&self, from: &str, to: &str) {
        self.transitions
            .with_label_values(&[self.route.as_str(), from, to])
            .inc();
    }

    pub(crate) fn gate_failed(&self, gate: &str) {
        self.gate_failures
            .with_label_values(&[self.route.as_str(), gate])
            .inc();
    }
}

/// The metrics of one route's shadow.
#[derive(Debug, Clone)]
pub(crate) struct ShadowMetrics {
    pub(crate) ok: IntCounter,
    pub(crate) error: IntCounter,
    pub(crate) dropped: IntCounter,
    pub(crate) agree: IntCounter,
    pub(crate) disagree: IntCounter,
    pub(crate) uncomparable: IntCounter,
    pub(crate) max_abs_diff: Histogram,
    pub(crate) latency_delta: Histogram,
}

/// Per-stage counters of one cascade.
#[derive(Debug, Clone)]
pub(crate) struct CascadeMetrics {
    pub(crate) answered: Box<[IntCounter]>,
    pub(crate) escalated: Box<[IntCounter]>,
    pub(crate) skipped_deadline: Box<[IntCounter]>,
    pub(crate) failed: Box<[IntCounter]>,
}

impl CascadeMetrics {
    /// `counter(stage, outcome)` for each of `stages` stages.
    pub(crate) fn new(stages: usize, counter: &dyn Fn(usize, &str) -> IntCounter) -> Self {
        let make = |what: &str| (0..stages).map(|i| counter(i, what)).collect::<Box<[_]>>();
        Self {
            answered: make("answered"),
            escalated: make("escalated"),
            skipped_deadline: make("skipped_deadline"),
            failed: make("failed"),
        }
    }
}

/// Per-step counters and latencies of one pipeline.
#[derive(Debug, Clone)]
pub(crate) struct PipelineMetrics {
    pub(crate) ok: Box<[IntCounter]>,
    pub(crate) error: Box<[IntCounter]>,
    pub(crate) deadline: Box<[IntCounter]>,
    pub(crate) seconds: Box<[Histogram]>,
}

/// Decisions of one switch: one counter per case, then the default.
#[derive(Debug, Clone)]
pub(crate) struct SwitchMetrics {
    pub(crate) cases: Box<[IntCounter]>,
    pub(crate) error: IntCounter,
}

/// Results of one ensemble plan.
#[derive(Debug, Clone)]
pub(crate) struct EnsembleMetrics {
    pub(crate) ok: IntCounter,
    pub(crate) below_quorum: IntCounter,
    pub(crate) error: IntCounter,
}

/// Handles of one route.
#[derive(Debug, Clone)]
pub(crate) struct RouteMetrics {
    /// Requests that failed before a target was chosen.
    pub(crate) unrouted: TargetMetrics,
    pub(crate) retry_connect: IntCounter,
    pub(crate) retry_after_send: IntCounter,
    pub(crate) fallback_breaker: IntCounter,
    pub(crate) budget_exhausted: IntCounter,
    /// Requests shed by priority class (index of the route's classes).
    pub(crate) shed: Box<[IntCounter]>,
}
