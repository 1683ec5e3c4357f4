//! Closed-loop gRPC load generator for Switchyard: fixed concurrency, warm-up, duration;
//! reports throughput and p50/p90/p99 latency (HDR histograms), side by side in one run.
//!
//! Scenarios (`--scenario`, default `all`):
//! * `backend`: `digits_mlp` batch 1 against `switchyard backend` (the release binary,
//!   started here on an ephemeral port) at each concurrency, then the in-process runtime
//!   at every batch size, whose best is the ceiling a server can approach; prints the
//!   ratio server / in-process.
//! * `proxies`: the same load against the backend directly and through each proxy in
//!   front of it, interleaved per concurrency: `switchyard gateway` (a single-target route
//!   named like the model), nginx `grpc_pass`, HAProxy and Envoy (configs in
//!   `benches/loadgen/`; a peer that is not installed is skipped, `benches/loadgen/install-peers.sh`
//!   installs them). Prints throughput as a ratio to direct, latency, and the CPU per
//!   request of every process (`/proc`, requests counted by the backend's metrics); then
//!   each proxy under callgrind: instructions and allocations per request.
//!   `--pin` reproduces issue 9's set-up: client on CPU 0, backend and proxy on CPU 1,
//!   one worker per proxy. `--client perf_analyzer` drives the points with Triton's
//!   perf_analyzer (`tests/interop/perf_analyzer/install.sh`) instead of this process.
//!   `--reps N` repeats the interleaved sequence; `--callgrind N` sets the requests
//!   counted (0: no callgrind).
//! * `strategies`: two backends and `switchyard gateway` with the sample strategy routes,
//!   over the held-out rows, interleaved per concurrency: single target vs the same with a
//!   100% shadow; always-MLP vs the cascade (and MLP calls per request, from the gateway's
//!   metrics); each ensemble member alone vs the ensemble of three; the same request
//!   uncached vs served from the cache.
//! * `rollout`: a route under rollout against the same route without one (throughput,
//!   gateway CPU and, with `--callgrind`, instructions per request), then the rollback
//!   latency of a confidently wrong candidate (`digits_shuffled`), from the answers: the
//!   gate's evidence complete → the rollback → the last request that reached it
//!   (`benches/loadgen/rollout.rs`).
//! * `pipeline`: the gateway's cost per pipeline step: each step's model called directly,
//!   the sample `digits-pipeline` route and a single-target route through the gateway,
//!   interleaved per concurrency and rep (`benches/loadgen/pipeline.rs`).
//! * `balance`: three replicas of one model behind one pool, one slowed, under each
//!   balance mode (`round_robin`, `least_request`, `queue_aware`): each replica's share,
//!   throughput and p50/p99, interleaved; then the reload time of a `backends:` change
//!   under load (`benches/loadgen/balance.rs`).
//! * `observability`: the access log and tracing (ratio 0, and every request exported to
//!   an OTLP receiver run here) against a gateway with neither, on a single-target route
//!   and the cascade: throughput ratios, p50/p99 and, with `--callgrind`, instructions per
//!   request (`benches/loadgen/observability.rs`).
//!
//! Run: `cargo bench --bench loadgen -- [--scenario all|backend|proxies|strategies|rollout|pipeline|balance|observability] [--duration 5]
//! [--warmup 1] [--concurrency 1,8,32] [--pin] [--client loadgen|perf_analyzer] [--reps 1]
//! [--workers N] [--callgrind 1000]`
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

#[path = "loadgen/balance.rs"]
mod balance;
#[path = "loadgen/callgrind.rs"]
mod callgrind;
#[path = "loadgen/observability.rs"]
mod observability;
#[path = "loadgen/peers.rs"]
mod peers;
#[path = "loadgen/pipeline.rs"]
mod pipeline;
#[path = "loadgen/rollout.rs"]
mod rollout;

struct Args {
    scenario: String,
    duration: Duration,
    warmup: Duration,
    concurrency: Vec<usize>,
    model: String,
    version: String,
    /// `proxies`: client on CPU 0, backend and proxy under test on CPU 1, one worker each.
    pin: bool,
    /// `proxies`: `loadgen` (this process) or `perf_analyzer`.
    client: String,
    /// `proxies`: workers of every proxy (default: 1 pinned, else one per core).
    workers: Option<usize>,
    /// `proxies`: times the whole interleaved sequence runs.
    reps: usize,
    /// `proxies`: requests counted under callgrind per proxy (0: none).
    callgrind: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        scenario: "all".to_owned(),
        duration: Duration::from_secs(5),
        warmup: Duration::from_secs(1),
        concurrency: vec![1, 8, 32],
        model: "digits_mlp".to_owned(),
        version: "1".to_owned(),
        pin: false,
        client: "loadgen".to_owned(),
        workers: None,
        reps: 1,
        callgrind: 1000,
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
            "--pin" => args.pin = true,
            "--client" => args.client = value(),
            "--workers" => args.workers = Some(value().parse().expect("a number")),
            "--reps" => args.reps = value().parse().expect("a number"),
            "--callgrind" => args.callgrind = value().parse().expect("a number"),
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

/// A gRPC client on its own connection to `addr`.
async fn client(addr: SocketAddr) -> GrpcInferenceServiceClient<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect");
    GrpcInferenceServiceClient::new(channel)
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
        let mut client = client(addr).await;
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
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        Self::start_with(&args)
    }

    /// `switchyard` with `args`, where a `taskset -c N` before the subcommand pins it.
    fn start_with(args: &[String]) -> Self {
        let mut argv: Vec<String> = Vec::new();
        let sub = args
            .iter()
            .position(|a| a == "backend" || a == "gateway")
            .unwrap_or(0);
        argv.extend(args[..sub].iter().cloned());
        argv.push(env!("CARGO_BIN_EXE_switchyard").into());
        argv.extend(args[sub..].iter().cloned());
        Self::start_program(&argv)
    }

    /// `argv[0]` with the rest as arguments; its first stdout line names its addresses.
    fn start_program(argv: &[String]) -> Self {
        use std::io::{BufRead, BufReader};
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
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
        Self::backend_with(repo, &[])
    }

    /// The same, run through `prefix` (`taskset -c N`).
    fn backend_with(repo: &Path, prefix: &[String]) -> Self {
        let mut args = prefix.to_vec();
        args.extend(
            [
                "backend",
                "--model-repository",
                repo.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
                "--metrics",
                "127.0.0.1:0",
            ]
            .map(String::from),
        );
        Self::start_with(&args)
    }

    /// CPU time (user + system) the process has used so far, in seconds.
    fn cpu_seconds(&self) -> f64 {
        peers::tree_cpu_seconds(self.child.id())
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

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "-".to_owned()
    }
}

/// The client that drives a `proxies` point.
#[derive(Clone, Copy, PartialEq)]
enum Client {
    /// This process's closed loop (tonic, one connection per worker).
    Loadgen,
    /// Triton's perf_analyzer (`tests/interop/perf_analyzer`), sync, one thread per stream.
    PerfAnalyzer,
}

/// One target at one concurrency: what the client saw, and the CPU each process used.
struct Point {
    throughput: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
    /// Requests the backend answered during the point (its `nv_inference_request_success`).
    served: f64,
    /// CPU seconds during the point: backend, proxy (none for direct), client.
    backend_cpu: f64,
    proxy_cpu: f64,
    client_cpu: f64,
}

impl Point {
    fn per_request_us(&self, cpu: f64) -> f64 {
        if self.served > 0.0 {
            cpu / self.served * 1e6
        } else {
            0.0
        }
    }
}

/// The perf_analyzer wrapper, when its install script has run.
fn perf_analyzer() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::var_os("PERF_ANALYZER_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/perf-analyzer"));
    dir.join("bin/perf_analyzer")
        .exists()
        .then(|| root.join("tests/interop/perf_analyzer/perf_analyzer"))
}

/// User + system seconds of a child that has exited but is not yet reaped: a zombie's
/// `/proc/<pid>/stat` still holds the times of all its threads. Waits for it to exit.
fn cpu_at_exit(child: &mut Child) -> f64 {
    let path = format!("/proc/{}/stat", child.id());
    loop {
        let stat = std::fs::read_to_string(&path).unwrap_or_default();
        let rest: Vec<&str> = stat
            .rsplit_once(") ")
            .map_or(vec![], |(_, r)| r.split(' ').collect());
        if rest.first().is_none_or(|state| *state == "Z") {
            let t = |i: usize| {
                rest.get(i)
                    .and_then(|f| f.parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            return (t(11) + t(12)) / 100.0;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One perf_analyzer run at `concurrency`: (throughput, p50 µs, p99 µs, its CPU seconds),
/// or its error output.
fn run_perf_analyzer(
    bin: &Path,
    addr: SocketAddr,
    args: &Args,
    concurrency: usize,
    prefix: &[String],
) -> Result<(f64, f64, f64, f64), String> {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("out.csv");
    let interval_ms = (args.duration.as_millis() / 3).max(500).to_string();
    let mut child = peers::launch(prefix, bin)
        .args([
            "-m",
            &args.model,
            "-x",
            &args.version,
            "-i",
            "grpc",
            "-b",
            "1",
        ])
        .arg("-u")
        .arg(addr.to_string())
        .arg("--concurrency-range")
        .arg(format!("{concurrency}:{concurrency}"))
        .args([
            "-p",
            &interval_ms,
            "--max-trials",
            "6",
            "--stability-percentage",
            "50",
        ])
        .arg("-f")
        .arg(&csv)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start perf_analyzer: {e}"))?;
    let stderr = child.stderr.take().unwrap();
    let errors = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let cpu = cpu_at_exit(&mut child);
    let status = child.wait().unwrap();
    let errors = errors.join().unwrap();
    let text = std::fs::read_to_string(&csv).unwrap_or_default();
    let mut lines = text.lines();
    let (Some(header), Some(row)) = (lines.next(), lines.next()) else {
        return Err(format!("perf_analyzer {status}: {}", errors.trim()));
    };
    let header: Vec<&str> = header.split(',').collect();
    let row: Vec<&str> = row.split(',').collect();
    let column = |name: &str| -> f64 {
        header
            .iter()
            .position(|h| *h == name)
            .and_then(|i| row.get(i)?.parse().ok())
            .unwrap_or(0.0)
    };
    Ok((
        column("Inferences/Second"),
        column("p50 latency"),
        column("p99 latency"),
        cpu,
    ))
}

/// The cores of this machine, and with `--pin` the one the client runs on and the one
/// the backend and the proxy under test share.
struct Placement {
    client: Option<usize>,
    server: Option<usize>,
}

impl Placement {
    fn prefix(cpu: Option<usize>) -> Vec<String> {
        cpu.map_or(vec![], |c| {
            vec!["taskset".into(), "-c".into(), c.to_string()]
        })
    }
}

/// The proxies under test, each in front of the same backend.
enum Proxy {
    Gateway(Server),
    Peer(peers::Peer),
}

impl Proxy {
    fn name(&self) -> &'static str {
        match self {
            Proxy::Gateway(_) => "switchyard gateway",
            Proxy::Peer(p) => p.name,
        }
    }
    fn addr(&self) -> SocketAddr {
        match self {
            Proxy::Gateway(g) => g.addr("grpc"),
            Proxy::Peer(p) => p.addr,
        }
    }
    fn pid(&self) -> u32 {
        match self {
            Proxy::Gateway(g) => g.child.id(),
            Proxy::Peer(p) => p.pid(),
        }
    }
}

/// A gateway config with one route named like the model (so that the same request and
/// perf_analyzer's metadata calls work on every target) to `backend`, in `dir`.
fn gateway_config(dir: &Path, args: &Args, backend: SocketAddr, workers: usize) -> PathBuf {
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    std::fs::write(
        dir.join("policies/bench.yaml"),
        format!(
            "version: 1\nroute: {m}\ntargets:\n  t: {{ backend: pool, model: {m}, version: {v} }}\ndefault: t\n",
            m = args.model,
            v = args.version
        ),
    )
    .unwrap();
    let path = dir.join("gateway.yaml");
    std::fs::write(
        &path,
        format!(
            "listen: {{ http: 127.0.0.1:0, grpc: 127.0.0.1:0, admin: 127.0.0.1:0 }}\npolicies: policies\nbackends:\n  pool: {{ endpoints: [\"{backend}\"] }}\nreload: {{ watch: false }}\nworkers: {workers}\n"
        ),
    )
    .unwrap();
    path
}

#[allow(clippy::too_many_arguments)]
fn measure(
    args: &Args,
    runtime: &tokio::runtime::Runtime,
    client: Client,
    placement: &Placement,
    backend: &Server,
    proxy: Option<&Proxy>,
    c: usize,
) -> Point {
    let addr = proxy.map_or(backend.addr("grpc"), Proxy::addr);
    let metrics = backend.addr("metrics");
    let served = || scrape(metrics, "nv_inference_request_success", &[]);
    let proxy_cpu = || proxy.map_or(0.0, |p| peers::tree_cpu_seconds(p.pid()));
    let backend_cpu = || peers::tree_cpu_seconds(backend.child.id());
    let (s0, b0, p0) = (served(), backend_cpu(), proxy_cpu());
    let (throughput, p50_us, p99_us, errors, client_cpu) = match client {
        Client::Loadgen => {
            let own0 = peers::tree_cpu_seconds(std::process::id());
            let r = runtime.block_on(closed_loop(
                addr,
                c,
                args.warmup,
                args.duration,
                vec![request(&args.model, &args.version, 1)],
            ));
            let own = peers::tree_cpu_seconds(std::process::id()) - own0;
            let q = |q: f64| r.latency_us.value_at_quantile(q) as f64;
            (r.throughput(), q(0.5), q(0.99), r.errors, own)
        }
        Client::PerfAnalyzer => {
            let bin = perf_analyzer().expect("perf_analyzer installed");
            match run_perf_analyzer(&bin, addr, args, c, &Placement::prefix(placement.client)) {
                Ok((t, p50, p99, cpu)) => (t, p50, p99, 0, cpu),
                Err(e) => {
                    println!("({e})");
                    (0.0, 0.0, 0.0, 1, 0.0)
                }
            }
        }
    };
    Point {
        throughput,
        p50_us,
        p99_us,
        errors,
        served: served() - s0,
        backend_cpu: backend_cpu() - b0,
        proxy_cpu: proxy_cpu() - p0,
        client_cpu,
    }
}

fn proxies(args: &Args, repo: &Path, runtime: &tokio::runtime::Runtime) {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let placement = if args.pin {
        assert!(cores >= 2, "--pin needs two cores");
        Placement {
            client: Some(0),
            server: Some(1),
        }
    } else {
        Placement {
            client: None,
            server: None,
        }
    };
    // Pinned, every proxy gets one worker on the server core; else one per core.
    let workers = args.workers.unwrap_or(if args.pin { 1 } else { cores });
    let client = match args.client.as_str() {
        "loadgen" => Client::Loadgen,
        "perf_analyzer" if perf_analyzer().is_some() => Client::PerfAnalyzer,
        "perf_analyzer" => {
            println!(
                "\n(perf_analyzer is not installed: run tests/interop/perf_analyzer/install.sh; using the loadgen client)"
            );
            Client::Loadgen
        }
        other => panic!("unknown --client {other}: loadgen or perf_analyzer"),
    };
    if let Some(cpu) = placement.client {
        // Threads started from here on (the tokio runtime's are already running and are
        // moved with -a) inherit the client core.
        let _ = Command::new("taskset")
            .args([
                "-a",
                "-p",
                "-c",
                &cpu.to_string(),
                &std::process::id().to_string(),
            ])
            .stdout(Stdio::null())
            .status();
    }
    let server_prefix = Placement::prefix(placement.server);
    let backend = Server::backend_with(repo, &server_prefix);
    let backend_addr = backend.addr("grpc");
    let dir = tempfile::tempdir().unwrap();
    let config = gateway_config(dir.path(), args, backend_addr, workers);
    let mut gateway_args = server_prefix.clone();
    gateway_args.extend([
        "gateway".into(),
        "--config".into(),
        config.display().to_string(),
    ]);
    let mut proxies = vec![Proxy::Gateway(Server::start_with(&gateway_args))];
    for (name, start) in [
        ("nginx", peers::Peer::nginx as fn(_, _, &_) -> _),
        ("haproxy", peers::Peer::haproxy),
        ("envoy", peers::Peer::envoy),
    ] {
        match start(backend_addr, workers, &server_prefix) {
            Some(p) => proxies.push(Proxy::Peer(p)),
            None => println!(
                "\n({name} not found or not starting: its column is skipped; benches/loadgen/install-peers.sh installs the peers)"
            ),
        }
    }
    println!(
        "\nproxies: one backend, each proxy in front of it, interleaved per concurrency; client {}; {}; every proxy with {workers} worker(s)",
        if client == Client::Loadgen {
            "loadgen (tonic)"
        } else {
            "Triton perf_analyzer"
        },
        if args.pin {
            "pinned: client on CPU 0, backend and proxy under test on CPU 1"
        } else {
            "not pinned (client, proxy and backend share every core)"
        }
    );
    println!(
        "\n| rep | target | concurrency | req/s | ratio to direct | p50 µs | p99 µs | errors | proxy CPU µs/req | backend CPU µs/req | client CPU µs/req |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    // (concurrency, target index: 0 = direct, then proxies) -> points over reps.
    let mut points: Vec<Vec<Vec<Point>>> = args
        .concurrency
        .iter()
        .map(|_| (0..=proxies.len()).map(|_| Vec::new()).collect())
        .collect();
    for rep in 1..=args.reps {
        for (ci, &c) in args.concurrency.iter().enumerate() {
            let mut direct_rate = 0.0;
            for (target, at) in points[ci].iter_mut().enumerate() {
                let proxy = target.checked_sub(1).map(|i| &proxies[i]);
                let p = measure(args, runtime, client, &placement, &backend, proxy, c);
                if proxy.is_none() {
                    direct_rate = p.throughput;
                }
                println!(
                    "| {rep} | {} | {c} | {:.0} | {} | {:.0} | {:.0} | {} | {} | {:.1} | {:.1} |",
                    proxy.map_or("direct", Proxy::name),
                    p.throughput,
                    ratio(p.throughput, direct_rate),
                    p.p50_us,
                    p.p99_us,
                    p.errors,
                    if proxy.is_some() {
                        format!("{:.1}", p.per_request_us(p.proxy_cpu))
                    } else {
                        "-".into()
                    },
                    p.per_request_us(p.backend_cpu),
                    p.per_request_us(p.client_cpu),
                );
                at.push(p);
            }
        }
    }
    let names: Vec<&str> = proxies.iter().map(Proxy::name).collect();
    let header = |what: &str| {
        println!(
            "\n{what}\n\n| concurrency | {} |\n| --- |{}",
            names.join(" | "),
            " --- |".repeat(names.len())
        )
    };
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    header("throughput as a ratio to the direct backend (mean over reps of each rep's ratio):");
    for (ci, &c) in args.concurrency.iter().enumerate() {
        let row: Vec<String> = (1..=proxies.len())
            .map(|t| {
                let ratios: Vec<f64> = points[ci][t]
                    .iter()
                    .zip(&points[ci][0])
                    .map(|(p, d)| p.throughput / d.throughput.max(1e-9))
                    .collect();
                format!("{:.2}", mean(&ratios))
            })
            .collect();
        println!("| {c} | {} |", row.join(" | "));
    }
    header(
        "CPU per request of the proxy process(es), µs (from /proc; requests counted by the backend):",
    );
    for (ci, &c) in args.concurrency.iter().enumerate() {
        let row: Vec<String> = (1..=proxies.len())
            .map(|t| {
                let us: Vec<f64> = points[ci][t]
                    .iter()
                    .map(|p| p.per_request_us(p.proxy_cpu))
                    .collect();
                format!("{:.1}", mean(&us))
            })
            .collect();
        println!("| {c} | {} |", row.join(" | "));
    }
    drop(proxies);
    if args.callgrind > 0 {
        instructions_per_request(args, runtime, &backend);
    }
}

/// Each proxy (the gateway, HAProxy, nginx; Envoy links its own allocator and is left
/// out) under callgrind, one at a time, unary gRPC at concurrency 1: instructions and
/// allocations per request over `--callgrind` requests after a warm-up.
fn instructions_per_request(args: &Args, runtime: &tokio::runtime::Runtime, backend: &Server) {
    if !callgrind::available() {
        println!("\n(valgrind not found: no instruction counts; install Debian's valgrind)");
        return;
    }
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/loadgen");
    std::fs::create_dir_all(&out).unwrap();
    let n = args.callgrind;
    println!(
        "\ninstructions per request under valgrind --tool=callgrind, one worker, {n} unary requests at concurrency 1 after 200 to warm up:\n\n| proxy | instructions / request | allocations / request | profile |\n| --- | --- | --- | --- |"
    );
    let backend_addr = backend.addr("grpc");
    let dir = tempfile::tempdir().unwrap();
    let prefix = callgrind::command(dir.path());
    let config = gateway_config(dir.path(), args, backend_addr, 1);
    let mut gateway_args = prefix.clone();
    gateway_args.extend([
        env!("CARGO_BIN_EXE_switchyard").into(),
        "gateway".into(),
        "--config".into(),
        config.display().to_string(),
    ]);
    let started: Vec<(&str, Option<Proxy>)> = vec![
        (
            "gateway",
            Some(Proxy::Gateway(Server::start_program(&gateway_args))),
        ),
        (
            "haproxy",
            peers::Peer::haproxy(backend_addr, 1, &prefix).map(Proxy::Peer),
        ),
        (
            "nginx",
            peers::Peer::nginx(backend_addr, 1, &prefix).map(Proxy::Peer),
        ),
    ];
    for (short, proxy) in started {
        let Some(proxy) = proxy else { continue };
        let request = request(&args.model, &args.version, 1);
        let addr = proxy.addr();
        let run = |count: usize| {
            runtime.block_on(async {
                let mut client = client(addr).await;
                for _ in 0..count {
                    client.model_infer(request.clone()).await.expect("infer");
                }
            })
        };
        run(200);
        callgrind::instrument_on(proxy.pid());
        run(n);
        let count = callgrind::dump(proxy.pid(), dir.path());
        let keep = out.join(format!("callgrind.out.{short}"));
        let _ = std::fs::copy(&count.file, &keep);
        println!(
            "| {} | {:.0} | {:.1} | {} |",
            proxy.name(),
            count.instructions as f64 / n as f64,
            count.allocations as f64 / n as f64,
            keep.strip_prefix(env!("CARGO_MANIFEST_DIR"))
                .unwrap_or(&keep)
                .display()
        );
    }
    println!("\n(`callgrind_annotate --inclusive=yes <profile>` shows where the instructions go)");
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
    if args.scenario == "rollout" || args.scenario == "all" {
        rollout::run(&args, &repo, &runtime);
    }
    if args.scenario == "pipeline" || args.scenario == "all" {
        pipeline::run(&args, &repo, &runtime);
    }
    if args.scenario == "balance" || args.scenario == "all" {
        balance::run(&args, &runtime);
    }
    if args.scenario == "observability" || args.scenario == "all" {
        observability::run(&args, &repo, &runtime);
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

/// Writes `dir/gateway.yaml` for a gateway on ephemeral ports in front of two backends
/// (pools `stable` and `canary`) with the policies of `dir/policies`, reloads off; returns
/// its path.
fn two_pool_config(dir: &Path, stable: &Server, canary: &Server) -> String {
    let path = dir.join("gateway.yaml");
    std::fs::write(
        &path,
        format!(
            "listen: {{ http: 127.0.0.1:0, grpc: 127.0.0.1:0, admin: 127.0.0.1:0 }}\npolicies: policies\nbackends:\n  stable: {{ endpoints: [\"{}\"] }}\n  canary: {{ endpoints: [\"{}\"] }}\nreload: {{ watch: false }}\n",
            stable.addr("grpc"),
            canary.addr("grpc")
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_owned()
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
    let config = two_pool_config(dir.path(), &stable, &canary);
    let gateway = Server::start(&["gateway", "--config", &config]);
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
