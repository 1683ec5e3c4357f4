//! Closed-loop gRPC load generator for Switchyard: fixed concurrency, warm-up, duration;
//! reports throughput and p50/p90/p99 latency (HDR histograms), side by side in one run.
//!
//! Scenarios (`--scenario`, default `all`):
//! * `backend`: `digits_mlp` batch 1 against `switchyard backend` (the release binary,
//!   started here on an ephemeral port) at each concurrency, then the in-process runtime
//!   at every batch size, whose best is the ceiling a server can approach; prints the
//!   ratio server / in-process.
//! * `proxies`: the same load against (a) the backend directly, (b) `switchyard gateway`
//!   with a single-target route, (c) nginx `grpc_pass` (Debian's nginx, config in
//!   `benches/nginx-grpc.conf`), interleaved per concurrency; prints gateway/direct and
//!   gateway/nginx for throughput and latency. nginx missing: its column is skipped.
//!
//! * `strategies`: two backends and `switchyard gateway` with the sample strategy routes,
//!   over the held-out rows, interleaved per concurrency: single target vs the same with a
//!   100% shadow; always-MLP vs the cascade (and MLP calls per request, from the gateway's
//!   metrics); each ensemble member alone vs the ensemble of three; the same request
//!   uncached vs served from the cache.
//!
//! Run: `cargo bench --bench loadgen -- [--scenario all|backend|proxies|strategies] [--duration 5]
//! [--warmup 1] [--concurrency 1,8,32]`
//! Client and server share the machine, so absolute numbers include the client's cost;
//! compare ratios from one run, never numbers from different runs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use switchyard_backend::{LocalModel, RepositoryOptions};
use switchyard_proto::inference::{
    ModelInferRequest, grpc_inference_service_client::GrpcInferenceServiceClient,
    model_infer_request::InferInputTensor,
};
use tonic::transport::Channel;

struct Args {
    scenario: String,
    duration: Duration,
    warmup: Duration,
    concurrency: Vec<usize>,
    model: String,
    version: String,
}

fn parse_args() -> Args {
    let mut args = Args {
        scenario: "all".to_owned(),
        duration: Duration::from_secs(5),
        warmup: Duration::from_secs(1),
        concurrency: vec![1, 8, 32],
        model: "digits_mlp".to_owned(),
        version: "1".to_owned(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--duration" => {
                args.duration = Duration::from_secs_f64(value().parse().expect("seconds"))
            }
            "--warmup" => args.warmup = Duration::from_secs_f64(value().parse().expect("seconds")),
            "--concurrency" => {
                args.concurrency = value()
                    .split(',')
                    .map(|c| c.parse().expect("a number"))
                    .collect()
            }
            "--model" => args.model = value(),
            "--scenario" => args.scenario = value(),
            "--version" => args.version = value(),
            // `cargo bench` passes --bench; nothing else is expected.
            "--bench" => {}
            other => panic!("unknown flag {other}; see the header of benches/loadgen.rs"),
        }
    }
    args
}

/// One closed-loop measurement.
#[derive(Debug)]
struct Report {
    requests: u64,
    errors: u64,
    elapsed: Duration,
    latency_us: Histogram<u64>,
}

impl Report {
    fn throughput(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
    fn row(&self, label: &str, concurrency: usize) -> String {
        format!(
            "| {label} | {concurrency} | {:.0} | {} | {} | {} | {} |",
            self.throughput(),
            self.latency_us.value_at_quantile(0.50),
            self.latency_us.value_at_quantile(0.90),
            self.latency_us.value_at_quantile(0.99),
            self.errors
        )
    }
}

/// `concurrency` workers, each with its own connection, send `requests` back to back,
/// cycling through them (each worker from its own offset).
async fn closed_loop(
    addr: SocketAddr,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    requests: Vec<ModelInferRequest>,
) -> Report {
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let mut workers = Vec::with_capacity(concurrency);
    for worker in 0..concurrency {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .expect("connect");
        let mut client = GrpcInferenceServiceClient::new(channel);
        let requests = requests.clone();
        workers.push(tokio::spawn(async move {
            let mut next = worker * 7;
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
            let (mut ok, mut errors) = (0u64, 0u64);
            loop {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                let request = requests[next % requests.len()].clone();
                next += 1;
                let result = client.model_infer(request).await;
                let done = Instant::now();
                if t >= measure_from {
                    match result {
                        Ok(_) => {
                            ok += 1;
                            let _ = hist.record((done - t).as_micros().max(1) as u64);
                        }
                        Err(_) => errors += 1,
                    }
                }
            }
            (hist, ok, errors)
        }));
    }
    let mut latency_us = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    let (mut requests, mut errors) = (0, 0);
    for w in workers {
        let (h, ok, err) = w.await.unwrap();
        latency_us.add(h).unwrap();
        requests += ok;
        errors += err;
    }
    Report {
        requests,
        errors,
        elapsed: duration,
        latency_us,
    }
}

fn request(model: &str, version: &str, rows: usize) -> ModelInferRequest {
    let raw: Vec<u8> = (0..rows * 64)
        .flat_map(|i| ((i % 17) as f32).to_le_bytes())
        .collect();
    ModelInferRequest {
        model_name: model.to_owned(),
        model_version: version.to_owned(),
        inputs: vec![InferInputTensor {
            name: "INPUT__0".to_owned(),
            datatype: "FP32".to_owned(),
            shape: vec![rows as i64, 64],
            ..Default::default()
        }],
        raw_input_contents: vec![raw.into()],
        ..Default::default()
    }
}

/// A `switchyard` subcommand as a child process; killed (SIGTERM) on drop.
struct Server {
    child: Child,
    addrs: Vec<(String, SocketAddr)>,
}

impl Server {
    fn start(args: &[&str]) -> Self {
        use std::io::{BufRead, BufReader};
        let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start switchyard");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addrs = line
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
            .collect();
        Self { child, addrs }
    }

    /// `switchyard backend` on `repo`, on ephemeral ports.
    fn backend(repo: &Path) -> Self {
        Self::start(&[
            "backend",
            "--model-repository",
            repo.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
        ])
    }

    /// CPU time (user + system) the process has used so far, in seconds (`/proc`, whose
    /// clock ticks are USER_HZ = 100 on Linux).
    fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command name (which may hold spaces) start at ") ".
        let fields: Vec<&str> = stat
            .rsplit_once(") ")
            .map_or(vec![], |(_, rest)| rest.split(' ').collect());
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
        (ticks(11) + ticks(12)) / 100.0
    }

    fn addr(&self, key: &str) -> SocketAddr {
        self.addrs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("no {key}= address"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// Rows per second of the in-process runtime at one batch size, for about `duration`.
fn in_process(repo: &Path, model: &str, version: u64, batch: usize, duration: Duration) -> f64 {
    let mut local =
        LocalModel::open(repo, model, version, &RepositoryOptions::default()).expect("open model");
    let input: Vec<u8> = (0..batch * 64)
        .flat_map(|i| ((i % 17) as f32).to_le_bytes())
        .collect();
    for _ in 0..50 {
        local.infer(&[&input], batch).unwrap();
    }
    let start = Instant::now();
    let mut rows = 0usize;
    while start.elapsed() < duration {
        local.infer(&[&input], batch).unwrap();
        rows += batch;
    }
    rows as f64 / start.elapsed().as_secs_f64()
}

/// A free loopback port (bound, read, released) for processes that cannot report theirs.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// nginx with `grpc_pass` to `backend`, as a child process; `None` when nginx is missing.
struct Nginx {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Nginx {
    fn start(backend: SocketAddr, workers: usize) -> Option<Self> {
        let bin = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| Path::new(p).exists())?;
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tmp")).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let template = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/nginx-grpc.conf"),
        )
        .unwrap();
        let conf = template
            .replace("@WORKERS@", &workers.to_string())
            .replace("@LISTEN@", &addr.to_string())
            .replace("@BACKEND@", &backend.to_string());
        std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let child = Command::new(bin)
            .arg("-p")
            .arg(format!("{}/", dir.path().display()))
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        for _ in 0..100 {
            if std::net::TcpStream::connect(addr).is_ok() {
                return Some(Self {
                    child,
                    addr,
                    _dir: dir,
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-QUIT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "-".to_owned()
    }
}

fn proxies(args: &Args, repo: &Path, runtime: &tokio::runtime::Runtime) {
    let backend = Server::backend(repo);
    let backend_addr = backend.addr("grpc");
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::write(
        dir.path().join("policies/bench.yaml"),
        format!("version: 1\nroute: bench\ntargets:\n  t: {{ backend: pool, model: {}, version: {} }}\ndefault: t\n", args.model, args.version),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("gateway.yaml"),
        format!("listen: {{ http: 127.0.0.1:0, grpc: 127.0.0.1:0, admin: 127.0.0.1:0 }}\npolicies: policies\nbackends:\n  pool: {{ endpoints: [\"{backend_addr}\"] }}\nreload: {{ watch: false }}\n"),
    )
    .unwrap();
    let gateway = Server::start(&[
        "gateway",
        "--config",
        dir.path().join("gateway.yaml").to_str().unwrap(),
    ]);
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let nginx = Nginx::start(backend_addr, workers);
    if nginx.is_none() {
        println!("\n(nginx not found: install Debian's nginx for the peer column)");
    }
    let direct_req = request(&args.model, &args.version, 1);
    let gateway_req = request("bench", "", 1);
    println!(
        "\nproxies: same closed-loop load, interleaved per concurrency (gateway tokio workers = nginx workers = {workers})"
    );
    println!(
        "\n| target | concurrency | req/s | p50 µs | p90 µs | p99 µs | errors |\n| --- | --- | --- | --- | --- | --- | --- |"
    );
    let mut summary = Vec::new();
    for &c in &args.concurrency {
        let direct = runtime.block_on(closed_loop(
            backend_addr,
            c,
            args.warmup,
            args.duration,
            vec![direct_req.clone()],
        ));
        println!("{}", direct.row("direct", c));
        let gw = runtime.block_on(closed_loop(
            gateway.addr("grpc"),
            c,
            args.warmup,
            args.duration,
            vec![gateway_req.clone()],
        ));
        println!("{}", gw.row("switchyard gateway", c));
        let ng = nginx.as_ref().map(|n| {
            runtime.block_on(closed_loop(
                n.addr,
                c,
                args.warmup,
                args.duration,
                vec![direct_req.clone()],
            ))
        });
        if let Some(ng) = &ng {
            println!("{}", ng.row("nginx grpc_pass", c));
        }
        summary.push((c, direct, gw, ng));
    }
    println!(
        "\n| concurrency | throughput gateway/direct | gateway/nginx | p50 gateway/direct | p50 gateway/nginx | p99 gateway/direct | p99 gateway/nginx | added p50 µs gateway | added p50 µs nginx |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for (c, d, g, n) in &summary {
        let p = |r: &Report, q: f64| r.latency_us.value_at_quantile(q) as f64;
        let (nt, n50, n99) = n
            .as_ref()
            .map_or((0.0, 0.0, 0.0), |n| (n.throughput(), p(n, 0.5), p(n, 0.99)));
        println!(
            "| {c} | {} | {} | {} | {} | {} | {} | {:.0} | {} |",
            ratio(g.throughput(), d.throughput()),
            ratio(g.throughput(), nt),
            ratio(p(g, 0.5), p(d, 0.5)),
            ratio(p(g, 0.5), n50),
            ratio(p(g, 0.99), p(d, 0.99)),
            ratio(p(g, 0.99), n99),
            p(g, 0.5) - p(d, 0.5),
            if n.is_some() {
                format!("{:.0}", n50 - p(d, 0.5))
            } else {
                "-".to_owned()
            },
        );
    }
}

fn main() {
    let args = parse_args();
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("backends/model_repository");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "# switchyard loadgen: {} v{} batch 1, warm-up {:?}, {:?} per point",
        args.model, args.version, args.warmup, args.duration
    );
    if args.scenario == "proxies" || args.scenario == "all" {
        proxies(&args, &repo, &runtime);
    }
    if args.scenario == "backend" || args.scenario == "all" {
        backend_scenario(&args, &repo, &runtime);
    }
    if args.scenario == "strategies" || args.scenario == "all" {
        strategies(&args, &repo, &runtime);
    }
}

fn backend_scenario(args: &Args, repo: &Path, runtime: &tokio::runtime::Runtime) {
    println!("\nbackend: direct gRPC, then the runtime in-process");

    let backend = Server::backend(repo);
    let addr = backend.addr("grpc");
    let req = request(&args.model, &args.version, 1);
    println!(
        "\n| target | concurrency | req/s | p50 µs | p90 µs | p99 µs | errors |\n| --- | --- | --- | --- | --- | --- | --- |"
    );
    let mut best_server = 0f64;
    for &c in &args.concurrency {
        let report = runtime.block_on(closed_loop(
            addr,
            c,
            args.warmup,
            args.duration,
            vec![req.clone()],
        ));
        best_server = best_server.max(report.throughput());
        println!("{}", report.row("backend (gRPC)", c));
    }
    drop(backend);

    let version: u64 = args.version.parse().expect("numeric version");
    println!("\n| in-process batch | rows/s |\n| --- | --- |");
    let mut best = (0usize, 0f64);
    for batch in [1, 2, 4, 8, 16, 32, 64] {
        let rate = in_process(
            repo,
            &args.model,
            version,
            batch,
            Duration::from_millis(700),
        );
        println!("| {batch} | {rate:.0} |");
        if rate > best.1 {
            best = (batch, rate);
        }
    }
    println!(
        "\nbest server throughput {:.0} req/s (batch-1 requests) vs in-process {:.0} rows/s at batch {}: ratio server/in-process = {:.3}",
        best_server,
        best.1,
        best.0,
        best_server / best.1
    );
}

/// The held-out rows as batch-1 requests to `route`.
fn holdout_requests(route: &str) -> Vec<ModelInferRequest> {
    #[derive(serde::Deserialize)]
    struct Holdout {
        features: Vec<Vec<f32>>,
    }
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("backends/sample_data/digits_holdout.json");
    let holdout: Holdout = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    holdout
        .features
        .iter()
        .map(|row| {
            let mut r = request(route, "", 1);
            r.raw_input_contents = vec![
                row.iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<u8>>()
                    .into(),
            ];
            r
        })
        .collect()
}

/// One metric series summed over the lines that carry all `labels`, from `/metrics`.
fn scrape(admin: SocketAddr, name: &str, labels: &[&str]) -> f64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(admin).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter(|l| labels.iter().all(|lb| l.contains(lb)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn strategies(args: &Args, repo: &Path, runtime: &tokio::runtime::Runtime) {
    let (stable, canary) = (Server::backend(repo), Server::backend(repo));
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    let samples = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    for f in [
        "digits-cascade.yaml",
        "digits-ensemble.yaml",
        "digits-cached.yaml",
    ] {
        std::fs::copy(samples.join(f), policies.join(f)).unwrap();
    }
    let single = |route: &str, pool: &str, model: &str, version: u32, extra: &str| {
        let text = format!(
            "version: 1\nroute: {route}\ntargets:\n  t: {{ backend: {pool}, model: {model}, version: {version} }}\n  mlp-v2: {{ backend: canary, model: digits_mlp, version: 2 }}\ndefault: t\ndeadline: 250ms\n{extra}"
        );
        std::fs::write(policies.join(format!("{route}.yaml")), text).unwrap();
    };
    single("mlp-v1", "stable", "digits_mlp", 1, "");
    single(
        "mlp-v1-shadowed",
        "stable",
        "digits_mlp",
        1,
        "shadow: { target: mlp-v2, percent: 100, max_in_flight: 1024 }\n",
    );
    single("mlp-v2", "canary", "digits_mlp", 2, "");
    single("linear", "stable", "digits_linear", 1, "");
    std::fs::write(
        dir.path().join("gateway.yaml"),
        format!(
            "listen: {{ http: 127.0.0.1:0, grpc: 127.0.0.1:0, admin: 127.0.0.1:0 }}\npolicies: policies\nbackends:\n  stable: {{ endpoints: [\"{}\"] }}\n  canary: {{ endpoints: [\"{}\"] }}\nreload: {{ watch: false }}\n",
            stable.addr("grpc"),
            canary.addr("grpc")
        ),
    )
    .unwrap();
    let gateway = Server::start(&[
        "gateway",
        "--config",
        dir.path().join("gateway.yaml").to_str().unwrap(),
    ]);
    let (grpc, admin) = (gateway.addr("grpc"), gateway.addr("admin"));
    println!(
        "\nstrategies: the sample strategy routes through `switchyard gateway`, held-out rows, two backends on this machine"
    );
    println!(
        "\n| route | concurrency | req/s | p50 µs | p90 µs | p99 µs | errors | gateway CPU µs/req | backends CPU µs/req |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    let run = |route: &str, c: usize, requests: Vec<ModelInferRequest>| {
        let cpu = || {
            (
                gateway.cpu_seconds(),
                stable.cpu_seconds() + canary.cpu_seconds(),
            )
        };
        let before = cpu();
        let r = runtime.block_on(closed_loop(grpc, c, args.warmup, args.duration, requests));
        let after = cpu();
        // Warm-up requests used CPU too: divide by all requests sent, estimated from the rate.
        let sent = r.throughput() * (args.warmup + args.duration).as_secs_f64();
        let per = |a: f64, b: f64| (a - b) * 1e6 / sent.max(1.0);
        println!(
            "{} {:.0} | {:.0} |",
            r.row(route, c),
            per(after.0, before.0),
            per(after.1, before.1)
        );
        r
    };
    let p = |r: &Report, q: f64| r.latency_us.value_at_quantile(q) as f64;
    let mut rows = Vec::new();
    for &c in &args.concurrency {
        let single = run("mlp-v1", c, holdout_requests("mlp-v1"));
        let dropped_before = scrape(
            admin,
            "switchyard_shadow_requests_total",
            &["result=\"dropped\""],
        );
        let shadowed = run(
            "mlp-v1 + 100% shadow to mlp-v2",
            c,
            holdout_requests("mlp-v1-shadowed"),
        );
        let dropped = scrape(
            admin,
            "switchyard_shadow_requests_total",
            &["result=\"dropped\""],
        ) - dropped_before;
        rows.push(format!(
            "| shadow | {c} | throughput {} | p50 {} | p99 {} (added p99 {:+.1}%) | {dropped} copies dropped |",
            ratio(shadowed.throughput(), single.throughput()),
            ratio(p(&shadowed, 0.5), p(&single, 0.5)),
            ratio(p(&shadowed, 0.99), p(&single, 0.99)),
            (p(&shadowed, 0.99) / p(&single, 0.99) - 1.0) * 100.0,
        ));

        let mlp = run("mlp-v2 (always the MLP)", c, holdout_requests("mlp-v2"));
        let stage = |s: &str, outcome: &str| {
            scrape(
                admin,
                "switchyard_cascade_stage_total",
                &[
                    "route=\"digits-cascade\"",
                    &format!("stage=\"{s}\""),
                    &format!("outcome=\"{outcome}\""),
                ],
            )
        };
        let before = (
            stage("1", "answered") + stage("1", "escalated") + stage("1", "failed"),
            stage("2", "answered") + stage("2", "failed"),
        );
        let cascade = run(
            "digits-cascade (linear -> mlp-v2)",
            c,
            holdout_requests("digits-cascade"),
        );
        let after = (
            stage("1", "answered") + stage("1", "escalated") + stage("1", "failed"),
            stage("2", "answered") + stage("2", "failed"),
        );
        let mlp_calls = (after.1 - before.1) / (after.0 - before.0).max(1.0);
        rows.push(format!(
            "| cascade vs always-MLP | {c} | throughput {} | p50 {} | p99 {} | MLP calls per request {mlp_calls:.3} (always-MLP: 1) |",
            ratio(cascade.throughput(), mlp.throughput()),
            ratio(p(&cascade, 0.5), p(&mlp, 0.5)),
            ratio(p(&cascade, 0.99), p(&mlp, 0.99)),
        ));

        let linear = run("linear", c, holdout_requests("linear"));
        let ensemble = run(
            "digits-ensemble (mean of 3)",
            c,
            holdout_requests("digits-ensemble"),
        );
        let members = [&single, &mlp, &linear];
        let slowest = members.iter().map(|r| p(r, 0.5)).fold(0.0, f64::max);
        let sum: f64 = members.iter().map(|r| p(r, 0.5)).sum();
        rows.push(format!(
            "| ensemble of 3 vs members alone | {c} | throughput vs mlp-v1 {} | p50 vs slowest member {} | p50 vs sum of members {} | p99 vs mlp-v1 {} |",
            ratio(ensemble.throughput(), single.throughput()),
            ratio(p(&ensemble, 0.5), slowest),
            ratio(p(&ensemble, 0.5), sum),
            ratio(p(&ensemble, 0.99), p(&single, 0.99)),
        ));

        // One request repeated: every call after the first is a hit.
        let one = holdout_requests("digits-cached").swap_remove(0);
        let mut uncached_one = one.clone();
        uncached_one.model_name = "mlp-v1".to_owned();
        let uncached = run("mlp-v1 (same request, uncached)", c, vec![uncached_one]);
        let cached = run("digits-cached (cache hits)", c, vec![one]);
        rows.push(format!(
            "| cache hit vs uncached | {c} | throughput {} | p50 {} | p99 {} | |",
            ratio(cached.throughput(), uncached.throughput()),
            ratio(p(&cached, 0.5), p(&uncached, 0.5)),
            ratio(p(&cached, 0.99), p(&uncached, 0.99)),
        ));
    }
    println!(
        "\n| comparison | concurrency | throughput ratio | p50 ratio | p99 ratio | note |\n| --- | --- | --- | --- | --- | --- |"
    );
    for r in rows {
        println!("{r}");
    }
}
