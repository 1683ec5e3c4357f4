//! What a listener does with a connection before pingora reads a request from it: count it
//! against `limits.max_connections`, wait at most `limits.header_timeout` for its first
//! bytes, and on the gRPC port tell HTTP/2 from HTTP/1.x by as few bytes as tell them
//! apart, handing HTTP/2 to the gateway's own h2 server (`frontend::grpc`).
//!
//! pingora's own h2c detection waits for all 24 bytes of the HTTP/2 preface, with no time
//! limit: a 20-byte `GET /v2 HTTP/1.0` request was never answered, and 23 bytes held a
//! connection forever. Here the first byte that differs from the preface hands the
//! connection to an HTTP/1.x-only proxy at once, and only a whole preface to HTTP/2.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::apps::ServerApp;
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;
use prometheus::{IntCounter, IntGauge};

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Connections one listener holds, across workers.
#[derive(Debug)]
pub(crate) struct Connections {
    open: AtomicUsize,
    max: usize,
    gauge: IntGauge,
    refused: IntCounter,
}

impl Connections {
    pub(crate) fn new(max: u32, gauge: IntGauge, refused: IntCounter) -> Self {
        Self {
            open: AtomicUsize::new(0),
            max: max as usize,
            gauge,
            refused,
        }
    }

    /// A slot for one more connection, or `None` at the limit.
    fn admit(self: &Arc<Self>) -> Option<Slot> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            self.refused.inc();
            return None;
        }
        self.gauge.inc();
        Some(Slot(self.clone()))
    }
}

/// One admitted connection; dropping it frees the slot.
struct Slot(Arc<Connections>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.gauge.dec();
    }
}

/// A listener's app: the guard in front of pingora's HTTP apps.
pub(crate) struct Guarded<A> {
    /// Serves HTTP/1.x (its `h2c` off).
    pub(crate) http1: Arc<A>,
    /// Serves HTTP/2 (gRPC) after a whole preface, on the gRPC port only.
    pub(crate) grpc: Option<Arc<crate::Shared>>,
    pub(crate) connections: Arc<Connections>,
    pub(crate) first_bytes: Duration,
}

/// What a connection's first bytes say.
#[derive(Debug, PartialEq, Eq)]
enum Opening {
    Http1,
    Http2,
    /// Closed, failed or too slow: nothing to serve.
    Nothing,
}

/// Peeks (without consuming) at the first bytes, one more at a time while they still match
/// the preface: a peek returns once that many bytes have arrived, and the first read
/// usually brings them all, so the later peeks are served from pingora's buffer.
async fn opening(stream: &mut Stream, sniff_h2: bool) -> Opening {
    let mut buf = [0u8; H2_PREFACE.len()];
    let wanted = if sniff_h2 { H2_PREFACE.len() } else { 1 };
    for n in 1..=wanted {
        match stream.try_peek(&mut buf[..n]).await {
            Ok(true) => {}
            // A stream that cannot peek (none of ours): let pingora decide.
            Ok(false) => {
                return if sniff_h2 {
                    Opening::Http2
                } else {
                    Opening::Http1
                };
            }
            Err(_) => return Opening::Nothing,
        }
        if !sniff_h2 || buf[n - 1] != H2_PREFACE[n - 1] {
            return Opening::Http1;
        }
    }
    Opening::Http2
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Guarded<A> {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let _slot = self.connections.admit()?;
        let opening =
            tokio::time::timeout(self.first_bytes, opening(&mut stream, self.grpc.is_some()))
                .await
                .unwrap_or(Opening::Nothing);
        match (opening, &self.grpc) {
            (Opening::Http2, Some(shared)) => {
                crate::frontend::grpc::serve_connection(shared.clone(), stream, shutdown.clone())
                    .await;
                None
            }
            (Opening::Http1 | Opening::Http2, _) => self.http1.process_new(stream, shutdown).await,
            (Opening::Nothing, _) => None,
        }
    }

    async fn cleanup(&self) {
        self.http1.cleanup().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_is_refused_at_the_limit_and_freed_on_drop() {
        let c = Arc::new(Connections::new(
            2,
            IntGauge::new("g", "g").unwrap(),
            IntCounter::new("r", "r").unwrap(),
        ));
        let a = c.admit().unwrap();
        let _b = c.admit().unwrap();
        assert!(c.admit().is_none());
        assert_eq!((c.gauge.get(), c.refused.get()), (2, 1));
        drop(a);
        assert!(c.admit().is_some());
    }
}
