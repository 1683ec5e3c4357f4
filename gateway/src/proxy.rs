//! The pingora side: one `ProxyHttp` per listener. Every request is answered in
//! `request_filter` by the frontend for that port, so the proxy phases after it never run:
//! the gateway terminates KServe v2 calls and makes its own upstream calls (see
//! `upstream::client` for why).

use std::sync::Arc;

use async_trait::async_trait;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::{Error, ErrorType, Result};
use pingora_proxy::{ProxyHttp, Session};

use crate::Shared;
use crate::frontend::{RequestCtx, admin, grpc, rest};
use crate::metrics::Protocol;

/// Which frontend a listener runs.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Port {
    Rest,
    Grpc,
    Admin,
}

impl Port {
    /// The listener's name in metrics.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Port::Rest => "rest",
            Port::Grpc => "grpc",
            Port::Admin => "admin",
        }
    }
}

/// The `ProxyHttp` of one listener.
#[derive(Debug)]
pub(crate) struct Frontend {
    pub(crate) port: Port,
    pub(crate) shared: Arc<Shared>,
}

#[async_trait]
impl ProxyHttp for Frontend {
    type CTX = RequestCtx;

    /// A request arrives: its start, snapshot, reply headers and in-flight guard.
    fn new_ctx(&self) -> RequestCtx {
        let protocol = match self.port {
            Port::Grpc => Some(Protocol::Grpc),
            Port::Rest => Some(Protocol::Rest),
            Port::Admin => None,
        };
        RequestCtx::new(&self.shared, protocol)
    }

    /// The whole request: decode, route, run, reply (see `frontend::models::infer`).
    ///
    /// An async fn's future is as large as its largest branch, and this one is boxed
    /// (async_trait) and moved on every request: the REST and admin branches (JSON, a
    /// reload) are boxed on their own. (gRPC over HTTP/2 does not come through pingora's
    /// session at all: see `frontend::grpc`; HTTP/1.x on that port gets a 426.)
    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        match self.port {
            Port::Grpc => grpc::serve_http1(session, ctx).await,
            Port::Rest => Box::pin(rest::serve(&self.shared, session, ctx)).await,
            Port::Admin => Box::pin(admin::serve(&self.shared, session, ctx)).await,
        }
        Ok(true)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        // Invariant: request_filter always answers, so pingora never asks for a peer.
        Error::e_explain(
            ErrorType::InternalError,
            "every request is answered by the frontend",
        )
    }
}
