//! The `rollout` scenario: what a rollout costs a request, and how fast a failed gate
//! takes the candidate's traffic away.
//!
//! * Cost: one gateway, two routes to the same backend and model version, identical but
//!   for a rollout section (its candidate another name for the same model, at 50%, gates
//!   on): interleaved closed-loop points, gateway CPU per request, and, under callgrind,
//!   instructions per request of each route in the same process.
//! * Rollback latency: a route rolling out `digits_shuffled` with a 100% shadow and a
//!   `shadow_agreement` gate, driven by closed-loop clients that record every answer
//!   (when it was sent and received, who answered, `x-switchyard-rollout`). From the
//!   answers and the rollback's time in the gateway's history: evidence (the
//!   `min_requests`-th baseline answer of the generation, after which the gate can be
//!   judged) → the rollback → the last request that reached the candidate. Each rep
//!   starts a new generation by reloading an edited policy.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use super::{Args, Server, callgrind, client, closed_loop, holdout_requests};

pub(super) const TOKEN: &str = "bench-token";
const MIN_REQUESTS: u64 = 100;

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        * 1000.0
}

/// One HTTP/1.1 request to the admin API: (status, JSON body).
pub(super) fn admin(addr: SocketAddr, method: &str, path: &str) -> (u16, serde_json::Value) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, serde_json::from_str(body).unwrap_or_default())
}

fn cost_policies(dir: &Path) {
    let route = |name: &str, rollout: &str| {
        format!(
            "version: 1\nroute: {name}\ntargets:\n  t: {{ backend: stable, model: digits_mlp, version: 1 }}\n  c: {{ backend: stable, model: digits_mlp, version: 1 }}\ndefault: t\ndeadline: 5s\n{rollout}"
        )
    };
    std::fs::write(dir.join("plain.yaml"), route("plain", "")).unwrap();
    std::fs::write(
        dir.join("ramping.yaml"),
        route(
            "ramping",
            "rollout:\n  candidate: c\n  baseline: t\n  steps: [50, 100]\n  interval: 24h\n  gates:\n    error_rate: { max_increase: 0.01 }\n    latency_p99: { max_ratio: 100 }\n",
        ),
    )
    .unwrap();
}

fn wrong_policy(dir: &Path, rep: usize) {
    // `max_consecutive_errors` differs per rep: each rep is a new generation at step 1.
    std::fs::write(
        dir.join("wrong.yaml"),
        format!(
            "version: 1\nroute: wrong\ntargets:\n  stable: {{ backend: stable, model: digits_mlp, version: 1 }}\n  cand: {{ backend: canary, model: digits_shuffled, version: 1 }}\ndefault: stable\nfallback: [stable]\ndeadline: 5s\nshadow: {{ target: cand, percent: 100, max_in_flight: 1024 }}\nrollout:\n  candidate: cand\n  baseline: stable\n  steps: [10, 50, 100]\n  interval: 24h\n  min_requests: {MIN_REQUESTS}\n  max_consecutive_errors: {}\n  gates:\n    shadow_agreement: {{ min: 0.95 }}\n",
            5 + rep
        ),
    )
    .unwrap();
}

fn gateway_yaml(dir: &Path, stable: SocketAddr, canary: SocketAddr) -> String {
    std::fs::write(dir.join("token"), TOKEN).unwrap();
    let path = dir.join("gateway.yaml");
    std::fs::write(
        &path,
        format!(
            "listen: {{ http: 127.0.0.1:0, grpc: 127.0.0.1:0, admin: 127.0.0.1:0 }}\npolicies: policies\nbackends:\n  stable: {{ endpoints: [\"{stable}\"] }}\n  canary: {{ endpoints: [\"{canary}\"] }}\nreload: {{ watch: false }}\nadmin: {{ token_file: token }}\n"
        ),
    )
    .unwrap();
    path.display().to_string()
}

pub(crate) fn run(args: &Args, repo: &Path, runtime: &tokio::runtime::Runtime) {
    let (stable, canary) = (Server::backend(repo), Server::backend(repo));
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    cost_policies(&policies);
    wrong_policy(&policies, 0);
    let config = gateway_yaml(dir.path(), stable.addr("grpc"), canary.addr("grpc"));
    let gateway = Server::start(&["gateway", "--config", &config]);
    let (grpc, admin_addr) = (gateway.addr("grpc"), gateway.addr("admin"));

    println!(
        "\nrollout: the cost of a route under rollout (candidate at 50%, the same model on the same backend) against the same route without one, interleaved"
    );
    println!(
        "\n| route | concurrency | req/s | p50 µs | p90 µs | p99 µs | errors | gateway CPU µs/req |\n| --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    let mut ratios = Vec::new();
    for &c in &args.concurrency {
        let mut rates = [0.0; 2];
        for _ in 0..args.reps.max(1) {
            for (i, route) in ["plain", "ramping"].iter().enumerate() {
                let before = gateway.cpu_seconds();
                let r = runtime.block_on(closed_loop(
                    grpc,
                    c,
                    args.warmup,
                    args.duration,
                    holdout_requests(route),
                ));
                let cpu = gateway.cpu_seconds() - before;
                let sent = r.throughput() * (args.warmup + args.duration).as_secs_f64();
                println!("{} {:.1} |", r.row(route, c), cpu * 1e6 / sent.max(1.0));
                rates[i] += r.throughput();
            }
        }
        ratios.push((c, rates[1] / rates[0]));
    }
    for (c, r) in &ratios {
        println!("\nconcurrency {c}: throughput under rollout / without = {r:.3}");
    }
    rollback_latency(args, runtime, grpc, admin_addr, &policies);
    drop(gateway);
    if args.callgrind > 0 {
        instructions(args, runtime, dir.path(), &config);
    }
}

/// Instructions per request of each route, in one gateway under callgrind.
fn instructions(args: &Args, runtime: &tokio::runtime::Runtime, dir: &Path, config: &str) {
    let Some(counts) = callgrind::per_route(
        args.callgrind,
        runtime,
        dir,
        config,
        &["plain", "ramping"],
        "rollout",
        "the rollout controller's ticks included in both",
    ) else {
        return;
    };
    println!(
        "\nunder rollout / without: {:.3} instructions per request (+{:.0})",
        counts[1] / counts[0],
        counts[1] - counts[0]
    );
}

/// An answer as the client saw it.
#[derive(Debug, Clone)]
struct Seen {
    sent_ms: f64,
    received_ms: f64,
    candidate: bool,
    baseline_step_one: bool,
}

fn rollback_latency(
    args: &Args,
    runtime: &tokio::runtime::Runtime,
    grpc: SocketAddr,
    admin_addr: SocketAddr,
    policies: &Path,
) {
    let reps = args.reps.max(3);
    let clients = 8;
    println!(
        "\nrollback latency: digits_shuffled rolled out against digits_mlp v1, 100% shadow, shadow_agreement min 0.95 after {MIN_REQUESTS} comparisons, {clients} closed-loop clients, {reps} generations\n\n| rep | evidence → rollback ms | rollback → last candidate request sent ms | evidence → 0% ms | candidate answers | requests |\n| --- | --- | --- | --- | --- | --- |"
    );
    let mut totals = Vec::new();
    for rep in 0..reps {
        if rep > 0 {
            wrong_policy(policies, rep);
            let (status, body) = admin(admin_addr, "POST", "/admin/reload");
            assert_eq!(status, 200, "reload: {body}");
        }
        let seen = Arc::new(Mutex::new(Vec::<Seen>::new()));
        let requests = holdout_requests("wrong");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let rolled_back = runtime.block_on(async {
            let mut tasks = Vec::new();
            for w in 0..clients {
                let (seen, requests, stop) = (seen.clone(), requests.clone(), stop.clone());
                let mut client = client(grpc).await;
                tasks.push(tokio::spawn(async move {
                    let mut i = w * 41;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let sent_ms = now_ms();
                        let r = client
                            .model_infer(requests[i % requests.len()].clone())
                            .await;
                        i += 1;
                        let received_ms = now_ms();
                        if let Ok(r) = r {
                            let h = |k: &str| {
                                r.metadata()
                                    .get(k)
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or_default()
                                    .to_owned()
                            };
                            let target = h("x-switchyard-target");
                            let step = h("x-switchyard-rollout");
                            seen.lock().push(Seen {
                                sent_ms,
                                received_ms,
                                candidate: target == "digits_shuffled/1",
                                baseline_step_one: target == "digits_mlp/1"
                                    && step.starts_with("step=1/"),
                            });
                        }
                    }
                }));
            }
            let started = Instant::now();
            let mut status = serde_json::Value::Null;
            while started.elapsed() < Duration::from_secs(60) {
                status = admin(admin_addr, "GET", "/admin/rollouts/wrong").1;
                if status["state"] == "rolled_back" {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // A little more traffic after the rollback, then stop.
            tokio::time::sleep(Duration::from_millis(200)).await;
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            for t in tasks {
                let _ = t.await;
            }
            status
        });
        assert_eq!(rolled_back["state"], "rolled_back", "{rolled_back}");
        let history = rolled_back["history"].as_array().unwrap();
        let at = history.last().unwrap()["at_ms"].as_f64().unwrap();
        let generation_start = history.first().unwrap()["at_ms"].as_f64().unwrap();
        let seen = seen.lock();
        let mut baseline: Vec<f64> = seen
            .iter()
            .filter(|s| s.baseline_step_one && s.sent_ms >= generation_start)
            .map(|s| s.received_ms)
            .collect();
        baseline.sort_by(f64::total_cmp);
        let evidence = baseline
            .get(MIN_REQUESTS as usize - 1)
            .copied()
            .unwrap_or(f64::NAN);
        let last_candidate = seen
            .iter()
            .filter(|s| s.candidate)
            .map(|s| s.sent_ms)
            .fold(f64::MIN, f64::max);
        let total = at.max(last_candidate) - evidence;
        totals.push(total);
        println!(
            "| {rep} | {:.1} | {:.1} | {:.1} | {} | {} |",
            at - evidence,
            last_candidate - at,
            total,
            seen.iter().filter(|s| s.candidate).count(),
            seen.len()
        );
    }
    totals.sort_by(f64::total_cmp);
    println!(
        "\nevidence → 0% candidate traffic: median {:.1} ms, max {:.1} ms (the gateway's history is in whole ms; evidence is when the {MIN_REQUESTS}th baseline answer arrived, the earliest the gate can be judged)",
        totals[totals.len() / 2],
        totals[totals.len() - 1]
    );
}
