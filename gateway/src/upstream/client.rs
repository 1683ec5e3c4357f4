//! Unary gRPC calls to backend endpoints over HTTP/2 (h2c) connections that belong to the
//! worker thread making the call.
//!
//! The gateway speaks gRPC upstream itself rather than through a generic client: a connect
//! failure (nothing sent, always safe to retry elsewhere) must be told apart from a failure
//! after the request left, and the request body goes out as a list of `Bytes` chunks so a
//! forwarded tensor is never copied.
//!
//! Each worker thread keeps one h2 connection per endpoint (`Endpoint::conns`), driven by a
//! task on that thread's event loop: a call never wakes another thread, takes no lock of
//! ours, and finds its connection with one thread-local lookup. pingora's connection pool
//! checked every reused connection's peer address with a `getpeername` syscall and rebuilt
//! the request header through two conversions; a call now builds its `http::Request` once.
//! A connection that died is replaced by the next call on that thread before anything is
//! sent, so a restarted backend costs no request.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use http::header::{CONTENT_TYPE, TE};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri};
use prometheus::IntGauge;
use tracing::debug;

use crate::grpc::frame::{Gather, frame, unframe};
use crate::grpc::status::{code, grpc_status, grpc_timeout};
use crate::trace::Propagate;
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
    /// The reply grew past `limits.max_response_bytes`; the stream was reset there.
    #[error("{endpoint} sent a reply over the {limit}-byte limit (limits.max_response_bytes)")]
    TooLarge { endpoint: String, limit: u64 },
}

/// What a call says of itself beyond the message: whether it is a shadow copy, and the
/// trace it belongs to.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Marks<'a> {
    /// A shadow copy: `x-switchyard-shadow: 1`.
    pub(crate) shadow: bool,
    /// `traceparent` (and `tracestate`): the backend's spans continue the trace.
    pub(crate) trace: Option<&'a Propagate>,
}

/// One unary call: `path` (`/inference.GRPCInferenceService/ModelInfer`), the message as
/// chunks, within `budget`. The remaining budget travels as `grpc-timeout`; `marks` say
/// what else the call carries.
pub(crate) async fn unary(
    endpoint: &Endpoint,
    path: &'static str,
    message: &[Bytes],
    budget: Duration,
    marks: Marks<'_>,
) -> Result<Reply, CallError> {
    // Counted here, so a call cut short by its budget leaves the count too.
    let _stream = InFlight::new(&endpoint.streams);
    match tokio::time::timeout(budget, exchange(endpoint, path, message, budget, marks)).await {
        Ok(result) => result,
        Err(_) => Err(CallError::Timeout {
            endpoint: endpoint.address.clone(),
            after: budget,
        }),
    }
}

/// How an endpoint is reached: resolved once when the pools are built.
#[derive(Debug)]
pub(crate) struct Dial {
    pub(crate) addr: SocketAddr,
    /// `:authority` of every request: the endpoint's address, the honest one.
    pub(crate) authority: Authority,
    pub(crate) connect_timeout: Duration,
    /// PING interval on idle and busy connections alike; a PONG missing for
    /// [`PING_TIMEOUT`] closes the connection (a peer powered off or partitioned sends no
    /// FIN and no RST).
    pub(crate) ping_interval: Duration,
    /// `limits.max_response_bytes`.
    pub(crate) max_reply: u64,
}

/// The connection each worker thread holds to one endpoint.
pub(crate) type Conns = thread_local::ThreadLocal<RefCell<Option<SendRequest<Bytes>>>>;

/// How long a PING may go unanswered.
const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// Flow-control windows: 8 MiB per stream and per connection (pingora's values), so a
/// tensor of a few MiB is not held back by WINDOW_UPDATE round trips.
const WINDOW: u32 = 1 << 23;

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

/// This thread's connection to `endpoint`, if it has one. (The slot is looked up again
/// after every await: on a work-stealing runtime, such as the health checks', the call may
/// resume on another thread.)
fn held(endpoint: &Endpoint) -> Option<SendRequest<Bytes>> {
    endpoint
        .conns
        .get_or(|| RefCell::new(None))
        .borrow()
        .clone()
}

fn hold(endpoint: &Endpoint, send: Option<SendRequest<Bytes>>) {
    *endpoint.conns.get_or(|| RefCell::new(None)).borrow_mut() = send;
}

/// A ready handle on this thread's connection to `endpoint`, opening one when there is
/// none or when the one there has closed. Nothing is sent before this returns, so every
/// error here is a [`CallError::Connect`].
async fn ready(endpoint: &Endpoint) -> Result<SendRequest<Bytes>, CallError> {
    if let Some(send) = held(endpoint) {
        match send.ready().await {
            Ok(send) => return Ok(send),
            // The connection ended (the backend restarted, went away, or sent GOAWAY).
            Err(e) => debug!(endpoint = %endpoint.address, "upstream connection closed: {e}"),
        }
    }
    // Calls that find no connection wait for the one that opens it, so a burst to a cold
    // endpoint opens one connection, not one per call.
    let _connecting = endpoint.connecting.lock().await;
    if let Some(send) = held(endpoint)
        && let Ok(send) = send.ready().await
    {
        return Ok(send);
    }
    hold(endpoint, None);
    let send = connect(endpoint).await?;
    hold(endpoint, Some(send.clone()));
    send.ready().await.map_err(|e| CallError::Connect {
        endpoint: endpoint.address.clone(),
        reason: e.to_string(),
    })
}

/// Opens an h2c connection (prior knowledge) and spawns its driver on this thread.
async fn connect(endpoint: &Endpoint) -> Result<SendRequest<Bytes>, CallError> {
    let dial = &endpoint.dial;
    let failed = |reason: String| CallError::Connect {
        endpoint: endpoint.address.clone(),
        reason,
    };
    let tcp = match tokio::time::timeout(
        dial.connect_timeout,
        tokio::net::TcpStream::connect(dial.addr),
    )
    .await
    {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return Err(failed(e.to_string())),
        Err(_) => {
            return Err(failed(format!(
                "no connection within {:?}",
                dial.connect_timeout
            )));
        }
    };
    // Small unary calls: no Nagle delay on the request's last frame.
    let _ = tcp.set_nodelay(true);
    let handshake = h2::client::Builder::new()
        .enable_push(false)
        .max_frame_size(64 * 1024)
        .initial_window_size(WINDOW)
        .initial_connection_window_size(WINDOW)
        .handshake::<_, Bytes>(tcp);
    let (send, mut connection) = match tokio::time::timeout(dial.connect_timeout, handshake).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => return Err(failed(format!("HTTP/2 handshake: {e}"))),
        Err(_) => {
            return Err(failed(format!(
                "no HTTP/2 handshake within {:?}",
                dial.connect_timeout
            )));
        }
    };
    endpoint.connects.inc();
    let pings = connection.ping_pong();
    let (address, interval) = (endpoint.address.clone(), dial.ping_interval);
    tokio::spawn(async move {
        tokio::select! {
            result = &mut connection => {
                if let Err(e) = result {
                    debug!(endpoint = %address, "upstream connection ended: {e}");
                }
            }
            () = keepalive(pings, interval) => {
                tracing::warn!(endpoint = %address, "upstream connection closed: no PONG within {PING_TIMEOUT:?}");
            }
        }
    });
    Ok(send)
}

/// Sends a PING every `interval` and returns when one goes unanswered for
/// [`PING_TIMEOUT`]; never returns when pings are off or unavailable.
async fn keepalive(pings: Option<h2::PingPong>, interval: Duration) {
    let Some(mut pings) = pings.filter(|_| !interval.is_zero()) else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(PING_TIMEOUT, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            // The connection itself failed: its driver ends it.
            Ok(Err(_)) => return std::future::pending().await,
            Err(_) => return,
        }
    }
}

/// The request header of one call.
fn request(dial: &Dial, path: &'static str, budget: Duration, marks: Marks<'_>) -> Request<()> {
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(Scheme::HTTP);
    uri.authority = Some(dial.authority.clone());
    uri.path_and_query = Some(PathAndQuery::from_static(path));
    let mut req = Request::new(());
    *req.method_mut() = Method::POST;
    *req.uri_mut() = Uri::from_parts(uri).unwrap_or_default();
    let headers: &mut HeaderMap = req.headers_mut();
    headers.reserve(if marks.trace.is_some() { 6 } else { 4 });
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(TE, HeaderValue::from_static("trailers"));
    if let Ok(mut v) = HeaderValue::try_from(grpc_timeout(budget)) {
        // A new value on nearly every call: sent as a literal that HPACK never indexes,
        // rather than one that evicts the connection's useful table entries each time.
        v.set_sensitive(true);
        headers.insert(HeaderName::from_static("grpc-timeout"), v);
    }
    if marks.shadow {
        // Backends (and their logs and metrics) can tell shadow traffic apart.
        headers.insert(
            HeaderName::from_static("x-switchyard-shadow"),
            HeaderValue::from_static("1"),
        );
    }
    if let Some(t) = marks.trace {
        // A new span id per call: never indexed, like grpc-timeout.
        let mut parent = t.traceparent.clone();
        parent.set_sensitive(true);
        headers.insert(crate::trace::TRACEPARENT, parent);
        if let Some(state) = &t.tracestate {
            headers.insert(crate::trace::TRACESTATE, state.clone());
        }
    }
    req
}

async fn exchange(
    endpoint: &Endpoint,
    path: &'static str,
    message: &[Bytes],
    budget: Duration,
    marks: Marks<'_>,
) -> Result<Reply, CallError> {
    let address = endpoint.address.as_str();
    let transport = |e: h2::Error| CallError::Transport {
        endpoint: address.to_owned(),
        reason: describe(&e),
    };
    let mut send = ready(endpoint).await?;
    let (response, mut body) =
        match send.send_request(request(&endpoint.dial, path, budget, marks), false) {
            Ok(pair) => pair,
            // Refused before a byte of this stream left: the connection had just closed.
            Err(e) => {
                return Err(CallError::Connect {
                    endpoint: address.to_owned(),
                    reason: describe(&e),
                });
            }
        };
    // h2 buffers the data and sends it with the HEADERS frame when the connection task
    // next writes: one write for the whole request.
    for (chunk, end) in frame(message) {
        body.send_data(chunk, end).map_err(transport)?;
    }
    let response = response.await.map_err(transport)?;
    let (parts, mut recv) = response.into_parts();
    let mut body = Gather::default();
    let mut total = 0u64;
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.map_err(transport)?;
        total += chunk.len() as u64;
        if total > endpoint.dial.max_reply {
            // Dropping the stream resets it: the backend stops sending.
            return Err(CallError::TooLarge {
                endpoint: address.to_owned(),
                limit: endpoint.dial.max_reply,
            });
        }
        let _ = recv.flow_control().release_capacity(chunk.len());
        body.push(chunk);
    }
    let trailers = recv.trailers().await.map_err(transport)?;
    let http_status = parts.status.as_u16();
    let (status, message) = grpc_status(Some(&parts.headers), trailers.as_ref());
    let Some(status) = status else {
        return Err(CallError::Transport {
            endpoint: address.to_owned(),
            reason: format!("the response (HTTP {http_status}) carried no grpc-status"),
        });
    };
    let body = if status == code::OK {
        unframe(body.finish()).map_err(|reason| CallError::Transport {
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

/// An h2 error in one line: the stream or connection error and its reason.
fn describe(e: &h2::Error) -> String {
    if e.is_go_away() {
        format!("the connection was closed by the backend (GOAWAY): {e}")
    } else if e.is_io() {
        format!("connection lost: {e}")
    } else {
        e.to_string()
    }
}
