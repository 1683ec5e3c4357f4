//! The `switchyard` binary: parses the command line and hands off to the crates. `up` runs
//! the bundled backends and the gateway together; `gateway` and `backend` run one each;
//! `check` and `explain` are the policy linter and dry run; `rollout` drives canary
//! rollouts through the admin API; `batch` scores a data set through a route or a model.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use switchyard_backend::{Backend, BackendConfig, RuntimeKind};
use tokio::net::TcpListener;

mod batch;
mod rollout;

#[derive(Debug, Parser)]
#[command(
    name = "switchyard",
    version,
    about = "Multi-model inference gateway and traffic router"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the bundled backends on the sample models and the gateway in front of them.
    Up(UpArgs),
    /// Run the gateway: KServe v2 REST and gRPC routed by the policies.
    Gateway(GatewayArgs),
    /// Serve a Triton-style model repository over the KServe v2 gRPC protocol.
    Backend(BackendArgs),
    /// Parse, validate and compile a policy folder as a reload would; print every problem.
    Check(CheckArgs),
    /// Show which plan and target a request with these headers would get, and why.
    Explain(ExplainArgs),
    /// Canary rollouts of a running gateway: status, pause, resume, promote, abort, finish.
    Rollout(rollout::RolloutArgs),
    /// Score a data set (JSONL, CSV, NumPy, Parquet) through a route, a backend or Triton:
    /// batched, bounded concurrency, retries, a checkpoint to resume from, progress.
    Batch(Box<batch::BatchArgs>),
}

#[derive(Debug, clap::Args)]
struct UpArgs {
    /// The deployment file; a backend is started on each endpoint of its pools.
    #[arg(long, default_value = "config/gateway.yaml")]
    config: PathBuf,
    /// The model repository the bundled backends serve.
    #[arg(long, default_value = "backends/model_repository")]
    model_repository: PathBuf,
}

#[derive(Debug, clap::Args)]
struct GatewayArgs {
    /// The deployment file (listeners, policy folder, backend pools).
    #[arg(long, default_value = "config/gateway.yaml")]
    config: PathBuf,
}

#[derive(Debug, clap::Args)]
struct CheckArgs {
    /// The deployment file (for backend names and defaults).
    #[arg(long, default_value = "config/gateway.yaml")]
    config: PathBuf,
    /// The policy folder to check (default: the one the deployment file names).
    dir: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct ExplainArgs {
    /// The route a client would call.
    route: String,
    /// A request header, `name:value`; repeat for several.
    #[arg(short = 'H', long = "header", value_name = "NAME:VALUE")]
    headers: Vec<String>,
    /// The request's model_version (a release or Triton version pins a target).
    #[arg(long, default_value = "")]
    model_version: String,
    /// The deployment file.
    #[arg(long, default_value = "config/gateway.yaml")]
    config: PathBuf,
    /// The policy folder (default: the one the deployment file names).
    #[arg(long)]
    policies: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct BackendArgs {
    /// Model repository: <DIR>/<model>/config.pbtxt and <DIR>/<model>/<version>/model.onnx.
    #[arg(long, value_name = "DIR")]
    model_repository: PathBuf,
    /// gRPC listen address (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8001")]
    listen: SocketAddr,
    /// Prometheus /metrics listen address.
    #[arg(long, default_value = "127.0.0.1:8002")]
    metrics: SocketAddr,
    /// Refuse model files larger than this (bytes, or with a KiB/MiB/GiB suffix).
    #[arg(long, default_value = "10GiB", value_parser = parse_size)]
    max_model_size: u64,
    /// Runtime for models whose config.pbtxt does not pick one: tract or onnxruntime.
    #[arg(long, default_value = "tract", value_parser = parse_runtime)]
    runtime: RuntimeKind,
    /// Path of libonnxruntime.so for the onnxruntime runtime (default: $ORT_DYLIB_PATH).
    #[arg(long, value_name = "PATH")]
    onnxruntime_lib: Option<PathBuf>,
    /// Largest gRPC request accepted (bytes, or with a suffix): the gateway's default body
    /// limit (16 MiB) and 64 KiB for the fields it rewrites. A ModelInferRequest that would
    /// take over 8 × its size + 1 MiB once decoded is refused too (RESOURCE_EXHAUSTED).
    #[arg(long, alias = "max-message-size", default_value = "16448KiB", value_parser = parse_size)]
    max_request_size: u64,
    /// Input bytes the requests of all models may hold at once, queued or running (bytes,
    /// or with a suffix); one more is refused with RESOURCE_EXHAUSTED.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    max_queue_bytes: u64,
    /// Largest gRPC response sent (bytes, or with a suffix).
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    max_response_size: u64,
    /// Who may load and unload models (Triton's --model-control-mode): `none` refuses
    /// RepositoryModelLoad/Unload, `explicit` serves them to callers presenting the token
    /// of --model-control-token-file as `authorization: Bearer <token>`.
    #[arg(long, default_value = "none", value_parser = ["none", "explicit"])]
    model_control_mode: String,
    /// A file holding the model-control token (needed with --model-control-mode explicit).
    #[arg(long, value_name = "PATH")]
    model_control_token_file: Option<PathBuf>,
    /// Export spans (an inference's, its queue wait's and compute's, continuing the
    /// caller's `traceparent`) to this OTLP/gRPC receiver, e.g. http://127.0.0.1:4317.
    /// Default: no tracing.
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// The share of traces started here that are recorded (calls with a `traceparent`
    /// follow their caller's sampling flag).
    #[arg(long, default_value_t = 1.0)]
    trace_sample_ratio: f64,
    /// `service.name` of the spans.
    #[arg(long, default_value = "switchyard-backend")]
    trace_service_name: String,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Up(args) => up(args).await,
            Command::Gateway(args) => gateway(args).await,
            Command::Backend(args) => backend(args).await,
            Command::Check(args) => check(args),
            Command::Explain(args) => explain(args),
            Command::Rollout(args) => {
                let config = load_config(&args_config(&args))?;
                rollout::run(args, &config)
            }
            Command::Batch(args) => match batch::run(*args).await? {
                0 => Ok(()),
                code => std::process::exit(code),
            },
        }
    })
}

async fn backend(args: BackendArgs) -> Result<()> {
    let mut config = BackendConfig::new(&args.model_repository);
    config.repository.max_model_size = args.max_model_size;
    config.repository.default_runtime = args.runtime;
    config.repository.onnxruntime_lib = args.onnxruntime_lib;
    config.repository.max_queue_bytes = args.max_queue_bytes;
    config.tracing = args
        .otlp_endpoint
        .map(|endpoint| switchyard_proto::trace::Settings {
            endpoint,
            sample_ratio: args.trace_sample_ratio,
            service_name: args.trace_service_name,
            max_queue: 4096,
        });
    config.max_request_size =
        usize::try_from(args.max_request_size).context("--max-request-size")?;
    config.max_response_size =
        usize::try_from(args.max_response_size).context("--max-response-size")?;
    config.model_control = match (
        args.model_control_mode.as_str(),
        &args.model_control_token_file,
    ) {
        ("explicit", Some(file)) => {
            let token = std::fs::read_to_string(file)
                .with_context(|| format!("--model-control-token-file {}", file.display()))?
                .trim()
                .to_owned();
            anyhow::ensure!(
                token.len() >= 16,
                "--model-control-token-file {}: the token must be at least 16 characters",
                file.display()
            );
            switchyard_backend::ModelControl::Explicit { token }
        }
        ("explicit", None) => anyhow::bail!(
            "--model-control-mode explicit needs --model-control-token-file: a token callers present to load and unload models"
        ),
        _ => switchyard_backend::ModelControl::None,
    };
    let backend = Backend::load(config)
        .await
        .with_context(|| format!("loading {}", args.model_repository.display()))?;
    let grpc = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let metrics = TcpListener::bind(args.metrics)
        .await
        .with_context(|| format!("binding {}", args.metrics))?;
    // One machine-readable line, so scripts and tests can find ports chosen by the OS.
    println!(
        "switchyard backend listening grpc={} metrics={}",
        grpc.local_addr()?,
        metrics.local_addr()?
    );
    backend
        .serve(grpc, Some(metrics), shutdown_signal())
        .await?;
    Ok(())
}

fn load_config(path: &std::path::Path) -> Result<switchyard_config::GatewayConfig> {
    switchyard_config::load_gateway_config(path).map_err(|d| anyhow::anyhow!("{d}"))
}

async fn gateway(args: GatewayArgs) -> Result<()> {
    let config = load_config(&args.config)?;
    let gateway = switchyard_gateway::Gateway::new(config.clone())?;
    let listeners = switchyard_gateway::Listeners::bind(&config)?;
    println!(
        "switchyard gateway listening http={} grpc={} admin={}",
        listeners.http_addr(),
        listeners.grpc_addr(),
        listeners.admin_addr()
    );
    spawn_sighup_reload(gateway.clone());
    gateway
        .serve(listeners, shutdown_signal(), config.limits.shutdown_grace.0)
        .await?;
    Ok(())
}

/// SIGHUP reloads the policies, as nginx does.
fn spawn_sighup_reload(gateway: switchyard_gateway::Gateway) {
    tokio::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        while hup.recv().await.is_some() {
            let _ = gateway.reload("SIGHUP").await;
        }
    });
}

async fn up(args: UpArgs) -> Result<()> {
    let config = load_config(&args.config)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut tasks = Vec::new();
    let mut started = Vec::new();
    for (pool, backend) in &config.backends {
        for endpoint in &backend.value.endpoints {
            let endpoint = endpoint.address();
            let listener = TcpListener::bind(endpoint).await.with_context(|| {
                format!("starting the bundled backend for pool '{pool}' on {endpoint}")
            })?;
            let mut backend_config = BackendConfig::new(&args.model_repository);
            // The bundled backends trace to the gateway's receiver, as their own service.
            backend_config.tracing =
                config
                    .tracing
                    .as_ref()
                    .map(|t| switchyard_proto::trace::Settings {
                        endpoint: t.otlp_endpoint.clone(),
                        sample_ratio: t.sample_ratio,
                        service_name: "switchyard-backend".into(),
                        max_queue: t.max_queue,
                    });
            let loaded = Backend::load(backend_config)
                .await
                .with_context(|| format!("loading {}", args.model_repository.display()))?;
            started.push(format!("{pool}={endpoint}"));
            tasks.push(tokio::spawn(loaded.serve(
                listener,
                None,
                stopped(stop_rx.clone()),
            )));
        }
    }
    let gateway = switchyard_gateway::Gateway::new(config.clone())?;
    let listeners = switchyard_gateway::Listeners::bind(&config)?;
    let (http, grpc, admin) = (
        listeners.http_addr(),
        listeners.grpc_addr(),
        listeners.admin_addr(),
    );
    println!(
        "switchyard up listening http={http} grpc={grpc} admin={admin} backends={}",
        started.join(",")
    );
    println!();
    println!("  KServe v2 REST   http://{http}/v2/models/digits   (gRPC on {grpc})");
    println!("  dashboard        http://{admin}/");
    println!("  metrics, admin   http://{admin}/metrics   http://{admin}/admin/policy");
    println!(
        "  policies         {}  (edit a file: the gateway reloads it)",
        config.policies.display()
    );
    println!();
    println!(
        "  try: curl -s -H 'x-user-id: alice' -d @backends/sample_data/request.json http://{http}/v2/models/digits/infer"
    );
    println!();
    spawn_sighup_reload(gateway.clone());
    gateway
        .serve(listeners, shutdown_signal(), config.limits.shutdown_grace.0)
        .await?;
    let _ = stop_tx.send(true);
    for t in tasks {
        t.await??;
    }
    Ok(())
}

fn check(args: CheckArgs) -> Result<()> {
    let config = load_config(&args.config)?;
    let dir = args.dir.unwrap_or_else(|| config.policies.clone());
    match switchyard_gateway::routing::load(&dir, &config) {
        Ok(table) => {
            println!(
                "{}: ok, {} route(s): {}",
                dir.display(),
                table.names().len(),
                table.names().join(", ")
            );
            Ok(())
        }
        Err(diagnostics) => {
            eprintln!("{diagnostics}");
            eprintln!(
                "{}: {} problem(s); nothing would be applied",
                dir.display(),
                diagnostics.0.len()
            );
            std::process::exit(1);
        }
    }
}

fn explain(args: ExplainArgs) -> Result<()> {
    let config = load_config(&args.config)?;
    let dir = args.policies.unwrap_or_else(|| config.policies.clone());
    let table =
        switchyard_gateway::routing::load(&dir, &config).map_err(|d| anyhow::anyhow!("{d}"))?;
    let Some(route) = table.get(&args.route) else {
        anyhow::bail!(
            "no route '{}'; the policies define: {}",
            args.route,
            table.names().join(", ")
        );
    };
    let mut headers = http::HeaderMap::new();
    for h in &args.headers {
        let (name, value) = h
            .split_once(':')
            .with_context(|| format!("-H '{h}': expected name:value"))?;
        let name = http::HeaderName::from_bytes(name.trim().to_ascii_lowercase().as_bytes())
            .with_context(|| format!("-H '{h}': bad header name"))?;
        headers.append(
            name,
            http::HeaderValue::from_str(value.trim())
                .with_context(|| format!("-H '{h}': bad header value"))?,
        );
    }
    print!(
        "{}",
        switchyard_gateway::routing::explain(route, &headers, &args.model_version)
    );
    if let Some(rollout) = switchyard_gateway::explain_rollout(
        route,
        &headers,
        &args.model_version,
        config.state_dir.as_deref(),
    ) {
        print!("{rollout}");
    }
    Ok(())
}

fn args_config(args: &rollout::RolloutArgs) -> PathBuf {
    args.config().to_path_buf()
}

/// Completes on SIGTERM or SIGINT (Ctrl-C): both drain in-flight requests, then exit 0.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutdown signal received; draining in-flight requests");
}

fn parse_runtime(s: &str) -> Result<RuntimeKind, String> {
    RuntimeKind::from_name(s)
        .ok_or_else(|| format!("unknown runtime '{s}': expected tract or onnxruntime"))
}

/// Parses `1024`, `64KiB`, `10MiB`, `10GiB` (also KB/MB/GB as powers of 1000).
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits.parse().map_err(|_| {
        format!("'{s}' is not a size: expected a number of bytes like 1024 or 10GiB")
    })?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "unknown size unit '{other}' in '{s}': use B, KiB, MiB or GiB"
            ));
        }
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("size '{s}' is too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("2 MiB"), Ok(2 << 20));
        assert!(parse_size("ten").is_err());
        assert!(parse_size("1TiB").is_err());
    }
}
