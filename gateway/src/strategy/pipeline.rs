//! Pipelines and switches: steps whose requests are built from the client's tensors and
//! earlier steps' outputs, and a first answer that picks the plan that answers.
//!
//! Only the tensors a mapping names are touched, and then only as slices: an output that
//! becomes the next step's input is the same `Bytes` (the answer's `raw_output_contents`,
//! decoded without copying), with its datatype and shape. Datatypes are not converted:
//! the load-time check against the models' metadata refuses a mapping whose types differ.
//! A client tensor sent as typed `contents` is the one case that is encoded, once, as raw
//! little-endian bytes.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use switchyard_proto::inference::model_infer_request::InferInputTensor;
use switchyard_proto::inference::model_infer_response::InferOutputTensor;
use switchyard_proto::inference::{InferTensorContents, ModelInferRequest, ModelInferResponse};
use switchyard_proto::wire::InferMessage;
use tokio::time::Instant;

use super::{Answer, AnsweredBy, Invoker, Latencies, Part};
use crate::error::GatewayError;
use crate::metrics::PipelineMetrics;
use crate::routing::{Mapping, Pipeline, PlanId, Source};

/// One tensor as it travels between steps: its datatype, shape and raw bytes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Raw {
    pub(crate) datatype: String,
    pub(crate) shape: Vec<i64>,
    pub(crate) bytes: Bytes,
}

/// The client's request, decoded once (and only when a mapping reads it).
#[derive(Debug, Default)]
pub(crate) struct RequestTensors {
    pub(crate) id: String,
    pub(crate) inputs: Vec<(String, Raw)>,
}

/// The client's tensors by name, as raw bytes: slices of the received message where they
/// came raw, encoded from typed `contents` otherwise.
pub(crate) fn request_tensors(message: &InferMessage) -> Result<RequestTensors, String> {
    let mut req = ModelInferRequest::default();
    for field in &message.rest {
        req.merge(field.clone())
            .map_err(|e| format!("the request could not be read again: {e}"))?;
    }
    req.raw_input_contents
        .extend(message.tensors.iter().cloned());
    let raw = req.raw_input_contents.len();
    if raw != 0 && raw != req.inputs.len() {
        return Err(format!(
            "the request has {} inputs but {raw} raw_input_contents; send one per input",
            req.inputs.len()
        ));
    }
    let mut inputs = Vec::with_capacity(req.inputs.len());
    for (i, input) in req.inputs.into_iter().enumerate() {
        let bytes = match req.raw_input_contents.get(i) {
            Some(b) => b.clone(),
            None => typed_to_raw(&input)?,
        };
        inputs.push((
            input.name,
            Raw {
                datatype: input.datatype,
                shape: input.shape,
                bytes,
            },
        ));
    }
    Ok(RequestTensors { id: req.id, inputs })
}

/// A typed `contents` tensor as the raw little-endian bytes Triton's raw form carries.
fn typed_to_raw(input: &InferInputTensor) -> Result<Bytes, String> {
    let empty = InferTensorContents::default();
    let c = input.contents.as_ref().unwrap_or(&empty);
    let mut out = BytesMut::new();
    match input.datatype.as_str() {
        "BOOL" => c
            .bool_contents
            .iter()
            .for_each(|&v| out.put_u8(u8::from(v))),
        "INT8" => c.int_contents.iter().for_each(|&v| out.put_i8(v as i8)),
        "INT16" => c
            .int_contents
            .iter()
            .for_each(|&v| out.put_i16_le(v as i16)),
        "INT32" => c.int_contents.iter().for_each(|&v| out.put_i32_le(v)),
        "INT64" => c.int64_contents.iter().for_each(|&v| out.put_i64_le(v)),
        "UINT8" => c.uint_contents.iter().for_each(|&v| out.put_u8(v as u8)),
        "UINT16" => c
            .uint_contents
            .iter()
            .for_each(|&v| out.put_u16_le(v as u16)),
        "UINT32" => c.uint_contents.iter().for_each(|&v| out.put_u32_le(v)),
        "UINT64" => c.uint64_contents.iter().for_each(|&v| out.put_u64_le(v)),
        "FP32" => c.fp32_contents.iter().for_each(|&v| out.put_f32_le(v)),
        "FP64" => c.fp64_contents.iter().for_each(|&v| out.put_f64_le(v)),
        "BYTES" => c.bytes_contents.iter().for_each(|v| {
            out.put_u32_le(v.len() as u32);
            out.put_slice(v);
        }),
        other => {
            return Err(format!(
                "input '{}': {other} has no typed contents; send it in raw_input_contents",
                input.name
            ));
        }
    }
    Ok(out.freeze())
}

/// A step's request: the client's model name and timeout, its id, and `tensors` as
/// inputs with raw contents. Nothing else of the client's request is sent (its requested
/// outputs and parameters are for the answer it gets, not for a step's).
pub(crate) fn step_message(
    client: &InferMessage,
    id: &str,
    tensors: &[(&str, &Raw)],
) -> InferMessage {
    let mut rest = Vec::with_capacity(tensors.len() + 1);
    if !id.is_empty() {
        let mut b = Vec::with_capacity(id.len() + 2);
        prost::encoding::string::encode(3, &id.to_owned(), &mut b);
        rest.push(Bytes::from(b));
    }
    for (name, raw) in tensors {
        let input = InferInputTensor {
            name: (*name).to_owned(),
            datatype: raw.datatype.clone(),
            shape: raw.shape.clone(),
            ..Default::default()
        };
        let mut b = Vec::with_capacity(input.encoded_len() + 2);
        prost::encoding::message::encode(5, &input, &mut b);
        rest.push(Bytes::from(b));
    }
    InferMessage {
        model_name: client.model_name.clone(),
        model_version: String::new(),
        timeout_us: client.timeout_us,
        rest,
        tensors: tensors.iter().map(|(_, r)| r.bytes.clone()).collect(),
    }
}

/// An output of a step's answer, by name.
fn output(resp: &ModelInferResponse, name: &str) -> Option<Raw> {
    let i = resp.outputs.iter().position(|o| o.name == name)?;
    let o = &resp.outputs[i];
    Some(Raw {
        datatype: o.datatype.clone(),
        shape: o.shape.clone(),
        bytes: resp.raw_output_contents.get(i)?.clone(),
    })
}

fn output_names(resp: &ModelInferResponse) -> String {
    let names: Vec<&str> = resp.outputs.iter().map(|o| o.name.as_str()).collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// Per-step counters and latency estimates of one pipeline.
#[derive(Debug)]
pub(crate) struct PipelineStats {
    pub(crate) metrics: PipelineMetrics,
    latency: Latencies,
}

impl PipelineStats {
    pub(crate) fn new(metrics: PipelineMetrics) -> Self {
        let steps = metrics.ok.len();
        Self {
            metrics,
            latency: Latencies::new(steps),
        }
    }

    fn observe(&self, step: usize, took: Duration) {
        self.latency.observe(step, took);
        self.metrics.seconds[step].observe(took.as_secs_f64());
    }
}

/// What a pipeline run came to: the answer and the labels of the steps that answered.
#[derive(Debug)]
pub(crate) struct PipelineAnswer {
    pub(crate) answer: Answer,
    pub(crate) labels: Vec<Arc<str>>,
}

/// Runs the steps in order. A step whose usual latency does not fit in the time left is
/// not started (DEADLINE_EXCEEDED naming it); any error names the pipeline and the step.
pub(crate) async fn pipeline(
    p: &Pipeline,
    plan: PlanId,
    name: &str,
    invoker: &dyn Invoker,
    client: &InferMessage,
    deadline: Instant,
    stats: &PipelineStats,
) -> Result<PipelineAnswer, GatewayError> {
    let reads_request = p
        .steps
        .iter()
        .filter_map(|s| s.inputs.as_deref())
        .flatten()
        .any(|m| m.from == Source::Request);
    let request = if reads_request {
        request_tensors(client)
            .map_err(|e| GatewayError::BadRequest(format!("pipeline '{name}': {e}")))?
    } else {
        RequestTensors::default()
    };
    let last = p.steps.len() - 1;
    // Each step's answer, decoded when a later mapping first reads it.
    let mut answers: Vec<Option<Answer>> = vec![None; p.steps.len()];
    let mut decoded: Vec<Option<ModelInferResponse>> = vec![None; p.steps.len()];
    let mut labels = Vec::with_capacity(p.steps.len());
    let mut id = request.id.clone();
    for (i, step) in p.steps.iter().enumerate() {
        let what = || format!("pipeline '{name}' step '{}'", step.name);
        let left = deadline.saturating_duration_since(Instant::now());
        let usual = stats.latency.estimate(i);
        if left.is_zero() || left < usual {
            stats.metrics.deadline[i].inc();
            return Err(GatewayError::Deadline {
                route: String::new(),
                after: left,
                detail: format!(
                    " before {}: {:?} left, the step usually takes {:?}",
                    what(),
                    left,
                    usual
                ),
            });
        }
        let message;
        let run = match &step.inputs {
            None => invoker.run(step.plan, deadline, Part::Step(i, &step.name)),
            Some(inputs) => {
                let mut tensors: Vec<(&str, Raw)> = Vec::with_capacity(inputs.len());
                for m in inputs.iter() {
                    let raw = read(m, &request, &answers, &mut decoded, p).map_err(|e| {
                        GatewayError::UpstreamFailed {
                            route: String::new(),
                            reason: format!("{}: input '{}': {e}", what(), m.name),
                        }
                    })?;
                    tensors.push((&m.name, raw));
                }
                let refs: Vec<(&str, &Raw)> = tensors.iter().map(|(n, r)| (*n, r)).collect();
                message = step_message(client, &id, &refs);
                invoker.run_with(step.plan, &message, deadline, Part::Step(i, &step.name))
            }
        };
        let started = Instant::now();
        match run.await {
            Ok(a) => {
                stats.observe(i, started.elapsed());
                stats.metrics.ok[i].inc();
                labels.push(a.label.clone());
                answers[i] = Some(a);
            }
            Err(e) => {
                if matches!(e, GatewayError::Deadline { .. }) {
                    stats.metrics.deadline[i].inc();
                } else {
                    stats.metrics.error[i].inc();
                }
                return Err(e.in_step(&what()));
            }
        }
        if i == 0 && id.is_empty() && !reads_request {
            // The client's id, as the first step echoed it.
            if let Some(resp) = decode(&answers, &mut decoded, 0) {
                id = resp.id.clone();
            }
        }
    }
    let degraded = answers.iter().flatten().any(|a| a.degraded);
    let response = if p.outputs.is_empty() {
        answers[last].take().map(|a| a.response).unwrap_or_default()
    } else {
        let mut resp = ModelInferResponse {
            model_name: client.model_name.clone(),
            id,
            ..Default::default()
        };
        for m in p.outputs.iter() {
            let raw = read(m, &request, &answers, &mut decoded, p).map_err(|e| {
                GatewayError::UpstreamFailed {
                    route: String::new(),
                    reason: format!("pipeline '{name}': output '{}': {e}", m.name),
                }
            })?;
            resp.outputs.push(InferOutputTensor {
                name: m.name.to_string(),
                datatype: raw.datatype,
                shape: raw.shape,
                ..Default::default()
            });
            resp.raw_output_contents.push(raw.bytes);
        }
        Bytes::from(resp.encode_to_vec())
    };
    Ok(PipelineAnswer {
        answer: Answer {
            response,
            by: AnsweredBy::Plan(plan),
            label: Arc::from(""),
            cascade: None,
            degraded,
            pipeline: Some(plan),
            switch: None,
            overflow: None,
        },
        labels,
    })
}

fn decode<'a>(
    answers: &[Option<Answer>],
    decoded: &'a mut [Option<ModelInferResponse>],
    step: usize,
) -> Option<&'a ModelInferResponse> {
    if decoded[step].is_none() {
        let bytes = answers[step].as_ref()?.response.clone();
        decoded[step] = ModelInferResponse::decode(bytes).ok();
    }
    decoded[step].as_ref()
}

/// The tensor a mapping reads.
fn read(
    m: &Mapping,
    request: &RequestTensors,
    answers: &[Option<Answer>],
    decoded: &mut [Option<ModelInferResponse>],
    p: &Pipeline,
) -> Result<Raw, String> {
    match m.from {
        Source::Request => request
            .inputs
            .iter()
            .find(|(n, _)| *n == *m.tensor)
            .map(|(_, r)| r.clone())
            .ok_or_else(|| {
                let names: Vec<&str> = request.inputs.iter().map(|(n, _)| n.as_str()).collect();
                format!(
                    "reads request.{}, but the request has no input '{}' (it sent: {})",
                    m.tensor,
                    m.tensor,
                    if names.is_empty() {
                        "none".into()
                    } else {
                        names.join(", ")
                    }
                )
            }),
        Source::Step(j) => {
            let step = &p.steps[j].name;
            let Some(resp) = decode(answers, decoded, j) else {
                return Err(format!("step '{step}' gave no readable answer"));
            };
            output(resp, &m.tensor).ok_or_else(|| {
                format!(
                    "reads {step}.{}, but step '{step}' answered without an output '{}' (its outputs: {})",
                    m.tensor,
                    m.tensor,
                    output_names(resp)
                )
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::Step;
    use crate::strategy::tests::Fake;
    use prometheus::{Histogram, HistogramOpts, IntCounter};

    fn stats(steps: usize) -> PipelineStats {
        let c = |i: usize, what: &str| IntCounter::new(format!("p_{i}_{what}"), "test").unwrap();
        PipelineStats::new(PipelineMetrics {
            ok: (0..steps).map(|i| c(i, "ok")).collect(),
            error: (0..steps).map(|i| c(i, "error")).collect(),
            deadline: (0..steps).map(|i| c(i, "deadline")).collect(),
            seconds: (0..steps)
                .map(|i| {
                    Histogram::with_opts(HistogramOpts::new(format!("p_{i}_s"), "test")).unwrap()
                })
                .collect(),
        })
    }

    fn mapping(name: &str, from: Source, tensor: &str) -> Mapping {
        Mapping {
            name: name.into(),
            from,
            tensor: tensor.into(),
            line: 0,
            column: 0,
        }
    }

    /// Step `a` (plan 0) answers the request as it is; step `b` (plan 1) reads its output.
    fn two_steps(outputs: Vec<Mapping>) -> Pipeline {
        Pipeline {
            steps: vec![
                Step {
                    name: "a".into(),
                    plan: PlanId(0),
                    inputs: None,
                    line: 0,
                },
                Step {
                    name: "b".into(),
                    plan: PlanId(1),
                    inputs: Some(vec![mapping("X", Source::Step(0), "probabilities")].into()),
                    line: 0,
                },
            ]
            .into(),
            outputs: outputs.into(),
        }
    }

    fn client() -> InferMessage {
        InferMessage {
            model_name: "r".into(),
            model_version: String::new(),
            timeout_us: None,
            rest: vec![],
            tensors: vec![],
        }
    }

    #[tokio::test(start_paused = true)]
    async fn steps_run_in_order_and_outputs_are_renamed() {
        let fake = Fake::new(vec![
            (0, 5, Ok(vec![0.6, 0.4])),
            (1, 10, Ok(vec![0.1, 0.9])),
        ]);
        let s = stats(2);
        let p = two_steps(vec![
            mapping("final", Source::Step(1), "probabilities"),
            mapping("first", Source::Step(0), "probabilities"),
        ]);
        let start = Instant::now();
        let done = pipeline(
            &p,
            PlanId(2),
            "p",
            &fake,
            &client(),
            start + Duration::from_secs(1),
            &s,
        )
        .await
        .unwrap();
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(15),
            "one after the other"
        );
        let resp = ModelInferResponse::decode(done.answer.response).unwrap();
        let names: Vec<&str> = resp.outputs.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, ["final", "first"]);
        assert_eq!(resp.raw_output_contents[0], raw(&[0.1, 0.9]).bytes);
        assert_eq!(done.answer.pipeline, Some(PlanId(2)));
        assert_eq!((s.metrics.ok[0].get(), s.metrics.ok[1].get()), (1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_step_that_cannot_fit_in_the_time_left_fails_naming_it() {
        let fake = Fake::new(vec![
            (0, 5, Ok(vec![0.6, 0.4])),
            (1, 80, Ok(vec![0.1, 0.9])),
        ]);
        let s = stats(2);
        let p = two_steps(vec![]);
        // Teach the estimate: step b takes 80 ms.
        pipeline(
            &p,
            PlanId(2),
            "p",
            &fake,
            &client(),
            Instant::now() + Duration::from_secs(1),
            &s,
        )
        .await
        .unwrap();
        let start = Instant::now();
        let err = pipeline(
            &p,
            PlanId(2),
            "p",
            &fake,
            &client(),
            start + Duration::from_millis(40),
            &s,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, GatewayError::Deadline { .. }), "{err:?}");
        assert!(
            err.to_string().contains("before pipeline 'p' step 'b'"),
            "{err}"
        );
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(5),
            "b was not started"
        );
        assert_eq!(fake.calls(1), 1, "b ran only the first time");
        assert_eq!(s.metrics.deadline[1].get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_missing_output_is_an_error_naming_the_step_and_tensor() {
        let fake = Fake::new(vec![(0, 5, Ok(vec![0.6, 0.4])), (1, 5, Ok(vec![0.1, 0.9]))]);
        let p = two_steps(vec![mapping("out", Source::Step(1), "logits")]);
        let err = pipeline(
            &p,
            PlanId(2),
            "p",
            &fake,
            &client(),
            Instant::now() + Duration::from_secs(1),
            &stats(2),
        )
        .await
        .unwrap_err();
        assert!(
            err.to_string().contains("pipeline 'p': output 'out': reads b.logits, but step 'b' answered without an output 'logits' (its outputs: probabilities)"),
            "{err}"
        );
        let failing = Fake::new(vec![(0, 5, Err("down")), (1, 5, Ok(vec![0.1, 0.9]))]);
        let err = pipeline(
            &p,
            PlanId(2),
            "p",
            &failing,
            &client(),
            Instant::now() + Duration::from_secs(1),
            &stats(2),
        )
        .await
        .unwrap_err();
        assert_eq!(err.to_string(), "pipeline 'p' step 'a': down");
        assert_eq!(failing.calls(1), 0);
    }

    fn raw(v: &[f32]) -> Raw {
        let mut b = BytesMut::new();
        v.iter().for_each(|x| b.put_f32_le(*x));
        Raw {
            datatype: "FP32".into(),
            shape: vec![1, v.len() as i64],
            bytes: b.freeze(),
        }
    }

    #[test]
    fn a_step_message_carries_the_mapped_tensors_untouched() {
        let client = InferMessage {
            model_name: "digits-pipeline".into(),
            model_version: String::new(),
            timeout_us: Some(5000),
            rest: vec![],
            tensors: vec![],
        };
        let features = raw(&[0.5, -1.0]);
        let msg = step_message(&client, "req-7", &[("FEATURES", &features)]);
        assert!(
            msg.tensors[0].as_ptr() == features.bytes.as_ptr(),
            "the same bytes, not a copy"
        );
        let back = request_tensors(&msg).unwrap();
        assert_eq!(back.id, "req-7");
        assert_eq!(back.inputs, vec![("FEATURES".to_owned(), features)]);
        assert_eq!(msg.timeout_us, Some(5000));
    }

    #[test]
    fn typed_contents_become_raw_bytes() {
        let input = InferInputTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![1, 2],
            contents: Some(InferTensorContents {
                fp32_contents: vec![0.5, -1.0],
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut b = Vec::new();
        prost::encoding::message::encode(5, &input, &mut b);
        let msg = InferMessage {
            model_name: "r".into(),
            model_version: String::new(),
            timeout_us: None,
            rest: vec![Bytes::from(b)],
            tensors: vec![],
        };
        let t = request_tensors(&msg).unwrap();
        assert_eq!(t.inputs[0].1, raw(&[0.5, -1.0]));
        let fp16 = InferInputTensor {
            datatype: "FP16".into(),
            ..input
        };
        assert!(
            typed_to_raw(&fp16)
                .unwrap_err()
                .contains("raw_input_contents")
        );
    }
}
