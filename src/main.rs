//! The `switchyard` binary: parses the command line and hands off to the crates
//! (`backend` runs `switchyard-backend`; the gateway commands come with the gateway).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use switchyard_backend::{Backend, BackendConfig, RuntimeKind};
use tokio::net::TcpListener;

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
    /// Serve a Triton-style model repository over the KServe v2 gRPC protocol.
    Backend(BackendArgs),
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
    /// Largest gRPC message accepted or sent (bytes, or with a suffix).
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    max_message_size: u64,
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
            Command::Backend(args) => backend(args).await,
        }
    })
}

async fn backend(args: BackendArgs) -> Result<()> {
    let mut config = BackendConfig::new(&args.model_repository);
    config.repository.max_model_size = args.max_model_size;
    config.repository.default_runtime = args.runtime;
    config.repository.onnxruntime_lib = args.onnxruntime_lib;
    config.max_message_size =
        usize::try_from(args.max_message_size).context("--max-message-size")?;
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
