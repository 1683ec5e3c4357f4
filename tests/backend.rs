//! End-to-end tests of `switchyard backend`: a real tonic server on an ephemeral port with
//! the sample ONNX models, driven over gRPC.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use switchyard_proto::inference::{
    InferParameter, InferTensorContents, ModelConfigRequest, ModelMetadataRequest,
    ModelReadyRequest, ModelStatisticsRequest, RepositoryIndexRequest, RepositoryModelLoadRequest,
    RepositoryModelUnloadRequest, ServerLiveRequest, ServerMetadataRequest, ServerReadyRequest,
    infer_parameter::ParameterChoice, model_infer_request::InferRequestedOutputTensor,
};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predictions_match_reference_and_accuracy_matches_readme() {
    let backend = TestBackend::start(&sample_repo()).await;
    let mut client = backend.client().await;
    let data = holdout();
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    for (model, version) in [
        ("digits_linear", "1"),
        ("digits_mlp", "1"),
        ("digits_mlp", "2"),
    ] {
        let reference = &data.models[&format!("{model}/{version}")];
        let mut correct = 0;
        let mut worst = 0f32;
        for (start, rows) in data
            .features
            .chunks(60)
            .enumerate()
            .map(|(i, c)| (i * 60, c))
        {
            let resp = client
                .model_infer(infer_request(model, version, rows))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(resp.model_name, model);
            assert_eq!(resp.model_version, version);
            assert_eq!(resp.outputs[0].shape, vec![rows.len() as i64, 10]);
            assert_eq!(resp.outputs[0].datatype, "FP32");
            for (i, probs) in probabilities(&resp).iter().enumerate() {
                let expected = &reference.probabilities[start + i];
                for (a, b) in probs.iter().zip(expected) {
                    worst = worst.max((a - b).abs());
                }
                correct += usize::from(argmax(probs) == data.labels[start + i]);
            }
        }
        assert!(
            worst < 1e-5,
            "{model} v{version}: max |diff| {worst} from the reference"
        );
        let accuracy = correct as f64 / data.labels.len() as f64;
        assert!(
            (accuracy - reference.accuracy).abs() < 1e-12,
            "{model} v{version}: {accuracy}"
        );
        let row = format!("| `{model}` | {version} | {:.2}% |", accuracy * 100.0);
        assert!(
            readme.contains(&row),
            "README.md should carry the accuracy row {row:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_contents_give_the_same_answer_as_raw_bytes() {
    let backend = TestBackend::start(&sample_repo()).await;
    let mut client = backend.client().await;
    let data = holdout();
    let rows = &data.features[..3];
    let raw = client
        .model_infer(infer_request("digits_mlp", "2", rows))
        .await
        .unwrap()
        .into_inner();
    let mut typed = infer_request("digits_mlp", "2", rows);
    typed.raw_input_contents.clear();
    typed.inputs[0].contents = Some(InferTensorContents {
        fp32_contents: rows.concat(),
        ..Default::default()
    });
    typed.id = "req-7".to_owned();
    typed.outputs = vec![InferRequestedOutputTensor {
        name: "probabilities".to_owned(),
        ..Default::default()
    }];
    let typed = client.model_infer(typed).await.unwrap().into_inner();
    assert_eq!(typed.id, "req-7");
    assert_eq!(probabilities(&typed), probabilities(&raw));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_and_config_match_config_pbtxt() {
    let backend = TestBackend::start(&sample_repo()).await;
    let mut client = backend.client().await;
    assert!(
        client
            .server_live(ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
    assert!(
        client
            .server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let server = client
        .server_metadata(ServerMetadataRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(server.name, "switchyard");
    assert!(server.extensions.contains(&"model_repository".to_owned()));

    let meta = client
        .model_metadata(ModelMetadataRequest {
            name: "digits_mlp".to_owned(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.name, "digits_mlp");
    assert_eq!(
        meta.versions,
        vec!["1", "2"],
        "version_policy all serves both"
    );
    assert_eq!(meta.platform, "onnxruntime_onnx");
    assert_eq!(
        (
            meta.inputs[0].name.as_str(),
            meta.inputs[0].datatype.as_str()
        ),
        ("INPUT__0", "FP32")
    );
    assert_eq!(meta.inputs[0].shape, vec![-1, 64]);
    assert_eq!(
        (
            meta.outputs[0].name.as_str(),
            meta.outputs[0].shape.as_slice()
        ),
        ("probabilities", &[-1, 10][..])
    );

    let linear = client
        .model_metadata(ModelMetadataRequest {
            name: "digits_linear".to_owned(),
            version: "1".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(linear.versions, vec!["1"]);

    let config = client
        .model_config(ModelConfigRequest {
            name: "digits_mlp".to_owned(),
            version: "2".to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    assert_eq!(config.name, "digits_mlp");
    assert_eq!(config.max_batch_size, 64);
    assert_eq!(config.input[0].dims, vec![64]);
    assert_eq!(config.input[0].data_type, 11, "TYPE_FP32");
    assert_eq!(config.output[0].dims, vec![10]);
    use switchyard_proto::inference::model_config::SchedulingChoice;
    let Some(SchedulingChoice::DynamicBatching(db)) = config.scheduling_choice else {
        panic!("dynamic batching")
    };
    assert_eq!(db.preferred_batch_size, vec![16, 32]);
    assert_eq!(db.max_queue_delay_microseconds, 100);
    assert_eq!(db.default_queue_policy.unwrap().max_queue_size, 1024);
    assert_eq!(config.instance_group[0].count, 1);
    assert!(matches!(
        config.version_policy.unwrap().policy_choice,
        Some(switchyard_proto::inference::model_version_policy::PolicyChoice::All(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_are_batched() {
    let backend = TestBackend::start(&sample_repo()).await;
    let data = Arc::new(holdout());
    let mut tasks = Vec::new();
    for t in 0..48 {
        let mut client = backend.client().await;
        let data = data.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..20 {
                let row = &data.features[(t * 20 + i) % data.features.len()];
                let resp = client
                    .model_infer(infer_request("digits_mlp", "1", std::slice::from_ref(row)))
                    .await
                    .unwrap();
                assert_eq!(resp.into_inner().outputs[0].shape, vec![1, 10]);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut client = backend.client().await;
    let stats = client
        .model_statistics(ModelStatisticsRequest {
            name: "digits_mlp".to_owned(),
            version: "1".to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .model_stats;
    assert_eq!(stats.len(), 1);
    let s = &stats[0];
    assert_eq!(s.inference_count, 48 * 20);
    assert!(
        s.execution_count < s.inference_count,
        "no batching: {} executions",
        s.execution_count
    );
    assert!(
        s.batch_stats.iter().any(|b| b.batch_size > 1),
        "{:?}",
        s.batch_stats
    );
    let executed: u64 = s
        .batch_stats
        .iter()
        .map(|b| b.batch_size * b.compute_infer.unwrap().count)
        .sum();
    assert_eq!(
        executed, s.inference_count,
        "batch statistics account for every inference"
    );
    assert_eq!(
        s.inference_stats.as_ref().unwrap().success.unwrap().count,
        48 * 20
    );

    let metrics = backend.metrics_text().await;
    for line in [
        "nv_inference_request_success{model=\"digits_mlp\",version=\"1\"} 960",
        "nv_inference_count{model=\"digits_mlp\",version=\"1\"} 960",
        &format!(
            "nv_inference_exec_count{{model=\"digits_mlp\",version=\"1\"}} {}",
            s.execution_count
        ),
        "nv_inference_pending_request_count{model=\"digits_mlp\",version=\"1\"} 0",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
    for family in [
        "nv_inference_request_duration_us",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_infer_duration_us",
        "nv_inference_request_failure",
    ] {
        assert!(
            metrics.contains(&format!("{family}{{model=\"digits_mlp\",version=\"1\"}}")),
            "missing {family}"
        );
    }
}

/// One bad request: how to break a good one, the status, and words the message must hold.
struct BadCase {
    what: &'static str,
    mutate: fn(&mut switchyard_proto::inference::ModelInferRequest),
    code: Code,
    message: &'static [&'static str],
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_a_precise_status_and_the_server_keeps_serving() {
    let cases: Vec<BadCase> = vec![
        BadCase {
            what: "unknown model",
            mutate: |r| r.model_name = "nope".into(),
            code: Code::NotFound,
            message: &["unknown model", "'nope'"],
        },
        BadCase {
            what: "unknown version",
            mutate: |r| r.model_version = "7".into(),
            code: Code::NotFound,
            message: &["'digits_mlp' version 7"],
        },
        BadCase {
            what: "non-numeric version",
            mutate: |r| r.model_version = "latest".into(),
            code: Code::NotFound,
            message: &["version latest"],
        },
        BadCase {
            what: "wrong datatype",
            mutate: |r| r.inputs[0].datatype = "FP64".into(),
            code: Code::InvalidArgument,
            message: &["'INPUT__0'", "'FP64'", "expects 'FP32'"],
        },
        BadCase {
            what: "unknown datatype",
            mutate: |r| r.inputs[0].datatype = "FLOAT".into(),
            code: Code::InvalidArgument,
            message: &["unknown datatype 'FLOAT'"],
        },
        BadCase {
            what: "wrong rank",
            mutate: |r| r.inputs[0].shape = vec![256],
            code: Code::InvalidArgument,
            message: &[
                "unexpected shape",
                "'INPUT__0'",
                "Expected [-1,64], got [256]",
            ],
        },
        BadCase {
            what: "wrong dims",
            mutate: |r| r.inputs[0].shape = vec![2, 32],
            code: Code::InvalidArgument,
            message: &["Expected [-1,64], got [2,32]"],
        },
        BadCase {
            what: "negative dim",
            mutate: |r| r.inputs[0].shape = vec![-2, 64],
            code: Code::InvalidArgument,
            message: &["got [-2,64]"],
        },
        BadCase {
            what: "byte length",
            mutate: |r| r.raw_input_contents[0] = r.raw_input_contents[0].slice(1..),
            code: Code::InvalidArgument,
            message: &["byte size mismatch", "'INPUT__0'", "Expected 512, got 511"],
        },
        BadCase {
            what: "batch above max_batch_size",
            mutate: |r| {
                r.inputs[0].shape = vec![65, 64];
                r.raw_input_contents[0] = vec![0u8; 65 * 64 * 4].into();
            },
            code: Code::InvalidArgument,
            message: &["batch-size must be between 1 and 64", "got 65"],
        },
        BadCase {
            what: "huge shape",
            mutate: |r| r.inputs[0].shape = vec![i64::MAX, 64],
            code: Code::InvalidArgument,
            message: &["batch-size"],
        },
        BadCase {
            what: "missing input",
            mutate: |r| {
                r.inputs.clear();
                r.raw_input_contents.clear();
            },
            code: Code::InvalidArgument,
            message: &["missing input 'INPUT__0'"],
        },
        BadCase {
            what: "unknown input",
            mutate: |r| r.inputs[0].name = "IMAGE".into(),
            code: Code::InvalidArgument,
            message: &["unexpected inference input 'IMAGE'", "'INPUT__0'"],
        },
        BadCase {
            what: "duplicate input",
            mutate: |r| {
                r.inputs.push(r.inputs[0].clone());
                r.raw_input_contents.push(r.raw_input_contents[0].clone());
            },
            code: Code::InvalidArgument,
            message: &["'INPUT__0' appears more than once"],
        },
        BadCase {
            what: "raw count",
            mutate: |r| r.raw_input_contents.push(vec![0u8; 4].into()),
            code: Code::InvalidArgument,
            message: &["raw_input_contents has 2 entries", "1 inputs"],
        },
        BadCase {
            what: "raw and typed",
            mutate: |r| {
                r.inputs[0].contents = Some(InferTensorContents {
                    fp32_contents: vec![0.0; 128],
                    ..Default::default()
                })
            },
            code: Code::InvalidArgument,
            message: &["typed contents", "raw_input_contents"],
        },
        BadCase {
            what: "typed count",
            mutate: |r| {
                r.raw_input_contents.clear();
                r.inputs[0].contents = Some(InferTensorContents {
                    fp32_contents: vec![0.0; 127],
                    ..Default::default()
                });
            },
            code: Code::InvalidArgument,
            message: &["holds 128 elements", "fp32_contents has 127"],
        },
        BadCase {
            what: "typed field of another type",
            mutate: |r| {
                r.raw_input_contents.clear();
                r.inputs[0].contents = Some(InferTensorContents {
                    int_contents: vec![0; 128],
                    ..Default::default()
                });
            },
            code: Code::InvalidArgument,
            message: &["fp32_contents has 0"],
        },
        BadCase {
            what: "unknown output",
            mutate: |r| {
                r.outputs = vec![InferRequestedOutputTensor {
                    name: "logits".into(),
                    ..Default::default()
                }]
            },
            code: Code::InvalidArgument,
            message: &["unexpected inference output 'logits'", "'probabilities'"],
        },
        BadCase {
            what: "timeout of the wrong type",
            mutate: |r| {
                r.parameters.insert(
                    "timeout".into(),
                    InferParameter {
                        parameter_choice: Some(ParameterChoice::StringParam("soon".into())),
                    },
                );
            },
            code: Code::InvalidArgument,
            message: &["'timeout'", "microseconds"],
        },
    ];
    let backend = TestBackend::start(&sample_repo()).await;
    let mut client = backend.client().await;
    let data = holdout();
    let good = infer_request("digits_mlp", "1", &data.features[..2]);
    for case in &cases {
        let mut req = good.clone();
        (case.mutate)(&mut req);
        let status = client.model_infer(req).await.expect_err(case.what);
        assert_eq!(
            status.code(),
            case.code,
            "{}: {}",
            case.what,
            status.message()
        );
        for words in case.message {
            assert!(
                status.message().contains(words),
                "{}: {:?} lacks {words:?}",
                case.what,
                status.message()
            );
        }
    }
    assert!(
        client.model_infer(good).await.is_ok(),
        "the server still serves"
    );
    let metrics = backend.metrics_text().await;
    assert!(
        metric(
            &metrics,
            "nv_inference_request_failure",
            &[("model", "digits_mlp"), ("version", "1")]
        ) >= 1.0,
        "the refused requests that reached version 1 are counted: {metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arbitrary_request_bytes_never_break_the_server() {
    use prost::Message;
    let backend = TestBackend::start(&sample_repo()).await;
    let data = holdout();
    let good = infer_request("digits_mlp", "1", &data.features[..2]).encode_to_vec();
    let mut raw = raw_client(backend.addr).await;
    // Deterministic mutations of a valid request: flipped bytes, truncations, insertions.
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..400 {
        let mut bytes = good.clone();
        match i % 4 {
            0 => {
                for _ in 0..1 + next() % 8 {
                    let at = (next() as usize) % bytes.len();
                    bytes[at] = next() as u8;
                }
            }
            1 => bytes.truncate((next() as usize) % bytes.len()),
            2 => {
                let at = (next() as usize) % bytes.len();
                let junk: Vec<u8> = (0..1 + next() % 32).map(|_| next() as u8).collect();
                bytes.splice(at..at, junk);
            }
            _ => bytes = (0..next() % 300).map(|_| next() as u8).collect(),
        }
        raw.ready().await.unwrap();
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(
            "/inference.GRPCInferenceService/ModelInfer",
        );
        // Each mutation gets an answer or a status that names the request's fault; a
        // transport error, UNKNOWN or UNAVAILABLE would mean the server broke.
        if let Err(status) = raw.unary(tonic::Request::new(bytes), path, RawCodec).await {
            let decode = status.code() == tonic::Code::Internal
                && status
                    .message()
                    .starts_with("failed to decode Protobuf message");
            assert!(
                decode
                    || matches!(
                        status.code(),
                        tonic::Code::InvalidArgument
                            | tonic::Code::NotFound
                            | tonic::Code::Unimplemented
                            | tonic::Code::FailedPrecondition
                    ),
                "mutation {i}: {status:?}"
            );
        }
    }
    let mut client = backend.client().await;
    let resp = client
        .model_infer(infer_request("digits_mlp", "1", &data.features[..1]))
        .await
        .unwrap();
    assert_eq!(resp.into_inner().outputs[0].shape, vec![1, 10]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_max_queue_size_are_refused_and_timeouts_expire() {
    let repo = tempfile::tempdir().unwrap();
    let model = repo.path().join("slow");
    std::fs::create_dir_all(model.join("1")).unwrap();
    std::fs::copy(
        sample_repo().join("digits_linear/1/model.onnx"),
        model.join("1/model.onnx"),
    )
    .unwrap();
    // A batch of fewer than 8 rows waits a full second for company; the queue holds 3.
    std::fs::write(
        model.join("config.pbtxt"),
        "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 1000000 default_queue_policy { max_queue_size: 3 } }\n",
    )
    .unwrap();
    let backend = TestBackend::start(repo.path()).await;
    let data = Arc::new(holdout());
    let mut waiting = Vec::new();
    for i in 0..3 {
        let mut client = backend.client().await;
        let data = data.clone();
        waiting.push(tokio::spawn(async move {
            client
                .model_infer(infer_request("slow", "", &data.features[i..i + 1]))
                .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut client = backend.client().await;
    let status = client
        .model_infer(infer_request("slow", "", &data.features[..1]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
    assert!(
        status.message().contains("max_queue_size 3"),
        "{}",
        status.message()
    );
    for w in waiting {
        assert!(
            w.await.unwrap().is_ok(),
            "queued requests are served once the delay expires"
        );
    }
    // A request whose `timeout` (µs) is shorter than the queue delay expires in the queue.
    let mut req = infer_request("slow", "", &data.features[..1]);
    req.parameters.insert(
        "timeout".into(),
        InferParameter {
            parameter_choice: Some(ParameterChoice::Int64Param(50_000)),
        },
    );
    let status = client.model_infer(req).await.unwrap_err();
    assert_eq!(
        status.code(),
        Code::DeadlineExceeded,
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("Request timeout expired"),
        "{}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_repository_entries_are_refused_with_a_reason_and_the_rest_serves() {
    let repo = tempfile::tempdir().unwrap();
    let r = repo.path();
    let sample = sample_repo();
    // The good model: the small linear one (about 3 KB).
    copy_dir(&sample.join("digits_linear"), &r.join("good"));
    std::fs::write(
        r.join("good/config.pbtxt"),
        std::fs::read_to_string(sample.join("digits_linear/config.pbtxt"))
            .unwrap()
            .replace("digits_linear", "good"),
    )
    .unwrap();
    let mlp_config = std::fs::read_to_string(sample.join("digits_mlp/config.pbtxt")).unwrap();
    let with_name = |name: &str| {
        mlp_config
            .replace("digits_mlp", name)
            .replace("version_policy: { all {} }\n", "")
    };
    let make = |name: &str, config: &str, model: Option<&[u8]>| {
        std::fs::create_dir_all(r.join(name).join("1")).unwrap();
        std::fs::write(r.join(name).join("config.pbtxt"), config).unwrap();
        if let Some(bytes) = model {
            std::fs::write(r.join(name).join("1/model.onnx"), bytes).unwrap();
        }
    };
    let mlp = std::fs::read(sample.join("digits_mlp/1/model.onnx")).unwrap();
    let linear = std::fs::read(sample.join("digits_linear/1/model.onnx")).unwrap();
    assert!(
        mlp.len() > 8_000 && linear.len() < 8_000,
        "the size limit below sits between the two models"
    );

    make(
        "pickled",
        &with_name("pickled").replace("onnxruntime_onnx", "pytorch_libtorch"),
        None,
    );
    std::fs::write(r.join("pickled/1/model.pt"), b"\x80\x04\x95pickle").unwrap();
    make("tampered", &with_name("tampered"), Some(&linear));
    std::fs::write(
        r.join("tampered/1/SHA256SUMS"),
        format!("{}  model.onnx\n", "0".repeat(64)),
    )
    .unwrap();
    make("oversize", &with_name("oversize"), Some(&mlp));
    make(
        "mismatch",
        &with_name("mismatch")
            .replace("dims: [ 64 ]", "dims: [ 32 ]")
            .replace("\"probabilities\"", "\"scores\""),
        Some(&linear),
    );
    make(
        "corrupt",
        &with_name("corrupt"),
        Some(b"\x08\x07this is not an onnx model\xff\xff\xff"),
    );
    make(
        "malformed",
        "name: \"malformed\"\nmax_batch_size: 64\ninput [ { name: \"INPUT__0\" data_type: TYPE_FP33 dims: [ 64 ] } ]\n",
        Some(&linear),
    );
    // A model folder that is a dangling link aborted the whole start-up.
    std::os::unix::fs::symlink(r.join("gone"), r.join("dangling")).unwrap();

    let mut config = switchyard_backend::BackendConfig::new(r);
    config.repository.max_model_size = 8_000;
    let backend = TestBackend::start_with(config).await;
    let mut client = backend.client().await;
    let index = client
        .repository_index(RepositoryIndexRequest::default())
        .await
        .unwrap()
        .into_inner()
        .models;
    let reason = |name: &str| {
        let rows: Vec<_> = index.iter().filter(|m| m.name == name).collect();
        assert_eq!(rows.len(), 1, "{name}: {index:#?}");
        assert_eq!(rows[0].state, "UNAVAILABLE", "{name}");
        rows[0].reason.clone()
    };
    let expectations: [(&str, &[&str]); 7] = [
        ("dangling", &["dangling cannot be read", "No such file"]),
        (
            "pickled",
            &["model.pt", "pickle-based format", "arbitrary code"],
        ),
        ("tampered", &["checksum mismatch", "model.onnx"]),
        ("oversize", &["over the 8000-byte model size limit"]),
        (
            "mismatch",
            &[
                "dims[0] is 32 in config.pbtxt but 64",
                "config output 'scores' is not in",
                "'probabilities'",
            ],
        ),
        ("corrupt", &["not a valid ONNX model"]),
        ("malformed", &["config.pbtxt:3:39", "TYPE_FP33"]),
    ];
    for (name, words) in expectations {
        let reason = reason(name);
        for w in words {
            assert!(reason.contains(w), "{name}: {reason:?} lacks {w:?}");
        }
        let ready = client
            .model_ready(ModelReadyRequest {
                name: name.to_owned(),
                version: String::new(),
            })
            .await
            .unwrap();
        assert!(!ready.into_inner().ready, "{name}");
        let status = client
            .model_infer(infer_request(name, "", &holdout().features[..1]))
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::Unavailable,
            "{name}: {}",
            status.message()
        );
    }
    let good: Vec<_> = index.iter().filter(|m| m.name == "good").collect();
    assert_eq!(
        (good[0].version.as_str(), good[0].state.as_str()),
        ("1", "READY")
    );
    let resp = client
        .model_infer(infer_request("good", "", &holdout().features[..4]))
        .await
        .unwrap()
        .into_inner();
    for (got, want) in probabilities(&resp)
        .iter()
        .zip(&holdout().models["digits_linear/1"].probabilities)
    {
        assert!(close(got, want));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloading_a_changed_version_never_fails_a_request() {
    let repo = copy_sample_repo();
    let backend = TestBackend::start_controlled(repo.path()).await;
    let data = Arc::new(holdout());
    let v1 = data.models["digits_mlp/1"].probabilities[0].clone();
    let v2 = data.models["digits_mlp/2"].probabilities[0].clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for _ in 0..4 {
        let mut client = backend.client().await;
        let (data, stop, served) = (data.clone(), stop.clone(), served.clone());
        let (v1, v2) = (v1.clone(), v2.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let resp = client
                    .model_infer(infer_request("digits_mlp", "1", &data.features[..1]))
                    .await;
                let probs =
                    probabilities(&resp.expect("no request fails during a reload").into_inner());
                assert!(
                    close(&probs[0], &v1) || close(&probs[0], &v2),
                    "an answer from the old or the new model"
                );
                served.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let mut admin = backend.client().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Version 1 gets version 2's weights: a changed file, reloaded in place.
    let v1_path = repo.path().join("digits_mlp/1/model.onnx");
    std::fs::copy(repo.path().join("digits_mlp/2/model.onnx"), &v1_path).unwrap();
    std::fs::remove_file(repo.path().join("digits_mlp/1/SHA256SUMS")).unwrap();
    admin
        .repository_model_load(controlled(RepositoryModelLoadRequest {
            model_name: "digits_mlp".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let after = admin
        .model_infer(infer_request("digits_mlp", "1", &data.features[..1]))
        .await
        .unwrap()
        .into_inner();
    assert!(
        close(&probabilities(&after)[0], &v2),
        "version 1 now answers with the new weights"
    );

    // A broken reload keeps the serving version and says why.
    std::fs::write(&v1_path, b"truncated").unwrap();
    let status = admin
        .repository_model_load(controlled(RepositoryModelLoadRequest {
            model_name: "digits_mlp".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert!(
        status.message().contains("not a valid ONNX model"),
        "{}",
        status.message()
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    assert!(served.load(Ordering::Relaxed) > 20);
    let still = admin
        .model_infer(infer_request("digits_mlp", "1", &data.features[..1]))
        .await
        .unwrap()
        .into_inner();
    assert!(close(&probabilities(&still)[0], &v2));
    let index = admin
        .repository_index(RepositoryIndexRequest::default())
        .await
        .unwrap()
        .into_inner()
        .models;
    let row = index
        .iter()
        .find(|m| m.name == "digits_mlp" && m.version == "1")
        .unwrap();
    assert_eq!(row.state, "READY");
    assert!(
        row.reason.contains("reload failed, previous model kept"),
        "{}",
        row.reason
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unload_and_load_again() {
    let repo = copy_sample_repo();
    let backend = TestBackend::start_controlled(repo.path()).await;
    let mut client = backend.client().await;
    let rows = &holdout().features[..1];
    client
        .repository_model_unload(controlled(RepositoryModelUnloadRequest {
            model_name: "digits_linear".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    let status = client
        .model_infer(infer_request("digits_linear", "", rows))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let index = client
        .repository_index(RepositoryIndexRequest::default())
        .await
        .unwrap()
        .into_inner()
        .models;
    assert!(
        index.iter().any(|m| m.name == "digits_linear"
            && m.state == "UNAVAILABLE"
            && m.reason == "unloaded")
    );
    client
        .repository_model_load(controlled(RepositoryModelLoadRequest {
            model_name: "digits_linear".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert!(
        client
            .model_infer(infer_request("digits_linear", "", rows))
            .await
            .is_ok()
    );
    let status = client
        .repository_model_load(controlled(RepositoryModelLoadRequest {
            model_name: "ghost".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert!(
        status.message().contains("no folder"),
        "{}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_without_inputs_and_outputs_is_completed_from_the_graph() {
    let repo = tempfile::tempdir().unwrap();
    let model = repo.path().join("auto");
    std::fs::create_dir_all(model.join("3")).unwrap();
    std::fs::create_dir_all(model.join("5")).unwrap();
    std::fs::copy(
        sample_repo().join("digits_mlp/1/model.onnx"),
        model.join("3/model.onnx"),
    )
    .unwrap();
    std::fs::copy(
        sample_repo().join("digits_mlp/2/model.onnx"),
        model.join("5/model.onnx"),
    )
    .unwrap();
    std::fs::write(model.join("config.pbtxt"), "max_batch_size: 16\n").unwrap();
    let backend = TestBackend::start(repo.path()).await;
    let mut client = backend.client().await;
    let config = client
        .model_config(ModelConfigRequest {
            name: "auto".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    assert_eq!(config.name, "auto");
    assert_eq!(config.platform, "onnxruntime_onnx");
    assert_eq!(
        (
            config.input[0].name.as_str(),
            config.input[0].dims.as_slice()
        ),
        ("INPUT__0", &[64][..])
    );
    assert_eq!(
        (
            config.output[0].name.as_str(),
            config.output[0].dims.as_slice()
        ),
        ("probabilities", &[10][..])
    );
    // Default version policy: latest 1, so only version 5 serves.
    let meta = client
        .model_metadata(ModelMetadataRequest {
            name: "auto".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.versions, vec!["5"]);
    let resp = client
        .model_infer(infer_request("auto", "", &holdout().features[..1]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.model_version, "5");
}

/// Equal within the 1e-5 that separates runtimes' float rounding.
fn close(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5)
}

/// Needs `--features onnxruntime` and `ORT_DYLIB_PATH` (`.ci/run` sets both, from the PyPI wheel).
#[cfg(feature = "onnxruntime")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onnxruntime_runtime_serves_the_reference_predictions() {
    let repo = copy_sample_repo();
    // Per model: digits_linear asks for ONNX Runtime in its config; digits_mlp follows the flag.
    let config_path = repo.path().join("digits_linear/config.pbtxt");
    let text = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(&config_path, format!("{text}parameters {{ key: \"switchyard.runtime\" value {{ string_value: \"onnxruntime\" }} }}\n")).unwrap();
    for default_runtime in [
        switchyard_backend::RuntimeKind::Tract,
        switchyard_backend::RuntimeKind::OnnxRuntime,
    ] {
        let mut config = switchyard_backend::BackendConfig::new(repo.path());
        config.repository.default_runtime = default_runtime;
        let backend = TestBackend::start_with(config).await;
        let mut client = backend.client().await;
        let data = holdout();
        for (model, version) in [
            ("digits_linear", "1"),
            ("digits_mlp", "1"),
            ("digits_mlp", "2"),
        ] {
            let reference = &data.models[&format!("{model}/{version}")];
            for (start, rows) in data
                .features
                .chunks(64)
                .enumerate()
                .map(|(i, c)| (i * 64, c))
            {
                let resp = client
                    .model_infer(infer_request(model, version, rows))
                    .await
                    .unwrap()
                    .into_inner();
                for (i, probs) in probabilities(&resp).iter().enumerate() {
                    assert!(
                        close(probs, &reference.probabilities[start + i]),
                        "{model} v{version} row {}",
                        start + i
                    );
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_control_is_off_by_default_and_needs_the_token_when_on() {
    let rows = &holdout().features[..1];
    let unload = || RepositoryModelUnloadRequest {
        model_name: "digits_linear".into(),
        ..Default::default()
    };
    // Triton's `--model-control-mode none`: an anonymous unload was served before.
    let backend = TestBackend::start(&sample_repo()).await;
    let mut client = backend.client().await;
    let status = client.repository_model_unload(unload()).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("--model-control-mode explicit"),
        "{status:?}"
    );
    let status = client
        .repository_model_load(controlled(RepositoryModelLoadRequest {
            model_name: "digits_linear".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::FailedPrecondition,
        "a token opens nothing when off"
    );
    assert!(
        client
            .model_infer(infer_request("digits_linear", "", rows))
            .await
            .is_ok()
    );

    // `explicit`: the token, and only the token, unloads.
    let repo = copy_sample_repo();
    let backend = TestBackend::start_controlled(repo.path()).await;
    let mut client = backend.client().await;
    let status = client.repository_model_unload(unload()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let mut wrong = tonic::Request::new(unload());
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer not-the-token".parse().unwrap());
    let status = client.repository_model_unload(wrong).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(
        client
            .model_infer(infer_request("digits_linear", "", rows))
            .await
            .is_ok()
    );
    client
        .repository_model_unload(controlled(unload()))
        .await
        .unwrap();
    let status = client
        .model_infer(infer_request("digits_linear", "", rows))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_of_many_requests_keeps_a_bounded_number_in_flight() {
    // A model whose batches wait a second for company (up to 1024 rows): every request
    // read from the stream sits in the queue, so the queue depth shows what is in flight.
    let repo = patient_repo("patient", 1024, 1_000_000);
    let backend = TestBackend::start(repo.path()).await;
    let mut client = backend.client().await;
    let data = holdout();
    let requests: Vec<_> = (0..200)
        .map(|i| {
            let mut r = infer_request("patient", "", &data.features[i % 10..i % 10 + 1]);
            r.id = i.to_string();
            r
        })
        .collect();
    let mut answers = client
        .model_stream_infer(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pending = metric(
        &backend.metrics_text().await,
        "nv_inference_pending_request_count",
        &[("model", "patient")],
    );
    assert!(
        pending > 0.0 && pending <= 64.0,
        "in flight from one stream: {pending}"
    );
    let mut ids = std::collections::HashSet::new();
    while let Some(answer) = answers.message().await.unwrap() {
        assert_eq!(answer.error_message, "");
        ids.insert(answer.infer_response.unwrap().id);
        if ids.len() == 200 {
            break;
        }
    }
    assert_eq!(ids.len(), 200, "every message answered once");
}

/// A `lookup` request for one table index (INT64 [1, 1]).
fn lookup(index: i64) -> switchyard_proto::inference::ModelInferRequest {
    use switchyard_proto::inference::{ModelInferRequest, model_infer_request::InferInputTensor};
    ModelInferRequest {
        model_name: "lookup".into(),
        inputs: vec![InferInputTensor {
            name: "INDEX".into(),
            datatype: "INT64".into(),
            shape: vec![1, 1],
            ..Default::default()
        }],
        raw_input_contents: vec![index.to_le_bytes().to_vec().into()],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_model_cannot_run_fails_alone_not_its_batch() {
    // Three requests share one batch (the queue waits 300 ms for company); index 99 is past
    // the lookup table, so the runtime fails the batch. Every request of it got that
    // INTERNAL error, and the gateway counted it against the backend.
    let repo = tempfile::tempdir().unwrap();
    copy_dir(
        &root().join("tests/models/lookup"),
        &repo.path().join("lookup"),
    );
    let backend = TestBackend::start(repo.path()).await;
    let calls: Vec<_> = [1, 99, 7]
        .into_iter()
        .map(|index| {
            let addr = backend.addr;
            tokio::spawn(async move { client(addr).await.model_infer(lookup(index)).await })
        })
        .collect();
    let mut results = Vec::new();
    for c in calls {
        results.push(c.await.unwrap());
    }
    let value = |r: &Result<
        tonic::Response<switchyard_proto::inference::ModelInferResponse>,
        tonic::Status,
    >| {
        let raw = &r.as_ref().unwrap().get_ref().raw_output_contents[0];
        f32::from_le_bytes(raw[..4].try_into().unwrap())
    };
    assert_eq!(value(&results[0]), 10.0);
    assert_eq!(value(&results[2]), 70.0);
    let bad = results[1].as_ref().unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    assert!(
        bad.message()
            .contains("cannot run this request, while the other requests of its batch ran"),
        "{bad:?}"
    );
    // Alone, the model's failure cannot be told from the request's: INTERNAL, as Triton.
    let alone = client(backend.addr)
        .await
        .model_infer(lookup(99))
        .await
        .unwrap_err();
    assert_eq!(alone.code(), Code::Internal, "{alone:?}");
    // And the instance still serves: the panicked run left tract's state half-run, and
    // every later request failed with "Clashing resolution for expression".
    let after = client(backend.addr).await.model_infer(lookup(2)).await;
    assert_eq!(value(&after), 20.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_is_bounded_by_bytes_too() {
    // The model holds requests 300 ms for a batch; the queue may hold 20 bytes of inputs
    // (two requests of 8), so a third waiting request is refused at once.
    let repo = tempfile::tempdir().unwrap();
    copy_dir(
        &root().join("tests/models/lookup"),
        &repo.path().join("lookup"),
    );
    let mut config = switchyard_backend::BackendConfig::new(repo.path());
    config.repository.max_queue_bytes = 20;
    let backend = TestBackend::start_with(config).await;
    let held: Vec<_> = (0..2)
        .map(|i| {
            let addr = backend.addr;
            tokio::spawn(async move { client(addr).await.model_infer(lookup(i)).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = client(backend.addr)
        .await
        .model_infer(lookup(3))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("--max-queue-bytes"),
        "{refused:?}"
    );
    for h in held {
        h.await.unwrap().unwrap();
    }
    // Answered requests give their bytes back.
    client(backend.addr)
        .await
        .model_infer(lookup(3))
        .await
        .unwrap();
}
