//! Switchyard's gateway: one stable KServe v2 endpoint (REST on 8000, gRPC on 8001, admin
//! on 8002) on pingora, routing each request by policy to a model version on a backend
//! pool, protecting the pools, and hot-reloading its routing table.
//!
//! # Overview
//! * `routing`: policies compiled into routes, rules, plans and splits; the pure decision.
//! * `snapshot`: a policy version with its runtime handles, swapped whole by `reload`.
//! * `frontend`: pingora sessions to requests and back (`grpc`, `rest`, `admin`, `json`).
//! * `upstream::attempt`: breaker admission, fallbacks, retries, deadline; `upstream`: pools, pooled
//!   h2c connections (one per worker thread and endpoint), health checks, breakers, retry budget.
//! * `grpc`: the gRPC codec both sides share (framing, status, `grpc-timeout`, method
//!   paths); `grpc::infer` reads `model_name`/`model_version` from a `ModelInferRequest` without decoding
//!   its tensors, and rewrites them for the chosen target.
//!
//! # How to use
//! [`Gateway::new`] loads the policies (refusing to start on invalid ones), then
//! [`Gateway::serve`] runs on bound listeners until a shutdown future completes.
//!
//! # Invariants
//! * A request loads the snapshot once; it never sees two policy versions.
//! * The request path takes no lock: `ArcSwap`, atomics, and metric handles resolved when
//!   a snapshot is built.
//! * Breakers, pools and health state outlive reloads; a failed reload changes nothing.
//! * Only this crate names pingora.

mod access_log;
mod dashboard;
mod error;
mod execute;
mod frontend;
#[doc(hidden)]
pub mod fuzzing;
mod grpc;
mod listener;
mod metrics;
mod proxy;
mod reload;
mod rollout;
pub mod routing;
mod snapshot;
mod strategy;
mod ticker;
mod trace;
mod upstream;

use std::future::Future;
use std::os::fd::IntoRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use pingora_core::apps::HttpServerOptions;
use pingora_core::listeners::TcpSocketOptions;
use pingora_core::protocols::l4::ext::TcpKeepalive;
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::{Fds, ListenFds};
use switchyard_config::{Diagnostics, GatewayConfig, load_policies};
use tracing::info;

pub use metrics::Metrics;

use snapshot::Snapshot;
use upstream::Upstreams;
use upstream::budget::RetryBudget;

/// State shared by every request and background task: first what a request needs, then
/// what only reloads and the admin API use.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: GatewayConfig,
    pub(crate) snapshot: ArcSwap<Snapshot>,
    pub(crate) upstreams: Arc<Upstreams>,
    pub(crate) budget: RetryBudget,
    pub(crate) metrics: Metrics,
    pub(crate) ready: AtomicBool,
    /// Reload's own state: versions, the one-at-a-time lock, the last outcome, what
    /// outlives snapshots.
    pub(crate) reloads: reload::Reloads,
    /// The admin API's bearer token (none: `POST /admin/reload` is refused).
    pub(crate) admin_token: Option<String>,
    /// Whether `GET /admin/policy|targets|shadow` need the bearer token
    /// (`admin.topology` on the admin listener's address).
    pub(crate) topology_needs_token: bool,
    /// Connections held by the REST, gRPC and admin listeners, across workers.
    pub(crate) connections: [Arc<listener::Connections>; 3],
    /// The dashboard's minute of counter readings.
    pub(crate) dashboard: dashboard::Window,
    /// The tracer, with `tracing:` in gateway.yaml.
    pub(crate) tracing: Option<switchyard_proto::trace::Tracing>,
    /// The access log, with `access_log:`.
    pub(crate) access_log: Option<access_log::AccessLog>,
}
impl Shared {
    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && self.snapshot.load().version > 0
    }

    /// Requests being served now, REST and gRPC together.
    pub(crate) fn total_in_flight(&self) -> i64 {
        self.metrics
            .in_flight
            .iter()
            .map(prometheus::IntGauge::get)
            .sum()
    }

    pub(crate) fn in_flight(&self, protocol: metrics::Protocol) -> InFlight {
        let gauge = &self.metrics.in_flight[protocol as usize];
        gauge.inc();
        InFlight(gauge.clone())
    }
}

/// Counts a request in `switchyard_requests_in_flight` while alive.
#[derive(Debug)]
pub(crate) struct InFlight(prometheus::IntGauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// For `switchyard explain`: what `route`'s rollout does to this request now, as the
/// state file under `state_dir` says; `None` when the route has no rollout.
pub fn explain_rollout(
    route: &routing::Route,
    headers: &http::HeaderMap,
    model_version: &str,
    state_dir: Option<&std::path::Path>,
) -> Option<String> {
    rollout::explain(route, headers, model_version, state_dir)
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The policies in force at start-up are invalid (every problem is listed).
    #[error("invalid policies:\n{0}")]
    Policies(Diagnostics),
    /// The tracer or the access log could not be set up.
    #[error("{0}")]
    Setup(String),
}

/// The listeners, bound before the gateway starts (tests bind `127.0.0.1:0`): one socket
/// per worker for REST and for gRPC, sharing the port with SO_REUSEPORT so the kernel
/// spreads connections over the workers; one for the admin API.
#[derive(Debug)]
pub struct Listeners {
    /// KServe v2 REST, one per worker.
    pub http: Vec<std::net::TcpListener>,
    /// KServe v2 gRPC, one per worker.
    pub grpc: Vec<std::net::TcpListener>,
    /// Admin API and metrics.
    pub admin: std::net::TcpListener,
}
impl Listeners {
    /// Binds the addresses of `gateway.yaml`, one REST and one gRPC socket per worker.
    pub fn bind(config: &GatewayConfig) -> std::io::Result<Self> {
        let workers = config
            .workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
            .max(1);
        Ok(Self {
            http: bind_shared(config.listen.http, workers)?,
            grpc: bind_shared(config.listen.grpc, workers)?,
            admin: bind_shared(config.listen.admin, 1)?.remove(0),
        })
    }

    /// The REST address (the port chosen when the configured one was 0).
    pub fn http_addr(&self) -> std::net::SocketAddr {
        self.http[0]
            .local_addr()
            .expect("a bound socket has an address")
    }

    /// The gRPC address.
    pub fn grpc_addr(&self) -> std::net::SocketAddr {
        self.grpc[0]
            .local_addr()
            .expect("a bound socket has an address")
    }

    /// The admin address.
    pub fn admin_addr(&self) -> std::net::SocketAddr {
        self.admin
            .local_addr()
            .expect("a bound socket has an address")
    }
}

/// `n` listening sockets on one address (SO_REUSEPORT); port 0 picks one port for all.
fn bind_shared(
    addr: std::net::SocketAddr,
    n: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Socket, Type};
    let err = |e: std::io::Error| std::io::Error::new(e.kind(), format!("binding {addr}: {e}"));
    let mut out: Vec<std::net::TcpListener> = Vec::with_capacity(n);
    for _ in 0..n {
        let target = out
            .first()
            .map_or(Ok(addr), std::net::TcpListener::local_addr)?;
        let socket = Socket::new(Domain::for_address(target), Type::STREAM, None).map_err(err)?;
        socket.set_reuse_address(true).map_err(err)?;
        socket.set_reuse_port(true).map_err(err)?;
        socket.bind(&target.into()).map_err(err)?;
        socket.listen(1024).map_err(err)?;
        out.push(socket.into());
    }
    Ok(out)
}

/// A gateway with its first policy snapshot loaded.
#[derive(Debug, Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
}

impl Gateway {
    /// Loads the policies and builds the pools. The admin token is read from the
    /// environment variable `admin.token_env` names, or from `admin.token_file`.
    pub fn new(config: GatewayConfig) -> Result<Self, StartError> {
        let metrics = Metrics::new();
        let upstreams = Arc::new(Upstreams::new(&config, metrics.clone()));
        let policies = load_policies(&config.policies, &config).map_err(StartError::Policies)?;
        let kept = snapshot::Kept::new(config.state_dir.clone(), config.shared_state.is_some());
        let table = routing::compile(&policies, &config)
            .map_err(|e| StartError::Policies(e.diagnostics()))?;
        let snapshot = Snapshot::build(1, &table, &upstreams, &upstreams.pools(), &metrics, &kept)
            .map_err(|e| StartError::Policies(e.diagnostics()))?;
        metrics.policy_version.set(1);
        let from_env = config
            .admin
            .token_env
            .as_ref()
            .and_then(|v| std::env::var(v).ok());
        let from_file = config
            .admin
            .token_file
            .as_ref()
            .and_then(|f| std::fs::read_to_string(f).ok());
        let admin_token = from_env
            .or(from_file)
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty());
        let connections = [proxy::Port::Rest, proxy::Port::Grpc, proxy::Port::Admin].map(|port| {
            let name = [port.name()];
            Arc::new(listener::Connections::new(
                config.limits.max_connections,
                metrics.connections.with_label_values(&name),
                metrics.connections_refused.with_label_values(&name),
            ))
        });
        let tracing = match &config.tracing {
            None => None,
            Some(t) => Some(
                switchyard_proto::trace::Tracing::start(&switchyard_proto::trace::Settings {
                    endpoint: t.otlp_endpoint.clone(),
                    sample_ratio: t.sample_ratio,
                    service_name: t.service_name.clone(),
                    max_queue: t.max_queue,
                })
                .map_err(StartError::Setup)?,
            ),
        };
        let access_log = match &config.access_log {
            None => None,
            Some(a) => Some(
                access_log::AccessLog::open(
                    &a.path,
                    a.buffer,
                    metrics.access_log_dropped.clone(),
                    metrics.access_log_lines.clone(),
                )
                .map_err(|e| StartError::Setup(e.to_string()))?,
            ),
        };
        let shared = Shared {
            tracing,
            access_log,
            budget: RetryBudget::new(
                config.retry_budget.percent,
                config.retry_budget.min_concurrency,
            ),
            snapshot: ArcSwap::from_pointee(snapshot),
            upstreams,
            metrics,
            admin_token,
            ready: AtomicBool::new(true),
            reloads: reload::Reloads::new(kept),
            connections,
            topology_needs_token: config.admin.topology.needs_token(&config.listen.admin),
            dashboard: dashboard::Window::default(),
            config,
        };
        Ok(Self {
            shared: Arc::new(shared),
        })
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// The policy version in force.
    pub fn policy_version(&self) -> u64 {
        self.shared.snapshot.load().version
    }

    /// Reloads the policies now (what SIGHUP does); on error the old snapshot stays.
    pub async fn reload(&self, trigger: &str) -> Result<u64, Diagnostics> {
        self.shared.reload(trigger).await
    }

    /// Serves on `listeners` until `shutdown` completes, then stops accepting, waits for
    /// requests in flight as long as the longest route deadline in force (no request
    /// can last longer), at most `drain`, and returns.
    pub async fn serve(
        self,
        listeners: Listeners,
        shutdown: impl Future<Output = ()> + Send,
        drain: Duration,
    ) -> std::io::Result<()> {
        let shared = self.shared;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let Listeners { http, grpc, admin } = listeners;
        let mut admin = Some(admin);
        let mut workers = Vec::with_capacity(http.len());
        info!(http = ?http[0].local_addr()?, grpc = ?grpc[0].local_addr()?, admin = ?admin.as_ref().map(|a| a.local_addr()), workers = http.len(), "listening");
        // One event loop per worker thread, each with its own listeners, connections and
        // upstream connection pool: a request is served start to finish on one thread.
        for (i, (http, grpc)) in http.into_iter().zip(grpc).enumerate() {
            let mut sockets = vec![(proxy::Port::Rest, http), (proxy::Port::Grpc, grpc)];
            if let Some(a) = admin.take() {
                sockets.push((proxy::Port::Admin, a));
            }
            let (shared, stop) = (shared.clone(), stop_rx.clone());
            let (done_tx, done_rx) = tokio::sync::oneshot::channel::<std::io::Result<()>>();
            std::thread::Builder::new()
                .name(format!("switchyard-w{i}"))
                .spawn(move || {
                    let result = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map(|rt| rt.block_on(run_worker(shared, sockets, stop, drain)));
                    let _ = done_tx.send(result.and_then(|r| r));
                })?;
            workers.push(done_rx);
        }
        let mut tasks = vec![
            tokio::spawn(shared.upstreams.clone().run_health_checks(stop_rx.clone())),
            tokio::spawn(upstream::discovery::run(
                shared.upstreams.clone(),
                stop_rx.clone(),
            )),
        ];
        tasks.push(tokio::spawn(dashboard::run(
            shared.clone(),
            stop_rx.clone(),
        )));
        tasks.push(tokio::spawn(rollout::drive(
            shared.clone(),
            stop_rx.clone(),
        )));
        if shared.config.shared_state.is_some() {
            tasks.push(tokio::spawn(rollout::shared::run(
                shared.clone(),
                stop_rx.clone(),
            )));
        }
        if shared.config.reload.watch {
            tasks.push(tokio::spawn(reload::watch(shared.clone(), stop_rx.clone())));
        }
        shutdown.await;
        info!("shutting down: no new connections; draining requests in flight");
        shared.ready.store(false, Ordering::Release);
        let _ = stop_tx.send(true);
        for t in tasks {
            let _ = t.await;
        }
        for w in workers {
            if let Ok(Err(e)) = w.await {
                return Err(e);
            }
        }
        if shared.tracing.is_some() {
            // The last requests' spans are still in the batch: exported before exit.
            let s = shared.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if let Some(t) = &s.tracing {
                    t.shutdown();
                }
            })
            .await;
        }
        info!("gateway stopped");
        Ok(())
    }
}

/// One worker: the pingora services for its sockets on the current-thread runtime, until
/// `stop`; then it waits up to `drain` for requests in flight before its runtime ends.
async fn run_worker(
    shared: Arc<Shared>,
    sockets: Vec<(proxy::Port, std::net::TcpListener)>,
    stop: tokio::sync::watch::Receiver<bool>,
    drain: Duration,
) -> std::io::Result<()> {
    let conf = Arc::new(ServerConf::default());
    let mut services = Vec::with_capacity(sockets.len());
    for (port, listener) in sockets {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?.to_string();
        let proxy = || {
            let mut proxy = pingora_proxy::http_proxy(
                &conf,
                proxy::Frontend {
                    port,
                    shared: shared.clone(),
                },
            );
            // HTTP/1.x only: HTTP/2 goes to `frontend::grpc` (see `listener`).
            let mut options = HttpServerOptions::default();
            options.h2c = false;
            proxy.server_options = Some(options);
            Arc::new(proxy)
        };
        // The REST and admin ports speak HTTP/1.x; the gRPC port h2c, and HTTP/1.x to a
        // client that sends anything but the h2 preface (see `listener`).
        let guarded = listener::Guarded {
            http1: proxy(),
            grpc: matches!(port, proxy::Port::Grpc).then(|| shared.clone()),
            connections: shared.connections[port as usize].clone(),
            first_bytes: shared.config.limits.header_timeout.0,
        };
        let mut service = pingora_core::services::listening::Service::new(
            format!("switchyard {port:?}"),
            guarded,
        );
        let mut socket = TcpSocketOptions::default();
        // A client that vanished without a FIN is found by TCP keep-alive probes.
        socket.tcp_keepalive = Some(TcpKeepalive {
            idle: shared.config.limits.tcp_keepalive.0,
            interval: Duration::from_secs(10),
            count: 3,
            user_timeout: Duration::ZERO,
        });
        service.add_tcp_with_settings(&addr, socket);
        // Hand pingora the socket we bound, keyed by the address string it looks up.
        let mut fds = Fds::new();
        fds.add(addr, listener.into_raw_fd());
        let fds: ListenFds = Arc::new(Mutex::new(fds));
        let stop = stop.clone();
        services.push(tokio::spawn(async move {
            pingora_core::services::Service::start_service(&mut service, Some(fds), stop, 1).await;
        }));
    }
    for s in services {
        let _ = s.await;
    }
    let drain = drain.min(shared.snapshot.load().longest_deadline);
    let started = tokio::time::Instant::now();
    while total_in_flight(&shared) > 0 && started.elapsed() < drain {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

fn total_in_flight(shared: &Shared) -> i64 {
    shared.total_in_flight()
}
