//! The `balance` scenario: load-aware endpoint picking inside a pool.
//!
//! Three `switchyard backend` replicas of one model (the sample linear model), one slowed:
//! its batcher holds each request `SLOW_US` for company, as a replica on a starved or
//! busier host answers later. One gateway, three routes to the same three endpoints, each
//! through its own pool: `round_robin`, `least_request`, `queue_aware`. Interleaved
//! closed-loop points per concurrency and rep: each replica's share of the calls (from
//! `switchyard_upstream_requests_total`), throughput and p50/p99.
//!
//! Then the reload time of a `backends:` change under load: while clients run on the
//! `least_request` route, gateway.yaml gains a fourth replica and `POST /admin/reload` is
//! timed, then the time until the new replica takes its first call, and the errors
//! clients saw meanwhile.

use std::path::Path;
use std::time::{Duration, Instant};

use super::rollout::{TOKEN, admin};
use super::{Args, Server, closed_loop, request, scrape};

/// How long the slow replica's batcher holds a request.
const SLOW_US: u64 = 20_000;

const MODES: [&str; 3] = ["round_robin", "least_request", "queue_aware"];

/// A repository with model `m` (the sample linear model) whose batches wait `delay_us`.
fn repo(dir: &Path, delay_us: u64) {
    let model = dir.join("m");
    std::fs::create_dir_all(model.join("1")).unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("backends/model_repository/digits_linear/1/model.onnx"),
        model.join("1/model.onnx"),
    )
    .unwrap();
    std::fs::write(
        model.join("config.pbtxt"),
        format!(
            "max_batch_size: 64\ndynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}\n"
        ),
    )
    .unwrap();
}

fn endpoints(replicas: &[&Server]) -> String {
    replicas
        .iter()
        .map(|r| {
            format!(
                "{{ address: \"{}\", metrics: \"{}\" }}",
                r.addr("grpc"),
                r.addr("metrics")
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn config(replicas: &[&Server]) -> String {
    let mut yaml = "listen: { http: 127.0.0.1:0, grpc: 127.0.0.1:0, admin: 127.0.0.1:0 }\npolicies: policies\nreload: { watch: false }\nadmin: { token_file: admin-token }\nbackends:\n".to_owned();
    for mode in MODES {
        yaml.push_str(&format!(
            "  {mode}: {{ endpoints: [{}], balance: {mode}, scrape_interval: 100ms }}\n",
            endpoints(replicas)
        ));
    }
    yaml
}

pub(super) fn run(args: &Args, runtime: &tokio::runtime::Runtime) {
    let dir = tempfile::tempdir().unwrap();
    let (fast_repo, slow_repo) = (dir.path().join("fast"), dir.path().join("slow"));
    repo(&fast_repo, 0);
    repo(&slow_repo, SLOW_US);
    let a = Server::backend(&fast_repo);
    let b = Server::backend(&fast_repo);
    let slow = Server::backend(&slow_repo);
    let spare = Server::backend(&fast_repo);
    let replicas = [&a, &b, &slow];
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    for mode in MODES {
        std::fs::write(
            policies.join(format!("{mode}.yaml")),
            format!(
                "version: 1\nroute: {mode}\ntargets:\n  t: {{ backend: {mode}, model: m, version: 1 }}\ndefault: t\ndeadline: 5s\n"
            ),
        )
        .unwrap();
    }
    std::fs::write(dir.path().join("admin-token"), TOKEN).unwrap();
    let file = dir.path().join("gateway.yaml");
    std::fs::write(&file, config(&replicas)).unwrap();
    let gateway = Server::start(&["gateway", "--config", file.to_str().unwrap()]);
    let (grpc, admin_addr) = (gateway.addr("grpc"), gateway.addr("admin"));

    println!(
        "\nbalance: three replicas of one model behind one pool, the third slowed (its batcher holds each request {} ms); per balance mode, interleaved",
        SLOW_US / 1000
    );
    println!(
        "\n| mode | concurrency | rep | req/s | p50 µs | p99 µs | share fast / fast / slow | errors |\n| --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    let calls = |mode: &str| -> Vec<f64> {
        replicas
            .iter()
            .map(|r| {
                scrape(
                    admin_addr,
                    "switchyard_upstream_requests_total",
                    &[
                        &format!("backend=\"{mode}\""),
                        &format!("endpoint=\"{}\"", r.addr("grpc")),
                    ],
                )
            })
            .collect()
    };
    for &c in &args.concurrency {
        for rep in 0..args.reps {
            for mode in MODES {
                let before = calls(mode);
                let r = runtime.block_on(closed_loop(
                    grpc,
                    c,
                    args.warmup,
                    args.duration,
                    vec![request(mode, "", 1)],
                ));
                let after = calls(mode);
                let delta: Vec<f64> = after.iter().zip(&before).map(|(x, y)| x - y).collect();
                let total: f64 = delta.iter().sum::<f64>().max(1.0);
                let share: Vec<String> = delta
                    .iter()
                    .map(|d| format!("{:.1}%", 100.0 * d / total))
                    .collect();
                println!(
                    "| {mode} | {c} | {} | {:.0} | {} | {} | {} | {} |",
                    rep + 1,
                    r.throughput(),
                    r.latency_us.value_at_quantile(0.5),
                    r.latency_us.value_at_quantile(0.99),
                    share.join(" / "),
                    r.errors
                );
            }
        }
    }

    // A `backends:` change under load: a fourth replica joins the least_request pool.
    let c = *args.concurrency.last().unwrap_or(&8);
    let load = runtime.spawn(closed_loop(
        grpc,
        c,
        Duration::ZERO,
        args.duration + Duration::from_secs(2),
        vec![request("least_request", "", 1)],
    ));
    std::thread::sleep(Duration::from_secs(1));
    let grown = config(&replicas).replace(
        &format!("{}], balance: least_request", endpoints(&replicas)),
        &format!(
            "{}, {}], balance: least_request",
            endpoints(&replicas),
            endpoints(&[&spare])
        ),
    );
    std::fs::write(&file, grown).unwrap();
    let start = Instant::now();
    let (status, body) = admin(admin_addr, "POST", "/admin/reload");
    let reload = start.elapsed();
    let new_calls = || {
        scrape(
            admin_addr,
            "switchyard_upstream_requests_total",
            &[
                "backend=\"least_request\"",
                &format!("endpoint=\"{}\"", spare.addr("grpc")),
            ],
        )
    };
    let mut first_call = None;
    while start.elapsed() < Duration::from_secs(5) {
        if new_calls() > 0.0 {
            first_call = Some(start.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let r = runtime.block_on(load).unwrap();
    println!(
        "\nreload of backends: under load ({c} clients on least_request): POST /admin/reload answered {status} in {:.1} ms (version {}); the new replica's first call {} after the request; {} requests, {} errors during the run",
        reload.as_secs_f64() * 1000.0,
        body["version"],
        first_call.map_or("never (5 s)".to_owned(), |t| format!(
            "{:.1} ms",
            t.as_secs_f64() * 1000.0
        )),
        r.requests,
        r.errors
    );
}
