//! The client side of a batch job: the model's config (inputs, outputs, `max_batch_size`)
//! read over gRPC, a chunk's `ModelInferRequest` cut from the data set without copying, and
//! its call retried with exponential backoff and full jitter while the failure is one that
//! passes (UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, ABORTED); any other status is
//! the chunk's final answer.

use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use rand::Rng;
use switchyard_proto::ElementType;
use switchyard_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use switchyard_proto::inference::model_infer_request::{
    InferInputTensor, InferRequestedOutputTensor,
};
use switchyard_proto::inference::{ModelConfigRequest, ModelInferRequest};
use tokio::sync::watch;
use tonic::transport::Channel;

use super::data::{Dataset, Want};
use super::journal::{ChunkRecord, Header};

pub(crate) type Client = GrpcInferenceServiceClient<Channel>;

/// How calls are made and retried.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    /// Calls per chunk at most, the first included.
    pub(crate) attempts: u32,
    pub(crate) backoff: Duration,
    pub(crate) max_backoff: Duration,
    pub(crate) timeout: Duration,
    /// Request metadata sent with every call (`-H name:value`).
    pub(crate) headers: Vec<(
        tonic::metadata::AsciiMetadataKey,
        tonic::metadata::AsciiMetadataValue,
    )>,
}

/// The model as its config describes it.
#[derive(Debug)]
pub(crate) struct Model {
    pub(crate) inputs: Vec<Want>,
    pub(crate) outputs: Vec<String>,
    pub(crate) max_batch_size: u32,
}

/// Connects (lazily: a server that is restarting is waited for by the retries).
pub(crate) fn connect(url: &str) -> Result<Client> {
    let url = if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    };
    let channel = Channel::from_shared(url.clone())
        .map_err(|e| anyhow!("--url {url}: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .connect_lazy();
    Ok(GrpcInferenceServiceClient::new(channel)
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20))
}

/// Reads the model's (or route's) config, retrying while the server is unreachable.
pub(crate) async fn model(
    client: &mut Client,
    name: &str,
    version: &str,
    policy: &Policy,
    url: &str,
) -> Result<Model> {
    let mut attempt = 0;
    let resp = loop {
        attempt += 1;
        let mut req = tonic::Request::new(ModelConfigRequest {
            name: name.to_owned(),
            version: version.to_owned(),
        });
        req.set_timeout(policy.timeout);
        match client.model_config(req).await {
            Ok(r) => break r.into_inner(),
            Err(s) if passes(&s) && attempt < policy.attempts => {
                tokio::time::sleep(backoff(policy, attempt, None)).await;
            }
            Err(s) => bail!(
                "{url}: cannot read the config of `{name}`: {} ({})",
                s.message(),
                s.code().description()
            ),
        }
    };
    let config = resp
        .config
        .ok_or_else(|| anyhow!("{url}: `{name}` answered its config request with no config"))?;
    let inputs = config
        .input
        .iter()
        .map(|i| {
            let dtype = ElementType::from_config(i.data_type)
                .ok_or_else(|| anyhow!("`{name}` input `{}`: unknown data_type {}", i.name, i.data_type))?;
            if dtype == ElementType::Bytes {
                bail!("`{name}` input `{}` is TYPE_STRING (BYTES): not supported by `switchyard batch`", i.name);
            }
            Ok(Want {
                name: i.name.clone(),
                dtype,
                dims: i.dims.clone(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    if inputs.is_empty() {
        bail!("{url}: the config of `{name}` lists no inputs");
    }
    Ok(Model {
        inputs,
        outputs: config.output.iter().map(|o| o.name.clone()).collect(),
        max_batch_size: u32::try_from(config.max_batch_size.max(0)).unwrap_or(0),
    })
}

/// Whether a failure may pass if the call is made again: a status that says so, or a call
/// that got no answer at all (the connection reset or closed under it: tonic reports that
/// as CANCELLED, or UNKNOWN with the transport's error as its source). Scoring a row is
/// idempotent, so a call whose answer was lost may be made again.
pub(crate) fn passes(status: &tonic::Status) -> bool {
    retryable(status.code())
        || status.code() == tonic::Code::Cancelled
        || (status.code() == tonic::Code::Unknown && std::error::Error::source(status).is_some())
}

/// Whether a status code says the failure may pass.
pub(crate) fn retryable(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::ResourceExhausted
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Aborted
    )
}

/// The wait before call `attempt + 1`: full jitter over `backoff × 2^(attempt-1)` capped at
/// `max_backoff`, and at least what the server's `retry-after` asked.
pub(crate) fn backoff(policy: &Policy, attempt: u32, retry_after: Option<Duration>) -> Duration {
    let ceiling = policy
        .backoff
        .saturating_mul(1u32 << (attempt - 1).min(20))
        .min(policy.max_backoff);
    let jittered = ceiling.mul_f64(rand::rng().random_range(0.0..=1.0));
    jittered.max(retry_after.unwrap_or_default().min(policy.max_backoff))
}

/// The rows of chunk `index`.
pub(crate) fn rows_of(index: u64, chunk_rows: u64, total: u64) -> (u64, u64) {
    let first = index * chunk_rows;
    (first, chunk_rows.min(total - first))
}

/// The request of rows `first .. first + n`: each input's bytes a slice of the data set.
pub(crate) fn request(
    data: &Dataset,
    model: &str,
    version: &str,
    outputs: &[String],
    batched: bool,
    first: u64,
    n: u64,
) -> ModelInferRequest {
    let (first, n) = (first as usize, n as usize);
    let mut inputs = Vec::with_capacity(data.columns.len());
    let mut raw = Vec::with_capacity(data.columns.len());
    for c in &data.columns {
        let mut shape = Vec::with_capacity(c.row_shape.len() + 1);
        if batched {
            shape.push(n as i64);
        }
        shape.extend_from_slice(&c.row_shape);
        inputs.push(InferInputTensor {
            name: c.name.clone(),
            datatype: c.dtype.as_str().to_owned(),
            shape,
            ..Default::default()
        });
        raw.push(c.data.slice(first * c.row_bytes..(first + n) * c.row_bytes));
    }
    ModelInferRequest {
        model_name: model.to_owned(),
        model_version: version.to_owned(),
        inputs,
        outputs: outputs
            .iter()
            .map(|o| InferRequestedOutputTensor {
                name: o.clone(),
                ..Default::default()
            })
            .collect(),
        raw_input_contents: raw,
        ..Default::default()
    }
}

/// Runs one chunk to its end: answered, or failed for good. `None` when the job was asked
/// to stop while the chunk waited to be retried: it is not done, and a resumed run sends it.
pub(crate) async fn chunk(
    client: &mut Client,
    policy: &Policy,
    make: impl Fn() -> ModelInferRequest,
    index: u64,
    (first_row, rows): (u64, u64),
    stop: &mut watch::Receiver<bool>,
) -> Option<ChunkRecord> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut req = tonic::Request::new(make());
        req.set_timeout(policy.timeout);
        for (k, v) in &policy.headers {
            req.metadata_mut().insert(k.clone(), v.clone());
        }
        let started = Instant::now();
        let result = client.model_infer(req).await;
        let latency_us = started.elapsed().as_micros() as u64;
        let mut record = ChunkRecord {
            index,
            first_row,
            rows: rows as u32,
            attempts: attempt,
            latency_us,
            ..Default::default()
        };
        match result {
            Ok(resp) => {
                record.headers = resp
                    .metadata()
                    .iter()
                    .filter_map(|kv| match kv {
                        tonic::metadata::KeyAndValueRef::Ascii(k, v)
                            if k.as_str().starts_with("x-switchyard-") =>
                        {
                            Some(Header {
                                name: k.as_str().to_owned(),
                                value: v.to_str().unwrap_or_default().to_owned(),
                            })
                        }
                        _ => None,
                    })
                    .collect();
                record.response = Some(resp.into_inner());
                return Some(record);
            }
            Err(status) => {
                if !passes(&status) || attempt >= policy.attempts {
                    record.code = status.code() as i32;
                    record.message = status.message().to_owned();
                    return Some(record);
                }
                if *stop.borrow() {
                    return None;
                }
                let retry_after = status
                    .metadata()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                let wait = backoff(policy, attempt, retry_after);
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = stop.wait_for(|s| *s) => return None,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_and_honours_retry_after() {
        let p = Policy {
            attempts: 5,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(400),
            timeout: Duration::from_secs(1),
            headers: Vec::new(),
        };
        for _ in 0..100 {
            assert!(backoff(&p, 1, None) <= Duration::from_millis(100));
            assert!(backoff(&p, 10, None) <= Duration::from_millis(400));
            assert!(backoff(&p, 1, Some(Duration::from_secs(1))) >= Duration::from_millis(400));
        }
        assert!(retryable(tonic::Code::Unavailable));
        assert!(!retryable(tonic::Code::InvalidArgument));
    }
}
