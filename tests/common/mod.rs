//! Test harness shared by the end-to-end tests: real backends on ephemeral ports, clients,
//! the sample repository and its held-out data, and request builders.
#![allow(dead_code, unreachable_pub)]

pub mod gateway;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use switchyard_backend::{Backend, BackendConfig};
use switchyard_proto::inference::{
    ModelInferRequest, ModelInferResponse,
    grpc_inference_service_client::GrpcInferenceServiceClient,
    model_infer_request::InferInputTensor,
};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

pub type Client = GrpcInferenceServiceClient<Channel>;

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The sample model repository.
pub fn sample_repo() -> PathBuf {
    root().join("backends/model_repository")
}

/// A private copy of the sample repository that a test may change.
pub fn copy_sample_repo() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    copy_dir(&sample_repo(), dir.path());
    dir
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A backend serving on an ephemeral port; stops gracefully when dropped or on `stop`.
pub struct TestBackend {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestBackend {
    pub async fn start(repo: &Path) -> Self {
        Self::start_with(BackendConfig::new(repo)).await
    }

    /// A backend whose models callers holding [`CONTROL_TOKEN`] may load and unload.
    pub async fn start_controlled(repo: &Path) -> Self {
        Self::start_with(BackendConfig {
            model_control: switchyard_backend::ModelControl::Explicit {
                token: CONTROL_TOKEN.to_owned(),
            },
            ..BackendConfig::new(repo)
        })
        .await
    }

    pub async fn start_with(config: BackendConfig) -> Self {
        Self::start_on(config, "127.0.0.1:0".parse().unwrap()).await
    }

    /// A backend on a given address (to restart one where it was).
    pub async fn start_on(config: BackendConfig, addr: SocketAddr) -> Self {
        let backend = Backend::load(config).await.expect("backend loads");
        let grpc = TcpListener::bind(addr).await.unwrap();
        let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = grpc.local_addr().unwrap();
        let metrics_addr = metrics.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(backend.serve(grpc, Some(metrics), async move {
            let _ = stopped.await;
        }));
        Self {
            addr,
            metrics_addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub async fn client(&self) -> Client {
        client(self.addr).await
    }

    /// Stops the server and waits for it to drain.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }

    /// The Prometheus exposition text.
    pub async fn metrics_text(&self) -> String {
        http_get(self.metrics_addr, "/metrics").await
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The peak resident memory of a process (`VmHWM`), in bytes.
pub fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .expect("VmHWM in /proc/PID/status")
}

/// Asserts that a process's peak memory grew by at most 4 × a request's `size` (plus
/// 32 MiB for what the allocator keeps), and says by how much.
pub fn assert_peak_within(what: &str, grown: u64, size: usize) {
    eprintln!(
        "{what}: peak RSS grew by {:.1} MiB for {} MiB",
        grown as f64 / f64::from(1 << 20),
        size >> 20
    );
    assert!(
        grown < 4 * size as u64 + (32 << 20),
        "{what}: the peak grew by {} MiB for {} MiB",
        grown >> 20,
        size >> 20
    );
}

/// A `switchyard backend` child process, for tests that kill backends for real.
pub struct BackendProcess {
    pub addr: SocketAddr,
    child: std::process::Child,
}

impl BackendProcess {
    /// Starts on `addr` (port 0: any) and waits until it serves.
    pub fn start(repo: &Path, addr: SocketAddr) -> Self {
        use std::io::{BufRead, BufReader};
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["backend", "--model-repository"])
            .arg(repo)
            .args(["--listen", &addr.to_string(), "--metrics", "127.0.0.1:0"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("grpc="))
            .unwrap_or_else(|| panic!("backend did not start: {line:?}"))
            .parse()
            .unwrap();
        Self { addr, child }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: connections drop mid-request, nothing drains.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn client(addr: SocketAddr) -> Client {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect");
    GrpcInferenceServiceClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

/// A minimal HTTP/1.1 GET over a raw socket (the tests need no HTTP client crate).
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

/// The held-out split written by backends/train/train_digits.py.
#[derive(Debug, serde::Deserialize)]
pub struct Holdout {
    pub features: Vec<Vec<f32>>,
    pub labels: Vec<usize>,
    pub models: HashMap<String, Reference>,
}

#[derive(Debug, serde::Deserialize)]
pub struct Reference {
    pub accuracy: f64,
    pub probabilities: Vec<Vec<f32>>,
}

pub fn holdout() -> Holdout {
    let text =
        std::fs::read_to_string(root().join("backends/sample_data/digits_holdout.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A row's top-1 minus top-2 probability: what a cascade's `margin` test compares.
pub fn margin(row: &[f32]) -> f32 {
    let mut sorted = row.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    sorted[0] - sorted[1]
}

/// An FP32 `INPUT__0` request with `rows` as raw little-endian bytes.
pub fn infer_request(model: &str, version: &str, rows: &[Vec<f32>]) -> ModelInferRequest {
    let mut raw = Vec::with_capacity(rows.len() * 64 * 4);
    for row in rows {
        for v in row {
            raw.extend_from_slice(&v.to_le_bytes());
        }
    }
    ModelInferRequest {
        model_name: model.to_owned(),
        model_version: version.to_owned(),
        inputs: vec![InferInputTensor {
            name: "INPUT__0".to_owned(),
            datatype: "FP32".to_owned(),
            shape: vec![rows.len() as i64, 64],
            ..Default::default()
        }],
        raw_input_contents: vec![raw.into()],
        ..Default::default()
    }
}

/// The `probabilities` output as rows of 10.
pub fn probabilities(resp: &ModelInferResponse) -> Vec<Vec<f32>> {
    let k = resp
        .outputs
        .iter()
        .position(|o| o.name == "probabilities")
        .expect("probabilities output");
    let bytes = &resp.raw_output_contents[k];
    let values: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    values.chunks(10).map(<[f32]>::to_vec).collect()
}

pub fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold(
            (0, f32::MIN),
            |best, (i, &v)| if v > best.1 { (i, v) } else { best },
        )
        .0
}

/// A gRPC client that sends arbitrary bytes as a message.
pub async fn raw_client(
    addr: std::net::SocketAddr,
) -> tonic::client::Grpc<tonic::transport::Channel> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    tonic::client::Grpc::new(channel)
}

#[derive(Debug, Clone, Copy)]
pub struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

/// The value of one series of a Prometheus exposition: the sum over series of `name`
/// whose labels include every `labels` pair (0 when none matches). Assert on the value,
/// not on the presence of a series: series are created when targets are registered.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| {
            l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{' | b' '))
        })
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One gRPC inference with extra request metadata (`headers`).
pub async fn infer_with(
    client: &mut Client,
    request: ModelInferRequest,
    headers: &[(&str, &str)],
) -> Result<tonic::Response<ModelInferResponse>, tonic::Status> {
    let mut req = tonic::Request::new(request);
    for (k, v) in headers {
        req.metadata_mut().insert(
            tonic::metadata::MetadataKey::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    client.model_infer(req).await
}

/// A gRPC response's metadata value (`""` when absent).
pub fn header_of<T>(resp: &tonic::Response<T>, name: &str) -> String {
    resp.metadata()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// The model-control token of [`TestBackend::start_controlled`].
pub const CONTROL_TOKEN: &str = "test-model-control-token-5c1e";

/// A model-control request carrying [`CONTROL_TOKEN`].
pub fn controlled<T>(message: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {CONTROL_TOKEN}").parse().unwrap(),
    );
    req
}

/// A repository with one model, `name` (the sample linear model), whose batches wait
/// `delay_us` for company (up to `max_batch` rows): each request is held about that long.
pub fn patient_repo(name: &str, max_batch: u32, delay_us: u64) -> tempfile::TempDir {
    let repo = tempfile::tempdir().unwrap();
    let model = repo.path().join(name);
    std::fs::create_dir_all(model.join("1")).unwrap();
    std::fs::copy(
        sample_repo().join("digits_linear/1/model.onnx"),
        model.join("1/model.onnx"),
    )
    .unwrap();
    std::fs::write(
        model.join("config.pbtxt"),
        format!("max_batch_size: {max_batch}\ndynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}\n"),
    )
    .unwrap();
    repo
}
