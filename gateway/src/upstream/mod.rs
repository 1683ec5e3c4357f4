//! Backend pools: endpoints with pooled HTTP/2 connections, active health checks, and the
//! per-target circuit breakers and readiness that survive policy reloads.
//!
//! Pools come from gateway.yaml and live as long as the gateway; policies only name them.
//! Breakers and readiness are keyed by target (backend, model, version): a reload that
//! keeps a target keeps its breaker state.

pub(crate) mod attempt;
pub(crate) mod breaker;
pub(crate) mod budget;
pub(crate) mod client;

use std::collections::HashMap;
use std::net::ToSocketAddrs;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use prometheus::{IntCounter, IntGauge};
use prost::Message;
use switchyard_config::GatewayConfig;
use switchyard_proto::inference::{
    ModelReadyRequest, ModelReadyResponse, ServerReadyRequest, ServerReadyResponse,
};
use tracing::{info, warn};

use crate::grpc::status::code;
use crate::grpc::{MODEL_READY, SERVER_READY};
use crate::metrics::Metrics;
use breaker::{Breaker, BreakerSettings};
use client::{CallError, Reply};

/// Why a typed control call (`Upstreams::control`) gave no answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ControlError {
    /// The call itself failed (connect, transport, timeout).
    #[error(transparent)]
    Call(#[from] CallError),
    /// The backend answered with a non-OK status.
    #[error("{message}")]
    Status { code: i32, message: String },
    /// The reply was not the expected message.
    #[error("undecodable reply: {0}")]
    Decode(#[from] prost::DecodeError),
}

/// One backend endpoint.
#[derive(Debug)]
pub(crate) struct Endpoint {
    pub(crate) address: String,
    pub(crate) dial: client::Dial,
    /// This endpoint's connection on each worker thread.
    pub(crate) conns: client::Conns,
    healthy: AtomicBool,
    failed_checks: AtomicU32,
    passed_checks: AtomicU32,
    gauge: IntGauge,
    /// Calls in flight to this endpoint, all workers together.
    pub(crate) streams: IntGauge,
    /// Connections opened to it.
    pub(crate) connects: IntCounter,
    /// Held while a call opens a connection, so calls that find none wait for that one
    /// instead of each opening their own (taken only on the way to a connect, never when
    /// the thread's connection is open).
    pub(crate) connecting: tokio::sync::Mutex<()>,
}

impl Endpoint {
    pub(crate) fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Takes the endpoint out of rotation at once: a connection to it was refused, so
    /// nothing listens there. The health checks bring it back once it passes them.
    pub(crate) fn eject(&self) {
        self.passed_checks.store(0, Ordering::Release);
        self.set_healthy(false, "connection refused");
    }

    fn set_healthy(&self, healthy: bool, why: &str) {
        if self.healthy.swap(healthy, Ordering::AcqRel) != healthy {
            if healthy {
                info!(endpoint = %self.address, "endpoint back in rotation");
            } else {
                warn!(endpoint = %self.address, why, "endpoint taken out of rotation");
            }
        }
        self.gauge.set(i64::from(healthy));
    }
}

/// A backend pool: endpoints serving the same models.
#[derive(Debug)]
pub(crate) struct Pool {
    pub(crate) endpoints: Box<[Arc<Endpoint>]>,
    next: AtomicUsize,
}

impl Pool {
    /// The next healthy endpoint, round robin; when none is healthy, the next one anyway
    /// (failing open: health checks can be wrong, a connect attempt cannot).
    pub(crate) fn pick(&self) -> &Arc<Endpoint> {
        let n = self.endpoints.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| &self.endpoints[(start + i) % n])
            .find(|e| e.is_healthy())
            .unwrap_or(&self.endpoints[start % n])
    }

    /// A healthy endpoint that is none of `tried` (their addresses), round robin: where a
    /// retry of the same target goes after an endpoint failed it.
    pub(crate) fn pick_other(&self, tried: &[usize]) -> Option<&Arc<Endpoint>> {
        let n = self.endpoints.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| &self.endpoints[(start + i) % n])
            .find(|e| e.is_healthy() && !tried.contains(&(Arc::as_ptr(e) as usize)))
    }

    /// Whether an endpoint other than `except` (its address) is healthy.
    pub(crate) fn has_other_healthy(&self, except: usize) -> bool {
        self.endpoints
            .iter()
            .any(|e| e.is_healthy() && Arc::as_ptr(e) as usize != except)
    }

    pub(crate) fn has_healthy(&self) -> bool {
        self.endpoints.iter().any(|e| e.is_healthy())
    }
}

/// A target's identity across reloads.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct TargetKey {
    pub(crate) backend: Arc<str>,
    pub(crate) model: Arc<str>,
    pub(crate) version: Arc<str>,
}

/// Per-target state that outlives snapshots.
#[derive(Debug)]
pub(crate) struct TargetState {
    pub(crate) key: TargetKey,
    pub(crate) breaker: Breaker,
    /// ModelReady on the pool, from the health checker.
    ready: AtomicBool,
    ready_gauge: IntGauge,
}

impl TargetState {
    /// Whether routing should consider this target: breaker not open, model ready.
    pub(crate) fn available(&self, pool: &Pool) -> bool {
        self.breaker.available() && self.ready.load(Ordering::Acquire) && pool.has_healthy()
    }
}

/// All pools, the connection pool, and the per-target registry.
pub(crate) struct Upstreams {
    pools: HashMap<Arc<str>, Arc<Pool>>,
    breaker: BreakerSettings,
    targets: Mutex<HashMap<TargetKey, Arc<TargetState>>>,
    metrics: Metrics,
    health: switchyard_config::gateway::HealthCheckConfig,
}

impl std::fmt::Debug for Upstreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstreams")
            .field("pools", &self.pools)
            .finish_non_exhaustive()
    }
}

/// Errors building the pools.
#[derive(Debug, thiserror::Error)]
#[error("backend '{backend}': endpoint '{endpoint}' does not resolve: {reason}")]
pub struct ResolveError {
    backend: String,
    endpoint: String,
    reason: String,
}

impl Upstreams {
    pub(crate) fn new(config: &GatewayConfig, metrics: Metrics) -> Result<Self, ResolveError> {
        let mut pools = HashMap::new();
        for (name, backend) in &config.backends {
            let connect_timeout = backend
                .value
                .connect_timeout
                .map_or(Duration::from_secs(1), |d| d.0);
            let mut endpoints = Vec::new();
            for address in &backend.value.endpoints {
                let err = |reason: String| ResolveError {
                    backend: name.clone(),
                    endpoint: address.clone(),
                    reason,
                };
                let addr = address
                    .to_socket_addrs()
                    .map_err(|e| err(e.to_string()))?
                    .next()
                    .ok_or_else(|| err("no address".to_owned()))?;
                let authority = http::uri::Authority::try_from(addr.to_string())
                    .map_err(|e| err(e.to_string()))?;
                let dial = client::Dial {
                    addr,
                    authority,
                    connect_timeout,
                    ping_interval: config.limits.upstream_ping_interval.0,
                    max_reply: config.limits.max_response_bytes.0,
                };
                let labels = [name.as_str(), address.as_str()];
                let gauge = metrics.endpoint_healthy.with_label_values(&labels);
                gauge.set(1);
                endpoints.push(Arc::new(Endpoint {
                    address: address.clone(),
                    dial,
                    conns: client::Conns::new(),
                    healthy: AtomicBool::new(true),
                    failed_checks: AtomicU32::new(0),
                    passed_checks: AtomicU32::new(0),
                    gauge,
                    streams: metrics.upstream_streams.with_label_values(&labels),
                    connects: metrics.upstream_connects.with_label_values(&labels),
                    connecting: tokio::sync::Mutex::new(()),
                }));
            }
            pools.insert(
                name.as_str().into(),
                Arc::new(Pool {
                    endpoints: endpoints.into(),
                    next: AtomicUsize::new(0),
                }),
            );
        }
        let b = &config.breaker;
        Ok(Self {
            pools,
            breaker: BreakerSettings {
                consecutive_failures: b.consecutive_failures,
                base_ejection: b.base_ejection.0,
                max_ejection: b.max_ejection.0,
                half_open_probes: b.half_open_probes,
            },
            targets: Mutex::new(HashMap::new()),
            metrics,
            health: config.health_check.clone(),
        })
    }

    pub(crate) fn pool(&self, name: &str) -> Option<&Arc<Pool>> {
        self.pools.get(name)
    }

    /// The state of a target, created on first use and kept across reloads.
    pub(crate) fn target(&self, key: TargetKey) -> Arc<TargetState> {
        let mut targets = self.targets.lock();
        targets
            .entry(key.clone())
            .or_insert_with(|| {
                let label = if key.version.is_empty() {
                    format!("{}:{}", key.backend, key.model)
                } else {
                    format!("{}:{}/{}", key.backend, key.model, key.version)
                };
                let metrics = self.metrics.breaker(&label);
                let ready_gauge = self
                    .metrics
                    .target_ready
                    .with_label_values(&[label.as_str()]);
                ready_gauge.set(1);
                Arc::new(TargetState {
                    key,
                    breaker: Breaker::with_metrics(label, self.breaker, Some(metrics)),
                    ready: AtomicBool::new(true),
                    ready_gauge,
                })
            })
            .clone()
    }

    /// One unary call to an endpoint. Failures feed the target's breaker (in `invoke`);
    /// only the active health checks move endpoints in and out of rotation, so the two
    /// mechanisms do not race each other.
    pub(crate) async fn call(
        &self,
        endpoint: &Endpoint,
        path: &'static str,
        message: &[Bytes],
        budget: Duration,
        shadow: bool,
    ) -> Result<Reply, CallError> {
        client::unary(endpoint, path, message, budget, shadow).await
    }

    /// One typed unary call (health, metadata, config, statistics): encodes `req`, checks
    /// the status and decodes the reply.
    pub(crate) async fn control<Req: Message, Resp: Message + Default>(
        &self,
        endpoint: &Endpoint,
        path: &'static str,
        req: &Req,
        budget: Duration,
    ) -> Result<Resp, ControlError> {
        let reply = self
            .call(
                endpoint,
                path,
                &[Bytes::from(req.encode_to_vec())],
                budget,
                false,
            )
            .await?;
        if reply.status != code::OK {
            return Err(ControlError::Status {
                code: reply.status,
                message: reply.message,
            });
        }
        Ok(Resp::decode(reply.body)?)
    }

    /// Active health checks until `stop` fires: ServerReady on every endpoint, ModelReady
    /// for every known target on its pool.
    pub(crate) async fn run_health_checks(
        self: Arc<Self>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(self.health.interval.0);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.check_once().await,
                _ = stop.changed() => return,
            }
        }
    }

    pub(crate) async fn check_once(&self) {
        let timeout = self.health.timeout.0;
        for pool in self.pools.values() {
            for endpoint in pool.endpoints.iter() {
                let ok = self
                    .control::<_, ServerReadyResponse>(
                        endpoint,
                        SERVER_READY,
                        &ServerReadyRequest {},
                        timeout,
                    )
                    .await
                    .is_ok_and(|r| r.ready);
                if ok {
                    endpoint.failed_checks.store(0, Ordering::Release);
                    if endpoint.passed_checks.fetch_add(1, Ordering::AcqRel) + 1
                        >= self.health.healthy_after
                    {
                        endpoint.set_healthy(true, "");
                    }
                } else {
                    endpoint.passed_checks.store(0, Ordering::Release);
                    if endpoint.failed_checks.fetch_add(1, Ordering::AcqRel) + 1
                        >= self.health.unhealthy_after
                    {
                        endpoint.set_healthy(false, "ServerReady failed");
                    }
                }
            }
        }
        let targets: Vec<Arc<TargetState>> = self.targets.lock().values().cloned().collect();
        for target in targets {
            let Some(pool) = self.pools.get(&target.key.backend) else {
                continue;
            };
            if !pool.has_healthy() {
                continue; // the endpoint checks already steer traffic away
            }
            let req = ModelReadyRequest {
                name: target.key.model.to_string(),
                version: target.key.version.to_string(),
            };
            let ready = match self
                .control::<_, ModelReadyResponse>(pool.pick(), MODEL_READY, &req, timeout)
                .await
            {
                Ok(r) => r.ready,
                // A transport problem is the endpoint's, not the model's.
                Err(ControlError::Call(_)) => continue,
                Err(_) => false,
            };
            if target.ready.swap(ready, Ordering::AcqRel) != ready {
                if ready {
                    info!(target = ?target.key, "model ready again");
                } else {
                    warn!(target = ?target.key, "model not ready on its backend (ModelReady false)");
                }
            }
            target.ready_gauge.set(i64::from(ready));
        }
    }
}
