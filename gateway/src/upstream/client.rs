//! Unary gRPC calls to backend endpoints over pingora's pooled HTTP/2 (h2c) connections.
//!
//! The gateway speaks gRPC upstream itself rather than through a generic client: a connect
//! failure (nothing sent, always safe to retry elsewhere) must be told apart from a failure
//! after the request left, and the request body goes out as a list of `Bytes` chunks so a
//! forwarded tensor is never copied.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pingora_core::connectors::http::v2::Connector;
use pingora_core::protocols::http::client::HttpSession;
use pingora_http::RequestHeader;
use prometheus::IntGauge;

use crate::grpc::frame::{frame, unframe};
use crate::grpc::status::{code, grpc_status, grpc_timeout};
use crate::upstream::Endpoint;

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
    endpoint: &Endpoint,
    path: &str,
    message: &[Bytes],
    budget: Duration,
    shadow: bool,
) -> Result<Reply, CallError> {
    // Counted here, so a call cut short by its budget leaves the count too.
    let _stream = InFlight::new(&endpoint.streams);
    let crowded = endpoint.streams.get() > i64::from(CROWDED);
    match tokio::time::timeout(
        budget,
        exchange(connector, endpoint, path, message, budget, shadow, crowded),
    )
    .await
    {
        Ok(result) => result,
        Err(_) => Err(CallError::Timeout {
            endpoint: endpoint.address.clone(),
            after: budget,
        }),
    }
}

/// Streams one upstream h2 connection carries at most; more concurrent calls to an
/// endpoint open more connections.
pub(crate) const MAX_STREAMS: usize = 100;

/// Calls in flight to one endpoint above which a finished call hands its connection back
/// to the pool (see `exchange`).
const CROWDED: u32 = MAX_STREAMS as u32 / 2;

/// One call counted in an endpoint's `switchyard_upstream_streams` while it lasts.
struct InFlight<'a>(&'a IntGauge);

impl<'a> InFlight<'a> {
    fn new(gauge: &'a IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn exchange(
    connector: &Connector,
    endpoint: &Endpoint,
    path: &str,
    message: &[Bytes],
    budget: Duration,
    shadow: bool,
    crowded: bool,
) -> Result<Reply, CallError> {
    let (peer, address) = (&endpoint.peer, endpoint.address.as_str());
    let connect = |e: Box<pingora_core::Error>| CallError::Connect {
        endpoint: address.to_owned(),
        reason: describe(&e),
    };
    let transport = |e: Box<pingora_core::Error>| CallError::Transport {
        endpoint: address.to_owned(),
        reason: describe(&e),
    };
    let mut session = match connector.reused_http_session(peer).await.map_err(connect)? {
        Some(session) => session,
        None => {
            // pingora's pool opens a connection per caller that finds no free stream: a
            // burst of calls to a cold endpoint opened one each. One call connects; the
            // others wait for it and share it (or the next, once it is full).
            let _connecting = endpoint.connecting.lock().await;
            match connector.reused_http_session(peer).await.map_err(connect)? {
                Some(session) => session,
                None => {
                    endpoint.connects.inc();
                    match connector
                        .new_http_session::<_, ()>(peer)
                        .await
                        .map_err(connect)?
                    {
                        HttpSession::H2(h2) => h2,
                        _ => {
                            return Err(CallError::Connect {
                                endpoint: address.to_owned(),
                                reason: "the endpoint did not speak HTTP/2".into(),
                            });
                        }
                    }
                }
            }
        }
    };
    let h2 = &mut session;
    let mut req = RequestHeader::build("POST", path.as_bytes(), Some(5)).map_err(connect)?;
    // h2 needs an authority; the endpoint address is the honest one.
    req.insert_header("host", address).map_err(connect)?;
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
            endpoint: address.to_owned(),
            reason: "no request body stream".to_owned(),
        })?;
    for (chunk, end) in frame(message) {
        body.send_data(chunk, end)
            .map_err(|e| CallError::Transport {
                endpoint: address.to_owned(),
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
    // Below CROWDED calls in flight, dropping the stream (rather than
    // release_http_session) keeps the h2 connection in pingora's in-use pool: release
    // moves a connection with no open stream to the idle pool and spawns an idle-timeout
    // task for it, which at low concurrency happened on every request. But a connection
    // whose last free stream was taken left the in-use pool, and only a release puts it
    // back: with more calls in flight, every call releases, so a full connection is
    // reused once a stream frees instead of churning new ones. Closed connections are
    // skipped and dropped by the pool either way.
    if crowded {
        connector.release_http_session(session, peer, peer.options.idle_timeout);
    } else {
        drop(session);
    }
    let Some(status) = status else {
        return Err(CallError::Transport {
            endpoint: address.to_owned(),
            reason: format!("the response (HTTP {http_status}) carried no grpc-status"),
        });
    };
    let body = if status == code::OK {
        unframe(body.freeze()).map_err(|reason| CallError::Transport {
            endpoint: address.to_owned(),
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
