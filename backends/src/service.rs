//! The tonic `GRPCInferenceService`: health, metadata, config, inference, statistics and
//! repository control, with Triton's semantics.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime};

use opentelemetry::KeyValue;
use opentelemetry::trace::{Span as _, SpanContext, SpanKind};
use switchyard_proto::trace::{self, Tracing};

use switchyard_proto::inference::{
    self as pb, grpc_inference_service_server::GrpcInferenceService,
    model_infer_response::InferOutputTensor, model_metadata_response::TensorMetadata,
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};
use tracing::debug;

use crate::error::BackendError;
use crate::repository::{ModelState, Repository, ServingVersion};
use crate::request;
use crate::scheduler::{Job, Refused};
use crate::spec::TensorSpec;

/// Extensions of the KServe v2 protocol this server implements (ServerMetadata).
const EXTENSIONS: [&str; 5] = [
    "model_repository",
    "model_configuration",
    "schedule_policy",
    "statistics",
    "parameters",
];

/// The gRPC service over a model repository.
#[derive(Debug, Clone)]
pub(crate) struct InferenceService {
    pub(crate) repo: Arc<Repository>,
    /// False until the repository is loaded and again once shutdown starts.
    pub(crate) ready: Arc<AtomicBool>,
    /// Who may load and unload models.
    pub(crate) control: Arc<crate::ModelControl>,
    /// Turns true when shutdown starts: open ModelStreamInfer streams stop reading, answer
    /// what they took, and end, so the server's graceful shutdown is not held open by a
    /// stream that never ends.
    pub(crate) stopping: tokio::sync::watch::Receiver<bool>,
    /// The tracer, when tracing is on.
    pub(crate) tracing: Option<Arc<Tracing>>,
}

/// Messages of one ModelStreamInfer stream that may be in flight at once.
const STREAM_IN_FLIGHT: usize = 64;

type ResponseStream =
    Pin<Box<dyn Stream<Item = Result<pb::ModelStreamInferResponse, Status>> + Send + 'static>>;

impl InferenceService {
    /// Whether this call may load or unload models (`model` names it in the refusal).
    fn may_control<T>(&self, req: &Request<T>, model: &str) -> Result<(), Status> {
        match &*self.control {
            crate::ModelControl::None => Err(Status::failed_precondition(format!(
                "cannot load or unload '{model}': model control is off (--model-control-mode none); start the backend with --model-control-mode explicit and a token to allow it"
            ))),
            crate::ModelControl::Explicit { token } => {
                let given = req
                    .metadata()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "));
                if given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
                    Ok(())
                } else {
                    Err(Status::unauthenticated(
                        "loading and unloading models needs `authorization: Bearer <token>` (the backend's --model-control-token-file)",
                    ))
                }
            }
        }
    }

    async fn infer(
        &self,
        mut req: pb::ModelInferRequest,
        parent: Option<&SpanContext>,
    ) -> Result<pb::ModelInferResponse, BackendError> {
        let start = Instant::now();
        let span = self.tracing.as_ref().map(|t| {
            t.span(
                format!("ModelInfer {}", req.model_name),
                SpanKind::Server,
                parent,
                vec![
                    KeyValue::new("rpc.system", "grpc"),
                    KeyValue::new("rpc.service", "inference.GRPCInferenceService"),
                    KeyValue::new("rpc.method", "ModelInfer"),
                    KeyValue::new("switchyard.model", req.model_name.clone()),
                    KeyValue::new("switchyard.model_version", req.model_version.clone()),
                ],
            )
        });
        let mut timing = None;
        let version = match self.repo.resolve(&req.model_name, &req.model_version) {
            Ok(v) => v,
            Err(e) => {
                end(span, Some(&e.to_string()), &[]);
                return Err(e);
            }
        };
        let result = run(&version, &mut req, start, &mut timing).await;
        match &result {
            Ok(_) => {
                debug!(model = %version.spec.name, version = version.version, "inference done")
            }
            Err(err) => {
                version.stats.record_failure(start.elapsed());
                debug!(model = %version.spec.name, version = version.version, %err, "inference failed");
            }
        }
        if let (Some(t), Some(span), Some(timing)) = (&self.tracing, &span, &timing) {
            // The scheduler measured both on its threads: recorded after the fact.
            let cx = span.span_context();
            let queued = timing.enqueued + timing.queue;
            let e = timing.exec;
            let computed = queued + e.compute_input + e.compute_infer + e.compute_output;
            let batch = KeyValue::new("switchyard.batch_rows", timing.batch_rows as i64);
            t.happened("queue", cx, vec![batch.clone()], (timing.enqueued, queued));
            t.happened(
                "compute",
                cx,
                vec![
                    batch,
                    KeyValue::new(
                        "switchyard.compute_input_us",
                        e.compute_input.as_micros() as i64,
                    ),
                    KeyValue::new(
                        "switchyard.compute_infer_us",
                        e.compute_infer.as_micros() as i64,
                    ),
                    KeyValue::new(
                        "switchyard.compute_output_us",
                        e.compute_output.as_micros() as i64,
                    ),
                ],
                (queued, computed),
            );
        }
        let version_attr = [KeyValue::new(
            "switchyard.served_version",
            version.version as i64,
        )];
        end(
            span,
            result.as_ref().err().map(|e| e.to_string()).as_deref(),
            &version_attr,
        );
        result
    }
}

/// Ends an inference's span, with its error.
fn end(span: Option<switchyard_proto::trace::Span>, error: Option<&str>, attributes: &[KeyValue]) {
    if let Some(mut span) = span {
        span.set_attributes(attributes.iter().cloned());
        if let Some(e) = error {
            span.set_status(opentelemetry::trace::Status::error(e.to_owned()));
        }
        span.end();
    }
}

/// When a job waited and ran, for its spans.
#[derive(Debug)]
struct Timing {
    enqueued: SystemTime,
    queue: std::time::Duration,
    exec: crate::stats::ExecTimes,
    batch_rows: usize,
}

/// The caller's trace context, from its gRPC metadata.
fn caller<T>(req: &Request<T>) -> Option<SpanContext> {
    let m = req.metadata();
    trace::remote_parent(
        m.get(trace::TRACEPARENT).map(|v| v.as_bytes()),
        m.get(trace::TRACESTATE).map(|v| v.as_bytes()),
    )
}

async fn run(
    version: &ServingVersion,
    req: &mut pb::ModelInferRequest,
    start: Instant,
    timing: &mut Option<Timing>,
) -> Result<pb::ModelInferResponse, BackendError> {
    let spec = &version.spec;
    let prepared = request::prepare(spec, req)?;
    let enqueued = SystemTime::now();
    let (reply, done) = oneshot::channel();
    let job = Job {
        rows: prepared.rows,
        inputs: prepared.inputs,
        shapes: prepared.shapes,
        enqueued: Instant::now(),
        deadline: prepared.timeout.map(|t| start + t),
        reply,
        held: None,
    };
    match version.scheduler.submit(job) {
        Ok(()) => {}
        Err(Refused::Count(limit)) => {
            return Err(BackendError::QueueFull {
                model: spec.name.clone(),
                version: version.version,
                limit,
            });
        }
        Err(Refused::Bytes(limit)) => return Err(BackendError::QueueBytes { limit }),
    }
    let output = done.await.map_err(|_| BackendError::Unloaded {
        model: spec.name.clone(),
        version: version.version,
    })??;
    *timing = Some(Timing {
        enqueued,
        queue: output.queue,
        exec: output.exec,
        batch_rows: output.batch_rows,
    });
    let mut outputs = Vec::with_capacity(prepared.outputs.len());
    let mut raw = Vec::with_capacity(prepared.outputs.len());
    for &k in &prepared.outputs {
        let tensor = &output.outputs[k];
        outputs.push(InferOutputTensor {
            name: spec.outputs[k].name.clone(),
            datatype: tensor.element.as_str().to_owned(),
            shape: tensor.shape.iter().map(|&d| d as i64).collect(),
            ..Default::default()
        });
        raw.push(tensor.data.clone());
    }
    version
        .stats
        .record_success(prepared.rows, start.elapsed(), output.queue, output.exec);
    Ok(pb::ModelInferResponse {
        model_name: spec.name.clone(),
        model_version: version.version.to_string(),
        id: std::mem::take(&mut req.id),
        outputs,
        raw_output_contents: raw,
        ..Default::default()
    })
}

fn tensor_metadata(tensors: &[TensorSpec], batched: bool) -> Vec<TensorMetadata> {
    tensors
        .iter()
        .map(|t| TensorMetadata {
            name: t.name.clone(),
            datatype: t.element.as_str().to_owned(),
            shape: batched
                .then_some(-1)
                .into_iter()
                .chain(t.dims.iter().copied())
                .collect(),
        })
        .collect()
}

#[tonic::async_trait]
impl GrpcInferenceService for InferenceService {
    async fn server_live(
        &self,
        _: Request<pb::ServerLiveRequest>,
    ) -> Result<Response<pb::ServerLiveResponse>, Status> {
        Ok(Response::new(pb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<pb::ServerReadyRequest>,
    ) -> Result<Response<pb::ServerReadyResponse>, Status> {
        Ok(Response::new(pb::ServerReadyResponse {
            ready: self.ready.load(Ordering::Acquire),
        }))
    }

    async fn model_ready(
        &self,
        req: Request<pb::ModelReadyRequest>,
    ) -> Result<Response<pb::ModelReadyResponse>, Status> {
        let req = req.into_inner();
        let ready = self.repo.resolve(&req.name, &req.version).is_ok();
        Ok(Response::new(pb::ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<pb::ServerMetadataRequest>,
    ) -> Result<Response<pb::ServerMetadataResponse>, Status> {
        Ok(Response::new(pb::ServerMetadataResponse {
            name: "switchyard".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            extensions: EXTENSIONS.iter().map(|e| (*e).to_owned()).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        req: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        let req = req.into_inner();
        let version = self.repo.resolve(&req.name, &req.version)?;
        let spec = &version.spec;
        let versions = match self.repo.catalog().models.get(&req.name) {
            Some(ModelState::Loaded { versions, .. }) => versions
                .iter()
                .filter(|(_, s)| s.serving.is_some())
                .map(|(v, _)| v.to_string())
                .collect(),
            _ => vec![version.version.to_string()],
        };
        let batched = spec.max_batch_size > 0;
        Ok(Response::new(pb::ModelMetadataResponse {
            name: spec.name.clone(),
            versions,
            platform: spec.config.platform.clone(),
            inputs: tensor_metadata(&spec.inputs, batched),
            outputs: tensor_metadata(&spec.outputs, batched),
        }))
    }

    async fn model_infer(
        &self,
        req: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        let parent = caller(&req);
        Ok(Response::new(
            self.infer(req.into_inner(), parent.as_ref()).await?,
        ))
    }

    async fn model_stream_infer(
        &self,
        req: Request<tonic::Streaming<pb::ModelInferRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        // Every message of the stream continues the trace the stream was opened in.
        let parent = caller(&req);
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_IN_FLIGHT);
        let service = self.clone();
        // At most STREAM_IN_FLIGHT messages of one stream run at once: the next is read
        // only when one finishes, so a client writing faster than the model answers is
        // held back by h2 flow control instead of growing the queue without bound.
        let in_flight = Arc::new(tokio::sync::Semaphore::new(STREAM_IN_FLIGHT));
        let mut stopping = self.stopping.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    next = inbound.next() => next,
                    _ = stopping.wait_for(|stop| *stop) => None,
                };
                let Some(next) = next else { break };
                let Ok(request) = next else { break };
                let Ok(permit) = in_flight.clone().acquire_owned().await else {
                    break;
                };
                let service = service.clone();
                let tx = tx.clone();
                let parent = parent.clone();
                // Requests on one stream run concurrently and answer as they finish,
                // each carrying its `id`, as Triton's streaming endpoint does.
                tokio::spawn(async move {
                    let id = request.id.clone();
                    let response = match service.infer(request, parent.as_ref()).await {
                        Ok(r) => pb::ModelStreamInferResponse {
                            error_message: String::new(),
                            infer_response: Some(r),
                        },
                        Err(e) => pb::ModelStreamInferResponse {
                            error_message: e.to_string(),
                            infer_response: Some(pb::ModelInferResponse {
                                id,
                                ..Default::default()
                            }),
                        },
                    };
                    let _ = tx.send(Ok(response)).await;
                    drop(permit);
                });
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn model_config(
        &self,
        req: Request<pb::ModelConfigRequest>,
    ) -> Result<Response<pb::ModelConfigResponse>, Status> {
        let req = req.into_inner();
        let version = self.repo.resolve(&req.name, &req.version)?;
        Ok(Response::new(pb::ModelConfigResponse {
            config: Some(version.spec.config.clone()),
        }))
    }

    async fn model_statistics(
        &self,
        req: Request<pb::ModelStatisticsRequest>,
    ) -> Result<Response<pb::ModelStatisticsResponse>, Status> {
        let req = req.into_inner();
        let catalog = self.repo.catalog();
        let mut names: Vec<&String> = catalog
            .models
            .keys()
            .filter(|n| req.name.is_empty() || **n == req.name)
            .collect();
        names.sort();
        if !req.name.is_empty() && names.is_empty() {
            return Err(BackendError::ModelNotFound { model: req.name }.into());
        }
        let mut model_stats = Vec::new();
        for name in names {
            if let ModelState::Loaded { versions, .. } = &catalog.models[name] {
                for (v, slot) in versions {
                    if !req.version.is_empty() && req.version != v.to_string() {
                        continue;
                    }
                    if let Some(serving) = &slot.serving {
                        model_stats.push(serving.stats.snapshot());
                    }
                }
            }
        }
        if !req.name.is_empty() && model_stats.is_empty() {
            return Err(BackendError::ModelNotReady {
                model: req.name,
                reason: "no ready version matches".to_owned(),
            }
            .into());
        }
        Ok(Response::new(pb::ModelStatisticsResponse { model_stats }))
    }

    async fn repository_index(
        &self,
        req: Request<pb::RepositoryIndexRequest>,
    ) -> Result<Response<pb::RepositoryIndexResponse>, Status> {
        let models = self
            .repo
            .index(req.into_inner().ready)
            .into_iter()
            .map(|e| pb::repository_index_response::ModelIndex {
                name: e.name,
                version: e.version,
                state: e.state.to_owned(),
                reason: e.reason,
            })
            .collect();
        Ok(Response::new(pb::RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        req: Request<pb::RepositoryModelLoadRequest>,
    ) -> Result<Response<pb::RepositoryModelLoadResponse>, Status> {
        self.may_control(&req, &req.get_ref().model_name)?;
        let req = req.into_inner();
        if let Some(key) = req.parameters.keys().next() {
            return Err(Status::invalid_argument(format!(
                "load parameter '{key}' is not supported; edit the model folder and load again"
            )));
        }
        self.repo.load(&req.model_name).await?;
        Ok(Response::new(pb::RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        req: Request<pb::RepositoryModelUnloadRequest>,
    ) -> Result<Response<pb::RepositoryModelUnloadResponse>, Status> {
        self.may_control(&req, &req.get_ref().model_name)?;
        self.repo.unload(&req.into_inner().model_name).await?;
        Ok(Response::new(pb::RepositoryModelUnloadResponse {}))
    }
}

/// Equal in time independent of where the inputs differ (a token compared byte by byte
/// would tell an attacker how much of a guess was right).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
