//! Where a pool's endpoints come from and how loaded they are: DNS names re-resolved on an
//! interval (a Kubernetes headless Service answers one address per ready pod), and each
//! endpoint's queue depth read from its Prometheus `/metrics` for `balance: queue_aware`.
//!
//! Everything here runs off the request path, in one task the gateway starts: it wakes
//! every few milliseconds, starts the scrapes and resolutions that are due (one at a time
//! per endpoint or pool) and puts new members in force with one atomic store. A request
//! reads a queue depth as two relaxed atomic loads.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus::IntGauge;
use switchyard_config::gateway::{BackendConfig, Balance, EndpointConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Pool, Upstreams};

/// The metric Triton and our backend export for requests waiting in a model's queue.
pub(crate) const PENDING: &str = "nv_inference_pending_request_count";

/// The largest `/metrics` reply read (Triton with many models writes a few hundred KiB).
const MAX_METRICS_BYTES: u64 = 8 << 20;

/// How often the discovery task looks for due work.
const TICK: Duration = Duration::from_millis(20);

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Milliseconds since the process's discovery clock started, plus one (0 means never).
pub(crate) fn now_ms() -> u64 {
    EPOCH.elapsed().as_millis() as u64 + 1
}

/// What a pool entry resolved to: its addresses and where each one's metrics are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Resolved {
    /// The entry as gateway.yaml writes it.
    pub(crate) entry: String,
    pub(crate) addrs: Vec<SocketAddr>,
    metrics: MetricsAt,
}

/// Where an entry's endpoints serve `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MetricsAt {
    None,
    /// `:port`: on each address's own host.
    Port(u16),
    /// One address for all.
    Addr(SocketAddr),
}

impl Resolved {
    /// Each address with its metrics address.
    pub(crate) fn endpoints(&self) -> impl Iterator<Item = (SocketAddr, Option<SocketAddr>)> {
        self.addrs.iter().map(move |a| {
            let metrics = match self.metrics {
                MetricsAt::None => None,
                MetricsAt::Port(p) => Some(SocketAddr::new(a.ip(), p)),
                MetricsAt::Addr(m) => Some(m),
            };
            (*a, metrics)
        })
    }
}

/// A pool's configuration and its last resolution, kept with the pool.
#[derive(Debug)]
pub(crate) struct Source {
    pub(crate) config: BackendConfig,
    resolved: Vec<Resolved>,
    /// Whether members were put in force once (logs say "added" after that only).
    pub(crate) installed: bool,
    /// Bumped by every install: a resolution started before one is dropped.
    generation: u64,
    /// When the last re-resolution started (`now_ms`), and whether one runs.
    last_resolve: u64,
    resolving: bool,
}

impl Source {
    pub(crate) fn new(config: BackendConfig) -> Self {
        Self {
            config,
            resolved: Vec::new(),
            installed: false,
            generation: 0,
            last_resolve: now_ms(),
            resolving: false,
        }
    }

    pub(crate) fn update(&mut self, config: BackendConfig, resolved: Vec<Resolved>) {
        self.config = config;
        self.resolved = resolved;
        self.installed = true;
        self.generation += 1;
    }
}

/// Whether `host:port` names its host by DNS rather than as an IP literal.
fn is_name(entry: &str) -> bool {
    entry.parse::<SocketAddr>().is_err()
}

/// `[::1]:80` and `1.2.3.4:80` as addresses, without DNS.
fn literal(entry: &str) -> Option<SocketAddr> {
    entry.parse().ok()
}

fn metrics_at(entry: &EndpointConfig, lookup: impl Fn(&str) -> Option<SocketAddr>) -> MetricsAt {
    match entry.metrics() {
        None => MetricsAt::None,
        Some(m) => match m.strip_prefix(':').and_then(|p| p.parse().ok()) {
            Some(port) => MetricsAt::Port(port),
            // Validated as host:port; a name that does not resolve reads no queue depth
            // (the endpoint counts as unloaded by others, as a stale reading does).
            None => lookup(m).map_or(MetricsAt::None, MetricsAt::Addr),
        },
    }
}

fn sorted(mut addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    addrs.sort();
    addrs.dedup();
    addrs
}

/// Resolves a pool's entries now, blocking (start-up). An entry that does not resolve
/// gives no address, and `failed(entry, why)` hears of it.
pub(crate) fn resolve_now(
    config: &BackendConfig,
    mut failed: impl FnMut(&str, String),
) -> Vec<Resolved> {
    let lookup = |s: &str| s.to_socket_addrs().ok().and_then(|mut a| a.next());
    config
        .endpoints
        .iter()
        .map(|e| {
            let entry = e.address();
            let addrs = match literal(entry) {
                Some(a) => vec![a],
                None => match entry.to_socket_addrs() {
                    Ok(a) => sorted(a.collect()),
                    Err(err) => {
                        failed(entry, err.to_string());
                        Vec::new()
                    }
                },
            };
            Resolved {
                entry: entry.to_owned(),
                addrs,
                metrics: metrics_at(e, lookup),
            }
        })
        .collect()
}

/// Resolves one `host:port` on tokio's blocking pool.
async fn lookup(entry: &str) -> Result<Vec<SocketAddr>, String> {
    if let Some(a) = literal(entry) {
        return Ok(vec![a]);
    }
    match tokio::net::lookup_host(entry).await {
        Ok(a) => {
            let a = sorted(a.collect());
            if a.is_empty() {
                Err("no address".to_owned())
            } else {
                Ok(a)
            }
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Resolves a pool's entries (a reload); like [`resolve_now`] without blocking.
pub(crate) async fn resolve(
    config: &BackendConfig,
    mut failed: impl FnMut(&str, String),
) -> Vec<Resolved> {
    let mut out = Vec::with_capacity(config.endpoints.len());
    for e in &config.endpoints {
        let entry = e.address();
        let addrs = lookup(entry).await.unwrap_or_else(|err| {
            failed(entry, err);
            Vec::new()
        });
        let metrics = match e.metrics() {
            Some(m) if !m.starts_with(':') => lookup(m).await.ok().and_then(|a| a.first().copied()),
            _ => None,
        };
        out.push(Resolved {
            entry: entry.to_owned(),
            addrs,
            metrics: metrics_at(e, |_| metrics),
        });
    }
    out
}

/// Re-resolves `previous` under `config`: an entry whose name fails keeps the addresses
/// it had (a DNS outage must not empty a pool).
async fn resolve_again(
    config: &BackendConfig,
    previous: &[Resolved],
    mut failed: impl FnMut(&str, String),
) -> Vec<Resolved> {
    let fresh = resolve(config, |_, _| {}).await;
    fresh
        .into_iter()
        .map(|mut r| {
            if r.addrs.is_empty()
                && let Some(p) = previous.iter().find(|p| p.entry == r.entry)
            {
                failed(&r.entry, "no answer".to_owned());
                r.addrs.clone_from(&p.addrs);
            }
            r
        })
        .collect()
}

/// An endpoint's queue depth as last read from its `/metrics`.
#[derive(Debug)]
pub(crate) struct QueueDepth {
    /// Where to read it; `None`: never read.
    pub(crate) at: Option<SocketAddr>,
    depth: AtomicU64,
    /// When the reading was taken (`now_ms`; 0: never).
    seen: AtomicU64,
    /// When the last scrape started, and whether one runs.
    started: AtomicU64,
    busy: AtomicBool,
    gauge: IntGauge,
}

impl QueueDepth {
    pub(crate) fn new(at: Option<SocketAddr>, gauge: IntGauge) -> Self {
        gauge.set(-1);
        Self {
            at,
            depth: AtomicU64::new(0),
            seen: AtomicU64::new(0),
            started: AtomicU64::new(0),
            busy: AtomicBool::new(false),
            gauge,
        }
    }

    /// The reading, if it is at most `stale_ms` old.
    pub(crate) fn fresh(&self, now_ms: u64, stale_ms: u64) -> Option<u64> {
        let seen = self.seen.load(Ordering::Relaxed);
        (seen != 0 && now_ms.saturating_sub(seen) <= stale_ms)
            .then(|| self.depth.load(Ordering::Relaxed))
    }

    fn record(&self, depth: u64) {
        self.depth.store(depth, Ordering::Relaxed);
        self.seen.store(now_ms(), Ordering::Relaxed);
        self.gauge.set(depth as i64);
    }
}

/// The sum of [`PENDING`] over every model in a Prometheus text exposition; `None` when
/// the text has no such series (metrics off, or not a Triton-protocol server).
pub(crate) fn pending_requests(text: &str) -> Option<u64> {
    let mut found = false;
    let mut sum = 0f64;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(PENDING) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue; // another metric whose name starts the same
        }
        // `name{labels} value [timestamp]`: labels may hold spaces inside quotes.
        let after = rest.rfind('}').map_or(rest, |i| &rest[i + 1..]);
        if let Some(v) = after
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            && v.is_finite()
            && v >= 0.0
        {
            found = true;
            sum += v;
        }
    }
    found.then_some(sum.round() as u64)
}

/// One scrape of `http://addr/metrics` (HTTP/1.0, so the reply is neither chunked nor
/// kept alive), bounded in size and time.
pub(crate) async fn scrape(addr: SocketAddr, timeout: Duration) -> Result<u64, String> {
    let work = async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let request = format!(
            "GET /metrics HTTP/1.0\r\nHost: {addr}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut body = Vec::new();
        (&mut stream)
            .take(MAX_METRICS_BYTES + 1)
            .read_to_end(&mut body)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if body.len() as u64 > MAX_METRICS_BYTES {
            return Err(format!("reply over {MAX_METRICS_BYTES} bytes"));
        }
        let text = String::from_utf8_lossy(&body);
        let (head, text) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| "no HTTP reply".to_owned())?;
        let status = head.split_whitespace().nth(1).unwrap_or_default();
        if status != "200" {
            return Err(format!("HTTP status {status}"));
        }
        pending_requests(text).ok_or_else(|| format!("no {PENDING} series"))
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| format!("no reply within {timeout:?}"))?
}

/// The discovery task: scrapes and re-resolutions as they fall due, until `stop`.
pub(crate) async fn run(upstreams: Arc<Upstreams>, stop: tokio::sync::watch::Receiver<bool>) {
    let mut ticks = crate::ticker::Ticker::new(TICK, stop);
    while ticks.next().await {
        let now = now_ms();
        for pool in upstreams.pools().values() {
            scrape_due(&upstreams, pool, now);
            resolve_due(&upstreams, pool, now);
        }
    }
}

fn scrape_due(upstreams: &Arc<Upstreams>, pool: &Arc<Pool>, now: u64) {
    let members = pool.members();
    if members.balance != Balance::QueueAware {
        return;
    }
    let interval = members.stale_ms / 4;
    for endpoint in members.endpoints.iter() {
        let q = &endpoint.queue;
        let Some(at) = q.at else { continue };
        if q.seen.load(Ordering::Relaxed) != 0 && q.fresh(now, members.stale_ms).is_none() {
            q.gauge.set(-1);
        }
        if now.saturating_sub(q.started.load(Ordering::Relaxed)) < interval
            || q.busy.swap(true, Ordering::AcqRel)
        {
            continue;
        }
        q.started.store(now, Ordering::Relaxed);
        let (endpoint, upstreams, pool) = (endpoint.clone(), upstreams.clone(), pool.name.clone());
        let timeout = Duration::from_millis(interval.max(1)).min(Duration::from_secs(1)) * 2;
        tokio::spawn(async move {
            match scrape(at, timeout).await {
                Ok(depth) => endpoint.queue.record(depth),
                Err(e) => {
                    tracing::debug!(backend = %pool, endpoint = %endpoint.address, metrics = %at, "queue depth scrape failed: {e}");
                    upstreams
                        .metrics
                        .discovery_errors
                        .with_label_values(&[&*pool, "scrape"])
                        .inc();
                }
            }
            endpoint.queue.busy.store(false, Ordering::Release);
        });
    }
}

fn resolve_due(upstreams: &Arc<Upstreams>, pool: &Arc<Pool>, now: u64) {
    let (config, previous, generation) = {
        let mut source = pool.source.lock();
        let every = source.config.resolve_every().as_millis() as u64;
        let names = source.config.endpoints.iter().any(|e| {
            is_name(e.address())
                || e.metrics()
                    .is_some_and(|m| !m.starts_with(':') && is_name(m))
        });
        if !names || source.resolving || now.saturating_sub(source.last_resolve) < every {
            return;
        }
        source.resolving = true;
        source.last_resolve = now;
        (
            source.config.clone(),
            source.resolved.clone(),
            source.generation,
        )
    };
    let (upstreams, pool) = (upstreams.clone(), pool.clone());
    tokio::spawn(async move {
        let resolved = resolve_again(&config, &previous, |entry, e| {
            upstreams.resolve_failed(&pool.name, entry, &e);
        })
        .await;
        let current = {
            let mut source = pool.source.lock();
            source.resolving = false;
            source.generation == generation && source.resolved != resolved
        };
        // A reload that installed meanwhile wins; an unchanged answer changes nothing.
        if current {
            upstreams.install(&pool, &config, resolved);
        }
    });
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    fn resolved_ips(r: &Resolved) -> Vec<IpAddr> {
        r.addrs.iter().map(SocketAddr::ip).collect()
    }

    #[test]
    fn pending_requests_sums_every_model_and_skips_lookalikes() {
        let text = "# HELP nv_inference_pending_request_count Instantaneous\n\
            # TYPE nv_inference_pending_request_count gauge\n\
            nv_inference_pending_request_count{model=\"a b\",version=\"1\"} 3\n\
            nv_inference_pending_request_count{model=\"c\",version=\"1\"} 4 1700000000\n\
            nv_inference_pending_request_count_other 100\n\
            nv_inference_request_success{model=\"a\"} 9\n";
        assert_eq!(pending_requests(text), Some(7));
        assert_eq!(pending_requests("nv_inference_count 1\n"), None);
        assert_eq!(
            pending_requests("nv_inference_pending_request_count 2\n"),
            Some(2)
        );
    }

    #[test]
    fn literals_need_no_dns_and_metrics_ports_follow_each_address() {
        let config: BackendConfig = serde_saphyr::from_str(
            "endpoints:\n  - 127.0.0.1:9001\n  - { address: \"[::1]:9002\", metrics: \":9102\" }\n",
        )
        .unwrap();
        let r = resolve_now(&config, |e, why| panic!("{e}: {why}"));
        assert_eq!(resolved_ips(&r[0]), vec![IpAddr::from([127, 0, 0, 1])]);
        assert_eq!(
            r[1].endpoints().collect::<Vec<_>>(),
            vec![(
                "[::1]:9002".parse().unwrap(),
                Some("[::1]:9102".parse().unwrap())
            )]
        );
        assert!(!is_name("127.0.0.1:1") && is_name("backend.default.svc:8001"));
    }

    #[tokio::test]
    async fn a_name_that_stops_resolving_keeps_its_addresses() {
        let config: BackendConfig =
            serde_saphyr::from_str("endpoints: [\"no-such-host.invalid:8001\"]\n").unwrap();
        let previous = vec![Resolved {
            entry: "no-such-host.invalid:8001".to_owned(),
            addrs: vec!["10.0.0.7:8001".parse().unwrap()],
            metrics: MetricsAt::None,
        }];
        let mut failures = Vec::new();
        let again = resolve_again(&config, &previous, |e, _| failures.push(e.to_owned())).await;
        assert_eq!(again, previous);
        assert_eq!(failures, vec!["no-such-host.invalid:8001".to_owned()]);
    }
}
