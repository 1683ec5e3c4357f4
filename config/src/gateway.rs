//! `gateway.yaml`: the deployment file. Listeners, the policy folder, backend pools, and
//! the knobs of the protection layer (limits, breakers, health checks, retry budget).

use std::net::SocketAddr;
use std::path::PathBuf;

use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::Deserialize;

use crate::units::{At, ByteSize, HumanDuration};

/// The gateway's deployment file.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Listen addresses. Defaults are Triton's ports on loopback.
    #[serde(default)]
    pub listen: ListenConfig,
    /// Folder of policy files (`*.yaml`, one route each), relative to this file.
    pub policies: PathBuf,
    /// Backend pools by name; policies refer to them from their targets.
    pub backends: IndexMap<String, At<BackendConfig>>,
    /// Request limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Circuit breaker settings for every target.
    #[serde(default)]
    pub breaker: BreakerConfig,
    /// Active health checks of backend endpoints.
    #[serde(default)]
    pub health_check: HealthCheckConfig,
    /// Retry budget shared by all routes.
    #[serde(default)]
    pub retry_budget: RetryBudgetConfig,
    /// The admin API.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Hot reload of the policy folder.
    #[serde(default)]
    pub reload: ReloadConfig,
    /// Event-loop threads serving REST and gRPC. Each owns the connections it accepts
    /// (listeners share the port with SO_REUSEPORT), as nginx's worker processes do, so a
    /// request never hops between threads. Default: the number of CPUs.
    #[serde(default)]
    pub workers: Option<usize>,
    /// Folder where rollout state is kept (one file per route under rollout), relative to
    /// this file; a restarted gateway resumes its rollouts from it. Default: none, and a
    /// restart starts every rollout again at its first step.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// State the gateway replicas share: with `redis`, every replica keeps its rollouts'
    /// step and gate counters there, so they move through steps together and a rollback
    /// seen by one is applied by all. Default: none, and each replica runs its own.
    #[serde(default)]
    pub shared_state: Option<SharedStateConfig>,
    /// Distributed tracing: a span per request with child spans per upstream attempt,
    /// cascade stage, ensemble member, pipeline step and shadow copy, exported over
    /// OTLP/gRPC; the W3C trace context goes on to the backends. Default: off.
    #[serde(default)]
    pub tracing: Option<TracingConfig>,
    /// One JSON line per request, written by its own thread from a bounded buffer (lines
    /// beyond it are dropped and counted). Default: off.
    #[serde(default)]
    pub access_log: Option<AccessLogConfig>,
    /// The file this was read from ([`crate::load_gateway_config`] sets it): reloads read
    /// its `backends:` again. Not a field of the file.
    #[serde(skip)]
    #[schemars(skip)]
    pub file: Option<PathBuf>,
}

/// Where the replicas of a gateway keep what they share.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SharedStateConfig {
    /// A Redis (or Valkey) server: `redis://host:port`, optionally `redis://host:port/db`
    /// or with `user:password@`.
    pub redis: String,
    /// The prefix of every key written. Default `switchyard`; gateways of different
    /// deployments sharing one server need different prefixes.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// How often each replica adds its counts and reads the shared state. Default 250ms.
    #[serde(default = "default_sync_interval")]
    pub sync_interval: HumanDuration,
    /// How long one exchange with the server may take; a replica that cannot reach it
    /// keeps its last known step, never promotes, and may still roll back. Default 500ms.
    #[serde(default = "default_shared_timeout")]
    pub timeout: HumanDuration,
}

/// Where spans go, and which traces are recorded.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// The OTLP/gRPC receiver (an OpenTelemetry collector, Jaeger, Tempo):
    /// `http://host:4317`. Plain h2c: TLS to the receiver is not built in (a collector
    /// beside the gateway can forward over TLS).
    pub otlp_endpoint: String,
    /// The share of traces started at the gateway that are recorded, 0 to 1. A request
    /// that arrives with a `traceparent` follows its caller's sampling flag. Default 1.
    #[serde(default = "default_sample_ratio")]
    pub sample_ratio: f64,
    /// `service.name` of the gateway's spans. Default `switchyard-gateway`.
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// Spans waiting for export at most; more are dropped. Default 4096.
    #[serde(default = "default_max_queue")]
    pub max_queue: usize,
}

fn default_sample_ratio() -> f64 {
    1.0
}

fn default_service_name() -> String {
    "switchyard-gateway".into()
}

fn default_max_queue() -> usize {
    4096
}

/// The access log.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AccessLogConfig {
    /// `stderr`, or a file (relative to this file), appended to.
    pub path: String,
    /// Lines waiting to be written at most; more are dropped and counted in
    /// `switchyard_access_log_dropped_total`. Default 8192.
    #[serde(default = "default_log_buffer")]
    pub buffer: usize,
}

fn default_log_buffer() -> usize {
    8192
}

fn default_prefix() -> String {
    "switchyard".into()
}

fn default_sync_interval() -> HumanDuration {
    HumanDuration(std::time::Duration::from_millis(250))
}

fn default_shared_timeout() -> HumanDuration {
    HumanDuration(std::time::Duration::from_millis(500))
}

/// Listen addresses.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// KServe v2 REST (HTTP/1.1 and h2c). Default 127.0.0.1:8000.
    pub http: SocketAddr,
    /// KServe v2 gRPC (h2c). Default 127.0.0.1:8001.
    pub grpc: SocketAddr,
    /// Admin API and `/metrics`. Default 127.0.0.1:8002 (loopback: it can reload policies).
    pub admin: SocketAddr,
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            http: SocketAddr::from(([127, 0, 0, 1], 8000)),
            grpc: SocketAddr::from(([127, 0, 0, 1], 8001)),
            admin: SocketAddr::from(([127, 0, 0, 1], 8002)),
        }
    }
}

/// One backend pool: endpoints that serve the same models.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Each endpoint's KServe v2 gRPC service: `host:port`, or `{ address: host:port,
    /// metrics: host:port }` where the pool reads queue depths (`balance: queue_aware`).
    /// A host that is a DNS name stands for every address it resolves to (a Kubernetes
    /// headless Service: one per ready pod), re-resolved every `resolve_interval`.
    pub endpoints: Vec<EndpointConfig>,
    /// Time to establish a connection. Default 1s.
    #[serde(default)]
    pub connect_timeout: Option<HumanDuration>,
    /// How a request picks an endpoint of this pool (after the policy picked the model
    /// version): `queue_aware`, `least_request` or `round_robin`. Default: `queue_aware`
    /// when every endpoint names its `metrics`, else `least_request` (the balance
    /// benchmark: both far ahead of round robin with a slow replica, queue_aware ahead of
    /// least_request at every concurrency).
    #[serde(default)]
    pub balance: Option<Balance>,
    /// How often each endpoint's `/metrics` is read for its queue depth
    /// (`nv_inference_pending_request_count`) under `balance: queue_aware`; a reading
    /// older than four intervals is ignored. Default 250ms.
    #[serde(default)]
    pub scrape_interval: Option<HumanDuration>,
    /// How often endpoint host names are resolved again. Default 5s.
    #[serde(default)]
    pub resolve_interval: Option<HumanDuration>,
    /// The load at which an endpoint is full: this gateway's calls in flight to it (plus
    /// its scraped queue depth under `queue_aware`). When every endpoint is full, a
    /// target with an `overflow` sends its requests there and other requests are shed
    /// by priority class. Default: no limit (the backends' own queues refuse).
    #[serde(default)]
    pub max_in_flight: Option<u32>,
}

impl BackendConfig {
    /// `scrape_interval`, or its default.
    pub fn scrape_every(&self) -> std::time::Duration {
        self.scrape_interval
            .map_or(std::time::Duration::from_millis(250), |d| d.0)
    }

    /// `balance`, or its default: `queue_aware` when every endpoint says where its
    /// metrics are, else `least_request`.
    pub fn balance(&self) -> Balance {
        self.balance.unwrap_or(
            if !self.endpoints.is_empty() && self.endpoints.iter().all(|e| e.metrics().is_some()) {
                Balance::QueueAware
            } else {
                Balance::LeastRequest
            },
        )
    }

    /// `resolve_interval`, or its default.
    pub fn resolve_every(&self) -> std::time::Duration {
        self.resolve_interval
            .map_or(std::time::Duration::from_secs(5), |d| d.0)
    }
}

/// Whether `s` is `host:port` with a non-empty host and a port above 0.
pub fn is_host_port(s: &str) -> bool {
    s.rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0))
}

/// Whether `s` is `:port` (a port on the endpoint's own host).
pub fn is_port_only(s: &str) -> bool {
    s.strip_prefix(':')
        .is_some_and(|port| port.parse::<u16>().is_ok_and(|p| p > 0))
}

/// How a pool picks an endpoint for a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Each healthy endpoint in turn, whatever its load.
    RoundRobin,
    /// Power of two choices: of two healthy endpoints drawn at random, the one with fewer
    /// of this gateway's requests in flight (Envoy's `LEAST_REQUEST`).
    #[default]
    LeastRequest,
    /// Power of two choices over this gateway's requests in flight plus the endpoint's
    /// own queue depth (`nv_inference_pending_request_count` from its `/metrics`), so
    /// load from other gateway replicas and other clients counts too. Every endpoint
    /// names its `metrics` address.
    QueueAware,
}

/// One endpoint of a pool: its gRPC address and, optionally, where its Prometheus
/// `/metrics` are served. Written as `host:port` alone, or as a map.
#[derive(Debug, Clone, PartialEq, Eq, JsonSchema)]
#[schemars(untagged)]
pub enum EndpointConfig {
    /// `host:port` of the gRPC service.
    Address(String),
    /// The gRPC service and its metrics.
    Detailed(EndpointDetail),
}

/// An endpoint written as a map.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EndpointDetail {
    /// `host:port` of the gRPC service.
    pub address: String,
    /// `host:port` of its `/metrics` (Prometheus text), or `:port` on the address's host
    /// (on each address a DNS name resolves to).
    #[serde(default)]
    pub metrics: Option<String>,
}

impl EndpointConfig {
    /// `host:port` of the gRPC service.
    pub fn address(&self) -> &str {
        match self {
            Self::Address(a) => a,
            Self::Detailed(d) => &d.address,
        }
    }

    /// Where its `/metrics` are, as written.
    pub fn metrics(&self) -> Option<&str> {
        match self {
            Self::Address(_) => None,
            Self::Detailed(d) => d.metrics.as_deref(),
        }
    }
}

impl From<&str> for EndpointConfig {
    fn from(address: &str) -> Self {
        Self::Address(address.to_owned())
    }
}

impl<'de> Deserialize<'de> for EndpointConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = EndpointConfig;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("host:port, or a map with `address` and `metrics`")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(EndpointConfig::Address(v.to_owned()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                EndpointDetail::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(EndpointConfig::Detailed)
            }
        }
        d.deserialize_any(Visit)
    }
}

/// Request limits.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest request body accepted; larger ones get 413 / RESOURCE_EXHAUSTED. Default 16MiB.
    pub max_body_bytes: ByteSize,
    /// Largest reply the gateway takes from a backend; a larger one is cut off there (the
    /// stream is reset, so the gateway holds at most this much of it) and the client gets
    /// 502 / RESOURCE_EXHAUSTED (gRPC's code for a message over a size limit). It says
    /// nothing of the backend's health and is not retried. Default 64MiB, the bundled
    /// backend's own `--max-response-size` (at least 1KiB).
    pub max_response_bytes: ByteSize,
    /// Deadline for routes that set none. Default 30s.
    pub default_deadline: HumanDuration,
    /// Requests (REST and gRPC together) the gateway serves at once; beyond it a request
    /// is refused at once with 429 / RESOURCE_EXHAUSTED and `Retry-After: 1`, and counted
    /// in `switchyard_requests_shed_total`. Default 10000.
    pub max_in_flight: u32,
    /// The longest a shutdown waits for requests in flight: it waits as long as the
    /// longest route deadline in force, at most this. Default 30s (at most 600s).
    pub shutdown_grace: HumanDuration,
    /// An HTTP/2 (gRPC) connection with no request in flight for this long is closed.
    /// Default 300s (at most an hour). HTTP/1.1 connections close after 60s idle
    /// between requests (pingora's keep-alive).
    pub idle_timeout: HumanDuration,
    /// A new connection's first bytes must arrive within this, and on the gRPC port the
    /// whole 24-byte HTTP/2 preface (a client that sends anything else is answered as
    /// HTTP/1.x at once); then HTTP/1.x request headers within 60s (pingora's read
    /// timeout, nginx's `client_header_timeout`). Default 60s (at most an hour).
    pub header_timeout: HumanDuration,
    /// The longest wait for the next bytes of a request body, HTTP/1.x and HTTP/2 (nginx's
    /// `client_body_timeout`); a body that stalls gets 408 / DEADLINE_EXCEEDED. Default
    /// 60s (at most an hour).
    pub body_timeout: HumanDuration,
    /// Connections each listener (REST, gRPC, admin) holds at once, all workers together;
    /// one more is closed as soon as it is accepted and counted in
    /// `switchyard_connections_refused_total`, so file descriptors stay for backends.
    /// Default 10000.
    pub max_connections: u32,
    /// TCP keep-alive on client connections: probes start after this long idle and a
    /// peer that answers none of 3 (10s apart) is dropped, so a vanished client is noticed
    /// in minutes, not hours. Default 60s (at most an hour).
    pub tcp_keepalive: HumanDuration,
    /// HTTP/2 PING on every upstream connection this often; a backend that does not
    /// answer one within 5s has its connection closed, and calls on it fail over, so a
    /// vanished backend host is found in seconds. Default 10s (at most an hour).
    pub upstream_ping_interval: HumanDuration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: ByteSize(16 << 20),
            max_response_bytes: ByteSize(64 << 20),
            max_in_flight: 10_000,
            shutdown_grace: HumanDuration(std::time::Duration::from_secs(30)),
            idle_timeout: HumanDuration(std::time::Duration::from_secs(300)),
            header_timeout: HumanDuration(std::time::Duration::from_secs(60)),
            body_timeout: HumanDuration(std::time::Duration::from_secs(60)),
            max_connections: 10_000,
            tcp_keepalive: HumanDuration(std::time::Duration::from_secs(60)),
            upstream_ping_interval: HumanDuration(std::time::Duration::from_secs(10)),
            default_deadline: HumanDuration(std::time::Duration::from_secs(30)),
        }
    }
}

/// Circuit breaker settings (Envoy's outlier-detection defaults plus half-open probing).
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Consecutive upstream failures that open the breaker. Default 5.
    pub consecutive_failures: u32,
    /// First open period; each further opening multiplies it. Default 30s.
    pub base_ejection: HumanDuration,
    /// Longest open period. Default 300s.
    pub max_ejection: HumanDuration,
    /// Requests admitted while half-open; that many successes close the breaker. Default 1.
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection: HumanDuration(std::time::Duration::from_secs(30)),
            max_ejection: HumanDuration(std::time::Duration::from_secs(300)),
            half_open_probes: 1,
        }
    }
}

/// Active health checks (ServerReady on every endpoint).
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheckConfig {
    /// Time between checks of an endpoint. Default 2s.
    pub interval: HumanDuration,
    /// Time a check may take. Default 1s.
    pub timeout: HumanDuration,
    /// Consecutive failed checks that take an endpoint out of rotation. Default 2.
    pub unhealthy_after: u32,
    /// Consecutive passed checks that bring it back. Default 1.
    pub healthy_after: u32,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        Self {
            interval: HumanDuration(std::time::Duration::from_secs(2)),
            timeout: HumanDuration(std::time::Duration::from_secs(1)),
            unhealthy_after: 2,
            healthy_after: 1,
        }
    }
}

/// Retries may use at most this share of the requests in flight (Envoy's retry budget).
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RetryBudgetConfig {
    /// Percent of active requests that may be retries. Default 20.
    pub percent: u32,
    /// Retries always allowed regardless of load. Default 3.
    pub min_concurrency: u32,
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        Self {
            percent: 20,
            min_concurrency: 3,
        }
    }
}

/// The admin API.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Environment variable holding the bearer token that `POST /admin/reload` requires.
    /// With neither this nor `token_file`, reload over HTTP is refused (SIGHUP and file
    /// changes still reload).
    pub token_env: Option<String>,
    /// A file holding the token (a mounted Kubernetes secret, say), relative to this file.
    pub token_file: Option<PathBuf>,
    /// Who may read what reveals the routing topology (`GET /admin/policy`,
    /// `/admin/targets`, `/admin/shadow`: routes, files, backends, endpoints). `loopback`
    /// (default): anyone when the admin listener is on a loopback address, the bearer
    /// token otherwise; `token`: the bearer token always; `open`: anyone. `/metrics` and
    /// the health endpoints stay open for scrapers and probes.
    pub topology: TopologyAccess,
}

/// Who may read the admin API's topology endpoints (`admin.topology`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TopologyAccess {
    /// Anyone on a loopback admin listener; the bearer token on any other.
    #[default]
    Loopback,
    /// The bearer token, always.
    Token,
    /// Anyone.
    Open,
}

impl TopologyAccess {
    /// Whether a topology read needs the token, on an admin listener bound to `admin`.
    pub fn needs_token(self, admin: &SocketAddr) -> bool {
        match self {
            Self::Loopback => !admin.ip().is_loopback(),
            Self::Token => true,
            Self::Open => false,
        }
    }
}

/// Hot reload of the policy folder.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ReloadConfig {
    /// Watch the policy folder and reload on change. Default true.
    pub watch: bool,
    /// Quiet time after the last file event before reloading. Default 200ms.
    pub debounce: HumanDuration,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        Self {
            watch: true,
            debounce: HumanDuration(std::time::Duration::from_millis(200)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(yaml: &str) -> BackendConfig {
        crate::parse_yaml(std::path::Path::new("gateway.yaml"), yaml).unwrap()
    }

    #[test]
    fn the_default_balance_is_queue_aware_where_every_endpoint_names_its_metrics() {
        let named = pool(
            "endpoints: [{ address: \"a:1\", metrics: \":2\" }, { address: \"b:1\", metrics: \"b:2\" }]",
        );
        assert_eq!(named.balance(), Balance::QueueAware);
        let one_without = pool("endpoints: [{ address: \"a:1\", metrics: \":2\" }, \"b:1\"]");
        assert_eq!(one_without.balance(), Balance::LeastRequest);
        let chosen =
            pool("endpoints: [{ address: \"a:1\", metrics: \":2\" }]\nbalance: round_robin");
        assert_eq!(chosen.balance(), Balance::RoundRobin);
    }
}
