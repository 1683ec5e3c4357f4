//! One inference on a route's decided target under the protection rules: breaker
//! admission, fallback and connect-failure retries on other targets, retries after sending
//! only on idempotent routes, a shared retry budget, and the deadline forwarded as
//! Triton's `timeout` parameter.
//!
//! Every reply or call error is classified once, by the pure [`classify`], into what it
//! means for the client (answered, refused, expired, failed) and for the target's health
//! (healthy, unhealthy, or nothing learnt). The rule that matters most: what the client
//! caused (its own short deadline, a request the backend cannot decode, any 4xx-class
//! status) never counts against a breaker and is never retried.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;
use tokio::time::Instant;

use super::budget::RetryBudget;
use super::client::{CallError, Marks, Reply};
use super::{Endpoint, Upstreams};
use crate::error::{GatewayError, is_upstream_failure};
use crate::grpc::MODEL_INFER;
use crate::grpc::infer::InferMessage;
use crate::grpc::status::code;
use crate::metrics::Attempt;
use crate::routing::{Class, Decision, TargetId};
use crate::snapshot::RouteEntry;
use crate::trace::{self, Cx};

/// A backend's timeout (or a client leaving) this close to the request's deadline is
/// the deadline passing.
pub(crate) const DEADLINE_SLACK: Duration = Duration::from_millis(5);

/// What tonic (and so the bundled backend) says when it cannot decode a request message.
const DECODE_REJECTION: &str = "failed to decode Protobuf message";

/// One unary gRPC call to an endpoint: the seam the tests fake.
pub(crate) trait Call: Sync {
    fn call(
        &self,
        endpoint: &Endpoint,
        path: &'static str,
        message: &[Bytes],
        budget: Duration,
        marks: Marks<'_>,
    ) -> impl Future<Output = Result<Reply, CallError>> + Send;
}

impl Call for Upstreams {
    fn call(
        &self,
        endpoint: &Endpoint,
        path: &'static str,
        message: &[Bytes],
        budget: Duration,
        marks: Marks<'_>,
    ) -> impl Future<Output = Result<Reply, CallError>> + Send {
        Upstreams::call(self, endpoint, path, message, budget, marks)
    }
}

/// A request's deadline, and whose it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Deadline {
    /// When it passes.
    pub(crate) at: Instant,
    /// The whole budget, for messages.
    pub(crate) budget: Duration,
    /// Whether the client chose it: a `grpc-timeout` or Triton `timeout` parameter shorter
    /// than the route's own deadline. A timeout then says nothing about the backend.
    pub(crate) clients: bool,
}

impl Deadline {
    /// The route's deadline from `start`, or the client's when that is shorter.
    pub(crate) fn new(start: Instant, route: Duration, client: Option<Duration>) -> Self {
        match client {
            Some(c) if c < route => Self {
                at: start + c,
                budget: c,
                clients: true,
            },
            _ => Self {
                at: start + route,
                budget: route,
                clients: false,
            },
        }
    }

    /// Time left at `now`.
    pub(crate) fn left(&self, now: Instant) -> Duration {
        self.at.saturating_duration_since(now)
    }

    /// The error of a request whose deadline passed; `detail` says what happened first.
    pub(crate) fn error(&self, route: &str, detail: String) -> GatewayError {
        GatewayError::Deadline {
            route: route.to_owned(),
            after: self.budget,
            detail,
        }
    }
}

/// What one attempt came to, for the client.
#[derive(Debug)]
pub(crate) enum Attempted {
    /// The target answered: the `ModelInferResponse` bytes.
    Answered(Bytes),
    /// The request itself was refused (the client's fault): answer with it, no retry.
    Refused(GatewayError),
    /// The deadline passed: answer with it, no retry.
    Expired(GatewayError),
    /// The backend is full and did not run the request (RESOURCE_EXHAUSTED, or
    /// UNAVAILABLE from a full queue): another endpoint or the overflow may take it.
    Full(String),
    /// The target failed; `sent` says whether the request may have reached it (then only
    /// idempotent routes retry), `gone` whether the connection failed (refused, reset,
    /// closed) rather than the backend answering with an error.
    Failed {
        sent: bool,
        gone: bool,
        error: GatewayError,
    },
}

/// What one attempt says about the target's health, for its breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Health {
    Healthy,
    Unhealthy,
    /// Nothing: the admission is given back unrecorded.
    Unknown,
}

/// One attempt's classification: for the client, for the breaker, for the metrics.
#[derive(Debug)]
pub(crate) struct Classified {
    pub(crate) attempted: Attempted,
    pub(crate) health: Health,
    pub(crate) metric: Attempt,
}

/// Classifies one upstream reply or call error of target `target` on `route`, at `now`.
pub(crate) fn classify(
    result: Result<Reply, CallError>,
    deadline: &Deadline,
    now: Instant,
    route: &str,
    target: &str,
) -> Classified {
    use Attempted::*;
    let done = |attempted, health, metric| Classified {
        attempted,
        health,
        metric,
    };
    let reply = match result {
        Ok(reply) => reply,
        Err(CallError::Connect { endpoint, reason }) => {
            let error = GatewayError::UpstreamFailed {
                route: route.to_owned(),
                reason: format!("{target}: cannot connect to {endpoint}: {reason}"),
            };
            return done(
                Failed {
                    sent: false,
                    gone: true,
                    error,
                },
                Health::Unhealthy,
                Attempt::ConnectError,
            );
        }
        Err(CallError::Transport { endpoint, reason }) => {
            let error = GatewayError::UpstreamFailed {
                route: route.to_owned(),
                reason: format!("{target}: {endpoint}: {reason}"),
            };
            return done(
                Failed {
                    sent: true,
                    gone: true,
                    error,
                },
                Health::Unhealthy,
                Attempt::TransportError,
            );
        }
        Err(CallError::TooLarge { endpoint, limit }) => {
            // The request asked for more than the gateway takes back: the client's to
            // change (a smaller batch, fewer outputs), and no sign of the backend's health.
            let error = GatewayError::ReplyTooLarge {
                route: route.to_owned(),
                detail: format!(
                    "{target}: {endpoint} sent a reply over the {limit}-byte limit (limits.max_response_bytes)"
                ),
            };
            return done(Refused(error), Health::Unknown, Attempt::Rejected);
        }
        Err(CallError::Timeout { .. }) => {
            // Our own timer fired at the deadline: the backend's fault only when the
            // deadline was the route's.
            let health = if deadline.clients {
                Health::Unknown
            } else {
                Health::Unhealthy
            };
            return done(
                Expired(deadline.error(route, String::new())),
                health,
                Attempt::Timeout,
            );
        }
    };
    let Reply {
        status,
        message,
        body,
    } = reply;
    match status {
        code::OK => done(Answered(body), Health::Healthy, Attempt::Ok),
        // A full backend is a busy one, not a broken one: its breaker hears nothing.
        s if says_full(s, &message) => done(Full(message), Health::Unknown, Attempt::Full),
        code::INTERNAL if message.starts_with(DECODE_REJECTION) => {
            // The backend could not parse what the client sent: the client's fault, and
            // it says nothing of the backend's health.
            let error = GatewayError::Upstream {
                code: code::INVALID_ARGUMENT,
                message: format!("the backend cannot decode the request: {message}"),
            };
            done(Refused(error), Health::Unknown, Attempt::Rejected)
        }
        s if !is_upstream_failure(s) => {
            // The backend judged the request itself: healthy backend, client's problem.
            let error = GatewayError::Upstream { code: s, message };
            done(Refused(error), Health::Healthy, Attempt::Rejected)
        }
        code::DEADLINE_EXCEEDED | code::CANCELLED
            if deadline.clients || deadline.left(now) < DEADLINE_SLACK =>
        {
            // The backend gave up on the budget we forwarded (its queue timeout, or
            // tonic's grpc-timeout, which it reports as CANCELLED) as our own timer was
            // about to: the request's deadline passed either way. A deadline the client
            // chose is the client's; the route's own is the backend's too slow answer.
            let health = if deadline.clients {
                Health::Unknown
            } else {
                Health::Unhealthy
            };
            let detail = format!(" (the backend: {message})");
            done(
                Expired(deadline.error(route, detail)),
                health,
                Attempt::Timeout,
            )
        }
        s => {
            let error = GatewayError::Upstream { code: s, message };
            done(
                Failed {
                    sent: true,
                    gone: false,
                    error,
                },
                Health::Unhealthy,
                Attempt::Failed,
            )
        }
    }
}

/// Whether a backend's status says its queue is full, so it did not run the request:
/// RESOURCE_EXHAUSTED (the bundled backend's `--max-queue-bytes`), unless it is about a
/// message over a size limit, which another endpoint would refuse as well; or UNAVAILABLE
/// from a full queue (Triton's "Exceeds maximum queue size").
fn says_full(status: i32, message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    match status {
        code::RESOURCE_EXHAUSTED => !(m.contains("too large") || m.contains("larger than")),
        code::UNAVAILABLE => m.contains("queue") && (m.contains("full") || m.contains("exceeds")),
        _ => false,
    }
}

/// How one inference runs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Options<'a> {
    /// Whether the route's fallback targets and the decision's other split members may
    /// answer when the chosen target cannot (top-level decisions only).
    pub(crate) fallback: bool,
    /// Whether this is a shadow copy (marked for the backend).
    pub(crate) shadow: bool,
    /// The request's priority class: how full an endpoint may be for it.
    pub(crate) class: Class,
    /// Where attempts' spans hang in the request's trace.
    pub(crate) trace: Cx<'a>,
}

/// A successful inference: which target answered and its `ModelInferResponse` bytes.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) target: TargetId,
    pub(crate) response: Bytes,
}

/// A failed inference: the error and the target that was last tried, if any.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) error: GatewayError,
    pub(crate) target: Option<TargetId>,
}

/// The upstream side of a request: the call and the retry budget it draws on.
pub(crate) struct Upstream<'a, C> {
    pub(crate) call: &'a C,
    pub(crate) budget: &'a RetryBudget,
}

// By hand: a derive would ask `C: Copy`, and only the references are copied.
impl<C> Clone for Upstream<'_, C> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<C> Copy for Upstream<'_, C> {}

/// Runs `message` on the decided target, falling back and retrying as the route allows,
/// until `deadline`.
pub(crate) async fn infer<C: Call>(
    upstream: Upstream<'_, C>,
    entry: &RouteEntry,
    decision: &Decision,
    message: &InferMessage,
    deadline: Deadline,
    options: Options<'_>,
) -> Result<Answer, Failure> {
    let route = &entry.route;
    let _active = upstream.budget.enter();
    let mut after_send_retries = 0u32;
    let mut last: Option<Failure> = None;
    let mut skipped: Vec<String> = Vec::new();
    let mut attempts = 0u32;
    // Nested plans (cascade stages, ensemble members, shadows) try their own target only:
    // a fallback answering for a member would change what the strategy computes.
    let tries = if options.fallback { usize::MAX } else { 1 };
    let mut candidates = route.candidates(decision).take(tries);
    // A target whose endpoint failed is tried again on another endpoint of its pool
    // before the next target; `tried` holds the endpoints that failed it.
    let mut again: Option<TargetId> = None;
    let mut tried: Vec<usize> = Vec::new();
    // A retry after a failed connection (refused, reset) adds no load to a backend that
    // is struggling: that one is gone. Only retries after an error answer draw on the
    // retry budget, which exists to keep retries from burying a slow backend.
    let mut budgeted = false;
    // The kind of retry the next attempt is (`Some(true)`: after sending), counted when it
    // is made: a failure with nowhere left to go is no retry.
    let mut retry_after_send: Option<bool> = None;
    loop {
        let (target_id, other_endpoint) = match again.take() {
            Some(t) => (t, true),
            None => match candidates.next() {
                Some(t) => {
                    tried.clear();
                    (t, false)
                }
                None => break,
            },
        };
        let target = entry.target(target_id);
        let spec = route.target(target_id);
        // The decided target is tried even when its pool looks down; others only if up.
        if attempts > 0 && !other_endpoint && !target.pool.has_healthy() {
            skipped.push(format!("{}: no healthy endpoint", spec.name));
            continue;
        }
        let endpoint = if other_endpoint {
            match target.pool.pick_other(&tried) {
                Some(e) => e,
                None => continue,
            }
        } else {
            match target.pool.pick() {
                Some(e) => e,
                None => {
                    skipped.push(format!(
                        "{}: no endpoint (its names resolve to nothing yet)",
                        spec.name
                    ));
                    continue;
                }
            }
        };
        // A pool with `max_in_flight`: a full endpoint passes the call to one with room.
        // A target with an overflow spills at the limit itself; one without takes each
        // class up to its share of the headroom above it, then refuses it.
        let spill = spec.overflow.is_some();
        let class = options.class;
        let endpoint = match target
            .pool
            .room(endpoint, |max| if spill { max } else { class.limit(max) })
        {
            Ok(e) => e,
            Err(limit) => {
                target.metrics.attempt(Attempt::Saturated);
                let detail = format!(
                    "{}: every endpoint of pool '{}' has {limit} calls in flight (its max_in_flight{})",
                    spec.name,
                    target.pool.name,
                    if spill || class.of == 1 {
                        String::new()
                    } else {
                        format!(" for priority class {} of {}", class.index + 1, class.of)
                    }
                );
                if attempts == 0 && !other_endpoint {
                    return Err(Failure {
                        error: GatewayError::Saturated {
                            route: route.name.to_string(),
                            detail,
                        },
                        target: Some(target_id),
                    });
                }
                skipped.push(detail);
                continue;
            }
        };
        let Some(admission) = target.state.breaker.admit() else {
            target.metrics.attempt(Attempt::BreakerOpen);
            entry.metrics.fallback_breaker.inc();
            skipped.push(format!("{}: circuit breaker open", spec.name));
            continue;
        };
        // A retry after an error answer needs the budget. (Returning or breaking drops
        // the admission unrecorded: nothing was sent.)
        let _retry = if budgeted {
            let Some(retry) = upstream.budget.try_retry() else {
                entry.metrics.budget_exhausted.inc();
                break;
            };
            Some(retry)
        } else {
            None
        };
        let left = deadline.left(Instant::now());
        if left.is_zero() {
            let detail = last
                .as_ref()
                .map(|f| format!(" after: {}", f.error))
                .unwrap_or_default();
            return Err(Failure {
                error: deadline.error(&route.name, detail),
                target: Some(target_id),
            });
        }
        attempts += 1;
        match retry_after_send.take() {
            Some(true) => entry.metrics.retry_after_send.inc(),
            Some(false) => entry.metrics.retry_connect.inc(),
            None => {}
        }
        let chunks = message.chunks(&spec.model, &spec.version, left.as_micros() as u64);
        endpoint.requests.inc();
        let span = options.trace.child(
            || format!("attempt {}", spec.name),
            SpanKind::Client,
            || {
                vec![
                    KeyValue::new("rpc.system", "grpc"),
                    KeyValue::new("rpc.method", "ModelInfer"),
                    KeyValue::new("server.address", endpoint.address.clone()),
                    KeyValue::new("switchyard.target", spec.name.to_string()),
                    KeyValue::new(
                        "switchyard.model",
                        format!("{}/{}", spec.model, spec.version),
                    ),
                    KeyValue::new("switchyard.attempt", i64::from(attempts)),
                ]
            },
        );
        let span_cx = trace::context(&span);
        let propagate = match &span_cx {
            Some(cx) => options.trace.under(cx).propagate(),
            None => options.trace.propagate(),
        };
        let marks = Marks {
            shadow: options.shadow,
            trace: propagate.as_ref(),
        };
        let result = upstream
            .call
            .call(&endpoint, MODEL_INFER, &chunks, left, marks)
            .await;
        let mut classified = classify(result, &deadline, Instant::now(), &route.name, &spec.name);
        trace::end(
            span,
            || {
                vec![KeyValue::new(
                    "switchyard.outcome",
                    classified.metric.label(),
                )]
            },
            match &classified.attempted {
                Attempted::Answered(_) => None,
                _ => Some(classified.metric.label()),
            },
        );
        if let Attempted::Failed {
            gone: true, sent, ..
        } = classified.attempted
        {
            // One endpoint's connection says nothing of the target served elsewhere: a
            // pool with one endpoint dead opened the breaker of every target on it. And a
            // refused connect means nothing listens there: waiting for two failed health
            // checks sent every other request to it meanwhile. (A pool's only endpoint
            // is left to the target's breaker and the health checks.)
            if target
                .pool
                .has_other_healthy(Arc::as_ptr(&endpoint) as usize)
            {
                classified.health = Health::Unknown;
                if !sent {
                    endpoint.eject();
                }
            }
        }
        match classified.health {
            Health::Healthy => admission.record(true),
            Health::Unhealthy => admission.record(false),
            Health::Unknown => drop(admission),
        }
        target.metrics.attempt(classified.metric);
        match classified.attempted {
            Attempted::Answered(response) => {
                return Ok(Answer {
                    target: target_id,
                    response,
                });
            }
            Attempted::Full(message) => {
                // Not run there: another endpoint of the pool may have room (nothing was
                // executed, so any route may go again); else the pool is full.
                tried.push(Arc::as_ptr(&endpoint) as usize);
                if target.pool.pick_other(&tried).is_some() {
                    again = Some(target_id);
                    continue;
                }
                return Err(Failure {
                    error: GatewayError::Saturated {
                        route: route.name.to_string(),
                        detail: format!(
                            "{}: the backends of pool '{}' are full ({message})",
                            spec.name, target.pool.name
                        ),
                    },
                    target: Some(target_id),
                });
            }
            Attempted::Refused(error) | Attempted::Expired(error) => {
                return Err(Failure {
                    error,
                    target: Some(target_id),
                });
            }
            Attempted::Failed { sent, gone, error } => {
                last = Some(Failure {
                    error,
                    target: Some(target_id),
                });
                if !sent {
                    // Nothing was sent: always safe to try elsewhere.
                    retry_after_send = Some(false);
                } else if route.retry.idempotent && after_send_retries < route.retry.attempts {
                    after_send_retries += 1;
                    retry_after_send = Some(true);
                } else {
                    break;
                }
                budgeted = !gone;
                tried.push(Arc::as_ptr(&endpoint) as usize);
                if target.pool.pick_other(&tried).is_some() {
                    again = Some(target_id);
                }
            }
        }
    }
    Err(last.unwrap_or_else(|| Failure {
        error: GatewayError::NoTarget {
            route: route.name.to_string(),
            detail: skipped.join(", "),
        },
        target: None,
    }))
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use parking_lot::Mutex;

    use super::*;
    use crate::grpc::infer::split_infer_request;
    use crate::metrics::Metrics;
    use crate::snapshot::{Kept, Snapshot};
    use crate::upstream::breaker::State;

    const ROUTE_MS: u64 = 250;

    fn deadline(clients: bool) -> Deadline {
        let now = Instant::now();
        if clients {
            Deadline::new(
                now,
                Duration::from_millis(ROUTE_MS),
                Some(Duration::from_millis(20)),
            )
        } else {
            Deadline::new(now, Duration::from_millis(ROUTE_MS), None)
        }
    }

    fn status(status: i32, message: &str) -> Result<Reply, CallError> {
        Ok(Reply {
            status,
            message: message.to_owned(),
            body: Bytes::new(),
        })
    }

    fn check(result: Result<Reply, CallError>, d: &Deadline) -> (&'static str, Health, i32) {
        let c = classify(result, d, Instant::now(), "r", "t");
        let (kind, grpc) = match &c.attempted {
            Attempted::Answered(_) => ("answered", 0),
            Attempted::Refused(e) => ("refused", e.rescue().grpc),
            Attempted::Expired(e) => ("expired", e.rescue().grpc),
            Attempted::Full(_) => ("full", code::RESOURCE_EXHAUSTED),
            Attempted::Failed {
                sent: true,
                gone: true,
                error,
            } => ("connection failed after send", error.rescue().grpc),
            Attempted::Failed {
                sent: true,
                gone: false,
                error,
            } => ("failed after send", error.rescue().grpc),
            Attempted::Failed {
                sent: false, error, ..
            } => ("not sent", error.rescue().grpc),
        };
        (kind, c.health, grpc)
    }

    /// What happened, the reply, whose deadline, and the expected classification.
    type Case = (
        &'static str,
        Result<Reply, CallError>,
        Deadline,
        (&'static str, Health, i32),
    );

    #[tokio::test(start_paused = true)]
    async fn each_reply_is_classified_once_for_client_and_breaker() {
        let route = deadline(false);
        let client = deadline(true);
        let timeout = || {
            Err(CallError::Timeout {
                endpoint: "e".into(),
                after: Duration::from_millis(1),
            })
        };
        let cases: Vec<Case> = vec![
            (
                "ok",
                status(code::OK, ""),
                route,
                ("answered", Health::Healthy, code::OK),
            ),
            (
                "a 4xx-class status is the client's; the backend is healthy",
                status(code::INVALID_ARGUMENT, "bad shape"),
                route,
                ("refused", Health::Healthy, code::INVALID_ARGUMENT),
            ),
            (
                "NOT_FOUND too",
                status(code::NOT_FOUND, "no such model"),
                route,
                ("refused", Health::Healthy, code::NOT_FOUND),
            ),
            (
                "a request the backend cannot decode is the client's, not INTERNAL",
                status(
                    code::INTERNAL,
                    "failed to decode Protobuf message: invalid wire type",
                ),
                route,
                ("refused", Health::Unknown, code::INVALID_ARGUMENT),
            ),
            (
                "a backend timeout under the client's short deadline is the client's",
                status(code::DEADLINE_EXCEEDED, "queue timeout"),
                client,
                ("expired", Health::Unknown, code::DEADLINE_EXCEEDED),
            ),
            (
                "tonic's CANCELLED for grpc-timeout likewise",
                status(code::CANCELLED, "Timeout expired"),
                client,
                ("expired", Health::Unknown, code::DEADLINE_EXCEEDED),
            ),
            (
                "our timer under the client's deadline is the client's",
                timeout(),
                client,
                ("expired", Health::Unknown, code::DEADLINE_EXCEEDED),
            ),
            (
                "our timer under the route's deadline is the backend's slowness",
                timeout(),
                route,
                ("expired", Health::Unhealthy, code::DEADLINE_EXCEEDED),
            ),
            (
                "a backend DEADLINE_EXCEEDED long before the route's deadline is a failure",
                status(code::DEADLINE_EXCEEDED, "stuck"),
                route,
                (
                    "failed after send",
                    Health::Unhealthy,
                    code::DEADLINE_EXCEEDED,
                ),
            ),
            (
                "INTERNAL is the backend's",
                status(code::INTERNAL, "model crashed"),
                route,
                ("failed after send", Health::Unhealthy, code::INTERNAL),
            ),
            (
                "UNAVAILABLE is the backend's",
                status(code::UNAVAILABLE, "draining"),
                route,
                ("failed after send", Health::Unhealthy, code::UNAVAILABLE),
            ),
            (
                "a full backend is busy, not broken: its breaker hears nothing",
                status(
                    code::RESOURCE_EXHAUSTED,
                    "the backend's requests hold its limit of 1024 input bytes (--max-queue-bytes); retry later",
                ),
                route,
                ("full", Health::Unknown, code::RESOURCE_EXHAUSTED),
            ),
            (
                "Triton's full queue says UNAVAILABLE; before, it counted against the breaker",
                status(code::UNAVAILABLE, "Exceeds maximum queue size"),
                route,
                ("full", Health::Unknown, code::RESOURCE_EXHAUSTED),
            ),
            (
                "a message over a size limit is the client's, whichever endpoint gets it",
                status(
                    code::RESOURCE_EXHAUSTED,
                    "decoded message length too large: found 9000000 bytes, the limit is: 4194304 bytes",
                ),
                route,
                ("refused", Health::Healthy, code::RESOURCE_EXHAUSTED),
            ),
            (
                "a connect failure sent nothing",
                Err(CallError::Connect {
                    endpoint: "e".into(),
                    reason: "refused".into(),
                }),
                route,
                ("not sent", Health::Unhealthy, code::UNAVAILABLE),
            ),
            (
                "a transport failure may have sent the request",
                Err(CallError::Transport {
                    endpoint: "e".into(),
                    reason: "reset".into(),
                }),
                route,
                (
                    "connection failed after send",
                    Health::Unhealthy,
                    code::UNAVAILABLE,
                ),
            ),
        ];
        for (what, result, d, want) in cases {
            assert_eq!(check(result, &d), want, "{what}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_backend_timeout_at_the_routes_deadline_is_the_deadline_passing() {
        let d = deadline(false);
        tokio::time::advance(Duration::from_millis(ROUTE_MS - 2)).await;
        let got = check(status(code::DEADLINE_EXCEEDED, "queue timeout"), &d);
        assert_eq!(got, ("expired", Health::Unhealthy, code::DEADLINE_EXCEEDED));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reply_over_the_size_limit_is_refused_and_says_nothing_of_the_backend() {
        let got = check(
            Err(CallError::TooLarge {
                endpoint: A.into(),
                limit: 1024,
            }),
            &deadline(false),
        );
        assert_eq!(got, ("refused", Health::Unknown, code::RESOURCE_EXHAUSTED));
    }

    #[test]
    fn the_clients_deadline_applies_only_when_shorter() {
        let now = Instant::now();
        let route = Duration::from_millis(250);
        let d = Deadline::new(now, route, Some(Duration::from_secs(5)));
        assert!(!d.clients && d.at == now + route);
        let d = Deadline::new(now, route, Some(Duration::from_millis(1)));
        assert!(d.clients && d.budget == Duration::from_millis(1));
    }

    /// A scripted upstream: each endpoint address answers from its own queue of replies
    /// (an empty queue never answers), and calls are counted per address.
    #[derive(Default)]
    struct Script {
        replies: Mutex<std::collections::HashMap<String, VecDeque<Result<Reply, CallError>>>>,
        calls: Mutex<Vec<String>>,
        pending: AtomicUsize,
    }

    impl Script {
        fn push(&self, address: &str, reply: Result<Reply, CallError>) {
            self.replies
                .lock()
                .entry(address.to_owned())
                .or_default()
                .push_back(reply);
        }
        fn calls(&self) -> Vec<String> {
            self.calls.lock().clone()
        }
    }

    impl Call for Script {
        fn call(
            &self,
            endpoint: &Endpoint,
            _path: &'static str,
            _message: &[Bytes],
            _budget: Duration,
            _marks: Marks<'_>,
        ) -> impl Future<Output = Result<Reply, CallError>> + Send {
            self.calls.lock().push(endpoint.address.clone());
            let next = self
                .replies
                .lock()
                .get_mut(&endpoint.address)
                .and_then(VecDeque::pop_front);
            let pending = &self.pending;
            async move {
                match next {
                    Some(reply) => reply,
                    None => {
                        pending.fetch_add(1, Ordering::SeqCst);
                        std::future::pending().await
                    }
                }
            }
        }
    }

    const A: &str = "127.0.0.1:1";
    const B: &str = "127.0.0.1:2";

    /// A route `r` with target `a` on pool `a` (endpoint A), target `b` on pool `b`
    /// (endpoint B), `b` as the fallback, and `extra` policy lines; breakers open after two
    /// failures.
    fn entry(extra: &str) -> (Arc<crate::snapshot::RouteEntry>, RetryBudget) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("policies")).unwrap();
        std::fs::write(
            dir.path().join("policies/r.yaml"),
            format!(
                "version: 1\nroute: r\ntargets:\n  a: {{ backend: a, model: m, version: 1 }}\n  b: {{ backend: b, model: m, version: 2 }}\ndefault: a\nfallback: [b]\n{extra}"
            ),
        )
        .unwrap();
        let yaml = dir.path().join("gateway.yaml");
        std::fs::write(
            &yaml,
            format!("policies: policies\nbackends:\n  a: {{ endpoints: [\"{A}\"] }}\n  b: {{ endpoints: [\"{B}\"] }}\nbreaker: {{ consecutive_failures: 2, half_open_probes: 1 }}\n"),
        )
        .unwrap();
        let config = switchyard_config::load_gateway_config(&yaml).unwrap();
        let policies = switchyard_config::load_policies(&config.policies, &config)
            .unwrap_or_else(|d| panic!("{d}"));
        let metrics = Metrics::new();
        let upstreams = Upstreams::new(&config, metrics.clone());
        let table = crate::routing::compile(&policies, &config).unwrap();
        let snapshot = Snapshot::build(
            1,
            &table,
            &upstreams,
            &upstreams.pools(),
            &metrics,
            &Kept::default(),
        )
        .unwrap();
        let entry = snapshot.routes.get("r").expect("route r").clone();
        (entry, RetryBudget::new(20, 10))
    }

    fn message() -> InferMessage {
        split_infer_request(&Bytes::from_static(b"\x0a\x01r")).unwrap()
    }

    async fn run(
        script: &Script,
        entry: &crate::snapshot::RouteEntry,
        budget: &RetryBudget,
        deadline: Deadline,
        fallback: bool,
    ) -> Result<Answer, Failure> {
        let decision = entry
            .route
            .decide(&http::HeaderMap::new(), "", 0, &|_| true)
            .unwrap();
        infer(
            Upstream {
                call: script,
                budget,
            },
            entry,
            &decision,
            &message(),
            deadline,
            Options {
                fallback,
                shadow: false,
                class: Class::ONLY,
                trace: Cx::default(),
            },
        )
        .await
    }

    fn ok() -> Result<Reply, CallError> {
        status(code::OK, "")
    }

    fn breaker(entry: &crate::snapshot::RouteEntry, i: usize) -> State {
        entry.targets[i].state.breaker.state()
    }

    #[tokio::test(start_paused = true)]
    async fn client_faults_never_open_a_breaker_nor_move_to_another_target() {
        let (entry, budget) = entry("retry: { attempts: 2, idempotent: true }\n");
        let script = Script::default();
        for _ in 0..10 {
            script.push(A, status(code::DEADLINE_EXCEEDED, "queue timeout"));
            let f = run(&script, &entry, &budget, deadline(true), true)
                .await
                .unwrap_err();
            assert_eq!(f.error.rescue().grpc, code::DEADLINE_EXCEEDED);
            script.push(
                A,
                status(code::INTERNAL, "failed to decode Protobuf message: x"),
            );
            let f = run(&script, &entry, &budget, deadline(false), true)
                .await
                .unwrap_err();
            assert_eq!(f.error.rescue().grpc, code::INVALID_ARGUMENT);
            script.push(A, status(code::INVALID_ARGUMENT, "bad shape"));
            run(&script, &entry, &budget, deadline(false), true)
                .await
                .unwrap_err();
        }
        assert_eq!(breaker(&entry, 0), State::Closed);
        assert!(
            script.calls().iter().all(|a| a == A),
            "never retried elsewhere"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn connect_failures_move_on_and_open_the_breaker() {
        let (entry, budget) = entry("");
        let script = Script::default();
        let refused = || {
            Err(CallError::Connect {
                endpoint: A.into(),
                reason: "refused".into(),
            })
        };
        for _ in 0..2 {
            script.push(A, refused());
            script.push(B, ok());
            let answer = run(&script, &entry, &budget, deadline(false), true)
                .await
                .unwrap();
            assert_eq!(answer.target, TargetId(1), "the fallback answered");
        }
        assert_eq!(breaker(&entry, 0), State::Open);
        script.push(B, ok());
        let answer = run(&script, &entry, &budget, deadline(false), true)
            .await
            .unwrap();
        assert_eq!(answer.target, TargetId(1));
        assert_eq!(
            script.calls(),
            [A, B, A, B, B],
            "the open breaker is skipped"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn after_send_failures_retry_only_on_idempotent_routes() {
        let (entry, budget) = entry("");
        let script = Script::default();
        script.push(A, status(code::INTERNAL, "crashed"));
        script.push(B, ok());
        let f = run(&script, &entry, &budget, deadline(false), true)
            .await
            .unwrap_err();
        assert_eq!(f.error.rescue().grpc, code::INTERNAL);
        assert_eq!(script.calls(), [A]);

        let (entry, budget) = entry_idempotent();
        let script = Script::default();
        script.push(A, status(code::INTERNAL, "crashed"));
        script.push(B, ok());
        let answer = run(&script, &entry, &budget, deadline(false), true)
            .await
            .unwrap();
        assert_eq!(answer.target, TargetId(1));
        assert_eq!(script.calls(), [A, B]);
    }

    fn entry_idempotent() -> (Arc<crate::snapshot::RouteEntry>, RetryBudget) {
        entry("retry: { attempts: 1, idempotent: true }\n")
    }

    #[tokio::test(start_paused = true)]
    async fn nested_plans_try_their_own_target_only() {
        let (entry, budget) = entry_idempotent();
        let script = Script::default();
        script.push(A, status(code::UNAVAILABLE, "down"));
        run(&script, &entry, &budget, deadline(false), false)
            .await
            .unwrap_err();
        assert_eq!(script.calls(), [A]);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_after_an_error_answer_stop_when_the_budget_is_spent() {
        let (entry, _) = entry("retry: { attempts: 1, idempotent: true }\n");
        let budget = RetryBudget::new(0, 0);
        let script = Script::default();
        script.push(A, status(code::UNAVAILABLE, "busy"));
        script.push(B, ok());
        let f = run(&script, &entry, &budget, deadline(false), true)
            .await
            .unwrap_err();
        assert_eq!(f.target, Some(TargetId(0)));
        assert_eq!(script.calls(), [A], "no budget, no retry");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_connection_is_retried_elsewhere_whatever_the_budget() {
        // Requests in flight when a backend dies all fail at once; the budget's floor of
        // 3 retries let the fourth fail although the fallback was healthy. Retrying a
        // gone backend's requests adds no load to it.
        let (entry, _) = entry("retry: { attempts: 1, idempotent: true }\n");
        let budget = RetryBudget::new(0, 0);
        for failure in [
            CallError::Connect {
                endpoint: A.into(),
                reason: "refused".into(),
            },
            CallError::Transport {
                endpoint: A.into(),
                reason: "ReadError: connection reset".into(),
            },
        ] {
            let script = Script::default();
            script.push(A, Err(failure));
            script.push(B, ok());
            let answer = run(&script, &entry, &budget, deadline(false), true)
                .await
                .unwrap();
            assert_eq!(answer.target, TargetId(1));
            assert_eq!(script.calls(), [A, B]);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_passed_deadline_sends_nothing_and_counts_nothing() {
        let (entry, budget) = entry("");
        let script = Script::default();
        let d = Deadline::new(
            Instant::now(),
            Duration::from_millis(ROUTE_MS),
            Some(Duration::ZERO),
        );
        let f = run(&script, &entry, &budget, d, true).await.unwrap_err();
        assert_eq!(f.error.rescue().grpc, code::DEADLINE_EXCEEDED);
        assert!(script.calls().is_empty());
        assert_eq!(breaker(&entry, 0), State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_half_open_probe_dropped_mid_call_frees_its_slot() {
        let (entry, budget) = entry("");
        let script = Script::default();
        for _ in 0..2 {
            script.push(A, status(code::UNAVAILABLE, "down"));
            run(&script, &entry, &budget, deadline(false), false)
                .await
                .unwrap_err();
        }
        assert_eq!(breaker(&entry, 0), State::Open);
        tokio::time::advance(Duration::from_secs(60)).await;
        // The probe's call never answers; the caller (an ensemble past its quorum, say)
        // drops it.
        let probe = run(&script, &entry, &budget, deadline(false), false);
        let dropped = tokio::time::timeout(Duration::from_millis(10), probe).await;
        assert!(dropped.is_err(), "the probe was still in flight");
        assert_eq!(script.pending.load(Ordering::SeqCst), 1);
        assert!(entry.available(TargetId(0)), "its slot is free again");
        script.push(A, ok());
        run(&script, &entry, &budget, deadline(false), false)
            .await
            .unwrap();
        assert_eq!(breaker(&entry, 0), State::Closed);
    }
}
