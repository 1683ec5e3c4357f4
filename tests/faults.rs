//! Fault injection under load: real `switchyard backend` processes behind the real
//! gateway, killed (SIGKILL), frozen (SIGSTOP, SIGCONT), restarted on their port, slowed,
//! and killed during a policy reload, while clients drive the route over gRPC and REST.
//!
//! The invariant (issue 15): on an idempotent route with a healthy alternative (another
//! split member, a fallback, another endpoint of the pool) no client request fails
//! because of a backend fault; on a route that is not idempotent a request fails only if
//! it may have reached the dead backend, and then with UNAVAILABLE naming it; no request
//! outlives its deadline. Every scenario prints what it sent and what failed.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::gateway::*;
use common::*;
use parking_lot::Mutex;
use tokio::sync::watch;

/// What the clients saw.
#[derive(Debug, Default)]
struct Tally {
    requests: AtomicUsize,
    /// Each failure: when (since the load started), protocol, and what the client got.
    failures: Mutex<Vec<(Duration, &'static str, String)>>,
    /// The slowest answer, in microseconds.
    worst_us: AtomicU64,
}

impl Tally {
    fn failed(&self) -> usize {
        self.failures.lock().len()
    }

    fn report(&self, scenario: &str, retried: f64) {
        let failures = self.failures.lock();
        eprintln!(
            "{scenario}: {} requests, {} failed, {retried} retried, worst {:.1} ms{}",
            self.requests.load(Ordering::Relaxed),
            failures.len(),
            self.worst_us.load(Ordering::Relaxed) as f64 / 1000.0,
            failures
                .iter()
                .take(5)
                .map(|(at, p, what)| format!("\n  at {at:?} over {p}: {what}"))
                .collect::<String>()
        );
    }
}

/// Drives `route` with `per_protocol` gRPC clients and as many REST clients until `stop`.
fn drive(
    gw: &TestGateway,
    route: &'static str,
    per_protocol: usize,
    stop: &watch::Receiver<bool>,
) -> (Arc<Tally>, Vec<tokio::task::JoinHandle<()>>) {
    let tally = Arc::new(Tally::default());
    let rows = Arc::new(holdout().features);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..per_protocol * 2 {
        let (tally, rows, mut stop) = (tally.clone(), rows.clone(), stop.clone());
        let (grpc, http_addr) = (gw.grpc, gw.http);
        tasks.push(tokio::spawn(async move {
            let mut client = if worker % 2 == 0 {
                Some(client(grpc).await)
            } else {
                None
            };
            let mut i = worker;
            while !*stop.borrow_and_update() {
                i = (i + 7) % rows.len();
                let row = &rows[i..i + 1];
                let t = Instant::now();
                let failure = match &mut client {
                    Some(c) => c
                        .model_infer(infer_request(route, "", row))
                        .await
                        .err()
                        .map(|s| ("grpc", format!("{:?}: {}", s.code(), s.message()))),
                    None => {
                        let r = http(
                            http_addr,
                            "POST",
                            &format!("/v2/models/{route}/infer"),
                            &[],
                            &rest_infer_body(row),
                        )
                        .await;
                        (r.status != 200).then(|| {
                            (
                                "rest",
                                format!("{}: {}", r.status, String::from_utf8_lossy(&r.body)),
                            )
                        })
                    }
                };
                let took = t.elapsed();
                tally.requests.fetch_add(1, Ordering::Relaxed);
                tally
                    .worst_us
                    .fetch_max(took.as_micros() as u64, Ordering::Relaxed);
                if let Some((protocol, what)) = failure {
                    tally
                        .failures
                        .lock()
                        .push((started.elapsed(), protocol, what));
                }
            }
        }));
    }
    (tally, tasks)
}

/// Stops the load and waits for its clients.
async fn finish(stop: watch::Sender<bool>, tasks: Vec<tokio::task::JoinHandle<()>>) {
    let _ = stop.send(true);
    for t in tasks {
        t.await.unwrap();
    }
}

fn signal(pid: u32, sig: &str) {
    assert!(
        Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
}

/// Two backend processes and a gateway whose pools are `a` and `b` (one endpoint each), or
/// one pool `ab` with both, serving `policy`.
async fn setup(
    pools: &str,
    policy: String,
    extra: &str,
) -> (TestGateway, BackendProcess, BackendProcess) {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let (a, b) = (
        BackendProcess::start(&sample_repo(), any),
        BackendProcess::start(&sample_repo(), any),
    );
    let backends = if pools == "ab" {
        vec![("ab".to_owned(), vec![a.addr, b.addr])]
    } else {
        vec![
            ("a".to_owned(), vec![a.addr]),
            ("b".to_owned(), vec![b.addr]),
        ]
    };
    let gw = TestGateway::start(GatewaySetup {
        backends,
        policies: vec![("r.yaml".into(), policy)],
        extra: format!("health_check: {{ interval: 200ms, timeout: 200ms }}\n{extra}"),
    })
    .await;
    (gw, a, b)
}

/// A 50/50 split over backends `a` (digits_mlp 1) and `b` (digits_mlp 2, so that metrics
/// tell them apart), each the other's fallback.
fn split_policy(idempotent: bool, deadline: &str) -> String {
    format!(
        "version: 1\nroute: r\ntargets:\n  ta: {{ backend: a, model: digits_mlp, version: 1 }}\n  tb: {{ backend: b, model: digits_mlp, version: 2 }}\ndefault:\n  split: {{ weights: {{ ta: 50, tb: 50 }} }}\nfallback: [ta, tb]\ndeadline: {deadline}\nretry: {{ attempts: 1, idempotent: {idempotent} }}\n"
    )
}

/// Loads route `r` of `gw` with 4 clients a protocol, applies `fault` after 300 ms, keeps
/// the load 500 ms more, and reports it as `scenario`.
async fn under_load<F: std::future::Future<Output = ()>>(
    gw: &TestGateway,
    scenario: &str,
    fault: F,
) -> Arc<Tally> {
    let (stop_tx, stop) = watch::channel(false);
    let (tally, tasks) = drive(gw, "r", 4, &stop);
    tokio::time::sleep(Duration::from_millis(300)).await;
    fault.await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    finish(stop_tx, tasks).await;
    tally.report(scenario, retries(&gw.metrics().await));
    tally
}

/// Retries the gateway made (after a failed connection or send; not the candidates it
/// skipped for an open breaker, which the same family counts as `breaker_open`).
fn retries(metrics: &str) -> f64 {
    ["connect_failure", "after_send"]
        .iter()
        .map(|r| metric(metrics, "switchyard_retries_total", &[("reason", r)]))
        .sum()
}

/// Repetitions of the kill scenarios: enough to show a race that loses one run in three.
const REPEATS: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_of_a_split_member_loses_no_request_on_an_idempotent_route() {
    let mut total = (0, 0);
    for run in 0..REPEATS {
        let (gw, a, b) = setup("a,b", split_policy(true, "2s"), "").await;
        let scenario = format!("sigkill split, run {run}");
        let tally = under_load(&gw, &scenario, async { b.kill() }).await;
        total.0 += tally.requests.load(Ordering::Relaxed);
        total.1 += tally.failed();
        assert_eq!(tally.failed(), 0, "run {run}: a request was lost");
        drop(a);
        gw.stop().await;
    }
    eprintln!(
        "sigkill split: {} requests in {REPEATS} runs, {} failed",
        total.0, total.1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_of_one_endpoint_of_a_pool_loses_no_request() {
    // One target whose pool has two endpoints: the retry goes to the other endpoint.
    let policy = "version: 1\nroute: r\ntargets:\n  t: { backend: ab, model: digits_mlp, version: 1 }\ndefault: t\ndeadline: 2s\nretry: { attempts: 1, idempotent: true }\n".to_owned();
    for run in 0..REPEATS {
        let (gw, a, b) = setup("ab", policy.clone(), "").await;
        let scenario = format!("sigkill pool endpoint, run {run}");
        let tally = under_load(&gw, &scenario, async { b.kill() }).await;
        assert_eq!(tally.failed(), 0, "run {run}: a request was lost");
        drop(a);
        gw.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_on_a_route_that_is_not_idempotent_fails_only_what_reached_the_dead_backend() {
    for run in 0..REPEATS {
        let (gw, a, b) = setup("a,b", split_policy(false, "2s"), "").await;
        let b_addr = b.addr.to_string();
        let scenario = format!("sigkill, not idempotent, run {run}");
        let tally = under_load(&gw, &scenario, async { b.kill() }).await;
        for (_, protocol, what) in tally.failures.lock().iter() {
            let unavailable = what.starts_with("Unavailable") || what.starts_with("502");
            assert!(
                unavailable && what.contains(&b_addr),
                "run {run} over {protocol}: {what}"
            );
        }
        // The requests in flight on b when it died, and those sent on its connection
        // before the gateway saw it close: a handful, never the load that followed.
        assert!(tally.failed() <= 16, "run {run}: {} failed", tally.failed());
        assert!(tally.worst_us.load(Ordering::Relaxed) < 2_500_000);
        drop(a);
        gw.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backend_restarted_on_its_port_loses_no_request() {
    for run in 0..REPEATS {
        let (gw, a, b) = setup("a,b", split_policy(true, "2s"), "").await;
        let port = b.addr;
        let restarted = Mutex::new(None);
        let scenario = format!("restart on its port, run {run}");
        let tally = under_load(&gw, &scenario, async {
            b.kill();
            *restarted.lock() = Some(BackendProcess::start(&sample_repo(), port));
        })
        .await;
        let b = restarted.into_inner();
        assert_eq!(tally.failed(), 0, "run {run}: a request was lost");
        drop((a, b));
        gw.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_policy_reload_and_a_backend_kill_at_once_lose_no_request() {
    for run in 0..REPEATS {
        let (gw, a, b) = setup("a,b", split_policy(true, "2s"), "").await;
        let scenario = format!("reload and kill, run {run}");
        let tally = under_load(&gw, &scenario, async {
            gw.write_policy(
                "r.yaml",
                &split_policy(true, "2s").replace("ta: 50, tb: 50", "ta: 30, tb: 70"),
            );
            let (reloaded, ()) = tokio::join!(gw.admin_reload(), async { b.kill() });
            assert_eq!(reloaded.0, 200, "{:?}", reloaded.1);
        })
        .await;
        assert_eq!(tally.failed(), 0, "run {run}: a request was lost");
        drop(a);
        gw.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_backend_is_taken_out_by_deadline_and_breaker_and_comes_back() {
    // SIGSTOP: connections stay up, nothing answers. Requests in flight on it end at the
    // deadline (they cannot be answered elsewhere without a second try per request), the
    // breaker opens, the other member answers; after SIGCONT it serves again.
    let (gw, a, b) = setup(
        "a,b",
        split_policy(true, "500ms"),
        "breaker: { consecutive_failures: 2, base_ejection: 1s, max_ejection: 1s }\n",
    )
    .await;
    let (stop_tx, stop) = watch::channel(false);
    let (tally, tasks) = drive(&gw, "r", 4, &stop);
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(b.pid(), "-STOP");
    tokio::time::sleep(Duration::from_millis(2000)).await;
    signal(b.pid(), "-CONT");
    // What was sent to b before SIGCONT may still end at its deadline: each half-open
    // probe of the breaker is a client request too, and cannot be answered elsewhere
    // without a second try per request.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let frozen = tally.failed();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let before_end = tally.failed();
    let served_by_b = |m: &str| {
        metric(
            m,
            "switchyard_requests_total",
            &[("route", "r"), ("target", "digits_mlp/2"), ("result", "ok")],
        )
    };
    let b_then = served_by_b(&gw.metrics().await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    finish(stop_tx, tasks).await;
    let m = gw.metrics().await;
    tally.report("sigstop then sigcont", retries(&m));
    for (_, protocol, what) in tally.failures.lock().iter() {
        assert!(
            what.starts_with("DeadlineExceeded") || what.starts_with("504"),
            "over {protocol}: {what}"
        );
    }
    // Only what was in flight on b, and what the breaker let through before it opened.
    assert!(frozen <= 16, "{frozen} failed while b was frozen");
    assert_eq!(before_end, frozen, "nothing fails once b is back");
    assert!(
        tally.worst_us.load(Ordering::Relaxed) < 1_000_000,
        "no request outlives its 500 ms deadline by much"
    );
    assert!(served_by_b(&m) > b_then, "b serves again after SIGCONT");
    drop(a);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backend_slower_than_the_deadline_never_holds_a_request_past_it() {
    // Every batch waits 400 ms for company; the route allows 150 ms.
    let repo = patient_repo("digits_mlp", 1024, 400_000);
    let slow = BackendProcess::start(repo.path(), "127.0.0.1:0".parse().unwrap());
    let gw = TestGateway::start(GatewaySetup {
        backends: vec![("a".into(), vec![slow.addr])],
        policies: vec![(
            "r.yaml".into(),
            "version: 1\nroute: r\ntargets:\n  t: { backend: a, model: digits_mlp, version: 1 }\ndefault: t\ndeadline: 150ms\n".into(),
        )],
        extra: String::new(),
    })
    .await;
    let (stop_tx, stop) = watch::channel(false);
    let (tally, tasks) = drive(&gw, "r", 2, &stop);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    finish(stop_tx, tasks).await;
    tally.report("slow backend", 0.0);
    assert!(tally.requests.load(Ordering::Relaxed) > 0);
    for (_, protocol, what) in tally.failures.lock().iter() {
        assert!(
            what.starts_with("DeadlineExceeded")
                || what.starts_with("504")
                || what.starts_with("Unavailable")
                || what.starts_with("503"),
            "over {protocol}: {what}"
        );
    }
    assert!(
        tally.worst_us.load(Ordering::Relaxed) < 400_000,
        "a request outlived its 150 ms deadline: {} µs",
        tally.worst_us.load(Ordering::Relaxed)
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_under_a_strategy_loses_no_request() {
    // Each strategy has its plan touch the backend that dies: a shadow copy, an ensemble
    // member (quorum 2 of 3), a cascade's first stage.
    let targets = "targets:\n  a-linear: { backend: a, model: digits_linear, version: 1 }\n  a-mlp: { backend: a, model: digits_mlp, version: 2 }\n  b-mlp: { backend: b, model: digits_mlp, version: 1 }\n  b-linear: { backend: b, model: digits_linear, version: 1 }\n";
    let plans = [
        (
            "shadow",
            "default: a-mlp\nshadow: { target: b-mlp, percent: 100 }\n",
        ),
        (
            "ensemble",
            "default:\n  ensemble: { members: [a-mlp, b-mlp, a-linear], combine: mean, quorum: 2 }\n",
        ),
        (
            "cascade",
            "default:\n  cascade:\n    - plan: b-linear\n      accept: { margin: 0.2, output: probabilities }\n    - plan: a-mlp\nfallback: [a-mlp]\n",
        ),
    ];
    for (strategy, plan) in plans {
        for run in 0..REPEATS {
            let policy = format!(
                "version: 1\nroute: r\n{targets}{plan}deadline: 2s\nretry: {{ attempts: 1, idempotent: true }}\n"
            );
            let (gw, a, b) = setup("a,b", policy, "").await;
            let scenario = format!("sigkill under a {strategy}, run {run}");
            let tally = under_load(&gw, &scenario, async { b.kill() }).await;
            assert_eq!(
                tally.failed(),
                0,
                "{strategy}, run {run}: a request was lost"
            );
            drop(a);
            gw.stop().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_of_the_gateway_under_load_fails_no_accepted_request() {
    // The gateway as a process in front of a backend process; gRPC clients keep their
    // connections, REST clients open one per request. After SIGTERM a client may be
    // refused (the listener is closed) but a request the gateway took must be answered.
    let backend = BackendProcess::start(&sample_repo(), "127.0.0.1:0".parse().unwrap());
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::write(
        dir.path().join("policies/r.yaml"),
        "version: 1\nroute: r\ntargets:\n  t: { backend: a, model: digits_mlp, version: 1 }\ndefault: t\ndeadline: 2s\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("gateway.yaml"),
        format!("listen: {{ http: 127.0.0.1:0, grpc: 127.0.0.1:0, admin: 127.0.0.1:0 }}\npolicies: policies\nbackends:\n  a: {{ endpoints: [\"{}\"] }}\nreload: {{ watch: false }}\n", backend.addr),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["gateway", "--config"])
        .arg(dir.path().join("gateway.yaml"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let addr = |name: &str| -> SocketAddr {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .unwrap_or_else(|| panic!("{name} in {line:?}"))
            .parse()
            .unwrap()
    };
    let (grpc, http_addr) = (addr("grpc="), addr("http="));
    let accepted = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let cut = Arc::new(AtomicUsize::new(0));
    let lost = Arc::new(Mutex::new(Vec::<String>::new()));
    let (stop_tx, stop) = watch::channel(false);
    let rows = Arc::new(holdout().features);
    let mut tasks = Vec::new();
    for worker in 0..8usize {
        let (accepted, refused, cut, lost, rows, stop) = (
            accepted.clone(),
            refused.clone(),
            cut.clone(),
            lost.clone(),
            rows.clone(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut grpc_client = if worker % 2 == 0 {
                Some(client(grpc).await)
            } else {
                None
            };
            let mut i = worker;
            while !*stop.borrow() {
                i = (i + 7) % rows.len();
                let row = &rows[i..i + 1];
                match &mut grpc_client {
                    Some(c) => match c.model_infer(infer_request("r", "", row)).await {
                        Ok(_) => {
                            accepted.fetch_add(1, Ordering::Relaxed);
                        }
                        // tonic's own words for a connection it could not (re)open, or a
                        // stream the server refused after its GOAWAY: never taken.
                        Err(s)
                            if s.code() == tonic::Code::Unavailable
                                && !s.message().contains("route 'r'") =>
                        {
                            refused.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        // The channel's own connection closing under a request it had
                        // not sent, or had sent just as the GOAWAY came: the client
                        // cannot tell which (counted apart, see below).
                        Err(s)
                            if matches!(s.code(), tonic::Code::Unknown | tonic::Code::Cancelled)
                                && !s.message().contains("route 'r'") =>
                        {
                            cut.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(s) => lost.lock().push(format!("grpc {:?}: {}", s.code(), s.message())),
                    },
                    None => {
                        let Ok(mut s) = tokio::net::TcpStream::connect(http_addr).await else {
                            refused.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            continue;
                        };
                        let body = rest_infer_body(row);
                        let head = format!(
                            "POST /v2/models/r/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
                            body.len()
                        );
                        let _ = s.write_all(head.as_bytes()).await;
                        let _ = s.write_all(&body).await;
                        let mut out = Vec::new();
                        let read = s.read_to_end(&mut out).await;
                        if out.starts_with(b"HTTP/1.1 200") {
                            accepted.fetch_add(1, Ordering::Relaxed);
                        } else if out.is_empty() {
                            // Closed or reset before a byte of answer: the connection sat
                            // in the kernel's backlog when the listener closed.
                            refused.fetch_add(1, Ordering::Relaxed);
                        } else {
                            lost.lock().push(format!(
                                "rest {read:?}: {}",
                                String::from_utf8_lossy(&out[..out.len().min(200)])
                            ));
                        }
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = accepted.load(Ordering::Relaxed);
    signal(child.id(), "-TERM");
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    finish(stop_tx, tasks).await;
    let lost = lost.lock();
    eprintln!(
        "gateway sigterm: {} answered ({} before the signal), {} refused, {} cut by the gRPC channel's connection closing, {} lost{}",
        accepted.load(Ordering::Relaxed),
        before,
        refused.load(Ordering::Relaxed),
        cut.load(Ordering::Relaxed),
        lost.len(),
        lost.iter()
            .take(5)
            .map(|l| format!("\n  {l}"))
            .collect::<String>()
    );
    assert!(status.success(), "exit status {status:?}");
    assert!(lost.is_empty(), "accepted requests failed");
    drop(backend);
}
