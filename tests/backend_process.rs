//! The `switchyard backend` process: start-up line, graceful shutdown on SIGTERM (in-flight
//! requests finish, exit status 0), memory bounded by what a request sends.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    // Requests wait 600 ms for a batch to fill, so they are still in flight at SIGTERM.
    let repo = patient_repo("slow", 8, 600_000);

    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["backend", "--model-repository"])
        .arg(repo.path())
        .args(["--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let grpc = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("grpc="))
        .unwrap_or_else(|| panic!("no grpc= in {line:?}"))
        .parse()
        .unwrap();

    let data = std::sync::Arc::new(holdout());
    let mut in_flight = Vec::new();
    for i in 0..3 {
        let mut client = client(grpc).await;
        let data = data.clone();
        in_flight.push(tokio::spawn(async move {
            client
                .model_infer(infer_request("slow", "1", &data.features[i..i + 1]))
                .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    for request in in_flight {
        let resp = request
            .await
            .unwrap()
            .expect("in-flight requests finish during shutdown");
        assert_eq!(resp.into_inner().outputs[0].shape, vec![1, 10]);
    }
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0), "graceful shutdown exits 0");
    assert!(
        tokio::net::TcpStream::connect(grpc).await.is_err(),
        "the listener is closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_would_decode_to_gigabytes_is_refused_before_decoding() {
    // 16 MiB of empty `inputs` entries (2 bytes each on the wire, ~300 once prost decodes
    // them) passed the 64 MiB decode limit and raised the backend's peak by gigabytes.
    let backend = BackendProcess::start(&sample_repo(), "127.0.0.1:0".parse().unwrap());
    let before = peak_rss(backend.pid());
    let size = 16 << 20;
    let mut body = vec![0x0a, 0x0a];
    body.extend_from_slice(b"digits_mlp");
    body.extend(std::iter::repeat_n([0x2a, 0x00], (size - body.len()) / 2).flatten());
    let mut raw = raw_client(backend.addr).await;
    raw.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/inference.GRPCInferenceService/ModelInfer",
    );
    let status = raw
        .unary(tonic::Request::new(body), path.clone(), RawCodec)
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("once decoded"), "{status:?}");
    let grown = peak_rss(backend.pid()).saturating_sub(before);
    assert_peak_within("backend, empty inputs", grown, size);

    // A message prost cannot decode is the sender's fault, not the backend's: `id` sent
    // as a varint.
    raw.ready().await.unwrap();
    let status = raw
        .unary(
            tonic::Request::new(vec![0x18, 0x01]),
            path.clone(),
            RawCodec,
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("ModelInferRequest.id (field 3)"),
        "{status:?}"
    );

    // Over the request limit (16 MiB + 64 KiB by default, aligned with the gateway's).
    let big = [0x3au8, 0x00].repeat(9 << 20);
    raw.ready().await.unwrap();
    let status = raw
        .unary(tonic::Request::new(big), path, RawCodec)
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_an_open_model_stream_infer_and_exits() {
    // A client that keeps its ModelStreamInfer stream open held graceful shutdown open
    // forever: the server waits for every stream, and this one never ended.
    let backend = BackendProcess::start(&sample_repo(), "127.0.0.1:0".parse().unwrap());
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut client = client(backend.addr).await;
    let data = holdout();
    tx.send(infer_request("digits_mlp", "1", &data.features[..1]))
        .await
        .unwrap();
    let mut responses = client
        .model_stream_infer(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = responses.message().await.unwrap().expect("an answer");
    assert_eq!(first.error_message, "");
    let pid = backend.pid();
    let killed = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    // The stream ends cleanly from the server's side while the client still holds it.
    let end = tokio::time::timeout(Duration::from_secs(20), responses.message())
        .await
        .expect("the stream ends at shutdown");
    assert!(matches!(end, Ok(None)), "{end:?}");
    let exited = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.split_whitespace().nth(2) == Some("Z"))
    });
    assert!(exited, "the backend exits");
    drop(tx);
}
