//! Harness for gateway tests: a real gateway (pingora) in-process on ephemeral ports in
//! front of real backends, its policy folder in a temp dir, and small HTTP helpers.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A running gateway.
pub struct TestGateway {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub gateway: switchyard_gateway::Gateway,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

/// Two backend pools on the sample repository, like `switchyard up`.
pub async fn pools() -> (super::TestBackend, super::TestBackend) {
    (
        super::TestBackend::start(&super::sample_repo()).await,
        super::TestBackend::start(&super::sample_repo()).await,
    )
}

/// What the test gateway's `gateway.yaml` says beyond the defaults.
pub struct GatewaySetup {
    /// `(pool, endpoint addresses)`.
    pub backends: Vec<(String, Vec<SocketAddr>)>,
    /// `(file name, contents)` of the policy folder.
    pub policies: Vec<(String, String)>,
    /// Extra top-level YAML for gateway.yaml (limits, breaker, health_check, ...).
    pub extra: String,
}

pub const ADMIN_TOKEN: &str = "test-token-7f3a";

impl TestGateway {
    pub async fn start(setup: GatewaySetup) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let policies = dir.path().join("policies");
        std::fs::create_dir_all(&policies).unwrap();
        for (name, text) in &setup.policies {
            std::fs::write(policies.join(name), text).unwrap();
        }
        let mut yaml = String::from(
            "listen: { http: 127.0.0.1:0, grpc: 127.0.0.1:0, admin: 127.0.0.1:0 }\npolicies: policies\nbackends:\n",
        );
        for (pool, addrs) in &setup.backends {
            let list: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
            yaml.push_str(&format!(
                "  {pool}: {{ endpoints: [{}] }}\n",
                list.join(", ")
            ));
        }
        std::fs::write(dir.path().join("admin-token"), format!("{ADMIN_TOKEN}\n")).unwrap();
        if !setup.extra.starts_with("admin:") && !setup.extra.contains("\nadmin:") {
            yaml.push_str("admin: { token_file: admin-token }\n");
        }
        yaml.push_str(&setup.extra);
        let config_path = dir.path().join("gateway.yaml");
        std::fs::write(&config_path, yaml).unwrap();
        let config =
            switchyard_config::load_gateway_config(&config_path).unwrap_or_else(|e| panic!("{e}"));
        let gateway =
            switchyard_gateway::Gateway::new(config.clone()).unwrap_or_else(|e| panic!("{e}"));
        let listeners = switchyard_gateway::Listeners::bind(&config).unwrap();
        let (http, grpc, admin) = (
            listeners.http_addr(),
            listeners.grpc_addr(),
            listeners.admin_addr(),
        );
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(gateway.clone().serve(
            listeners,
            async move {
                let _ = stopped.await;
            },
            Duration::from_secs(5),
        ));
        Self {
            http,
            grpc,
            admin,
            dir,
            gateway,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn policy_dir(&self) -> PathBuf {
        self.dir.path().join("policies")
    }

    /// Writes a policy file atomically (temp file + rename), as editors and CI do.
    pub fn write_policy(&self, name: &str, text: &str) {
        let tmp = self.policy_dir().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.policy_dir().join(name)).unwrap();
    }

    pub async fn client(&self) -> super::Client {
        super::client(self.grpc).await
    }

    /// `POST /admin/reload` with the token: (status, JSON body).
    pub async fn admin_reload(&self) -> (u16, serde_json::Value) {
        let auth = format!("Bearer {ADMIN_TOKEN}");
        let r = http(
            self.admin,
            "POST",
            "/admin/reload",
            &[("authorization", auth.as_str())],
            b"",
        )
        .await;
        (
            r.status,
            serde_json::from_slice(&r.body).unwrap_or_default(),
        )
    }

    pub async fn metrics(&self) -> String {
        String::from_utf8(http(self.admin, "GET", "/metrics", &[], b"").await.body).unwrap()
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
    }
}

/// A test gateway in front of two real backend pools on the sample repository, `stable`
/// and `canary` (as `switchyard up` runs them), plus `dead`, a pool nobody listens on:
/// `TestGateway::digits().policy("r.yaml", text).extra("breaker: {...}").start().await`.
pub struct Digits {
    policies: Vec<(String, String)>,
    extra: String,
}

/// A started [`Digits`] gateway with the pools it owns.
pub struct DigitsGateway {
    pub gw: TestGateway,
    pub stable: super::TestBackend,
    pub canary: super::TestBackend,
}

impl std::ops::Deref for DigitsGateway {
    type Target = TestGateway;
    fn deref(&self) -> &TestGateway {
        &self.gw
    }
}

impl TestGateway {
    /// A builder for a gateway on the sample pools.
    pub fn digits() -> Digits {
        Digits {
            policies: Vec::new(),
            extra: String::new(),
        }
    }
}

impl Digits {
    /// A policy file of the gateway's policy folder.
    pub fn policy(mut self, file: &str, text: &str) -> Self {
        self.policies.push((file.to_owned(), text.to_owned()));
        self
    }

    /// A sample policy from `policies/`, under its own file name.
    pub fn sample(self, file: &str) -> Self {
        let text = std::fs::read_to_string(super::root().join("policies").join(file)).unwrap();
        self.policy(file, &text)
    }

    /// Top-level gateway.yaml lines (limits, breaker, reload, ...).
    pub fn extra(mut self, yaml: &str) -> Self {
        self.extra.push_str(yaml);
        self
    }

    pub async fn start(self) -> DigitsGateway {
        let (stable, canary) = pools().await;
        // Port 1 on loopback refuses connections: a backend that is down.
        let dead: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let gw = TestGateway::start(GatewaySetup {
            backends: vec![
                ("stable".into(), vec![stable.addr]),
                ("canary".into(), vec![canary.addr]),
                ("dead".into(), vec![dead]),
            ],
            policies: self.policies,
            extra: self.extra,
        })
        .await;
        DigitsGateway { gw, stable, canary }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// An HTTP/1.1 response.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&self.body)))
    }
}

/// One HTTP/1.1 request on a fresh connection (the tests need no HTTP client crate).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete response head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    HttpResponse {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}

/// A policy file for tests, `targets` as `name: pool model version release`.
pub fn digits_policy(route: &str, body: &str) -> String {
    format!(
        "version: 1\nroute: {route}\ntargets:\n  v1: {{ backend: stable, model: digits_mlp, version: 1, release: v1.0.0 }}\n  v2: {{ backend: canary, model: digits_mlp, version: 2, release: v1.1.0 }}\n  linear: {{ backend: stable, model: digits_linear, version: 1, release: v0.1.0 }}\n{body}"
    )
}

/// The JSON body of a REST infer request for the given rows.
pub fn rest_infer_body(rows: &[Vec<f32>]) -> Vec<u8> {
    let data: Vec<f32> = rows.concat();
    serde_json::to_vec(&serde_json::json!({
        "inputs": [{ "name": "INPUT__0", "shape": [rows.len(), 64], "datatype": "FP32", "data": data }]
    }))
    .unwrap()
}

pub fn path_of(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// `GET /admin/rollouts/ROUTE`, which must answer 200.
pub async fn rollout_status(gw: &TestGateway, route: &str) -> serde_json::Value {
    let r = http(
        gw.admin,
        "GET",
        &format!("/admin/rollouts/{route}"),
        &[],
        b"",
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

/// `POST /admin/rollouts/ROUTE/VERB` with the admin token.
pub async fn rollout_command(gw: &TestGateway, route: &str, verb: &str) -> HttpResponse {
    let auth = format!("Bearer {ADMIN_TOKEN}");
    http(
        gw.admin,
        "POST",
        &format!("/admin/rollouts/{route}/{verb}"),
        &[("authorization", auth.as_str())],
        b"",
    )
    .await
}

/// Polls the rollout's status until `done` holds (at most `limit`).
pub async fn until_rollout(
    gw: &TestGateway,
    route: &str,
    limit: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let s = rollout_status(gw, route).await;
        if done(&s) {
            return s;
        }
        assert!(
            start.elapsed() < limit,
            "waited {limit:?}; the rollout is at {s:#}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
