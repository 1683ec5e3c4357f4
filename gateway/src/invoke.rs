//! Sends an inference to the route's chosen target, with the protection rules: breaker
//! admission, fallback and connect-failure retries on other targets, retries after sending
//! only on idempotent routes, a shared retry budget, and the deadline forwarded as
//! Triton's `timeout` parameter.

use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::error::{GatewayError, is_upstream_failure};
use crate::metrics::Attempt;
use crate::routing::{Decision, TargetId};
use crate::snapshot::RouteEntry;
use crate::upstream::Upstreams;
use crate::upstream::budget::RetryBudget;
use crate::upstream::client::{CallError, Reply, code};
use crate::wire::InferMessage;

pub(crate) const MODEL_INFER: &str = "/inference.GRPCInferenceService/ModelInfer";

/// A backend's timeout this close to the request's deadline is the deadline passing.
const DEADLINE_SLACK: Duration = Duration::from_millis(5);
/// How one inference runs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct How {
    /// Whether the route's fallback targets and the decision's other split members may
    /// answer when the chosen target cannot (top-level decisions only).
    pub(crate) fallback: bool,
    /// Whether this is a shadow copy (marked for the backend).
    pub(crate) shadow: bool,
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

/// Runs `message` on the decided target, falling back and retrying as the policy allows,
/// until `deadline` (the request's budget `total` after it arrived).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn infer(
    upstreams: &Upstreams,
    budget: &RetryBudget,
    entry: &RouteEntry,
    decision: &Decision,
    message: &InferMessage,
    deadline: Instant,
    total: Duration,
    how: How,
) -> Result<Answer, Failure> {
    let How { fallback, shadow } = how;
    let route = &entry.route;
    let _active = budget.enter();
    let mut after_send_retries = 0u32;
    let mut last: Option<Failure> = None;
    let mut skipped: Vec<String> = Vec::new();
    let mut attempts = 0u32;
    // Nested plans (cascade stages, ensemble members, shadows) try their own target only:
    // a fallback answering for a member would change what the strategy computes.
    for target_id in route
        .candidates(decision)
        .take(if fallback { usize::MAX } else { 1 })
    {
        let target = entry.target(target_id);
        let spec = route.target(target_id);
        // The decided target is tried even when its pool looks down; others only if up.
        if attempts > 0 && !target.pool.has_healthy() {
            skipped.push(format!("{}: no healthy endpoint", spec.name));
            continue;
        }
        let Some(admission) = target.state.breaker.admit() else {
            target.metrics.attempt(Attempt::BreakerOpen);
            entry.metrics.fallback_breaker.inc();
            skipped.push(format!("{}: circuit breaker open", spec.name));
            continue;
        };
        // Every attempt after the first is a retry and needs the budget.
        let _retry = if attempts > 0 {
            match budget.try_retry() {
                Some(r) => Some(r),
                None => {
                    target.state.breaker.release(admission);
                    entry.metrics.budget_exhausted.inc();
                    break;
                }
            }
        } else {
            None
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            target.state.breaker.release(admission);
            return Err(Failure {
                error: deadline_error(route.name.as_ref(), total, &last),
                target: Some(target_id),
            });
        }
        attempts += 1;
        let endpoint = target.pool.pick();
        let chunks = message.chunks(&spec.model, &spec.version, remaining.as_micros() as u64);
        let result = upstreams
            .call(endpoint, MODEL_INFER, &chunks, remaining, shadow)
            .await;
        match result {
            Ok(Reply {
                status: code::OK,
                body,
                ..
            }) => {
                target.state.breaker.record(admission, true);
                target.metrics.attempt(Attempt::Ok);
                return Ok(Answer {
                    target: target_id,
                    response: body,
                });
            }
            Ok(Reply {
                status,
                message: text,
                ..
            }) if !is_upstream_failure(status) => {
                // The backend judged the request itself: healthy backend, client's problem.
                target.state.breaker.record(admission, true);
                target.metrics.attempt(Attempt::Rejected);
                return Err(Failure {
                    error: GatewayError::Upstream {
                        code: status,
                        message: text,
                    },
                    target: Some(target_id),
                });
            }
            Ok(Reply {
                status: code::DEADLINE_EXCEEDED | code::CANCELLED,
                message: text,
                ..
            }) if deadline.saturating_duration_since(Instant::now()) < DEADLINE_SLACK => {
                // The backend gave up on the budget we forwarded (its queue timeout, or
                // tonic's grpc-timeout, which it reports as CANCELLED) as our own timer
                // was about to: the request's deadline passed either way.
                target.state.breaker.record(admission, false);
                target.metrics.attempt(Attempt::Timeout);
                return Err(Failure {
                    error: GatewayError::Deadline {
                        route: route.name.to_string(),
                        after: total,
                        detail: format!(" (the backend: {text})"),
                    },
                    target: Some(target_id),
                });
            }
            Ok(Reply {
                status,
                message: text,
                ..
            }) => {
                target.state.breaker.record(admission, false);
                target.metrics.attempt(Attempt::Failed);
                let error = GatewayError::Upstream {
                    code: status,
                    message: text,
                };
                last = Some(Failure {
                    error,
                    target: Some(target_id),
                });
                if !(route.retry.idempotent && after_send_retries < route.retry.attempts) {
                    break;
                }
                after_send_retries += 1;
                entry.metrics.retry_after_send.inc();
            }
            Err(CallError::Connect { endpoint, reason }) => {
                // Nothing was sent: always safe to try the next target.
                target.state.breaker.record(admission, false);
                target.metrics.attempt(Attempt::ConnectError);
                entry.metrics.retry_connect.inc();
                let error = GatewayError::UpstreamFailed {
                    route: route.name.to_string(),
                    reason: format!("{}: cannot connect to {endpoint}: {reason}", spec.name),
                };
                last = Some(Failure {
                    error,
                    target: Some(target_id),
                });
            }
            Err(CallError::Timeout { .. }) => {
                target.state.breaker.record(admission, false);
                target.metrics.attempt(Attempt::Timeout);
                return Err(Failure {
                    error: deadline_error(route.name.as_ref(), total, &None),
                    target: Some(target_id),
                });
            }
            Err(CallError::Transport { endpoint, reason }) => {
                target.state.breaker.record(admission, false);
                target.metrics.attempt(Attempt::TransportError);
                let error = GatewayError::UpstreamFailed {
                    route: route.name.to_string(),
                    reason: format!("{}: {endpoint}: {reason}", spec.name),
                };
                last = Some(Failure {
                    error,
                    target: Some(target_id),
                });
                if !(route.retry.idempotent && after_send_retries < route.retry.attempts) {
                    break;
                }
                after_send_retries += 1;
                entry.metrics.retry_after_send.inc();
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

fn deadline_error(route: &str, total: Duration, last: &Option<Failure>) -> GatewayError {
    let detail = last
        .as_ref()
        .map(|f| format!(" after: {}", f.error))
        .unwrap_or_default();
    GatewayError::Deadline {
        route: route.to_owned(),
        after: total,
        detail,
    }
}
