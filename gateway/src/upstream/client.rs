//! Unary gRPC calls to backend endpoints over pingora's pooled HTTP/2 (h2c) connections.
//!
//! The gateway speaks gRPC upstream itself rather than through a generic client: a connect
//! failure (nothing sent, always safe to retry elsewhere) must be told apart from a failure
//! after the request left, and the request body goes out as a list of `Bytes` chunks so a
//! forwarded tensor is never copied.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pingora_core::connectors::http::Connector;
use pingora_core::protocols::http::client::HttpSession;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::RequestHeader;

use crate::grpc::frame::{frame, unframe};
use crate::grpc::status::{code, grpc_status, grpc_timeout};

/// A gRPC reply: status, message and the response message (without its frame header).
#[derive(Debug, Clone)]
pub(crate) struct Reply {
    pub(crate) status: i32,
    pub(crate) message: String,
    /// The response message, empty for errors.
    pub(crate) body: Bytes,
}

/// Why a call produced no reply.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum CallError {
    /// No connection could be made: the request was never sent.
    #[error("cannot connect to {endpoint}: {reason}")]
    Connect { endpoint: String, reason: String },
    /// The request was (or may have been) sent, then the exchange failed.
    #[error("{endpoint} failed mid-request: {reason}")]
    Transport { endpoint: String, reason: String },
    /// The time budget ran out.
    #[error("{endpoint} did not answer within {after:?}")]
    Timeout { endpoint: String, after: Duration },
}

/// One unary call: `path` (`/inference.GRPCInferenceService/ModelInfer`), the message as
/// chunks, within `budget`. The remaining budget travels as `grpc-timeout`; shadow copies
/// carry `x-switchyard-shadow: 1`.
pub(crate) async fn unary(
    connector: &Connector,
    peer: &HttpPeer,
    endpoint: &str,
    path: &str,
    message: &[Bytes],
    budget: Duration,
    shadow: bool,
) -> Result<Reply, CallError> {
    match tokio::time::timeout(
        budget,
        exchange(connector, peer, endpoint, path, message, budget, shadow),
    )
    .await
    {
        Ok(result) => result,
        Err(_) => Err(CallError::Timeout {
            endpoint: endpoint.to_owned(),
            after: budget,
        }),
    }
}

async fn exchange(
    connector: &Connector,
    peer: &HttpPeer,
    endpoint: &str,
    path: &str,
    message: &[Bytes],
    budget: Duration,
    shadow: bool,
) -> Result<Reply, CallError> {
    let connect = |e: Box<pingora_core::Error>| CallError::Connect {
        endpoint: endpoint.to_owned(),
        reason: describe(&e),
    };
    let transport = |e: Box<pingora_core::Error>| CallError::Transport {
        endpoint: endpoint.to_owned(),
        reason: describe(&e),
    };
    let (mut session, _reused) = connector.get_http_session(peer).await.map_err(connect)?;
    let HttpSession::H2(h2) = &mut session else {
        return Err(CallError::Connect {
            endpoint: endpoint.to_owned(),
            reason: "the endpoint did not speak HTTP/2".into(),
        });
    };
    let mut req = RequestHeader::build("POST", path.as_bytes(), Some(5)).map_err(connect)?;
    // h2 needs an authority; the endpoint address is the honest one.
    req.insert_header("host", endpoint).map_err(connect)?;
    req.insert_header("content-type", "application/grpc")
        .map_err(connect)?;
    req.insert_header("te", "trailers").map_err(connect)?;
    req.insert_header("grpc-timeout", grpc_timeout(budget))
        .map_err(connect)?;
    if shadow {
        // Backends (and their logs and metrics) can tell shadow traffic apart.
        req.insert_header("x-switchyard-shadow", "1")
            .map_err(connect)?;
    }
    h2.write_request_header(Box::new(req), false)
        .map_err(connect)?;
    // Hand the body to h2 directly: pingora's write_request_body first waits for flow-control
    // capacity (a scheduler round trip per frame); h2 buffers the data and sends it with
    // the HEADERS frame when the connection task next writes.
    let mut body = h2
        .take_request_body_writer()
        .ok_or_else(|| CallError::Connect {
            endpoint: endpoint.to_owned(),
            reason: "no request body stream".to_owned(),
        })?;
    for (chunk, end) in frame(message) {
        body.send_data(chunk, end)
            .map_err(|e| CallError::Transport {
                endpoint: endpoint.to_owned(),
                reason: e.to_string(),
            })?;
    }
    h2.read_response_header().await.map_err(transport)?;
    let header = h2.response_header().cloned();
    let mut body = BytesMut::new();
    while let Some(chunk) = h2.read_response_body().await.map_err(transport)? {
        body.extend_from_slice(&chunk);
    }
    let trailers = h2.read_trailers().await.map_err(transport)?;
    let http_status = header.as_ref().map_or(0, |h| h.status.as_u16());
    let (status, message) = grpc_status(header.as_ref().map(|h| &h.headers), trailers.as_ref());
    // Dropping the stream (rather than release_http_session) keeps the h2 connection in
    // pingora's in-use pool: release moves a connection with no open stream to the idle
    // pool and spawns an idle-timeout task for it, which at low concurrency happened on
    // every request. Closed connections are still skipped and dropped by the pool.
    drop(session);
    let Some(status) = status else {
        return Err(CallError::Transport {
            endpoint: endpoint.to_owned(),
            reason: format!("the response (HTTP {http_status}) carried no grpc-status"),
        });
    };
    let body = if status == code::OK {
        unframe(body.freeze()).map_err(|reason| CallError::Transport {
            endpoint: endpoint.to_owned(),
            reason,
        })?
    } else {
        Bytes::new()
    };
    Ok(Reply {
        status,
        message,
        body,
    })
}

/// A pingora error in one line: its kind and the root cause (its `Display` nests contexts).
fn describe(e: &pingora_core::Error) -> String {
    let root = e.root_cause().to_string();
    format!("{:?}: {}", e.etype(), root.trim())
}
