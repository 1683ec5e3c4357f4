//! What both frontends answer the same way: inference through the route's policy, and a
//! route's readiness, metadata, config and statistics (those of its targets, under the
//! route's name).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
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
use crate::execute::{self, Executor, ShadowCopy};
use crate::error::Outcome;
use crate::metrics::Protocol;
use crate::routing::{Decision, PlanId, TargetId};
use crate::snapshot::{RouteEntry, Snapshot};
use crate::strategy::{Answer, AnsweredBy, cache, shadow};
use crate::upstream::attempt::{Deadline, Failure};
use crate::grpc::infer::InferMessage;
use crate::grpc::{MODEL_CONFIG, MODEL_METADATA, MODEL_READY, MODEL_STATISTICS};
use crate::upstream::ControlError;


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

/// One inference as a frontend hands it over.
pub(crate) struct Inference<'a> {
    pub(crate) headers: &'a HeaderMap,
    pub(crate) message: InferMessage,
    /// The client's `grpc-timeout`, if it sent one.
    pub(crate) client_deadline: Option<Duration>,
    pub(crate) protocol: Protocol,
    pub(crate) start: Instant,
}

/// Routes and runs one inference; returns the `ModelInferResponse` bytes. Every request
/// takes the same path: decide, start the shadow if one is sampled, run the decision
/// through the [`Executor`] (a single target is its cheapest case), through the cache
/// where the route has one, then [`finish`] writes the metrics, headers and trace line.
pub(crate) async fn infer(
    shared: &Arc<Shared>,
    snapshot: &Arc<Snapshot>,
    request: Inference<'_>,
    said: &mut Said,
) -> Result<Bytes, GatewayError> {
    let Inference {
        headers,
        message,
        client_deadline,
        protocol,
        start,
    } = request;
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
    // The client's own deadline: its grpc-timeout or its Triton `timeout` parameter.
    let clients = message.timeout_us.map(Duration::from_micros);
    let client = match (client_deadline, clients) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let deadline = Deadline::new(start, entry.route.deadline, client);
    let exec = Executor::new(
        shared,
        snapshot,
        entry,
        (&message, headers),
        random,
        deadline,
    );
    let report = start_shadow(&exec, (shared, snapshot, entry), &decision, said);
    let result = match &entry.cache {
        None => exec.decided(&decision).await,
        Some(cache) => cached(&exec, cache, &decision, said).await,
    };
    finish(entry, &decision, protocol, start, &result, said);
    match result {
        Ok(answer) => {
            if let Some(report) = report {
                let _ = report.send((answer.response.clone(), start.elapsed()));
            }
            Ok(answer.response)
        }
        Err(failure) => Err(failure.error),
    }
}

/// Starts the route's shadow copy when this request is sampled. The copy is spawned before
/// the primary runs; on this thread's event loop it starts once the primary's request is
/// out (and never holds the primary up). A request whose primary already is the shadow
/// plan is not copied: the pair would agree with itself and inflate the agreement rate.
fn start_shadow(
    exec: &Executor<'_>,
    owners: (&Arc<Shared>, &Arc<Snapshot>, &Arc<RouteEntry>),
    decision: &Decision,
    said: &mut Said,
) -> Option<shadow::PrimaryReport> {
    let entry = exec.entry;
    match (&entry.route.shadow, &entry.shadow) {
        (Some(spec), _) if spec.plan == decision.plan => {
            said.shadow = Some("same");
            None
        }
        (Some(spec), Some(stats)) if shadow::sampled(spec.threshold, exec.random) => {
            let copy = ShadowCopy {
                shared: owners.0.clone(),
                snapshot: owners.1.clone(),
                entry: owners.2.clone(),
                message: exec.message.clone(),
                headers: exec.headers.clone(),
                random: exec.random,
                deadline: exec.deadline,
            };
            let report = shadow::start(stats.clone(), copy.run(spec.plan));
            said.shadow = Some(if report.is_some() { "sent" } else { "dropped" });
            report
        }
        _ => None,
    }
}

/// Runs a decision through the route's cache: a stored answer answers with the caller's
/// own request id; a miss runs the decision (once for concurrent identical misses).
async fn cached(
    exec: &Executor<'_>,
    cache: &cache::RouteCache,
    decision: &Decision,
    said: &mut Said,
) -> Result<Answer, Failure> {
    let control = cache::Control::from_header(
        exec.headers
            .get(http::header::CACHE_CONTROL)
            .map(|v| v.as_bytes()),
    );
    let route = &exec.entry.route;
    let plan_key = route.plan_keys[decision.plan.0 as usize];
    let (key, id) = cache::key(&route.name, plan_key, exec.message).map_err(|error| Failure {
        error,
        target: None,
    })?;
    // The target a failed call last tried, for this caller's metrics (waiters on the same
    // call share its error, not its target).
    let failed = AtomicU32::new(u32::MAX);
    let primary = async {
        exec.decided(decision).await.map_err(|f| {
            if let Some(t) = f.target {
                failed.store(u32::from(t.0), Ordering::Relaxed);
            }
            f.error
        })
    };
    match cache.serve(key, control, primary).await {
        Ok((answer, outcome)) => {
            said.cache = Some(outcome.header());
            Ok(match outcome {
                cache::Served::Hit | cache::Served::Coalesced => Answer {
                    response: cache::with_id(&answer.response, &id),
                    ..answer
                },
                cache::Served::Miss | cache::Served::Bypass => answer,
            })
        }
        Err(error) => Err(Failure {
            error,
            target: u16::try_from(failed.load(Ordering::Relaxed))
                .ok()
                .map(TargetId),
        }),
    }
}

/// Writes what a request came to, once for every outcome: the request metrics of the
/// target or plan that answered (or was last tried), the response headers, the trace line.
fn finish(
    entry: &RouteEntry,
    decision: &Decision,
    protocol: Protocol,
    start: Instant,
    result: &Result<Answer, Failure>,
    said: &mut Said,
) {
    let seconds = start.elapsed().as_secs_f64();
    let plan_metrics = |p: PlanId| {
        entry
            .plans
            .get(p.0 as usize)
            .and_then(|p| p.metrics.as_ref())
            .unwrap_or(&entry.metrics.unrouted)
    };
    match result {
        Ok(answer) => {
            let metrics = match answer.by {
                AnsweredBy::Target(t) => {
                    said.target = Some(entry.target(t).label_header.clone());
                    &entry.target(t).metrics
                }
                AnsweredBy::Plan(p) => {
                    // A combination's label names the members that answered: it is made
                    // per request.
                    said.target = HeaderValue::from_str(&answer.label).ok();
                    plan_metrics(p)
                }
            };
            metrics.finish(protocol, Outcome::Ok, seconds);
            if let Some((stage, verdict)) = answer.cascade {
                said.cascade_stage = Some(HeaderValue::from(stage + 1));
                said.cascade = Some(execute::verdict_label(verdict));
            }
            tracing::debug!(route = %entry.route.name, target = %answer.label, ?decision, "inference");
        }
        Err(failure) => {
            let metrics = match failure.target.or(decision.target) {
                Some(t) => {
                    said.target = Some(entry.target(t).label_header.clone());
                    &entry.target(t).metrics
                }
                None => plan_metrics(decision.plan),
            };
            metrics.finish(protocol, failure.error.outcome(), seconds);
            tracing::debug!(route = %entry.route.name, error = %failure.error, "inference failed");
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
