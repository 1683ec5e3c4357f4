//! The KServe v2 REST frontend: health, server and model metadata, config, statistics, and
//! inference with JSON or binary tensors, each mapped onto the gRPC upstream.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use prost::Message;
use prost_reflect::{DynamicMessage, ReflectMessage, SerializeOptions};
use serde_json::{Value, json};
use switchyard_proto::inference::{ModelInferRequest, ModelInferResponse};
use switchyard_proto::prost_reflect;
use tokio::time::Instant;

use super::{
    ReplyHeaders, RequestCtx, client_leaves, json::parse_request, json::render_response, models,
    read_body, respond,
};
use crate::Shared;
use crate::error::GatewayError;
use crate::grpc::infer::split_infer_request;
use crate::metrics::Protocol;
use crate::snapshot::Snapshot;

const PROTOCOL: Protocol = Protocol::Rest;
const JSON: &str = "application/json";

/// What a REST path asks for.
#[derive(Debug, PartialEq, Eq)]
enum Call<'a> {
    Live,
    Ready,
    Server,
    Model {
        name: &'a str,
        version: &'a str,
        what: &'a str,
    },
    AllStats,
}

fn parse_path(path: &str) -> Option<Call<'_>> {
    let rest = path.strip_prefix("/v2")?;
    match rest {
        "" | "/" => return Some(Call::Server),
        "/health/live" => return Some(Call::Live),
        "/health/ready" => return Some(Call::Ready),
        "/models/stats" => return Some(Call::AllStats),
        _ => {}
    }
    let rest = rest.strip_prefix("/models/")?;
    let mut parts = rest.split('/');
    let name = parts.next().filter(|n| !n.is_empty())?;
    let mut version = "";
    let mut what = "";
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (None, ..) => {}
        (Some("versions"), Some(v), None, _) => version = v,
        (Some("versions"), Some(v), Some(w), None) => {
            version = v;
            what = w;
        }
        (Some(w), None, ..) => what = w,
        _ => return None,
    }
    matches!(what, "" | "ready" | "config" | "stats" | "infer").then_some(Call::Model {
        name,
        version,
        what,
    })
}

/// Serves one REST request to completion.
pub(crate) async fn serve(shared: &Arc<Shared>, session: &mut Session, ctx: &mut RequestCtx) {
    let shed = ctx.shed(shared);
    let (start, snapshot, said) = (ctx.start, &ctx.snapshot, &mut ctx.reply);
    let result = match shed {
        Some(e) => Err(e),
        None => handle(shared, snapshot, session, start, said).await,
    };
    match result {
        Ok(Reply {
            status,
            content_type,
            extra,
            body,
        }) => respond(session, status, content_type, said, &extra, body).await,
        Err(e) => {
            let r = e.rescue();
            let body = Bytes::from(json!({ "error": r.message }).to_string());
            respond(session, r.http, JSON, said, &[], body).await;
        }
    }
}

use pingora_proxy::Session;

struct Reply {
    status: u16,
    content_type: &'static str,
    extra: Vec<(&'static str, String)>,
    body: Bytes,
}

fn json_reply(v: &Value) -> Reply {
    Reply {
        status: 200,
        content_type: JSON,
        extra: Vec::new(),
        body: Bytes::from(v.to_string()),
    }
}

/// Protobuf to Triton's JSON: proto field names, enums by name, 64-bit integers as JSON
/// numbers (Triton's HTTP API writes counts and dims as numbers, not as proto3 JSON's
/// strings; perf_analyzer reads statistics with rapidjson's `GetUint64`, which a string
/// does not satisfy).
fn proto_json(m: &impl ReflectMessage) -> Result<Bytes, GatewayError> {
    let dynamic: DynamicMessage = m.transcode_to_dynamic();
    let options = SerializeOptions::new()
        .use_proto_field_name(true)
        .skip_default_fields(false)
        .stringify_64_bit_integers(false);
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::new(&mut out);
    dynamic
        .serialize_with_options(&mut ser, &options)
        .map_err(|e| GatewayError::UpstreamFailed {
            route: String::new(),
            reason: format!("cannot render JSON: {e}"),
        })?;
    Ok(Bytes::from(out))
}

async fn handle(
    shared: &Arc<Shared>,
    snapshot: &Arc<Snapshot>,
    session: &mut Session,
    start: Instant,
    said: &mut ReplyHeaders,
) -> Result<Reply, GatewayError> {
    let method = session.req_header().method.clone();
    let path = session.req_header().uri.path().to_owned();
    let call = parse_path(&path).ok_or_else(|| {
        GatewayError::BadRequest(format!(
            "unknown path {path}; see the KServe v2 REST protocol"
        ))
    })?;
    let is_get = method == http::Method::GET;
    let wrong_method =
        |want: &str| GatewayError::BadRequest(format!("{path} takes {want}, not {method}"));
    match call {
        Call::Live if is_get => Ok(json_reply(&json!({ "live": true }))),
        Call::Ready if is_get => {
            let ready = shared.is_ready();
            let mut r = json_reply(&json!({ "ready": ready }));
            if !ready {
                r.status = 503;
            }
            Ok(r)
        }
        Call::Server if is_get => Ok(json_reply(&json!({
            "name": "switchyard-gateway",
            "version": env!("CARGO_PKG_VERSION"),
            "extensions": ["binary_tensor_data", "model_configuration", "statistics", "parameters"],
        }))),
        Call::AllStats if is_get => Ok(Reply {
            status: 200,
            content_type: JSON,
            extra: Vec::new(),
            body: proto_json(&models::statistics(shared, snapshot, "", "").await?)?,
        }),
        Call::Model {
            name,
            version,
            what: "infer",
        } if method == http::Method::POST => {
            infer(shared, snapshot, session, name, version, start, said).await
        }
        Call::Model { what: "infer", .. } => Err(wrong_method("POST")),
        Call::Model {
            name,
            version,
            what: "",
        } if is_get => {
            let meta = models::metadata(shared, snapshot, name, version, said).await?;
            let tensors = |ts: &[switchyard_proto::inference::model_metadata_response::TensorMetadata]| -> Vec<Value> {
                ts.iter().map(|t| json!({ "name": t.name, "datatype": t.datatype, "shape": t.shape })).collect()
            };
            Ok(json_reply(&json!({
                "name": meta.name,
                "versions": meta.versions,
                "platform": meta.platform,
                "inputs": tensors(&meta.inputs),
                "outputs": tensors(&meta.outputs),
            })))
        }
        Call::Model {
            name,
            version,
            what: "ready",
        } if is_get => {
            let ready = models::ready(shared, snapshot, name, version, said).await;
            Ok(Reply {
                status: if ready { 200 } else { 400 },
                content_type: JSON,
                extra: Vec::new(),
                body: Bytes::from(json!({ "ready": ready }).to_string()),
            })
        }
        Call::Model {
            name,
            version,
            what: "config",
        } if is_get => {
            let config = models::config(shared, snapshot, name, version, said)
                .await?
                .config
                .unwrap_or_default();
            Ok(Reply {
                status: 200,
                content_type: JSON,
                extra: Vec::new(),
                body: proto_json(&config)?,
            })
        }
        Call::Model {
            name,
            version,
            what: "stats",
        } if is_get => {
            let stats = models::statistics(shared, snapshot, name, version).await?;
            Ok(Reply {
                status: 200,
                content_type: JSON,
                extra: Vec::new(),
                body: proto_json(&stats)?,
            })
        }
        _ => Err(wrong_method("GET")),
    }
}

async fn infer(
    shared: &Arc<Shared>,
    snapshot: &Arc<Snapshot>,
    session: &mut Session,
    route: &str,
    version: &str,
    start: Instant,
    said: &mut ReplyHeaders,
) -> Result<Reply, GatewayError> {
    let parsed = async {
        let header_len = match session
            .req_header()
            .headers
            .get("inference-header-content-length")
        {
            None => None,
            Some(v) => Some(
                v.to_str()
                    .ok()
                    .and_then(|s| s.trim().parse::<usize>().ok())
                    .ok_or_else(|| {
                        GatewayError::BadRequest(
                            "Inference-Header-Content-Length must be a number of bytes".to_owned(),
                        )
                    })?,
            ),
        };
        let body = read_body(session, &shared.config.limits).await?;
        let (mut req, format): (ModelInferRequest, _) =
            parse_request(&body, header_len).map_err(GatewayError::BadRequest)?;
        req.model_name = route.to_owned();
        req.model_version = version.to_owned();
        // The tensors go out as the chunks they already are, after the rest of the
        // message: encoding them into one buffer would copy every byte once more.
        let tensors = std::mem::take(&mut req.raw_input_contents);
        let mut message = split_infer_request(&Bytes::from(req.encode_to_vec()))?;
        message.tensors = tensors;
        Ok((message, format))
    };
    let (message, format) = match parsed.await {
        Ok(p) => p,
        Err(e) => {
            models::refused(shared, snapshot, route, PROTOCOL, start, &e);
            return Err(e);
        }
    };
    let headers = session.req_header().headers.clone();
    let request = models::Inference {
        headers: &headers,
        message,
        client_deadline: None,
        protocol: PROTOCOL,
        start,
    };
    let response = models::infer(shared, snapshot, request, client_leaves(session), said).await?;
    let resp = ModelInferResponse::decode(response).map_err(|e| GatewayError::UpstreamFailed {
        route: route.to_owned(),
        reason: format!("undecodable ModelInferResponse: {e}"),
    })?;
    let (json_len, chunks) =
        render_response(&resp, &format).map_err(|reason| GatewayError::UpstreamFailed {
            route: route.to_owned(),
            reason,
        })?;
    if chunks.len() == 1 {
        let body = chunks.into_iter().next().unwrap_or_default();
        return Ok(Reply {
            status: 200,
            content_type: JSON,
            extra: Vec::new(),
            body,
        });
    }
    let total: usize = chunks.iter().map(Bytes::len).sum();
    let mut body = BytesMut::with_capacity(total);
    for c in &chunks {
        body.extend_from_slice(c);
    }
    Ok(Reply {
        status: 200,
        content_type: "application/octet-stream",
        extra: vec![("inference-header-content-length", json_len.to_string())],
        body: body.freeze(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(parse_path("/v2/health/ready"), Some(Call::Ready));
        assert_eq!(parse_path("/v2"), Some(Call::Server));
        assert_eq!(
            parse_path("/v2/models/digits"),
            Some(Call::Model {
                name: "digits",
                version: "",
                what: ""
            })
        );
        assert_eq!(
            parse_path("/v2/models/digits/infer"),
            Some(Call::Model {
                name: "digits",
                version: "",
                what: "infer"
            })
        );
        assert_eq!(
            parse_path("/v2/models/digits/versions/v1.1.0/infer"),
            Some(Call::Model {
                name: "digits",
                version: "v1.1.0",
                what: "infer"
            })
        );
        assert_eq!(
            parse_path("/v2/models/digits/versions/2"),
            Some(Call::Model {
                name: "digits",
                version: "2",
                what: ""
            })
        );
        assert_eq!(
            parse_path("/v2/models/digits/versions/1/stats"),
            Some(Call::Model {
                name: "digits",
                version: "1",
                what: "stats"
            })
        );
        assert_eq!(
            parse_path("/v2/models/digits/versions/1/config"),
            Some(Call::Model {
                name: "digits",
                version: "1",
                what: "config"
            })
        );
        assert_eq!(parse_path("/v2/models/digits/explode"), None);
        assert_eq!(parse_path("/v1/models/x:predict"), None);
    }
}
