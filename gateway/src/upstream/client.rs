//! Unary gRPC calls to backend endpoints over pingora's pooled HTTP/2 (h2c) connections.
//!
//! The gateway speaks gRPC upstream itself rather than through a generic client: a connect
//! failure (nothing sent, always safe to retry elsewhere) must be told apart from a failure
//! after the request left, and the request body goes out as a list of `Bytes` chunks so a
//! forwarded tensor is never copied.

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::HeaderMap;
use pingora_core::connectors::http::Connector;
use pingora_core::protocols::http::client::HttpSession;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::RequestHeader;

/// gRPC status codes the gateway reasons about.
pub(crate) mod code {
    pub(crate) const OK: i32 = 0;
    pub(crate) const CANCELLED: i32 = 1;
    pub(crate) const UNKNOWN: i32 = 2;
    pub(crate) const INVALID_ARGUMENT: i32 = 3;
    pub(crate) const DEADLINE_EXCEEDED: i32 = 4;
    pub(crate) const NOT_FOUND: i32 = 5;
    pub(crate) const FAILED_PRECONDITION: i32 = 9;
    pub(crate) const RESOURCE_EXHAUSTED: i32 = 8;
    pub(crate) const UNIMPLEMENTED: i32 = 12;
    pub(crate) const INTERNAL: i32 = 13;
    pub(crate) const UNAVAILABLE: i32 = 14;
}

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

/// Below this size a message goes out as one buffer (one h2 DATA frame, one write);
/// above it the chunks go out as they are, so large tensors are never copied.
const COALESCE_BELOW: usize = 64 * 1024;

/// The gRPC frame for `message` (a list of chunks) as body writes: `(chunk, end_of_stream)`.
pub(crate) fn frame(message: &[Bytes]) -> Vec<(Bytes, bool)> {
    let len: usize = message.iter().map(Bytes::len).sum();
    let mut head = BytesMut::with_capacity(5 + if len < COALESCE_BELOW { len } else { 0 });
    head.put_u8(0);
    head.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    if len < COALESCE_BELOW {
        for chunk in message {
            head.extend_from_slice(chunk);
        }
        return vec![(head.freeze(), true)];
    }
    let mut out = Vec::with_capacity(message.len() + 1);
    out.push((head.freeze(), false));
    let last = message.len().saturating_sub(1);
    out.extend(
        message
            .iter()
            .enumerate()
            .map(|(i, c)| (c.clone(), i == last)),
    );
    out
}

/// A pingora error in one line: its kind and the root cause (its `Display` nests contexts).
fn describe(e: &pingora_core::Error) -> String {
    let root = e.root_cause().to_string();
    format!("{:?}: {}", e.etype(), root.trim())
}

/// `grpc-status` and `grpc-message` from trailers, or from the headers of a trailers-only
/// response.
fn grpc_status(headers: Option<&HeaderMap>, trailers: Option<&HeaderMap>) -> (Option<i32>, String) {
    for map in [trailers, headers].into_iter().flatten() {
        if let Some(s) = map
            .get("grpc-status")
            .and_then(|v| v.to_str().ok()?.parse().ok())
        {
            let message = map
                .get("grpc-message")
                .and_then(|v| v.to_str().ok())
                .map(percent_decode)
                .unwrap_or_default();
            return (Some(s), message);
        }
    }
    (None, String::new())
}

/// The message inside one gRPC frame.
pub(crate) fn unframe(mut frame: Bytes) -> Result<Bytes, String> {
    if frame.len() < 5 {
        return Err(format!(
            "a gRPC frame needs 5 header bytes, got {}",
            frame.len()
        ));
    }
    let compressed = frame.get_u8();
    let len = frame.get_u32() as usize;
    if compressed != 0 {
        return Err("compressed gRPC messages are not supported; disable compression".to_owned());
    }
    if frame.len() != len {
        return Err(format!(
            "the gRPC frame announces {len} bytes but carries {}",
            frame.len()
        ));
    }
    Ok(frame)
}

/// A `grpc-timeout` value: at most 8 digits and a unit.
pub(crate) fn grpc_timeout(d: Duration) -> String {
    let micros = d.as_micros();
    if micros < 100_000_000 {
        format!("{}u", micros.max(1))
    } else {
        format!("{}m", (d.as_millis()).min(99_999_999))
    }
}

/// Parses a `grpc-timeout` header (`100m`, `5S`, `250000u`).
pub(crate) fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// gRPC percent-encodes `grpc-message`; malformed escapes stay as they are.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%' && i + 2 < bytes.len())
            .then(|| {
                std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
            })
            .flatten();
        match escaped {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// gRPC percent-encodes `grpc-message`: everything outside printable ASCII, and `%`.
pub(crate) fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_round_trip() {
        for d in [
            Duration::from_micros(1),
            Duration::from_millis(250),
            Duration::from_secs(600),
        ] {
            let back = parse_grpc_timeout(&grpc_timeout(d)).unwrap();
            assert!(
                back <= d && d - back < Duration::from_millis(1),
                "{d:?} -> {back:?}"
            );
        }
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("123456789m"), None, "at most 8 digits");
        assert_eq!(parse_grpc_timeout("10x"), None);
        assert_eq!(parse_grpc_timeout(""), None);
    }

    #[test]
    fn grpc_messages_are_percent_coded() {
        let m = "shape 100% wrong: é";
        assert_eq!(percent_decode(&percent_encode(m)), m);
        assert_eq!(percent_encode("a%b"), "a%25b");
        assert_eq!(percent_decode("bad %zz end %4"), "bad %zz end %4");
    }
}
