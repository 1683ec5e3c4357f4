//! The downstream side: reading requests from pingora sessions and writing responses, for
//! the gRPC (`grpc.rs`) and REST (`rest.rs`) frontends and the admin API (`admin.rs`).

pub(crate) mod admin;
pub(crate) mod grpc;
pub(crate) mod json;
pub(crate) mod models;
pub(crate) mod rest;

use bytes::Bytes;

use crate::grpc::frame::Gather;
use http::HeaderValue;
use pingora_http::ResponseHeader;
use pingora_proxy::Session;

use std::sync::Arc;

use tokio::time::Instant;

use crate::error::GatewayError;
use crate::metrics::Protocol;
use crate::snapshot::Snapshot;
use crate::{InFlight, Shared};

/// What one request carries from pingora's `new_ctx` to its last byte: when it arrived,
/// the one policy snapshot it sees, the headers its reply will say what happened in, and
/// its place in `switchyard_requests_in_flight`.
#[derive(Debug)]
pub(crate) struct RequestCtx {
    pub(crate) start: Instant,
    pub(crate) snapshot: Arc<Snapshot>,
    pub(crate) reply: ReplyHeaders,
    /// Whether the request arrived over `limits.max_in_flight` and is to be refused.
    pub(crate) shed: bool,
    _in_flight: Option<InFlight>,
}

impl RequestCtx {
    /// A request arriving now on a port of `protocol` (`None`: the admin port, which is
    /// not counted in flight).
    pub(crate) fn new(shared: &Shared, protocol: Option<Protocol>) -> Self {
        let snapshot = shared.snapshot.load_full();
        let in_flight = protocol.map(|p| shared.in_flight(p));
        let shed = protocol.is_some_and(|p| {
            let over = shared.total_in_flight() > i64::from(shared.config.limits.max_in_flight);
            if over {
                shared.metrics.shed[p as usize].inc();
            }
            over
        });
        Self {
            start: Instant::now(),
            reply: ReplyHeaders {
                policy: Some(snapshot.version_header.clone()),
                ..ReplyHeaders::default()
            },
            snapshot,
            shed,
            _in_flight: in_flight,
        }
    }
}

/// Response headers that say what the gateway did.
#[derive(Debug, Default, Clone)]
pub(crate) struct ReplyHeaders {
    pub(crate) route: Option<HeaderValue>,
    pub(crate) target: Option<HeaderValue>,
    pub(crate) policy: Option<HeaderValue>,
    /// `x-switchyard-cache`: hit, miss or bypass.
    pub(crate) cache: Option<&'static str>,
    /// `x-switchyard-cascade-stage`: the 1-based stage that answered.
    pub(crate) cascade_stage: Option<HeaderValue>,
    /// `x-switchyard-cascade`: why that stage answered.
    pub(crate) cascade: Option<&'static str>,
    /// `x-switchyard-shadow`: whether a shadow copy was sent or dropped.
    pub(crate) shadow: Option<&'static str>,
    /// `x-switchyard-rollout`: the route's rollout step and weight.
    pub(crate) rollout: Option<HeaderValue>,
    /// `x-switchyard-pipeline`: the steps that ran (`features>classify`).
    pub(crate) pipeline: Option<HeaderValue>,
    /// `x-switchyard-switch`: the case a switch took and its plan.
    pub(crate) switch: Option<HeaderValue>,
    /// `x-switchyard-overflow`: the full target whose overflow plan answered.
    pub(crate) overflow: Option<HeaderValue>,
    /// `retry-after` (seconds), when the request was shed.
    pub(crate) retry_after: Option<&'static str>,
}
impl ReplyHeaders {
    /// Every header to send, with its name.
    fn each(&self, mut f: impl FnMut(&'static Named, HeaderValue)) {
        use names::*;
        for (name, value) in [
            (&ROUTE, &self.route),
            (&TARGET, &self.target),
            (&POLICY, &self.policy),
            (&CASCADE_STAGE, &self.cascade_stage),
            (&ROLLOUT, &self.rollout),
            (&PIPELINE, &self.pipeline),
            (&SWITCH, &self.switch),
            (&OVERFLOW, &self.overflow),
        ] {
            if let Some(v) = value {
                f(name, v.clone());
            }
        }
        for (name, value) in [
            (&CACHE, self.cache),
            (&CASCADE, self.cascade),
            (&SHADOW, self.shadow),
            (&RETRY_AFTER, self.retry_after),
        ] {
            if let Some(v) = value {
                f(name, HeaderValue::from_static(v));
            }
        }
    }

    /// Adds the headers to a pingora response (HTTP/1.x keeps the names' case).
    pub(crate) fn apply(&self, resp: &mut ResponseHeader) {
        self.each(|name, v| {
            let _ = resp.insert_header(name.text, v);
        });
    }

    /// Adds the headers to an HTTP/2 response's map: no name is parsed or copied.
    pub(crate) fn apply_to(&self, headers: &mut http::HeaderMap) {
        self.each(|name, v| {
            headers.insert(name.name.clone(), v);
        });
    }
}

/// A response header name, parsed once (at compile time), and as text.
pub(crate) struct Named {
    pub(crate) name: http::HeaderName,
    pub(crate) text: &'static str,
}

/// The gateway's response header names.
mod names {
    use super::Named;
    use http::HeaderName;

    const fn named(text: &'static str) -> Named {
        Named {
            name: HeaderName::from_static(text),
            text,
        }
    }
    pub(super) static ROUTE: Named = named("x-switchyard-route");
    pub(super) static TARGET: Named = named("x-switchyard-target");
    pub(super) static POLICY: Named = named("x-switchyard-policy");
    pub(super) static CASCADE_STAGE: Named = named("x-switchyard-cascade-stage");
    pub(super) static CACHE: Named = named("x-switchyard-cache");
    pub(super) static CASCADE: Named = named("x-switchyard-cascade");
    pub(super) static SHADOW: Named = named("x-switchyard-shadow");
    pub(super) static ROLLOUT: Named = named("x-switchyard-rollout");
    pub(super) static PIPELINE: Named = named("x-switchyard-pipeline");
    pub(super) static SWITCH: Named = named("x-switchyard-switch");
    pub(super) static OVERFLOW: Named = named("x-switchyard-overflow");
    pub(super) static RETRY_AFTER: Named = named("retry-after");
}

impl RequestCtx {
    /// The refusal of a shed request, with `Retry-After` set; `None` when it is admitted.
    pub(crate) fn shed(&mut self, shared: &Shared) -> Option<GatewayError> {
        self.shed.then(|| {
            self.reply.retry_after = Some("1");
            GatewayError::Overloaded {
                limit: shared.config.limits.max_in_flight,
            }
        })
    }
}

/// Completes when the client leaves: resets its h2 stream or closes its connection. The
/// body must have been read; until the client goes away this stays pending.
pub(crate) async fn client_leaves(session: &mut Session) {
    let _ = session.read_body_or_idle(true).await;
}

/// Reads the whole request body, refusing more than `limits.max_body_bytes` and a body
/// whose next bytes take longer than `limits.body_timeout`.
pub(crate) async fn read_body(
    session: &mut Session,
    limits: &switchyard_config::gateway::LimitsConfig,
) -> Result<Bytes, GatewayError> {
    let limit = limits.max_body_bytes.0;
    let patience = limits.body_timeout.0;
    if let Some(len) = session
        .req_header()
        .headers
        .get("content-length")
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        && len > limit
    {
        return Err(GatewayError::BodyTooLarge { limit });
    }
    let mut body = Gather::default();
    let mut total = 0u64;
    loop {
        let Ok(read) = tokio::time::timeout(patience, session.read_request_body()).await else {
            return Err(GatewayError::BodyStalled { after: patience });
        };
        match read {
            Ok(Some(chunk)) => {
                total += chunk.len() as u64;
                if total > limit {
                    return Err(GatewayError::BodyTooLarge { limit });
                }
                body.push(chunk);
            }
            Ok(None) => return Ok(body.finish()),
            Err(e) => {
                return Err(GatewayError::BadRequest(format!(
                    "cannot read the request body: {e}"
                )));
            }
        }
    }
}

/// Writes a complete HTTP response.
pub(crate) async fn respond(
    session: &mut Session,
    status: u16,
    content_type: &str,
    said: &ReplyHeaders,
    extra: &[(&str, String)],
    body: Bytes,
) {
    let Ok(mut resp) = ResponseHeader::build(status, Some(4 + extra.len())) else {
        return;
    };
    let _ = resp.insert_header("content-type", content_type);
    let _ = resp.insert_header("content-length", body.len().to_string());
    for (k, v) in extra {
        let _ = resp.insert_header(k.to_string(), v.as_str());
    }
    said.apply(&mut resp);
    if session
        .write_response_header(Box::new(resp), body.is_empty())
        .await
        .is_err()
    {
        return;
    }
    if !body.is_empty() {
        let _ = session.write_response_body(Some(body), true).await;
    }
}
