//! The gRPC frontend (`inference.GRPCInferenceService` over h2c): reads the unary request,
//! answers health and server metadata itself, sends route-level calls through `models`,
//! and writes the reply with `grpc-status` trailers.
//!
//! HTTP/2 connections are served here on the `h2` crate directly, not through pingora's
//! HTTP session: `listener::Guarded` hands over each connection that opens with the h2
//! preface, and its streams run as futures of the connection's own task (as HAProxy runs
//! streams in its event loop), with no task spawned, no pingora session built and no
//! header converted per request. callgrind counted pingora's per-stream layer at about a
//! fifth of the gateway's instructions per request. pingora still owns the listeners,
//! the workers and the process; an HTTP/1.x client on this port gets its 426 from
//! pingora's HTTP/1 app ([`serve_http1`]).

use std::future::poll_fn;
use std::panic::AssertUnwindSafe;
use std::pin::pin;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use h2::RecvStream;
use h2::server::SendResponse;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;
use pingora_proxy::Session;
use prost::Message;
use switchyard_proto::inference::{
    ModelConfigRequest, ModelMetadataRequest, ModelReadyRequest, ModelReadyResponse,
    ModelStatisticsRequest, ServerLiveResponse, ServerMetadataResponse, ServerReadyResponse,
};
use tokio::time::Instant;
use tracing::debug;

use super::{ReplyHeaders, RequestCtx, models};
use crate::Shared;
use crate::error::GatewayError;
use crate::grpc::SERVICE;
use crate::grpc::frame::{Gather, frame, unframe};
use crate::grpc::infer::split_infer_request;
use crate::grpc::status::{parse_grpc_timeout, percent_encode};
use crate::metrics::Protocol;
use crate::snapshot::Snapshot;

const PROTOCOL: Protocol = Protocol::Grpc;

/// Streams one client connection may have open at once (pingora's bound, kept).
const MAX_CONCURRENT_STREAMS: u32 = 100;

/// The largest header block a client may send, decoded (pingora's bound, kept).
const MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;

/// An HTTP/1.x request on the gRPC port.
pub(crate) async fn serve_http1(session: &mut Session, ctx: &RequestCtx) {
    let body = Bytes::from_static(
        b"this port speaks gRPC: HTTP/2 with prior knowledge (h2c); use port 8000 for REST\n",
    );
    super::respond(session, 426, "text/plain", &ctx.reply, &[], body).await;
}

/// Serves one h2c connection to its end: every stream it opens, until the client closes
/// it, it stays idle for `limits.idle_timeout` with no stream open, or the gateway shuts
/// down (a GOAWAY first, then the streams already open run to their end).
pub(crate) async fn serve_connection(
    shared: Arc<Shared>,
    stream: Stream,
    mut shutdown: ShutdownWatch,
) {
    let limits = &shared.config.limits;
    let handshake = h2::server::Builder::new()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .handshake::<_, Bytes>(stream);
    let mut conn = match tokio::time::timeout(limits.header_timeout.0, handshake).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            debug!("h2 handshake with a client failed: {e}");
            return;
        }
        Err(_) => return,
    };
    let idle_for = limits.idle_timeout.0;
    let mut idle = pin!(tokio::time::sleep(idle_for));
    let mut streams = FuturesUnordered::new();
    let mut shutting_down = *shutdown.borrow();
    if shutting_down {
        conn.graceful_shutdown();
    }
    loop {
        tokio::select! {
            biased;
            changed = shutdown.changed(), if !shutting_down => {
                if changed.is_err() || *shutdown.borrow() {
                    conn.graceful_shutdown();
                    shutting_down = true;
                }
            }
            Some(()) = streams.next(), if !streams.is_empty() => {
                if streams.is_empty() {
                    idle.as_mut().reset(tokio::time::Instant::now() + idle_for);
                }
            }
            accepted = conn.accept() => match accepted {
                Some(Ok((request, respond))) => {
                    // A panic in one request ends that stream (its reply dropped, so the
                    // client sees a reset), not its siblings on this connection.
                    streams.push(
                        AssertUnwindSafe(serve_stream(&shared, request, respond))
                            .catch_unwind()
                            .map(|done| {
                                if done.is_err() {
                                    tracing::error!("a gRPC request panicked; its stream was reset");
                                }
                            }),
                    );
                }
                Some(Err(e)) => {
                    debug!("h2 connection with a client ended: {e}");
                    return;
                }
                // Closed cleanly (after a GOAWAY, once its streams ended).
                None => return,
            },
            () = &mut idle, if streams.is_empty() => {
                // Idle with nothing in flight: dropping the connection closes the socket
                // now, with no GOAWAY wait that could hang on a dead peer.
                return;
            }
        }
    }
}

/// One stream: a unary call, answered with headers, the reply and `grpc-status` trailers.
async fn serve_stream(
    shared: &Arc<Shared>,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let mut ctx = RequestCtx::new(shared, Some(PROTOCOL));
    if let Some(e) = ctx.shed(shared) {
        write_error(&mut respond, &ctx.reply, &e);
        return;
    }
    let (start, snapshot, said) = (ctx.start, &ctx.snapshot, &mut ctx.reply);
    let (parts, body) = request.into_parts();
    match handle(shared, snapshot, &parts, body, &mut respond, start, said).await {
        Ok(message) => write_ok(&mut respond, said, message),
        Err(e) => write_error(&mut respond, said, &e),
    }
}

/// Reads the whole request body, refusing more than `limits.max_body_bytes` and a body
/// whose next bytes take longer than `limits.body_timeout`; flow-control credit goes back
/// to the client as each chunk is taken.
async fn read_body(
    headers: &HeaderMap,
    body: &mut RecvStream,
    limits: &switchyard_config::gateway::LimitsConfig,
) -> Result<Bytes, GatewayError> {
    let limit = limits.max_body_bytes.0;
    let patience = limits.body_timeout.0;
    if let Some(len) = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        && len > limit
    {
        return Err(GatewayError::BodyTooLarge { limit });
    }
    let mut gathered = Gather::default();
    let mut total = 0u64;
    loop {
        let Ok(read) = tokio::time::timeout(patience, body.data()).await else {
            return Err(GatewayError::BodyStalled { after: patience });
        };
        match read {
            Some(Ok(chunk)) => {
                let _ = body.flow_control().release_capacity(chunk.len());
                total += chunk.len() as u64;
                if total > limit {
                    return Err(GatewayError::BodyTooLarge { limit });
                }
                gathered.push(chunk);
            }
            None => return Ok(gathered.finish()),
            Some(Err(e)) => {
                return Err(GatewayError::BadRequest(format!(
                    "cannot read the request body: {e}"
                )));
            }
        }
    }
}

/// Completes when the client resets the stream or its connection fails: nobody is left
/// to answer.
async fn client_leaves(respond: &mut SendResponse<Bytes>) {
    let _ = poll_fn(|cx| respond.poll_reset(cx)).await;
}

async fn handle(
    shared: &Arc<Shared>,
    snapshot: &Arc<Snapshot>,
    parts: &http::request::Parts,
    mut body: RecvStream,
    respond: &mut SendResponse<Bytes>,
    start: Instant,
    said: &mut ReplyHeaders,
) -> Result<Bytes, GatewayError> {
    let path = parts.uri.path();
    let Some(method) = path.strip_prefix(SERVICE) else {
        return Err(GatewayError::Unsupported(format!(
            "unknown gRPC service or method '{path}'; the gateway serves inference.GRPCInferenceService"
        )));
    };
    let headers = &parts.headers;
    if method == "ModelInfer" {
        let parsed = read_body(headers, &mut body, &shared.config.limits)
            .await
            .and_then(|body| unframe(body).map_err(GatewayError::BadRequest))
            .and_then(|message| Ok(split_infer_request(&message)?));
        let msg = match parsed {
            Ok(m) => m,
            Err(e) => {
                // The route is inside the message that could not be read.
                models::refused(shared, snapshot, "-", PROTOCOL, start, &e);
                return Err(e);
            }
        };
        let deadline = headers
            .get("grpc-timeout")
            .and_then(|v| parse_grpc_timeout(v.to_str().ok()?));
        let request = models::Inference {
            headers,
            message: msg,
            client_deadline: deadline,
            protocol: PROTOCOL,
            start,
        };
        return models::infer(shared, snapshot, request, client_leaves(respond), said).await;
    }
    let body = read_body(headers, &mut body, &shared.config.limits).await?;
    let message = unframe(body).map_err(GatewayError::BadRequest)?;
    let bad = |what: &str, e: prost::DecodeError| {
        GatewayError::BadRequest(format!("cannot decode {what}: {e}"))
    };
    match method {
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

/// The reply's header: what the gateway did, and the gRPC content type.
fn response_header(said: &ReplyHeaders) -> Response<()> {
    let mut resp = Response::new(());
    let headers = resp.headers_mut();
    headers.reserve(6);
    headers.insert(http::header::CONTENT_TYPE, GRPC_CONTENT_TYPE);
    said.apply_to(headers);
    resp
}

const GRPC_CONTENT_TYPE: HeaderValue = HeaderValue::from_static("application/grpc");
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// The whole reply (headers, one DATA frame, trailers) is handed to h2 at once, so it
/// leaves in one write when the connection next flushes. A client that reset the stream
/// meanwhile makes these fail; there is nobody to tell.
fn write_ok(respond: &mut SendResponse<Bytes>, said: &ReplyHeaders, message: Bytes) {
    let Ok(mut body) = respond.send_response(response_header(said), false) else {
        return;
    };
    for (chunk, _) in frame(&[message]) {
        if body.send_data(chunk, false).is_err() {
            return;
        }
    }
    let mut trailers = HeaderMap::with_capacity(1);
    trailers.insert(GRPC_STATUS, HeaderValue::from_static("0"));
    let _ = body.send_trailers(trailers);
}

fn write_error(respond: &mut SendResponse<Bytes>, said: &ReplyHeaders, error: &GatewayError) {
    let rescued = error.rescue();
    let Ok(mut body) = respond.send_response(response_header(said), false) else {
        return;
    };
    let mut trailers = HeaderMap::with_capacity(2);
    trailers.insert(GRPC_STATUS, HeaderValue::from(rescued.grpc));
    if let Ok(v) = HeaderValue::from_str(&percent_encode(&rescued.message)) {
        trailers.insert(GRPC_MESSAGE, v);
    }
    let _ = body.send_trailers(trailers);
}
