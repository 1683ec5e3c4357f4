//! Switchyard's bundled inference backend: a KServe v2 / Triton gRPC server for ONNX models
//! in a Triton-style model repository, with Triton's dynamic batching and metrics.
//!
//! # Overview
//! * `repository`: scans `<repo>/<model>/config.pbtxt` and `<repo>/<model>/<version>/`,
//!   applies the version policy and the load-time safety checks, keeps the catalog.
//! * `pbtxt` and `spec`: `config.pbtxt` text format to `ModelConfig` to a checked spec.
//! * `runtime`: tract (default) and ONNX Runtime (feature `onnxruntime`) behind one trait.
//! * `scheduler`: the dynamic batcher and model instances, on their own OS threads.
//! * `request`: request validation; `service`: the tonic service; `stats`: statistics and
//!   Prometheus metrics with Triton's names.
//!
//! # How to use
//! ```no_run
//! # async fn run() -> std::io::Result<()> {
//! use switchyard_backend::{Backend, BackendConfig};
//! let backend = Backend::load(BackendConfig::new("backends/model_repository")).await?;
//! let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! backend.serve(grpc, None, std::future::pending()).await
//! # }
//! ```
//!
//! # Invariants
//! * Inference never runs on a tokio worker thread.
//! * No request bytes can panic the server: shapes are checked arithmetic, sizes are
//!   compared with received bytes before anything is allocated.
//! * A refused or failed (re)load never takes down a serving version.

mod error;
mod local;
mod repository;
mod request;
mod runtime;
mod scheduler;
mod service;
mod spec;
mod stats;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use switchyard_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::info;

pub use error::BackendError;
pub use local::LocalModel;
pub use repository::RepositoryOptions;
pub use runtime::RuntimeKind;
pub use stats::Metrics;

/// Everything `switchyard backend` is configured with.
#[derive(Debug, Clone)]
pub struct BackendConfig {
    /// The model repository folder.
    pub model_repository: PathBuf,
    /// How models are loaded.
    pub repository: RepositoryOptions,
    /// Largest gRPC request message accepted, in bytes. Default
    /// [`DEFAULT_MAX_REQUEST_SIZE`], the gateway's default body limit with room for the
    /// fields it rewrites. A `ModelInferRequest` is also refused, RESOURCE_EXHAUSTED, when
    /// decoding it would take over 8 × its size + 1 MiB (`switchyard_proto::wire`).
    pub max_request_size: usize,
    /// Largest gRPC response message sent, in bytes. Default 64 MiB.
    pub max_response_size: usize,
    /// Who may load and unload models. Default [`ModelControl::None`].
    pub model_control: ModelControl,
    /// Distributed tracing: a span per inference (continuing the caller's `traceparent`)
    /// with its queue wait and compute as children, exported over OTLP. Default: off.
    pub tracing: Option<switchyard_proto::trace::Settings>,
}

/// Who may load and unload models over RepositoryModelLoad/Unload: Triton's
/// `--model-control-mode`, where `explicit` also needs a token (Triton trusts anyone who
/// reaches the port).
#[derive(Clone, Default, PartialEq, Eq)]
pub enum ModelControl {
    /// Models load at start-up; load and unload calls are refused. The default.
    #[default]
    None,
    /// Load and unload calls are served to callers that send `authorization: Bearer TOKEN`.
    Explicit {
        /// The bearer token callers must present.
        token: String,
    },
}

impl std::fmt::Debug for ModelControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token stays out of logs.
        match self {
            Self::None => f.write_str("None"),
            Self::Explicit { .. } => f.write_str("Explicit { token: .. }"),
        }
    }
}

impl BackendConfig {
    /// Defaults for a repository folder.
    pub fn new(model_repository: impl Into<PathBuf>) -> Self {
        Self {
            model_repository: model_repository.into(),
            repository: RepositoryOptions::default(),
            max_request_size: DEFAULT_MAX_REQUEST_SIZE,
            max_response_size: 64 << 20,
            model_control: ModelControl::None,
            tracing: None,
        }
    }
}

/// The default request limit: 16 MiB, the gateway's default `limits.max_body_bytes`, and
/// 64 KiB for the model, version and deadline fields the gateway writes into a request.
pub const DEFAULT_MAX_REQUEST_SIZE: usize = (16 << 20) + (64 << 10);

/// A backend with its repository loaded, ready to serve.
#[derive(Debug, Clone)]
pub struct Backend {
    service: service::InferenceService,
    metrics: Metrics,
    max_request_size: usize,
    max_response_size: usize,
    /// Ends open ModelStreamInfer streams at shutdown (`InferenceService::stopping`).
    stopping: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Backend {
    /// Loads every model of the repository. Refused models are logged and reported by
    /// RepositoryIndex; only an unreadable repository folder is an error.
    pub async fn load(config: BackendConfig) -> std::io::Result<Self> {
        let metrics = Metrics::new();
        let root = config.model_repository.clone();
        if !root.is_dir() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("model repository {} is not a folder", root.display()),
            ));
        }
        let repo = Arc::new(repository::Repository::new(
            root.clone(),
            config.repository,
            metrics.clone(),
        ));
        let tracing = match &config.tracing {
            None => None,
            Some(t) => Some(Arc::new(
                switchyard_proto::trace::Tracing::start(t)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?,
            )),
        };
        let serving = repo.load_all().await?;
        let (stopping_tx, stopping_rx) = tokio::sync::watch::channel(false);
        info!(repository = %root.display(), versions = serving, "model repository loaded");
        Ok(Self {
            service: service::InferenceService {
                repo,
                ready: Arc::new(AtomicBool::new(true)),
                control: Arc::new(config.model_control.clone()),
                stopping: stopping_rx,
                tracing,
            },
            stopping: Arc::new(stopping_tx),
            metrics,
            max_request_size: config.max_request_size,
            max_response_size: config.max_response_size,
        })
    }

    /// The Prometheus registry with the `nv_inference_*` metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Serves gRPC on `grpc` and, if given, `/metrics` on `metrics`, until `shutdown`
    /// completes; then stops accepting, lets in-flight requests finish, and returns.
    pub async fn serve(
        self,
        grpc: TcpListener,
        metrics: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let ready = self.service.ready.clone();
        let streams = self.stopping.clone();
        tokio::spawn(async move {
            shutdown.await;
            // Readiness drops first, so health checks steer traffic away while we drain.
            ready.store(false, Ordering::Release);
            let _ = streams.send(true);
            let _ = stop_tx.send(true);
        });
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let metrics_task = metrics.map(|listener| {
            let registry = self.metrics.registry().clone();
            let app = axum::Router::new().route(
                "/metrics",
                axum::routing::get(move || {
                    let registry = registry.clone();
                    async move {
                        let body = prometheus::TextEncoder::new()
                            .encode_to_string(&registry.gather())
                            .unwrap_or_else(|e| format!("# encoding failed: {e}\n"));
                        ([(http_content_type(), "text/plain; version=0.0.4")], body)
                    }
                }),
            );
            tokio::spawn(
                axum::serve(listener, app)
                    .with_graceful_shutdown(stopped(stop_rx.clone()))
                    .into_future(),
            )
        });
        let tracing = self.service.tracing.clone();
        let svc = GrpcInferenceServiceServer::new(self.service)
            .max_decoding_message_size(self.max_request_size)
            .max_encoding_message_size(self.max_response_size);
        // Small unary RPCs: Nagle's algorithm would add tens of milliseconds.
        let incoming = TcpListenerStream::new(grpc).map(|s| {
            if let Ok(s) = &s {
                let _ = s.set_nodelay(true);
            }
            s
        });
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, stopped(stop_rx))
            .await
            .map_err(std::io::Error::other)?;
        if let Some(task) = metrics_task {
            let _ = task.await;
        }
        if let Some(t) = tracing {
            // The last inferences' spans are still in the batch: exported before exit.
            let _ = tokio::task::spawn_blocking(move || t.shutdown()).await;
        }
        info!("backend stopped");
        Ok(())
    }
}

fn http_content_type() -> &'static str {
    "content-type"
}
