//! What both frontends answer the same way: inference through the route's policy, and a
//! route's readiness, metadata, config and statistics (those of its targets, under the
//! route's name).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use opentelemetry::KeyValue;
use opentelemetry::trace::{Span as _, SpanKind};
use prost::Message;
use switchyard_proto::inference::model_metadata_response::TensorMetadata;
use switchyard_proto::inference::{
    ModelConfigRequest, ModelConfigResponse, ModelMetadataRequest, ModelMetadataResponse,
    ModelReadyRequest, ModelReadyResponse, ModelStatisticsRequest, ModelStatisticsResponse,
};
use switchyard_proto::trace as w3c;
use tokio::time::Instant;

use super::ReplyHeaders;
use crate::error::GatewayError;
use crate::error::Outcome;
use crate::execute::{self, Executor, ShadowCopy};
use crate::grpc::infer::InferMessage;
use crate::grpc::{MODEL_CONFIG, MODEL_METADATA, MODEL_READY, MODEL_STATISTICS};
use crate::metrics::{PROTOCOLS, Protocol};
use crate::routing::rollout::Arm;
use crate::routing::{Decision, PlanId, TargetId};
use crate::snapshot::{RouteEntry, Snapshot};
use crate::strategy::{Answer, AnsweredBy, cache, shadow};
use crate::trace::{self, Cx, Propagate};
use crate::upstream::ControlError;
use crate::upstream::attempt::{DEADLINE_SLACK, Deadline, Failure};
use crate::{Shared, access_log};

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
///
/// When `client_left` completes first (the client reset or closed), the run is dropped,
/// and with it every upstream call it was making (a shadow copy runs on under its own
/// bound); the request is finished as the deadline passing, if it had, or the client gone.
pub(crate) async fn infer(
    shared: &Arc<Shared>,
    snapshot: &Arc<Snapshot>,
    request: Inference<'_>,
    client_left: impl std::future::Future<Output = ()>,
    said: &mut ReplyHeaders,
) -> Result<Bytes, GatewayError> {
    if shared.tracing.is_none() && shared.access_log.is_none() {
        // The caller's trace context goes on to the backends as it came.
        let caller = Propagate::from_caller(request.headers);
        let cx = Cx::new(None, None, caller.as_ref());
        return routed(shared, snapshot, request, client_left, said, cx, None).await;
    }
    // Boxed: the state of the span and of the log line is not carried (and moved) by
    // every request's future when both are off.
    Box::pin(observed(shared, snapshot, request, client_left, said)).await
}

/// [`infer`] with a span, an access log line, or both.
async fn observed(
    shared: &Arc<Shared>,
    snapshot: &Arc<Snapshot>,
    request: Inference<'_>,
    client_left: impl std::future::Future<Output = ()>,
    said: &mut ReplyHeaders,
) -> Result<Bytes, GatewayError> {
    let headers = request.headers;
    let arrived = SystemTime::now();
    let (protocol, start) = (request.protocol, request.start);
    let route_name = request.message.model_name.clone();
    let parent = w3c::remote_parent(
        headers.get(trace::TRACEPARENT).map(HeaderValue::as_bytes),
        headers.get(trace::TRACESTATE).map(HeaderValue::as_bytes),
    );
    let span = shared.tracing.as_ref().map(|t| {
        let mut span = t.span(
            format!("infer {route_name}"),
            SpanKind::Server,
            parent.as_ref(),
            Vec::new(),
        );
        // A request the sampler drops gets a span that records nothing: no attributes.
        if span.is_recording() {
            span.set_attributes([
                KeyValue::new("switchyard.route", route_name.clone()),
                KeyValue::new("switchyard.protocol", PROTOCOLS[protocol as usize]),
                KeyValue::new("switchyard.policy_version", snapshot.version as i64),
            ]);
        }
        span
    });
    let span_cx = trace::context(&span);
    let caller = match span {
        None => Propagate::from_caller(headers),
        Some(_) => None,
    };
    let cx = Cx::new(shared.tracing.as_ref(), span_cx.as_ref(), caller.as_ref());
    let mut seen = Seen::default();
    let result = routed(
        shared,
        snapshot,
        request,
        client_left,
        said,
        cx,
        Some(&mut seen),
    )
    .await;
    let rescued = result.as_ref().err().map(GatewayError::rescue);
    let (status, grpc_status) = rescued.as_ref().map_or((200, 0), |r| (r.http, r.grpc));
    let outcome = result
        .as_ref()
        .err()
        .map_or(Outcome::Ok, GatewayError::outcome);
    fn text(v: &Option<HeaderValue>) -> Option<&str> {
        v.as_ref().and_then(|v| v.to_str().ok())
    }
    let target = text(&said.target);
    trace::end(
        span,
        || {
            let mut a = vec![
                KeyValue::new("switchyard.result", outcome.label()),
                KeyValue::new("rpc.grpc.status_code", i64::from(grpc_status)),
                KeyValue::new("http.response.status_code", i64::from(status)),
            ];
            let mut add = |k: &'static str, v: Option<&str>| {
                if let Some(v) = v {
                    a.push(KeyValue::new(k, v.to_owned()));
                }
            };
            add("switchyard.plan", seen.plan.as_deref());
            add("switchyard.target", target);
            add("switchyard.cache", said.cache);
            add("switchyard.cascade", said.cascade);
            add("switchyard.cascade.stage", text(&said.cascade_stage));
            add("switchyard.shadow", said.shadow);
            add("switchyard.rollout", text(&said.rollout));
            add("switchyard.pipeline", text(&said.pipeline));
            add("switchyard.switch", text(&said.switch));
            add("switchyard.overflow", text(&said.overflow));
            add(
                "error.message",
                rescued.as_ref().map(|r| r.message.as_str()),
            );
            a
        },
        rescued.as_ref().map(|r| r.message.as_str()),
    );
    if let Some(log) = &shared.access_log {
        let trace_id = span_cx
            .as_ref()
            .or(parent.as_ref())
            .filter(|c| c.is_valid())
            .map(w3c::trace_id);
        log.write(&access_log::Line {
            time: access_log::timestamp(arrived),
            route: &route_name,
            plan: seen.plan.as_deref(),
            target,
            protocol: PROTOCOLS[protocol as usize],
            status,
            grpc_status,
            // Microseconds are what the clock can tell apart.
            latency_ms: (start.elapsed().as_secs_f64() * 1e6).round() / 1e3,
            result: outcome.label(),
            policy_version: snapshot.version,
            cache: said.cache,
            cascade: said.cascade,
            cascade_stage: text(&said.cascade_stage),
            shadow: said.shadow,
            rollout: text(&said.rollout),
            pipeline: text(&said.pipeline),
            switch: text(&said.switch),
            overflow: text(&said.overflow),
            trace_id,
            error: rescued.map(|r| r.message),
        });
    }
    result
}

/// The access log's line for an inference refused before it could be routed: a body
/// that did not arrive whole, a message that does not decode. `route` is the route the
/// URL names, or `-` when it is inside the unreadable message.
pub(crate) fn refused(
    shared: &Shared,
    snapshot: &Snapshot,
    route: &str,
    protocol: Protocol,
    start: Instant,
    error: &GatewayError,
) {
    let Some(log) = &shared.access_log else {
        return;
    };
    let r = error.rescue();
    log.write(&access_log::Line {
        time: access_log::timestamp(SystemTime::now() - start.elapsed()),
        route,
        plan: None,
        target: None,
        protocol: PROTOCOLS[protocol as usize],
        status: r.http,
        grpc_status: r.grpc,
        latency_ms: (start.elapsed().as_secs_f64() * 1e6).round() / 1e3,
        result: error.outcome().label(),
        policy_version: snapshot.version,
        cache: None,
        cascade: None,
        cascade_stage: None,
        shadow: None,
        rollout: None,
        pipeline: None,
        switch: None,
        overflow: None,
        trace_id: None,
        error: Some(r.message),
    });
}

/// What the routed part of a request tells the span and the access log.
#[derive(Debug, Default)]
struct Seen {
    /// The decided plan's name.
    plan: Option<Arc<str>>,
}

async fn routed(
    shared: &Arc<Shared>,
    snapshot: &Arc<Snapshot>,
    request: Inference<'_>,
    client_left: impl std::future::Future<Output = ()>,
    said: &mut ReplyHeaders,
    trace: Cx<'_>,
    seen: Option<&mut Seen>,
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
            let error = GatewayError::from(e);
            let failure = Failure {
                error: error.clone(),
                target: None,
            };
            finish(entry, None, protocol, start, &Err(failure), said);
            return Err(error);
        }
    };
    // A rollout moves its share of the baseline's requests to the candidate.
    let (decision, arm) = match (&entry.route.rollout, &entry.rollout) {
        (Some(spec), Some(live)) => {
            let (threshold, header) = live.now();
            said.rollout = Some(header.clone());
            spec.divert(&entry.route, decision, headers, random, threshold, &|t| {
                entry.available(t)
            })
        }
        _ => (decision, None),
    };
    if let Some(seen) = seen {
        seen.plan = Some(entry.route.plan_name(decision.plan));
    }
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
    )
    .traced(trace);
    let report = start_shadow(&exec, (shared, snapshot, entry), &decision, arm, said);
    let run = async {
        match &entry.cache {
            None => exec.decided(&decision).await,
            // The cache's future (moka's) is large; boxed, the uncached path does not
            // carry its size (a future is moved whole, several times, per request).
            Some(cache) => Box::pin(cached(&exec, cache, &decision, said)).await,
        }
    };
    let result = tokio::select! {
        biased;
        result = run => result,
        () = client_left => Err(Failure {
            // A client that gives up at its own deadline (tonic resets the stream when
            // its grpc-timeout passes) saw the deadline pass.
            error: if deadline.left(Instant::now()) < DEADLINE_SLACK {
                deadline.error(&entry.route.name, " (the client stopped waiting)".into())
            } else {
                GatewayError::ClientGone
            },
            target: decision.target,
        }),
    };
    finish(entry, Some(&decision), protocol, start, &result, said);
    if let (Some(arm), Some(live)) = (arm, &entry.rollout) {
        live.record(arm, rollout_outcome(&decision, &result, start.elapsed()));
    }
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

/// What a finished request counts for its side: answered by the plan it was decided to
/// (with its latency), failed or answered by a fallback (an error), or nothing when the
/// client caused the failure.
fn rollout_outcome(
    decision: &Decision,
    result: &Result<Answer, Failure>,
    took: Duration,
) -> Option<Result<Duration, ()>> {
    match result {
        Ok(answer) => {
            let by_decided = match answer.by {
                AnsweredBy::Target(t) => decision.target == Some(t),
                AnsweredBy::Plan(p) => decision.plan == p,
            };
            Some(if by_decided { Ok(took) } else { Err(()) })
        }
        Err(f) => match f.error.outcome() {
            Outcome::ClientError | Outcome::Ok => None,
            _ => Some(Err(())),
        },
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
    arm: Option<Arm>,
    said: &mut ReplyHeaders,
) -> Option<shadow::PrimaryReport> {
    let entry = exec.entry;
    // A baseline request shadowed to the candidate is a comparison its rollout counts.
    let gate = match (&entry.route.rollout, &entry.rollout, &entry.route.shadow) {
        (Some(r), Some(live), Some(sh)) if arm == Some(Arm::Baseline) && sh.plan == r.candidate => {
            Some(live.agreement.clone())
        }
        _ => None,
    };
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
                trace: exec.trace.parent().cloned(),
            };
            let report = shadow::start(stats.clone(), gate, copy.run(spec.plan));
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
    said: &mut ReplyHeaders,
) -> Result<Answer, Failure> {
    let control = cache::Control::from_header(
        exec.headers
            .get(http::header::CACHE_CONTROL)
            .map(|v| v.as_bytes()),
    );
    let route = &exec.entry.route;
    let plan_key = route.plan_keys[decision.plan.0 as usize];
    let (key, id) = cache::key(&route.name, plan_key, exec.message);
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

/// Writes what a routed request came to, once for every outcome: the request metrics of
/// the target or plan that answered (or was last tried, or `-` when routing refused it),
/// the response headers, the trace line.
fn finish(
    entry: &RouteEntry,
    decision: Option<&Decision>,
    protocol: Protocol,
    start: Instant,
    result: &Result<Answer, Failure>,
    said: &mut ReplyHeaders,
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
            if let Some(p) = answer.pipeline {
                said.pipeline = entry.pipeline(p).map(|r| r.header.clone());
            }
            if let Some(t) = answer.overflow {
                said.overflow = Some(entry.target(t).name_header.clone());
            }
            if let Some((p, case)) = answer.switch {
                said.switch = entry
                    .switch(p)
                    .and_then(|r| r.headers.get(usize::from(case)))
                    .cloned();
            }
            tracing::debug!(route = %entry.route.name, target = %answer.label, ?decision, "inference");
        }
        Err(failure) => {
            let metrics = match (failure.target.or(decision.and_then(|d| d.target)), decision) {
                (Some(t), _) => {
                    said.target = Some(entry.target(t).label_header.clone());
                    &entry.target(t).metrics
                }
                (None, Some(d)) => plan_metrics(d.plan),
                (None, None) => &entry.metrics.unrouted,
            };
            metrics.finish(protocol, failure.error.outcome(), seconds);
            if let Some(after) = failure.error.retry_after() {
                said.retry_after = Some(after);
            }
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
    path: &'static str,
    req: &Req,
) -> Result<Resp, GatewayError> {
    let Some(endpoint) = entry.target(target).pool.pick() else {
        return Err(GatewayError::UpstreamFailed {
            route: entry.route.name.to_string(),
            reason: format!(
                "backend pool '{}' has no endpoint (its names resolve to no address yet)",
                entry.route.target(target).backend
            ),
        });
    };
    match shared
        .upstreams
        .control(&endpoint, path, req, CONTROL_BUDGET)
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

/// Whether the route can serve `version` (empty: its default plan) now: its face target's
/// model is ready, and for a pipeline every step's.
pub(crate) async fn ready(
    shared: &Shared,
    snapshot: &Snapshot,
    name: &str,
    version: &str,
    said: &mut ReplyHeaders,
) -> bool {
    let Ok(entry) = route(snapshot, name) else {
        return false;
    };
    said.route = Some(entry.name_header.clone());
    let Ok(t) = face(entry, version) else {
        return false;
    };
    // A pipeline answers only when every step can: each step's model must be ready.
    let faces: Vec<TargetId> = match entry.route.default_pipeline() {
        Some((_, p)) if version.is_empty() => p
            .steps
            .iter()
            .map(|s| entry.route.face_target(s.plan))
            .collect(),
        _ => vec![t],
    };
    for t in faces {
        let spec = entry.route.target(t);
        let req = ModelReadyRequest {
            name: spec.model.to_string(),
            version: spec.version.to_string(),
        };
        let ready = control::<_, ModelReadyResponse>(shared, entry, t, MODEL_READY, &req).await;
        if !matches!(ready, Ok(r) if r.ready) {
            return false;
        }
    }
    true
}

/// The route's metadata: its face target's, under the route's name.
///
/// `versions` follows Triton: the version numbers a client may ask for, each once, in
/// ascending order: those of the route's targets (an unversioned face target: the newest
/// version its backend reports). A release label pins a target (`model_version:
/// v1.1.0`) but is no version: clients parse `versions` as integers (perf_analyzer
/// aborts with `stoll` on `v1.0.0`).
pub(crate) async fn metadata(
    shared: &Shared,
    snapshot: &Snapshot,
    name: &str,
    version: &str,
    said: &mut ReplyHeaders,
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
    let backend_newest = meta.versions.iter().filter_map(|v| v.parse().ok()).max();
    let mut versions: Vec<u64> = entry
        .route
        .targets
        .iter()
        .enumerate()
        .filter_map(|(i, target)| match target.version.parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) if TargetId(i as u16) == t => backend_newest,
            Err(_) => None,
        })
        .collect();
    versions.sort_unstable();
    versions.dedup();
    meta.versions = versions.iter().map(u64::to_string).collect();
    if version.is_empty()
        && let Some((_, pipeline)) = entry.route.default_pipeline()
    {
        let (inputs, outputs) = pipeline_tensors(shared, entry, pipeline).await?;
        meta.inputs = inputs;
        meta.outputs = outputs;
    }
    Ok(meta)
}

/// Where each tensor a pipeline takes and gives comes from, as `(step, name there, name
/// for the client)`: the first step's inputs when it takes the request as it is, and each
/// `request.NAME` a step maps (as the input it feeds); the mapped outputs, or the last
/// step's. `first_inputs` and `last_outputs` name those steps' own tensors.
type Picks = Vec<(usize, String, String)>;

fn pipeline_picks(
    p: &crate::routing::Pipeline,
    first_inputs: Vec<String>,
    last_outputs: Vec<String>,
) -> (Picks, Picks) {
    use crate::routing::Source;
    let mut inputs: Picks = match p.steps[0].inputs {
        None => first_inputs
            .into_iter()
            .map(|n| (0, n.clone(), n))
            .collect(),
        Some(_) => Vec::new(),
    };
    for (i, step) in p.steps.iter().enumerate() {
        for m in step.inputs.iter().flat_map(|maps| maps.iter()) {
            if m.from == Source::Request && !inputs.iter().any(|(_, _, n)| *n == *m.tensor) {
                inputs.push((i, m.name.to_string(), m.tensor.to_string()));
            }
        }
    }
    let last = p.steps.len() - 1;
    let outputs = if p.outputs.is_empty() {
        last_outputs
            .into_iter()
            .map(|n| (last, n.clone(), n))
            .collect()
    } else {
        p.outputs
            .iter()
            .filter_map(|m| match m.from {
                Source::Step(j) => Some((j, m.tensor.to_string(), m.name.to_string())),
                Source::Request => None,
            })
            .collect()
    };
    (inputs, outputs)
}

/// Each step's face target's answer to a control call, in step order.
async fn per_step<Req: Message, Resp: Message + Default>(
    shared: &Shared,
    entry: &RouteEntry,
    p: &crate::routing::Pipeline,
    path: &'static str,
    request: impl Fn(&crate::routing::Target) -> Req,
) -> Result<Vec<Resp>, GatewayError> {
    let mut out = Vec::with_capacity(p.steps.len());
    for step in p.steps.iter() {
        let t = entry.route.face_target(step.plan);
        let req = request(entry.route.target(t));
        out.push(control::<_, Resp>(shared, entry, t, path, &req).await?);
    }
    Ok(out)
}

/// Picks tensors from per-step lists by name and renames them for the client.
fn pick_renamed<T: Clone>(
    picks: &[(usize, String, String)],
    lists: &[&[T]],
    name: impl Fn(&T) -> &str,
    rename: impl Fn(&T, &str) -> T,
) -> Vec<T> {
    picks
        .iter()
        .filter_map(|(step, there, client)| {
            lists[*step]
                .iter()
                .find(|t| name(t) == there)
                .map(|t| rename(t, client))
        })
        .collect()
}

/// The metadata of a pipeline route's tensors, from its steps' models.
async fn pipeline_tensors(
    shared: &Shared,
    entry: &RouteEntry,
    p: &crate::routing::Pipeline,
) -> Result<(Vec<TensorMetadata>, Vec<TensorMetadata>), GatewayError> {
    let metas: Vec<ModelMetadataResponse> =
        per_step(shared, entry, p, MODEL_METADATA, |t| ModelMetadataRequest {
            name: t.model.to_string(),
            version: t.version.to_string(),
        })
        .await?;
    let names = |ts: &[TensorMetadata]| ts.iter().map(|t| t.name.clone()).collect();
    let (inputs, outputs) = pipeline_picks(
        p,
        names(&metas[0].inputs),
        names(&metas[metas.len() - 1].outputs),
    );
    let rename = |t: &TensorMetadata, n: &str| TensorMetadata {
        name: n.to_owned(),
        ..t.clone()
    };
    let ins: Vec<&[TensorMetadata]> = metas.iter().map(|m| &m.inputs[..]).collect();
    let outs: Vec<&[TensorMetadata]> = metas.iter().map(|m| &m.outputs[..]).collect();
    Ok((
        pick_renamed(&inputs, &ins, |t| &t.name, rename),
        pick_renamed(&outputs, &outs, |t| &t.name, rename),
    ))
}

/// A pipeline route's config: its first step's, with the pipeline's inputs and outputs
/// (perf_analyzer checks that the config's tensors are the metadata's).
async fn pipeline_config(
    shared: &Shared,
    entry: &RouteEntry,
    p: &crate::routing::Pipeline,
    config: &mut switchyard_proto::inference::ModelConfig,
) -> Result<(), GatewayError> {
    use switchyard_proto::inference::{ModelInput, ModelOutput};
    let configs: Vec<ModelConfigResponse> =
        per_step(shared, entry, p, MODEL_CONFIG, |t| ModelConfigRequest {
            name: t.model.to_string(),
            version: t.version.to_string(),
        })
        .await?;
    let of = |c: &ModelConfigResponse| c.config.clone().unwrap_or_default();
    let steps: Vec<_> = configs.iter().map(of).collect();
    let (inputs, outputs) = pipeline_picks(
        p,
        steps[0].input.iter().map(|t| t.name.clone()).collect(),
        steps[steps.len() - 1]
            .output
            .iter()
            .map(|t| t.name.clone())
            .collect(),
    );
    let ins: Vec<&[ModelInput]> = steps.iter().map(|c| &c.input[..]).collect();
    let outs: Vec<&[ModelOutput]> = steps.iter().map(|c| &c.output[..]).collect();
    config.input = pick_renamed(
        &inputs,
        &ins,
        |t| &t.name,
        |t, n| ModelInput {
            name: n.to_owned(),
            ..t.clone()
        },
    );
    config.output = pick_renamed(
        &outputs,
        &outs,
        |t| &t.name,
        |t, n| ModelOutput {
            name: n.to_owned(),
            ..t.clone()
        },
    );
    // The route batches as far as every step does.
    if let Some(smallest) = steps.iter().map(|c| c.max_batch_size).min() {
        config.max_batch_size = smallest;
    }
    Ok(())
}

/// The route's model config: its face target's, under the route's name. A route with a
/// response cache says so (`response_cache { enable: true }`), as a Triton model whose
/// responses are cached does.
pub(crate) async fn config(
    shared: &Shared,
    snapshot: &Snapshot,
    name: &str,
    version: &str,
    said: &mut ReplyHeaders,
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
    if version.is_empty()
        && let (Some((_, pipeline)), Some(c)) =
            (entry.route.default_pipeline(), resp.config.as_mut())
    {
        pipeline_config(shared, entry, pipeline, c).await?;
    }
    if let Some(c) = resp.config.as_mut() {
        c.name = entry.route.name.to_string();
        if entry.cache.is_some() {
            c.response_cache =
                Some(switchyard_proto::inference::ModelResponseCache { enable: true });
        }
    }
    Ok(resp)
}

/// Statistics of the route (of every route when `name` is empty) as Triton reports a
/// model's: one entry per version number, named after the route.
///
/// `version` selects as a pin does: empty, every version; a release label, its target
/// alone (reported under that target's version number: a label is no version); a number,
/// the targets with that number. A named route with no such version is NOT_FOUND.
///
/// Several targets of a route may share a version number (`digits` runs digits_mlp/1 and
/// digits_linear/1). Their statistics are summed into the one entry of that number rather
/// than listed side by side: clients key statistics by (name, version). perf_analyzer
/// keeps them in a map (a second equal key is dropped silently), takes the version whose
/// queue count grew during a measurement window (with `stoll` on `version`), then reads
/// that one entry; two `(digits, "1")` entries would hide one target's traffic, and an
/// entry per target under its label would abort it. Sums keep what it checks: the
/// compute_input, compute_infer and compute_output counts of an entry stay equal. A
/// backend model version that two targets name is counted once.
///
/// A route's cache answers without a backend call, so its hits are added as Triton counts
/// its own cache hits (success and queue counts, cache_hit; not inference_count,
/// execution_count or compute), to the entry of the route's representative target, whose
/// plan the cache answers for in the common case of a single-target route. Without them a
/// cached route that answers from memory shows no traffic, and perf_analyzer stops with
/// "failed to find the requested model version". The gateway keeps no hit durations: their
/// `ns` stay 0.
pub(crate) async fn statistics(
    shared: &Shared,
    snapshot: &Snapshot,
    name: &str,
    version: &str,
) -> Result<ModelStatisticsResponse, GatewayError> {
    use std::collections::BTreeMap;
    use switchyard_proto::inference::ModelStatistics;

    let entries: Vec<&std::sync::Arc<RouteEntry>> = if name.is_empty() {
        let mut all: Vec<_> = snapshot.routes.values().collect();
        all.sort_by(|a, b| a.route.name.cmp(&b.route.name));
        all
    } else {
        vec![route(snapshot, name)?]
    };
    let mut out = ModelStatisticsResponse::default();
    for entry in entries {
        let targets = &entry.route.targets;
        let chosen: Vec<TargetId> = if version.is_empty() {
            (0..targets.len()).map(|i| TargetId(i as u16)).collect()
        } else if let Some(i) = targets
            .iter()
            .position(|t| t.release.as_deref() == Some(version))
        {
            vec![TargetId(i as u16)]
        } else {
            (0..targets.len())
                .filter(|&i| &*targets[i].version == version)
                .map(|i| TargetId(i as u16))
                .collect()
        };
        if chosen.is_empty() {
            if name.is_empty() {
                continue;
            }
            return Err(crate::routing::RouteError::UnknownVersion {
                route: entry.route.name.clone(),
                version: version.to_owned(),
            }
            .into());
        }
        let mut by_version: BTreeMap<u64, ModelStatistics> = BTreeMap::new();
        // Each backend model version (pool, model, version) once, with the version number
        // it resolved to.
        type Asked<'a> = ((&'a str, &'a str, &'a str), Option<u64>);
        let mut asked: Vec<Asked<'_>> = Vec::new();
        let face = entry.route.default_target();
        let mut face_version = None;
        for &t in &chosen {
            let spec = entry.route.target(t);
            let which = (&*spec.backend, &*spec.model, &*spec.version);
            let number = match asked.iter().find(|(w, _)| *w == which) {
                Some((_, n)) => *n,
                None => {
                    let req = ModelStatisticsRequest {
                        name: spec.model.to_string(),
                        version: spec.version.to_string(),
                    };
                    let resp: ModelStatisticsResponse =
                        control(shared, entry, t, MODEL_STATISTICS, &req).await?;
                    let mut stats: Vec<(u64, ModelStatistics)> = resp
                        .model_stats
                        .into_iter()
                        .filter_map(|s| Some((s.version.parse::<u64>().ok()?, s)))
                        .collect();
                    // An unversioned target runs the backend's newest version.
                    if spec.version.is_empty() {
                        stats.sort_by_key(|(n, _)| *n);
                        stats.drain(..stats.len().saturating_sub(1));
                    }
                    let n = spec
                        .version
                        .parse()
                        .ok()
                        .or_else(|| stats.last().map(|(n, _)| *n));
                    for (n, s) in stats {
                        add_statistics(by_version.entry(n).or_default(), s);
                    }
                    asked.push((which, n));
                    n
                }
            };
            if t == face {
                face_version = number;
            }
        }
        if let (Some(_), Some(n)) = (&entry.cache, face_version) {
            let counters = shared.metrics.cache(&entry.route.name);
            let hits = counters.hits.get() + counters.coalesced.get();
            let s = by_version.entry(n).or_default();
            let i = s.inference_stats.get_or_insert_with(Default::default);
            for (d, by) in [
                (&mut i.success, hits),
                (&mut i.queue, hits),
                (&mut i.cache_hit, hits),
                (&mut i.cache_miss, counters.misses.get()),
            ] {
                let d = d.get_or_insert_with(Default::default);
                d.count = d.count.saturating_add(by);
            }
        }
        for (n, mut s) in by_version {
            s.name = entry.route.name.to_string();
            s.version = n.to_string();
            // Every duration present: HTTP clients index them without checking.
            let i = s.inference_stats.get_or_insert_with(Default::default);
            for d in [
                &mut i.success,
                &mut i.fail,
                &mut i.queue,
                &mut i.compute_input,
                &mut i.compute_infer,
                &mut i.compute_output,
                &mut i.cache_hit,
                &mut i.cache_miss,
            ] {
                d.get_or_insert_with(Default::default);
            }
            out.model_stats.push(s);
        }
    }
    Ok(out)
}

/// Adds one backend's statistics of a model version into a route's entry.
fn add_statistics(
    into: &mut switchyard_proto::inference::ModelStatistics,
    s: switchyard_proto::inference::ModelStatistics,
) {
    use switchyard_proto::inference::StatisticDuration;
    fn add(into: &mut Option<StatisticDuration>, d: Option<StatisticDuration>) {
        if let Some(d) = d {
            let into = into.get_or_insert_with(Default::default);
            into.count = into.count.saturating_add(d.count);
            into.ns = into.ns.saturating_add(d.ns);
        }
    }
    into.last_inference = into.last_inference.max(s.last_inference);
    into.inference_count = into.inference_count.saturating_add(s.inference_count);
    into.execution_count = into.execution_count.saturating_add(s.execution_count);
    if let Some(d) = s.inference_stats {
        let i = into.inference_stats.get_or_insert_with(Default::default);
        add(&mut i.success, d.success);
        add(&mut i.fail, d.fail);
        add(&mut i.queue, d.queue);
        add(&mut i.compute_input, d.compute_input);
        add(&mut i.compute_infer, d.compute_infer);
        add(&mut i.compute_output, d.compute_output);
        add(&mut i.cache_hit, d.cache_hit);
        add(&mut i.cache_miss, d.cache_miss);
    }
    for b in s.batch_stats {
        match into
            .batch_stats
            .iter_mut()
            .find(|x| x.batch_size == b.batch_size)
        {
            Some(x) => {
                add(&mut x.compute_input, b.compute_input);
                add(&mut x.compute_infer, b.compute_infer);
                add(&mut x.compute_output, b.compute_output);
            }
            None => into.batch_stats.push(b),
        }
    }
    into.batch_stats.sort_by_key(|b| b.batch_size);
    into.memory_usage.extend(s.memory_usage);
    for (key, r) in s.response_stats {
        let x = into.response_stats.entry(key).or_default();
        add(&mut x.compute_infer, r.compute_infer);
        add(&mut x.compute_output, r.compute_output);
        add(&mut x.success, r.success);
        add(&mut x.fail, r.fail);
        add(&mut x.empty_response, r.empty_response);
        add(&mut x.cancel, r.cancel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_proto::inference::{
        InferBatchStatistics, InferStatistics, ModelStatistics, StatisticDuration,
    };

    fn stats(n: u64, ns: u64) -> ModelStatistics {
        let d = |count, ns| Some(StatisticDuration { count, ns });
        ModelStatistics {
            name: "backend-model".into(),
            version: "1".into(),
            last_inference: n,
            inference_count: n,
            execution_count: n,
            inference_stats: Some(InferStatistics {
                success: d(n, ns),
                queue: d(n, ns),
                compute_input: d(n, ns),
                compute_infer: d(n, ns),
                compute_output: d(n, ns),
                ..Default::default()
            }),
            batch_stats: vec![InferBatchStatistics {
                batch_size: 1,
                compute_infer: d(n, ns),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn targets_sharing_a_version_number_sum_into_one_entry() {
        let mut entry = ModelStatistics::default();
        add_statistics(&mut entry, stats(3, 30));
        add_statistics(&mut entry, stats(5, 7));
        let i = entry.inference_stats.as_ref().unwrap();
        let count = |d: &Option<StatisticDuration>| d.as_ref().unwrap().count;
        assert_eq!((entry.inference_count, entry.last_inference), (8, 5));
        assert_eq!(count(&i.queue), 8);
        // What perf_analyzer checks: the compute counts of an entry agree.
        assert_eq!(
            (
                count(&i.compute_input),
                count(&i.compute_infer),
                count(&i.compute_output)
            ),
            (8, 8, 8)
        );
        assert_eq!(i.success.as_ref().unwrap().ns, 37);
        assert_eq!(entry.batch_stats.len(), 1);
        assert_eq!(count(&entry.batch_stats[0].compute_infer), 8);
    }
}
