//! What both frontends answer the same way: inference through the route's policy, and a
//! route's readiness, metadata, config and statistics (those of its targets, under the
//! route's name).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use prost::Message;
use switchyard_proto::inference::{
    ModelConfigRequest, ModelConfigResponse, ModelMetadataRequest, ModelMetadataResponse,
    ModelReadyRequest, ModelReadyResponse, ModelStatisticsRequest, ModelStatisticsResponse,
};
use tokio::time::Instant;

use super::Said;
use crate::Shared;
use crate::error::GatewayError;
use crate::execute::{self, Executor};
use crate::invoke;
use crate::metrics::Outcome;
use crate::routing::{Decision, TargetId};
use crate::snapshot::{RouteEntry, Snapshot};
use crate::strategy::{Invoker, cache, shadow};
use crate::upstream::{ControlError, MODEL_METADATA, MODEL_READY};
use crate::wire::InferMessage;

const MODEL_CONFIG: &str = "/inference.GRPCInferenceService/ModelConfig";
const MODEL_STATISTICS: &str = "/inference.GRPCInferenceService/ModelStatistics";

/// Budget for metadata-style calls.
const CONTROL_BUDGET: Duration = Duration::from_secs(5);

pub(crate) fn route<'a>(
    snapshot: &'a Snapshot,
    name: &str,
) -> Result<&'a std::sync::Arc<RouteEntry>, GatewayError> {
    snapshot
        .routes
        .get(name)
        .ok_or_else(|| GatewayError::UnknownRoute {
            route: name.to_owned(),
            known: snapshot.route_list.clone(),
        })
}

/// Routes and runs one inference; returns the `ModelInferResponse` bytes. A decision for
/// one target on a route without shadow or cache takes the direct path; everything else
/// runs through the [`Executor`] and the strategies.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn infer(
    shared: &Arc<Shared>,
    snapshot: &Arc<Snapshot>,
    headers: &HeaderMap,
    message: InferMessage,
    client_deadline: Option<Duration>,
    protocol: usize,
    start: Instant,
    said: &mut Said,
) -> Result<Bytes, GatewayError> {
    let entry = route(snapshot, &message.model_name)?;
    said.route = Some(entry.name_header.clone());
    let random: u64 = rand::random();
    let decision = match entry
        .route
        .decide(headers, &message.model_version, random, &|t| {
            entry.available(t)
        }) {
        Ok(d) => d,
        Err(e) => {
            let e = GatewayError::from(e);
            entry
                .metrics
                .unrouted
                .finish(protocol, e.outcome(), start.elapsed().as_secs_f64());
            return Err(e);
        }
    };
    let budget = client_deadline.map_or(entry.route.deadline, |d| d.min(entry.route.deadline));
    if decision.target.is_none() || entry.shadow.is_some() || entry.cache.is_some() {
        let run = Run {
            entry,
            decision,
            random,
            budget,
            protocol,
            start,
        };
        return strategic(shared, snapshot, headers, message, run, said).await;
    }
    let result = invoke::infer(
        &shared.upstreams,
        &shared.budget,
        entry,
        &decision,
        &message,
        start + budget,
        budget,
        invoke::How {
            fallback: true,
            shadow: false,
        },
    )
    .await;
    let seconds = start.elapsed().as_secs_f64();
    match result {
        Ok(answer) => {
            let target = entry.target(answer.target);
            said.target = Some(target.label_header.clone());
            target.metrics.finish(protocol, Outcome::Ok, seconds);
            tracing::debug!(route = %entry.route.name, target = %entry.route.target(answer.target).label, ?decision, "inference");
            Ok(answer.response)
        }
        Err(failure) => {
            let metrics = match failure.target {
                Some(t) => {
                    said.target = Some(entry.target(t).label_header.clone());
                    &entry.target(t).metrics
                }
                None => &entry.metrics.unrouted,
            };
            metrics.finish(protocol, failure.error.outcome(), seconds);
            tracing::debug!(route = %entry.route.name, error = %failure.error, "inference failed");
            Err(failure.error)
        }
    }
}

/// A routed request on its way through the strategies.
struct Run<'a> {
    entry: &'a Arc<RouteEntry>,
    decision: Decision,
    random: u64,
    budget: Duration,
    protocol: usize,
    start: Instant,
}

/// Runs a decision through the executor, with the route's shadow and cache.
async fn strategic(
    shared: &Arc<Shared>,
    snapshot: &Arc<Snapshot>,
    headers: &HeaderMap,
    message: InferMessage,
    run: Run<'_>,
    said: &mut Said,
) -> Result<Bytes, GatewayError> {
    let Run {
        entry,
        decision,
        random,
        budget,
        protocol,
        start,
    } = run;
    let deadline = start + budget;
    let exec = Executor::new(
        shared.clone(),
        snapshot.clone(),
        entry.clone(),
        Arc::new(message),
        Arc::new(headers.clone()),
        random,
        budget,
    );
    // The shadow copy is spawned before the primary runs; on this thread's event loop it
    // starts once the primary's request is out (and never holds the primary up).
    // A request whose primary already is the shadow plan is not copied: the pair would
    // agree with itself and inflate the agreement rate.
    let report = match (&entry.route.shadow, &entry.shadow) {
        (Some(spec), _) if spec.plan == decision.plan => {
            said.shadow = Some("same");
            None
        }
        (Some(spec), Some(stats)) if shadow::sampled(spec.threshold, random) => {
            let copy = exec.as_shadow();
            let plan = spec.plan;
            let report =
                shadow::start(stats.clone(), async move { copy.run(plan, deadline).await });
            said.shadow = Some(if report.is_some() { "sent" } else { "dropped" });
            report
        }
        _ => None,
    };
    let primary = exec.decided(&decision, deadline);
    let result = match &entry.cache {
        Some(cache) => {
            let control = cache::Control::from_header(
                headers
                    .get(http::header::CACHE_CONTROL)
                    .map(|v| v.as_bytes()),
            );
            let plan = match decision.target {
                Some(t) => entry.route.target(t).label.clone(),
                None => entry.route.plan_name(decision.plan),
            };
            match cache::key(
                &entry.route.name,
                entry.route.fingerprint,
                &plan,
                &exec.message,
            ) {
                Ok(key) => cache
                    .serve(key, control, primary)
                    .await
                    .map(|(answer, outcome)| {
                        said.cache = Some(outcome.header());
                        answer
                    }),
                Err(e) => Err(e),
            }
        }
        None => primary.await,
    };
    let took = start.elapsed();
    let answered = result.as_ref().ok().and_then(|a| {
        entry
            .route
            .targets
            .iter()
            .position(|t| t.label == a.label)
            .map(|i| TargetId(i as u16))
    });
    let metrics = match (answered, decision.target) {
        (Some(t), _) | (None, Some(t)) => &entry.target(t).metrics,
        (None, None) => entry
            .plan_metrics
            .get(&decision.plan.0)
            .unwrap_or(&entry.metrics.unrouted),
    };
    match result {
        Ok(answer) => {
            metrics.finish(protocol, Outcome::Ok, took.as_secs_f64());
            said.target = HeaderValue::from_str(&answer.label).ok();
            if let Some((stage, verdict)) = answer.cascade {
                said.cascade_stage = Some(HeaderValue::from(stage + 1));
                said.cascade = Some(execute::verdict_label(verdict));
            }
            if let Some(report) = report {
                let _ = report.send((answer.response.clone(), took));
            }
            tracing::debug!(route = %entry.route.name, target = %answer.label, ?decision, "inference");
            Ok(answer.response)
        }
        Err(error) => {
            if let Some(t) = decision.target {
                said.target = Some(entry.target(t).label_header.clone());
            }
            metrics.finish(protocol, error.outcome(), took.as_secs_f64());
            tracing::debug!(route = %entry.route.name, %error, "inference failed");
            Err(error)
        }
    }
}

/// The target that answers for a route's metadata: the pinned one, else the default plan's.
fn face(entry: &RouteEntry, version: &str) -> Result<TargetId, GatewayError> {
    if version.is_empty() {
        return Ok(entry.route.default_target());
    }
    Ok(entry
        .route
        .pinned(version)
        .ok_or_else(|| crate::routing::RouteError::UnknownVersion {
            route: entry.route.name.clone(),
            version: version.to_owned(),
        })?)
}

/// One unary control call to a target's pool.
async fn control<Req: Message, Resp: Message + Default>(
    shared: &Shared,
    entry: &RouteEntry,
    target: TargetId,
    path: &str,
    req: &Req,
) -> Result<Resp, GatewayError> {
    let pool = &entry.target(target).pool;
    match shared
        .upstreams
        .control(pool.pick(), path, req, CONTROL_BUDGET)
        .await
    {
        Ok(resp) => Ok(resp),
        Err(ControlError::Status { code, message }) => {
            Err(GatewayError::Upstream { code, message })
        }
        Err(e) => Err(GatewayError::UpstreamFailed {
            route: entry.route.name.to_string(),
            reason: e.to_string(),
        }),
    }
}

/// Whether the route can serve `version` (empty: its default plan) now.
pub(crate) async fn ready(
    shared: &Shared,
    snapshot: &Snapshot,
    name: &str,
    version: &str,
    said: &mut Said,
) -> bool {
    let Ok(entry) = route(snapshot, name) else {
        return false;
    };
    said.route = Some(entry.name_header.clone());
    let Ok(t) = face(entry, version) else {
        return false;
    };
    let spec = entry.route.target(t);
    let req = ModelReadyRequest {
        name: spec.model.to_string(),
        version: spec.version.to_string(),
    };
    matches!(control::<_, ModelReadyResponse>(shared, entry, t, MODEL_READY, &req).await, Ok(r) if r.ready)
}

/// The route's metadata: its face target's, under the route's name, with the versions a
/// client may pin (releases, else Triton versions).
pub(crate) async fn metadata(
    shared: &Shared,
    snapshot: &Snapshot,
    name: &str,
    version: &str,
    said: &mut Said,
) -> Result<ModelMetadataResponse, GatewayError> {
    let entry = route(snapshot, name)?;
    said.route = Some(entry.name_header.clone());
    let t = face(entry, version)?;
    said.target = Some(entry.target(t).label_header.clone());
    let spec = entry.route.target(t);
    let req = ModelMetadataRequest {
        name: spec.model.to_string(),
        version: spec.version.to_string(),
    };
    let mut meta: ModelMetadataResponse = control(shared, entry, t, MODEL_METADATA, &req).await?;
    meta.name = entry.route.name.to_string();
    let mut versions: Vec<String> = Vec::new();
    for target in entry.route.targets.iter() {
        let v = target.release.as_deref().unwrap_or(&target.version);
        if !v.is_empty() && !versions.iter().any(|x| x == v) {
            versions.push(v.to_owned());
        }
    }
    meta.versions = versions;
    Ok(meta)
}

/// The route's model config: its face target's, under the route's name.
pub(crate) async fn config(
    shared: &Shared,
    snapshot: &Snapshot,
    name: &str,
    version: &str,
    said: &mut Said,
) -> Result<ModelConfigResponse, GatewayError> {
    let entry = route(snapshot, name)?;
    said.route = Some(entry.name_header.clone());
    let t = face(entry, version)?;
    said.target = Some(entry.target(t).label_header.clone());
    let spec = entry.route.target(t);
    let req = ModelConfigRequest {
        name: spec.model.to_string(),
        version: spec.version.to_string(),
    };
    let mut resp: ModelConfigResponse = control(shared, entry, t, MODEL_CONFIG, &req).await?;
    if let Some(c) = resp.config.as_mut() {
        c.name = entry.route.name.to_string();
    }
    Ok(resp)
}

/// Statistics of every target of the route (or of every route when `name` is empty),
/// each entry named after the route and versioned by the target's release or version.
pub(crate) async fn statistics(
    shared: &Shared,
    snapshot: &Snapshot,
    name: &str,
    version: &str,
) -> Result<ModelStatisticsResponse, GatewayError> {
    let entries: Vec<&std::sync::Arc<RouteEntry>> = if name.is_empty() {
        let mut all: Vec<_> = snapshot.routes.values().collect();
        all.sort_by(|a, b| a.route.name.cmp(&b.route.name));
        all
    } else {
        vec![route(snapshot, name)?]
    };
    let mut out = ModelStatisticsResponse::default();
    for entry in entries {
        for (i, spec) in entry.route.targets.iter().enumerate() {
            let label = spec.release.as_deref().unwrap_or(&spec.version);
            if !version.is_empty() && version != label && version != &*spec.version {
                continue;
            }
            let req = ModelStatisticsRequest {
                name: spec.model.to_string(),
                version: spec.version.to_string(),
            };
            let resp: ModelStatisticsResponse =
                control(shared, entry, TargetId(i as u16), MODEL_STATISTICS, &req).await?;
            for mut s in resp.model_stats {
                s.name = entry.route.name.to_string();
                if !label.is_empty() {
                    s.version = label.to_owned();
                }
                out.model_stats.push(s);
            }
        }
    }
    Ok(out)
}
