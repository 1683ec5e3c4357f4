//! The `switchyard backend` process: start-up line, graceful shutdown on SIGTERM (in-flight
//! requests finish, exit status 0).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let repo = tempfile::tempdir().unwrap();
    let model = repo.path().join("slow");
    std::fs::create_dir_all(model.join("1")).unwrap();
    std::fs::copy(
        sample_repo().join("digits_linear/1/model.onnx"),
        model.join("1/model.onnx"),
    )
    .unwrap();
    // Requests wait 600 ms for a batch to fill, so they are still in flight at SIGTERM.
    std::fs::write(
        model.join("config.pbtxt"),
        "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 600000 }\n",
    )
    .unwrap();

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
