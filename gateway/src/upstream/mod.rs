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
pub(crate) mod discovery;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use parking_lot::Mutex;
use prometheus::{IntCounter, IntGauge};
use prost::Message;
use rand::Rng;
use switchyard_config::GatewayConfig;
use switchyard_config::gateway::{BackendConfig, Balance};
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

/// One backend endpoint: one address of a pool (a DNS name gives one per address).
#[derive(Debug)]
pub(crate) struct Endpoint {
    /// `ip:port`, as metrics and logs name it.
    pub(crate) address: String,
    pub(crate) dial: client::Dial,
    /// This endpoint's connection on each worker thread.
    pub(crate) conns: client::Conns,
    healthy: AtomicBool,
    failed_checks: AtomicU32,
    passed_checks: AtomicU32,
    gauge: IntGauge,
    /// Calls in flight to this endpoint, all workers together: the load `least_request`
    /// and `queue_aware` compare.
    pub(crate) streams: IntGauge,
    /// Inference calls made to it.
    pub(crate) requests: IntCounter,
    /// Connections opened to it.
    pub(crate) connects: IntCounter,
    /// Held while a call opens a connection, so calls that find none wait for that one
    /// instead of each opening their own (taken only on the way to a connect, never when
    /// the thread's connection is open).
    pub(crate) connecting: tokio::sync::Mutex<()>,
    /// Where its `/metrics` are read (`balance: queue_aware`), and the reading.
    pub(crate) queue: discovery::QueueDepth,
    /// What makes two endpoints the same one across resolutions and reloads.
    key: EndpointKey,
}

/// An endpoint's identity: a pool that resolves or reloads to the same key keeps the
/// endpoint, its connections, health and load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct EndpointKey {
    pub(crate) addr: SocketAddr,
    pub(crate) metrics: Option<SocketAddr>,
    connect_timeout: Duration,
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

    /// What `least_request` and `queue_aware` compare: this gateway's calls in flight,
    /// plus the endpoint's queue depth when `queue` and the reading is fresh.
    /// (`queue`: the age past which a reading is stale.)
    fn load(&self, queue: Option<u64>, now_ms: u64) -> u64 {
        let own = self.streams.get().max(0) as u64;
        match queue {
            Some(stale_ms) => own + self.queue.fresh(now_ms, stale_ms).unwrap_or(0),
            None => own,
        }
    }
}

/// A pool's endpoints and how to pick among them, swapped whole when DNS answers or
/// `backends:` change.
#[derive(Debug)]
pub(crate) struct Members {
    pub(crate) endpoints: Box<[Arc<Endpoint>]>,
    pub(crate) balance: Balance,
    /// A queue reading older than this is ignored (four scrape intervals).
    stale_ms: u64,
    /// The load at which an endpoint is full (`max_in_flight`), if the pool has one.
    pub(crate) max_in_flight: Option<u64>,
}

/// A backend pool: endpoints serving the same models. The pool object lives as long as
/// gateway.yaml names it; its members change under it.
#[derive(Debug)]
pub(crate) struct Pool {
    pub(crate) name: Arc<str>,
    members: ArcSwap<Members>,
    next: AtomicUsize,
    /// The pool as gateway.yaml writes it and what its names resolved to last: what
    /// re-resolution and reloads start from (never touched by requests).
    pub(crate) source: Mutex<discovery::Source>,
}

impl Pool {
    /// The members now.
    pub(crate) fn members(&self) -> arc_swap::Guard<Arc<Members>> {
        self.members.load()
    }

    /// The endpoint for a call, by the pool's balance, among healthy endpoints; when none
    /// is healthy, one anyway (failing open: health checks can be wrong, a connect attempt
    /// cannot). `None` only when the pool has no endpoint at all (a DNS name that has
    /// resolved to nothing yet).
    pub(crate) fn pick(&self) -> Option<Arc<Endpoint>> {
        let m = self.members.load();
        let n = m.endpoints.len();
        if n == 0 {
            return None;
        }
        self.choose(&m, |e| e.is_healthy()).or_else(|| {
            let start = self.next.fetch_add(1, Ordering::Relaxed);
            Some(m.endpoints[start % n].clone())
        })
    }

    /// A healthy endpoint that is none of `tried` (their addresses): where a retry of the
    /// same target goes after an endpoint failed it.
    pub(crate) fn pick_other(&self, tried: &[usize]) -> Option<Arc<Endpoint>> {
        let m = self.members.load();
        self.choose(&m, |e| {
            e.is_healthy() && !tried.contains(&(std::ptr::from_ref(e) as usize))
        })
    }

    /// Round robin over the endpoints `ok` accepts, or power of two choices by load.
    fn choose(&self, m: &Members, ok: impl Fn(&Endpoint) -> bool) -> Option<Arc<Endpoint>> {
        let n = m.endpoints.len();
        if m.balance == Balance::RoundRobin {
            let start = self.next.fetch_add(1, Ordering::Relaxed);
            return (0..n)
                .map(|i| &m.endpoints[(start + i) % n])
                .find(|e| ok(e))
                .cloned();
        }
        // Power of two choices (Mitzenmacher; Envoy's LEAST_REQUEST, Ray Serve): two
        // distinct candidates drawn at random, the less loaded wins. Two, not all: every
        // gateway worker and replica comparing all would herd onto the same idle one.
        let candidates = m.endpoints.iter().filter(|e| ok(e)).count();
        let nth = |k: usize| m.endpoints.iter().filter(|e| ok(e)).nth(k);
        match candidates {
            0 => None,
            1 => nth(0).cloned(),
            c => {
                let mut rng = rand::rng();
                let a = rng.random_range(0..c);
                let b = (a + rng.random_range(1..c)) % c;
                let (a, b) = (nth(a)?, nth(b)?);
                let queue = (m.balance == Balance::QueueAware).then_some(m.stale_ms);
                let now = if queue.is_some() {
                    discovery::now_ms()
                } else {
                    0
                };
                let (la, lb) = (a.load(queue, now), b.load(queue, now));
                Some(if lb < la { b } else { a }.clone())
            }
        }
    }

    /// Where a call may go when the pool has a `max_in_flight`: `picked` while its load
    /// is under `limit(max_in_flight)`, else the least loaded healthy endpoint that is;
    /// `Err(limit)` when every one is full. A pool without a limit always has room.
    /// (Only a full `picked` costs a scan of the pool.)
    pub(crate) fn room(
        &self,
        picked: Arc<Endpoint>,
        limit: impl Fn(u64) -> u64,
    ) -> Result<Arc<Endpoint>, u64> {
        let m = self.members.load();
        let Some(max) = m.max_in_flight else {
            return Ok(picked);
        };
        let limit = limit(max);
        let queue = (m.balance == Balance::QueueAware).then_some(m.stale_ms);
        let now = if queue.is_some() {
            discovery::now_ms()
        } else {
            0
        };
        if picked.load(queue, now) < limit {
            return Ok(picked);
        }
        m.endpoints
            .iter()
            .filter(|e| e.is_healthy())
            .map(|e| (e.load(queue, now), e))
            .filter(|(load, _)| *load < limit)
            .min_by_key(|(load, _)| *load)
            .map(|(_, e)| e.clone())
            .ok_or(limit)
    }

    /// Whether an endpoint other than `except` (its address) is healthy.
    pub(crate) fn has_other_healthy(&self, except: usize) -> bool {
        self.members
            .load()
            .endpoints
            .iter()
            .any(|e| e.is_healthy() && Arc::as_ptr(e) as usize != except)
    }

    pub(crate) fn has_healthy(&self) -> bool {
        self.members.load().endpoints.iter().any(|e| e.is_healthy())
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

/// Backend pools by name.
pub(crate) type Pools = HashMap<Arc<str>, Arc<Pool>>;

/// All pools, the connection pool, and the per-target registry.
pub(crate) struct Upstreams {
    /// By name; swapped whole when a reload adds or removes pools.
    pools: ArcSwap<HashMap<Arc<str>, Arc<Pool>>>,
    breaker: BreakerSettings,
    targets: Mutex<HashMap<TargetKey, Arc<TargetState>>>,
    pub(crate) metrics: Metrics,
    health: switchyard_config::gateway::HealthCheckConfig,
    /// What every endpoint's connections share (`limits`).
    ping_interval: Duration,
    max_reply: u64,
}

impl std::fmt::Debug for Upstreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstreams")
            .field("pools", &self.pools)
            .finish_non_exhaustive()
    }
}

/// The pools a reload would put in force: built (names resolved, new pools made) before
/// the policies are compiled against them, put in force by [`Upstreams::commit`] only
/// if the whole reload succeeds.
#[derive(Debug)]
pub(crate) struct PoolPlan {
    pub(crate) pools: HashMap<Arc<str>, Arc<Pool>>,
    /// Pools whose configuration changed, with their new configuration and addresses.
    changes: Vec<(Arc<Pool>, BackendConfig, Vec<discovery::Resolved>)>,
    /// Pools in force that the plan drops.
    removed: Vec<Arc<str>>,
}

impl PoolPlan {
    /// What the plan changes, for the log: `(changed or added, removed)` pool names.
    pub(crate) fn summary(&self) -> (Vec<&str>, Vec<&str>) {
        (
            self.changes.iter().map(|(p, ..)| &*p.name).collect(),
            self.removed.iter().map(|n| &**n).collect(),
        )
    }

    /// Whether the plan changes anything.
    pub(crate) fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.removed.is_empty()
    }
}

impl Upstreams {
    /// Builds the pools of `gateway.yaml`. Names are resolved now; one that does not
    /// resolve yet (a Kubernetes Service whose pods are not ready) leaves its pool without
    /// those endpoints, and re-resolution adds them when it does.
    pub(crate) fn new(config: &GatewayConfig, metrics: Metrics) -> Self {
        let this = Self {
            pools: ArcSwap::from_pointee(HashMap::new()),
            breaker: {
                let b = &config.breaker;
                BreakerSettings {
                    consecutive_failures: b.consecutive_failures,
                    base_ejection: b.base_ejection.0,
                    max_ejection: b.max_ejection.0,
                    half_open_probes: b.half_open_probes,
                }
            },
            targets: Mutex::new(HashMap::new()),
            metrics,
            health: config.health_check.clone(),
            ping_interval: config.limits.upstream_ping_interval.0,
            max_reply: config.limits.max_response_bytes.0,
        };
        let mut pools = HashMap::new();
        for (name, backend) in &config.backends {
            let pool = this.empty_pool(name, &backend.value);
            let resolved = discovery::resolve_now(&backend.value, |entry, e| {
                this.resolve_failed(name, entry, &e);
            });
            this.install(&pool, &backend.value, resolved);
            pools.insert(pool.name.clone(), pool);
        }
        this.pools.store(Arc::new(pools));
        this
    }

    /// A name that did not resolve: logged and counted; its last addresses stay.
    pub(crate) fn resolve_failed(&self, pool: &str, entry: &str, error: &str) {
        warn!(backend = %pool, endpoint = entry, "does not resolve: {error}; the addresses it had stay in force, and it is tried again every resolve_interval");
        self.metrics
            .discovery_errors
            .with_label_values(&[pool, "resolve"])
            .inc();
    }

    fn empty_pool(&self, name: &str, config: &BackendConfig) -> Arc<Pool> {
        Arc::new(Pool {
            name: name.into(),
            members: ArcSwap::from_pointee(Members {
                endpoints: Box::new([]),
                balance: config.balance(),
                stale_ms: 0,
                max_in_flight: None,
            }),
            next: AtomicUsize::new(0),
            source: Mutex::new(discovery::Source::new(config.clone())),
        })
    }

    /// Puts `resolved` in force as `pool`'s members under `config`: endpoints whose key
    /// is unchanged are kept (connections, health, load, calls in flight), new ones made,
    /// the rest dropped (their calls in flight finish on the connections they hold).
    pub(crate) fn install(
        &self,
        pool: &Pool,
        config: &BackendConfig,
        resolved: Vec<discovery::Resolved>,
    ) {
        let mut source = pool.source.lock();
        let old = pool.members.load_full();
        let connect_timeout = config
            .connect_timeout
            .map_or(Duration::from_secs(1), |d| d.0);
        let mut endpoints: Vec<Arc<Endpoint>> = Vec::new();
        for (addr, metrics) in resolved.iter().flat_map(discovery::Resolved::endpoints) {
            let key = EndpointKey {
                addr,
                metrics,
                connect_timeout,
            };
            if endpoints.iter().any(|e| e.key.addr == key.addr) {
                continue; // two entries naming one address are one endpoint
            }
            let kept = old.endpoints.iter().find(|e| e.key == key).cloned();
            endpoints.push(kept.unwrap_or_else(|| self.endpoint(&pool.name, key)));
        }
        for gone in old
            .endpoints
            .iter()
            .filter(|e| !endpoints.iter().any(|n| Arc::ptr_eq(n, e)))
        {
            info!(backend = %pool.name, endpoint = %gone.address, "endpoint removed from the pool");
            if !endpoints.iter().any(|n| n.address == gone.address) {
                self.forget(&pool.name, gone);
            }
        }
        if source.installed {
            for new in endpoints
                .iter()
                .filter(|e| !old.endpoints.iter().any(|o| Arc::ptr_eq(o, e)))
            {
                info!(backend = %pool.name, endpoint = %new.address, "endpoint added to the pool");
            }
        }
        self.metrics
            .pool_endpoints
            .with_label_values(&[&*pool.name])
            .set(endpoints.len() as i64);
        pool.members.store(Arc::new(Members {
            endpoints: endpoints.into(),
            balance: config.balance(),
            stale_ms: 4 * config.scrape_every().as_millis() as u64,
            max_in_flight: config.max_in_flight.map(u64::from),
        }));
        source.update(config.clone(), resolved);
    }

    fn endpoint(&self, pool: &str, key: EndpointKey) -> Arc<Endpoint> {
        let address = key.addr.to_string();
        let labels = [pool, address.as_str()];
        let gauge = self.metrics.endpoint_healthy.with_label_values(&labels);
        gauge.set(1);
        Arc::new(Endpoint {
            dial: client::Dial {
                addr: key.addr,
                authority: http::uri::Authority::try_from(address.as_str())
                    .expect("a socket address is an authority"),
                connect_timeout: key.connect_timeout,
                ping_interval: self.ping_interval,
                max_reply: self.max_reply,
            },
            conns: client::Conns::new(),
            healthy: AtomicBool::new(true),
            failed_checks: AtomicU32::new(0),
            passed_checks: AtomicU32::new(0),
            gauge,
            streams: self.metrics.upstream_streams.with_label_values(&labels),
            requests: self.metrics.upstream_requests.with_label_values(&labels),
            connects: self.metrics.upstream_connects.with_label_values(&labels),
            connecting: tokio::sync::Mutex::new(()),
            queue: discovery::QueueDepth::new(
                key.metrics,
                self.metrics.endpoint_queue.with_label_values(&labels),
            ),
            key,
            address,
        })
    }

    /// Drops a removed endpoint's series, so `/metrics` lists what is in force.
    fn forget(&self, pool: &str, endpoint: &Endpoint) {
        let labels = [pool, endpoint.address.as_str()];
        let m = &self.metrics;
        let _ = m.endpoint_healthy.remove_label_values(&labels);
        let _ = m.upstream_streams.remove_label_values(&labels);
        let _ = m.upstream_requests.remove_label_values(&labels);
        let _ = m.upstream_connects.remove_label_values(&labels);
        let _ = m.endpoint_queue.remove_label_values(&labels);
    }

    /// The pools `backends` would give: unchanged pools as they are, changed and new ones
    /// resolved, none of it in force yet.
    pub(crate) async fn plan(
        &self,
        backends: &indexmap::IndexMap<String, switchyard_config::At<BackendConfig>>,
    ) -> PoolPlan {
        let current = self.pools.load_full();
        let mut plan = PoolPlan {
            pools: HashMap::new(),
            changes: Vec::new(),
            removed: current
                .keys()
                .filter(|k| !backends.contains_key(&***k))
                .cloned()
                .collect(),
        };
        for (name, backend) in backends {
            let config = &backend.value;
            let pool = match current.get(name.as_str()) {
                Some(pool) if pool.source.lock().config == *config => {
                    plan.pools.insert(pool.name.clone(), pool.clone());
                    continue;
                }
                Some(pool) => pool.clone(),
                None => self.empty_pool(name, config),
            };
            let resolved =
                discovery::resolve(config, |entry, e| self.resolve_failed(name, entry, &e)).await;
            plan.pools.insert(pool.name.clone(), pool.clone());
            plan.changes.push((pool, config.clone(), resolved));
        }
        plan
    }

    /// Puts a plan in force: the changed pools' members, then the set of pools.
    pub(crate) fn commit(&self, plan: PoolPlan) {
        for (pool, config, resolved) in plan.changes {
            self.install(&pool, &config, resolved);
        }
        let old = self.pools.load_full();
        for name in &plan.removed {
            info!(backend = %name, "backend pool removed");
            if let Some(pool) = old.get(name) {
                for e in pool.members().endpoints.iter() {
                    self.forget(name, e);
                }
            }
            let _ = self.metrics.pool_endpoints.remove_label_values(&[name]);
        }
        self.pools.store(Arc::new(plan.pools));
    }

    /// Every pool now.
    pub(crate) fn pools(&self) -> Arc<HashMap<Arc<str>, Arc<Pool>>> {
        self.pools.load_full()
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
        marks: client::Marks<'_>,
    ) -> Result<Reply, CallError> {
        client::unary(endpoint, path, message, budget, marks).await
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
                client::Marks::default(),
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
        stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut ticks = crate::ticker::Ticker::new(self.health.interval.0, stop);
        while ticks.next().await {
            self.check_once().await;
        }
    }

    pub(crate) async fn check_once(&self) {
        let timeout = self.health.timeout.0;
        let pools = self.pools.load_full();
        for pool in pools.values() {
            for endpoint in pool.members().endpoints.iter() {
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
            let Some(pool) = pools.get(&target.key.backend) else {
                continue;
            };
            if !pool.has_healthy() {
                continue; // the endpoint checks already steer traffic away
            }
            let Some(endpoint) = pool.pick() else {
                continue;
            };
            let req = ModelReadyRequest {
                name: target.key.model.to_string(),
                version: target.key.version.to_string(),
            };
            let ready = match self
                .control::<_, ModelReadyResponse>(&endpoint, MODEL_READY, &req, timeout)
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
