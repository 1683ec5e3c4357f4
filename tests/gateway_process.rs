//! The gateway as its users run it: `switchyard gateway` (SIGHUP reload, SIGTERM exit 0),
//! `switchyard check` (exit status and every problem printed) and `switchyard explain`.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::gateway::*;
use common::*;

fn switchyard() -> Command {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_sigterm_exits_zero() {
    let backend = TestBackend::start(&sample_repo()).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    let policy = |default: &str| {
        format!(
            "version: 1\nroute: digits\ntargets:\n  v1: {{ backend: stable, model: digits_mlp, version: 1 }}\n  v2: {{ backend: stable, model: digits_mlp, version: 2 }}\ndefault: {default}\n"
        )
    };
    std::fs::write(dir.path().join("policies/digits.yaml"), policy("v1")).unwrap();
    std::fs::write(
        dir.path().join("gateway.yaml"),
        format!("listen: {{ http: 127.0.0.1:0, grpc: 127.0.0.1:0, admin: 127.0.0.1:0 }}\npolicies: policies\nbackends:\n  stable: {{ endpoints: [\"{}\"] }}\nreload: {{ watch: false }}\n", backend.addr),
    )
    .unwrap();
    let mut child = switchyard()
        .args(["gateway", "--config"])
        .arg(dir.path().join("gateway.yaml"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = |key: &str| -> std::net::SocketAddr {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .unwrap_or_else(|| panic!("{key} in {line:?}"))
            .parse()
            .unwrap()
    };
    let (grpc, http_addr) = (addr("grpc="), addr("http="));
    let mut client = client(grpc).await;
    let target = |resp: &tonic::Response<_>| {
        resp.metadata()
            .get("x-switchyard-target")
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned()
    };
    let resp = client
        .model_infer(infer_request("digits", "", &holdout().features[..1]))
        .await
        .unwrap();
    assert_eq!(target(&resp), "digits_mlp/1");

    std::fs::write(dir.path().join("policies/digits.yaml"), policy("v2")).unwrap();
    assert!(
        Command::new("kill")
            .args(["-HUP", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let mut reloaded = false;
    for _ in 0..100 {
        let resp = client
            .model_infer(infer_request("digits", "", &holdout().features[..1]))
            .await
            .unwrap();
        if target(&resp) == "digits_mlp/2" {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reloaded, "SIGHUP reloaded the policies");
    let r = http(http_addr, "GET", "/v2/health/ready", &[], b"").await;
    assert_eq!(r.header("x-switchyard-policy"), Some("2"));

    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[test]
fn check_prints_every_problem_and_fails() {
    let ok = switchyard()
        .args(["check", "--config", "config/gateway.yaml"])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("ok, "));

    let dir = tempfile::tempdir().unwrap();
    for name in ["zero-weight.yaml", "bad-regex.yaml", "unknown-backend.yaml"] {
        std::fs::copy(
            root().join("tests/policies/invalid").join(name),
            dir.path().join(name),
        )
        .unwrap();
    }
    let bad = switchyard()
        .args(["check", "--config", "config/gateway.yaml"])
        .arg(dir.path())
        .current_dir(root())
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    for words in [
        "zero-weight.yaml:8:",
        "got 0",
        "bad-regex.yaml:",
        "invalid regex",
        "unknown backend 'gpu'",
        "3 problem(s)",
    ] {
        assert!(stderr.contains(words), "{words:?} missing from:\n{stderr}");
    }
}

#[test]
fn explain_says_which_target_and_why() {
    let out = switchyard()
        .args(["explain", "digits", "-H", "x-user-id: qa-7"])
        .current_dir(root())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("rule 1: x-user-id starts with \"qa-\" [yes] -> MATCHES"),
        "{text}"
    );
    assert!(
        text.contains("target mlp-v2: model digits_mlp version 2 on backend canary"),
        "{text}"
    );
    let out = switchyard()
        .args(["explain", "digits", "-H", "x-user-id:alice"])
        .current_dir(root())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("sticky on x-user-id: 'alice' always gets the same target"),
        "{text}"
    );
    let out = switchyard()
        .args(["explain", "nope"])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no route 'nope'"));
}

/// `switchyard gateway --config CONFIG` as a child, and its gRPC address (from the first
/// line it prints).
fn gateway_child(config: &std::path::Path) -> (std::process::Child, std::net::SocketAddr) {
    let (child, addrs) = gateway_child_on(config);
    (child, addrs["grpc"])
}

/// `switchyard gateway --config CONFIG` as a child, and its addresses by name (`http`,
/// `grpc`, `admin`).
fn gateway_child_on(
    config: &std::path::Path,
) -> (
    std::process::Child,
    std::collections::HashMap<String, std::net::SocketAddr>,
) {
    let mut child = switchyard()
        .args(["gateway", "--config"])
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addrs: std::collections::HashMap<_, _> = line
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
        .collect();
    assert!(addrs.contains_key("grpc"), "grpc= in {line:?}");
    (child, addrs)
}

/// A gateway child whose route `route` (with `extra` policy lines) targets a pool nobody
/// listens on, with a 32 MiB body limit: only the gateway's own work costs memory.
fn gateway_on_a_dead_pool(
    route: &str,
    extra: &str,
) -> (
    tempfile::TempDir,
    std::process::Child,
    std::collections::HashMap<String, std::net::SocketAddr>,
) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::write(
        dir.path().join(format!("policies/{route}.yaml")),
        format!("version: 1\nroute: {route}\ntargets:\n  a: {{ backend: dead, model: digits_mlp, version: 1 }}\ndefault: a\n{extra}"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("gateway.yaml"),
        "listen: { http: 127.0.0.1:0, grpc: 127.0.0.1:0, admin: 127.0.0.1:0 }\npolicies: policies\nbackends:\n  dead: { endpoints: [\"127.0.0.1:1\"] }\nreload: { watch: false }\nlimits: { max_body_bytes: 32MiB }\n",
    )
    .unwrap();
    let (child, addrs) = gateway_child_on(&dir.path().join("gateway.yaml"));
    (dir, child, addrs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_mebibytes_of_empty_inputs_are_refused_before_anything_decodes_them() {
    // The cache key decoded the whole request: 2 bytes of an empty `inputs` entry became a
    // few hundred, and 16 MiB of them raised the gateway's peak by gigabytes. Now the walk
    // that checks the request adds up what it would take decoded and refuses it at the
    // edge, so no backend (ours or Triton) is handed it either. The route's pool is down,
    // so only the gateway's own work counts.
    let (_dir, mut child, addrs) = gateway_on_a_dead_pool("cached", "cache: { ttl: 1m }\n");
    let grpc = addrs["grpc"];
    let before = peak_rss(child.id());
    let size = 16 << 20;
    let mut body = vec![0x0a, 0x06];
    body.extend_from_slice(b"cached");
    body.extend(std::iter::repeat_n([0x2a, 0x00], (size - body.len()) / 2).flatten());
    let mut raw = raw_client(grpc).await;
    raw.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/inference.GRPCInferenceService/ModelInfer",
    );
    let status = raw
        .unary(tonic::Request::new(body), path, RawCodec)
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("once decoded"), "{status:?}");
    let grown = peak_rss(child.id()).saturating_sub(before);
    let _ = child.kill();
    let _ = child.wait();
    assert_peak_within("gateway, empty inputs", grown, size);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sixteen_mebibyte_json_tensor_costs_the_gateway_a_few_times_its_size() {
    // The JSON body was parsed into a tree of values (about 40 bytes a number) and then
    // flattened and converted: roughly 50 times the body at its peak. Now it is parsed
    // straight into the tensor's bytes, which go out as they are.
    let (_dir, mut child, addrs) = gateway_on_a_dead_pool("json", "");
    let before = peak_rss(child.id());
    let size: usize = 16 << 20;
    let head = r#"{"inputs":[{"name":"INPUT__0","datatype":"FP32","shape":["#;
    let n = (size - head.len() - 40) / 2;
    let mut body = format!("{head}{n}],\"data\":[");
    body.push_str(&"0,".repeat(n - 1));
    body.push_str("0]}]}");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addrs["http"]).await.unwrap();
    let request = format!(
        "POST /v2/models/json/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(request.as_bytes()).await.unwrap();
    s.write_all(body.as_bytes()).await.unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    let grown = peak_rss(child.id()).saturating_sub(before);
    let _ = child.kill();
    let _ = child.wait();
    assert_peak_within("gateway, a JSON tensor", grown, size);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_request_in_flight_finish_within_its_deadline() {
    // A request that takes 3 s on a route whose deadline is 20 s: SIGTERM stops new
    // connections, and the gateway waits for it (as long as the longest deadline in
    // force, at most limits.shutdown_grace) before it exits 0.
    let repo = patient_repo("patient", 1024, 3_000_000);
    let backend = TestBackend::start(repo.path()).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::write(
        dir.path().join("policies/patient.yaml"),
        "version: 1\nroute: patient\ntargets:\n  a: { backend: slow, model: patient, version: 1 }\ndefault: a\ndeadline: 20s\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("gateway.yaml"),
        format!("listen: {{ http: 127.0.0.1:0, grpc: 127.0.0.1:0, admin: 127.0.0.1:0 }}\npolicies: policies\nbackends:\n  slow: {{ endpoints: [\"{}\"] }}\nreload: {{ watch: false }}\n", backend.addr),
    )
    .unwrap();
    let (mut child, grpc) = gateway_child(&dir.path().join("gateway.yaml"));
    let mut client = client(grpc).await;
    let slow = tokio::spawn(async move {
        client
            .model_infer(infer_request("patient", "", &holdout().features[..1]))
            .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let answer = slow.await.unwrap();
    assert!(
        answer.is_ok(),
        "the request in flight was answered: {answer:?}"
    );
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
}
