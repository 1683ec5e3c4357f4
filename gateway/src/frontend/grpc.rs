//! The gRPC frontend (`inference.GRPCInferenceService` over h2c): reads the unary request,
//! answers health and server metadata itself, sends route-level calls through `models`,
//! and writes the reply with `grpc-status` trailers.

use std::sync::Arc;

use bytes::Bytes;
use http::HeaderMap;
use pingora_core::protocols::http::ServerSession;
use pingora_http::ResponseHeader;
use pingora_proxy::Session;
use prost::Message;
use switchyard_proto::inference::{
    ModelConfigRequest, ModelMetadataRequest, ModelReadyRequest, ModelReadyResponse,
    ModelStatisticsRequest, ServerLiveResponse, ServerMetadataResponse, ServerReadyResponse,
};
use tokio::time::Instant;

use super::{ReplyHeaders, RequestCtx, client_leaves, models, read_body};
use crate::Shared;
use crate::error::GatewayError;
use crate::grpc::SERVICE;
use crate::grpc::frame::{frame, unframe};
use crate::grpc::infer::split_infer_request;
use crate::grpc::status::{parse_grpc_timeout, percent_encode};
use crate::metrics::Protocol;
use crate::snapshot::Snapshot;

const PROTOCOL: Protocol = Protocol::Grpc;

/// Serves one gRPC request to completion.
pub(crate) async fn serve(shared: &Arc<Shared>, session: &mut Session, ctx: &mut RequestCtx) {
    if !session.is_http2() {
        let body = Bytes::from_static(
            b"this port speaks gRPC: HTTP/2 with prior knowledge (h2c); use port 8000 for REST\n",
        );
        super::respond(session, 426, "text/plain", &ctx.reply, &[], body).await;
        return;
    }
    if let Some(e) = ctx.shed(shared) {
        write_error(session, &ctx.reply, &e).await;
        return;
    }
    let (start, snapshot, said) = (ctx.start, &ctx.snapshot, &mut ctx.reply);
    let result = handle(shared, snapshot, session, start, said).await;
    match result {
        Ok(message) => write_ok(session, said, message).await,
        Err(e) => write_error(session, said, &e).await,
    }
}

async fn handle(
    shared: &Arc<Shared>,
    snapshot: &Arc<Snapshot>,
    session: &mut Session,
    start: Instant,
    said: &mut ReplyHeaders,
) -> Result<Bytes, GatewayError> {
    let path = session.req_header().uri.path().to_owned();
    let Some(method) = path.strip_prefix(SERVICE) else {
        return Err(GatewayError::Unsupported(format!(
            "unknown gRPC service or method '{path}'; the gateway serves inference.GRPCInferenceService"
        )));
    };
    let body = read_body(session, &shared.config.limits).await?;
    let message = unframe(body).map_err(GatewayError::BadRequest)?;
    let bad = |what: &str, e: prost::DecodeError| {
        GatewayError::BadRequest(format!("cannot decode {what}: {e}"))
    };
    match method {
        "ModelInfer" => {
            let msg = split_infer_request(&message)?;
            let headers: &HeaderMap = &session.req_header().headers;
            let deadline = headers
                .get("grpc-timeout")
                .and_then(|v| parse_grpc_timeout(v.to_str().ok()?));
            // The inference runs beside a watch on the client's stream, which needs the
            // session: it reads its own copy of the headers (pingora's RequestHeader
            // gives no way to move them out and back).
            let headers = headers.clone();
            let request = models::Inference {
                headers: &headers,
                message: msg,
                client_deadline: deadline,
                protocol: PROTOCOL,
                start,
            };
            models::infer(shared, snapshot, request, client_leaves(session), said).await
        }
        "ServerLive" => Ok(encode(&ServerLiveResponse { live: true })),
        "ServerReady" => Ok(encode(&ServerReadyResponse {
            ready: shared.is_ready(),
        })),
        "ServerMetadata" => Ok(encode(&ServerMetadataResponse {
            name: "switchyard-gateway".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            extensions: vec![
                "model_configuration".to_owned(),
                "statistics".to_owned(),
                "parameters".to_owned(),
            ],
        })),
        "ModelReady" => {
            let req =
                ModelReadyRequest::decode(message).map_err(|e| bad("ModelReadyRequest", e))?;
            let ready = models::ready(shared, snapshot, &req.name, &req.version, said).await;
            Ok(encode(&ModelReadyResponse { ready }))
        }
        "ModelMetadata" => {
            let req = ModelMetadataRequest::decode(message)
                .map_err(|e| bad("ModelMetadataRequest", e))?;
            Ok(encode(
                &models::metadata(shared, snapshot, &req.name, &req.version, said).await?,
            ))
        }
        "ModelConfig" => {
            let req =
                ModelConfigRequest::decode(message).map_err(|e| bad("ModelConfigRequest", e))?;
            Ok(encode(
                &models::config(shared, snapshot, &req.name, &req.version, said).await?,
            ))
        }
        "ModelStatistics" => {
            let req = ModelStatisticsRequest::decode(message)
                .map_err(|e| bad("ModelStatisticsRequest", e))?;
            Ok(encode(
                &models::statistics(shared, snapshot, &req.name, &req.version).await?,
            ))
        }
        other => Err(GatewayError::Unsupported(format!(
            "the gateway does not serve {other}; call a backend directly for repository control and streaming"
        ))),
    }
}

fn encode(m: &impl Message) -> Bytes {
    Bytes::from(m.encode_to_vec())
}

/// The reply's header, built as `http` parts (pingora's own builder parses every name and
/// keeps a case map, which HTTP/2 has no use for).
fn response_header(said: &ReplyHeaders) -> Option<ResponseHeader> {
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.headers.reserve(6);
    parts
        .headers
        .insert(http::header::CONTENT_TYPE, GRPC_CONTENT_TYPE);
    said.apply_to(&mut parts.headers);
    Some(ResponseHeader::from(parts))
}

const GRPC_CONTENT_TYPE: http::HeaderValue = http::HeaderValue::from_static("application/grpc");

/// `grpc-status` trailers of a successful reply.
fn ok_trailers() -> HeaderMap {
    let mut trailers = HeaderMap::with_capacity(1);
    trailers.insert(GRPC_STATUS, http::HeaderValue::from_static("0"));
    trailers
}

const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: http::HeaderName = http::HeaderName::from_static("grpc-message");

async fn write_ok(session: &mut Session, said: &ReplyHeaders, message: Bytes) {
    let Some(resp) = response_header(said) else {
        return;
    };
    // The whole reply (headers, one DATA frame, trailers) is handed to h2 at once, so it
    // leaves in one write. pingora's write_response_body first waits for flow-control
    // capacity, which costs a scheduler round trip and a syscall per frame.
    if let ServerSession::H2(h2) = session.as_downstream_mut() {
        if h2.write_response_header(Box::new(resp), false).is_err() {
            return;
        }
        if let Some(mut body) = h2.take_response_body_writer() {
            for (chunk, _) in frame(&[message]) {
                if body.send_data(chunk, false).is_err() {
                    return;
                }
            }
            let _ = body.send_trailers(ok_trailers());
            return;
        }
    } else if session
        .write_response_header(Box::new(resp), false)
        .await
        .is_err()
    {
        return;
    }
    for (chunk, _) in frame(&[message]) {
        if session
            .write_response_body(Some(chunk), false)
            .await
            .is_err()
        {
            return;
        }
    }
    let _ = session.write_response_trailers(ok_trailers()).await;
}

async fn write_error(session: &mut Session, said: &ReplyHeaders, error: &GatewayError) {
    let rescued = error.rescue();
    let Some(resp) = response_header(said) else {
        return;
    };
    if session
        .write_response_header(Box::new(resp), false)
        .await
        .is_err()
    {
        return;
    }
    let mut trailers = HeaderMap::with_capacity(2);
    trailers.insert(GRPC_STATUS, http::HeaderValue::from(rescued.grpc));
    if let Ok(v) = http::HeaderValue::from_str(&percent_encode(&rescued.message)) {
        trailers.insert(GRPC_MESSAGE, v);
    }
    let _ = session.write_response_trailers(trailers).await;
}
