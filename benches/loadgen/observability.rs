//! The `observability` scenario: what the access log and tracing cost a request.
//!
//! Two backends and one `switchyard gateway` per setting, each with a single-target route
//! (`mlp`: digits_mlp on one backend) and the sample cascade (`digits-cascade`: a span
//! per stage and attempt when traced): nothing on (the default), `access_log` to a file,
//! `tracing` with `sample_ratio: 0` (the tracer on, no trace recorded: the cost of the
//! decision and the context handed to the backends), and `tracing` with every request
//! recorded, exported to an OTLP receiver this process runs (built on
//! `opentelemetry-proto`, counting what it is sent). Interleaved closed-loop points per
//! concurrency and rep over the held-out rows; throughput as a ratio to the default, and
//! p50/p99. With `--callgrind N`, each gateway's instructions per request on both routes.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

use super::{Args, Report, Server, callgrind, closed_loop, holdout_requests, ratio};

/// Counts the spans it receives.
#[derive(Debug, Default, Clone)]
struct Receiver {
    spans: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let n: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.spans.fetch_add(n as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn receiver(runtime: &tokio::runtime::Runtime) -> (Receiver, SocketAddr) {
    let receiver = Receiver::default();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    runtime.spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (receiver, addr)
}

pub(super) fn run(args: &Args, repo: &Path, runtime: &tokio::runtime::Runtime) {
    let (stable, canary) = (Server::backend(repo), Server::backend(repo));
    let (received, otlp) = receiver(runtime);
    let dir = tempfile::tempdir().unwrap();
    let settings: [(&str, String); 4] = [
        ("off (default)", String::new()),
        (
            "access_log to a file",
            format!(
                "access_log: {{ path: {} }}\n",
                dir.path().join("access.log").display()
            ),
        ),
        (
            "tracing, sample_ratio 0",
            format!("tracing: {{ otlp_endpoint: \"http://{otlp}\", sample_ratio: 0.0 }}\n"),
        ),
        (
            "tracing, every request",
            format!(
                "tracing: {{ otlp_endpoint: \"http://{otlp}\", sample_ratio: 1.0, max_queue: 65536 }}\n"
            ),
        ),
    ];
    let samples = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let configs: Vec<String> = settings
        .iter()
        .enumerate()
        .map(|(i, (_, extra))| {
            let at = dir.path().join(format!("g{i}"));
            let policies = at.join("policies");
            std::fs::create_dir_all(&policies).unwrap();
            std::fs::copy(
                samples.join("digits-cascade.yaml"),
                policies.join("digits-cascade.yaml"),
            )
            .unwrap();
            std::fs::write(
                policies.join("mlp.yaml"),
                "version: 1\nroute: mlp\ntargets:\n  mlp: { backend: stable, model: digits_mlp, version: 1 }\ndefault: mlp\ndeadline: 250ms\n",
            )
            .unwrap();
            let config = super::two_pool_config(&at, &stable, &canary);
            let mut text = std::fs::read_to_string(&config).unwrap();
            text.push_str(extra);
            std::fs::write(&config, text).unwrap();
            config
        })
        .collect();
    let gateways: Vec<Server> = configs
        .iter()
        .map(|c| Server::start(&["gateway", "--config", c]))
        .collect();

    println!(
        "\nobservability: the access log and tracing against the default, one gateway each, held-out rows; spans go to an OTLP receiver in this process"
    );
    println!(
        "\n| setting | route | concurrency | req/s | p50 µs | p90 µs | p99 µs | errors |\n| --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    let mut rows = Vec::new();
    for &c in &args.concurrency {
        for rep in 0..args.reps {
            for route in ["mlp", "digits-cascade"] {
                let reports: Vec<Report> = gateways
                    .iter()
                    .zip(&settings)
                    .map(|(g, (label, _))| {
                        let r = runtime.block_on(closed_loop(
                            g.addr("grpc"),
                            c,
                            args.warmup,
                            args.duration,
                            holdout_requests(route),
                        ));
                        println!("{}", r.row(&format!("{label} | {route}"), c));
                        r
                    })
                    .collect();
                let base = reports[0].throughput();
                let p50 = |r: &Report| r.latency_us.value_at_quantile(0.5);
                rows.push(format!(
                    "| {route} | {c} | {} | {} | {} | {} | {} / {} / {} / {} |",
                    rep + 1,
                    ratio(reports[1].throughput(), base),
                    ratio(reports[2].throughput(), base),
                    ratio(reports[3].throughput(), base),
                    p50(&reports[0]),
                    p50(&reports[1]),
                    p50(&reports[2]),
                    p50(&reports[3]),
                ));
            }
        }
    }
    println!(
        "\nthroughput against the default (same route, concurrency and rep):\n\n| route | concurrency | rep | access_log | tracing, ratio 0 | tracing, every request | p50 µs: off / log / ratio 0 / every |\n| --- | --- | --- | --- | --- | --- | --- |"
    );
    for r in rows {
        println!("{r}");
    }
    // Give the batch processor its last 500 ms, then report what arrived.
    std::thread::sleep(std::time::Duration::from_secs(1));
    println!(
        "\nspans received by the OTLP receiver: {} (the traced gateway's; the backends here do not trace)",
        received.spans.load(Ordering::Relaxed)
    );
    drop(gateways);
    if args.callgrind > 0 {
        for (i, ((label, _), config)) in settings.iter().zip(&configs).enumerate() {
            callgrind::per_route(
                args.callgrind,
                runtime,
                dir.path(),
                config,
                &["mlp", "digits-cascade"],
                &format!("observability-{i}"),
                label,
            );
        }
    }
}
