//! What both frontends answer the same way: inference through the route's policy, and a
//! route's readiness, metadata, config and statistics (those of its targets, under the
//! route's name).

use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use prost::Message;
use switchyard_proto::inference::{
    ModelConfigRequest, ModelConfigResponse, ModelMetadataRequest, ModelMetadataResponse,
    ModelReadyRequest, ModelReadyResponse, ModelStatisticsRequest, ModelStatisticsResponse,
};
use tokio::time::Instant;

use super::Said;
use crate::Shared;
use crate::error::GatewayError;
use crate::invoke;
use crate::metrics::Outcome;
use crate::routing::TargetId;
use crate::snapshot::{RouteEntry, Snapshot};
use crate::upstream::MODEL_READY;
use crate::upstream::client::code;
use crate::wire::InferMessage;

const MODEL_METADATA: &str = "/inference.GRPCInferenceService/ModelMetadata";
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

/// Routes and runs one inference; returns the `ModelInferResponse` bytes.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn infer(
    shared: &Shared,
    snapshot: &Snapshot,
    headers: &HeaderMap,
    message: InferMessage,
    client_deadline: Option<Duration>,
    protocol: usize,
    start: Instant,
    said: &mut Said,
) -> Result<Bytes, GatewayError> {
    let entry = route(snapshot, &message.model_name)?;
    said.route = Some(entry.name_header.clone());
    let decision = match entry
        .route
        .decide(headers, &message.model_version, rand::random(), &|t| {
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
    let result = invoke::infer(
        &shared.upstreams,
        &shared.budget,
        entry,
        &decision,
        &message,
        start + budget,
        budget,
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
    let reply = shared
        .upstreams
        .call(
            pool.pick(),
            path,
            &[Bytes::from(req.encode_to_vec())],
            CONTROL_BUDGET,
        )
        .await
        .map_err(|e| GatewayError::UpstreamFailed {
            route: entry.route.name.to_string(),
            reason: e.to_string(),
        })?;
    if reply.status != code::OK {
        return Err(GatewayError::Upstream {
            code: reply.status,
            message: reply.message,
        });
    }
    Resp::decode(reply.body).map_err(|e| GatewayError::UpstreamFailed {
        route: entry.route.name.to_string(),
        reason: format!("undecodable reply: {e}"),
    })
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
