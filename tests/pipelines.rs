//! Pipelines and switches end to end: the real gateway in front of two real backends on
//! the sample repository, the shipped `digits-pipeline` and `digits-switch` routes over
//! every held-out row against the offline composition (ONNX Runtime on the same model
//! files, in `digits_holdout.json`), the metadata check of a reload, a failing middle
//! step, and pipelines and switches where any plan may stand.

mod common;

use std::collections::HashMap;

use common::gateway::*;
use common::*;
use switchyard_proto::inference::{ModelMetadataRequest, ModelStatisticsRequest};

/// The routes' reference answers written by backends/train/train_digits.py.
#[derive(Debug, serde::Deserialize)]
struct Composed {
    confusable_digits: Vec<usize>,
    routes: HashMap<String, RouteReference>,
}

#[derive(Debug, serde::Deserialize)]
struct RouteReference {
    accuracy: f64,
    model_calls: Vec<u32>,
    probabilities: Vec<Vec<f32>>,
}

fn composed() -> Composed {
    let text =
        std::fs::read_to_string(root().join("backends/sample_data/digits_holdout.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() <= 1e-5, "{what}: {got:?} vs {want:?}");
    }
}

async fn inference_count(backend: &TestBackend, model: &str) -> u64 {
    let stats = backend
        .client()
        .await
        .model_statistics(ModelStatisticsRequest {
            name: model.into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    stats.model_stats.iter().map(|s| s.inference_count).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sample_pipeline_and_switch_match_the_offline_composition_on_every_row() {
    let gw = TestGateway::digits()
        .sample("digits-pipeline.yaml")
        .sample("digits-switch.yaml")
        .start()
        .await;
    let data = holdout();
    let refs = composed();
    let pipeline = &refs.routes["digits-pipeline"];
    let switch = &refs.routes["digits-switch"];
    let mut client = gw.client().await;
    let (mut right_pipeline, mut right_switch, mut specialist_rows) = (0usize, 0usize, 0u64);
    for (i, row) in data.features.iter().enumerate() {
        let resp = infer_with(
            &mut client,
            infer_request("digits-pipeline", "", std::slice::from_ref(row)),
            &[],
        )
        .await
        .unwrap_or_else(|s| panic!("row {i}: {s:?}"));
        assert_eq!(
            header_of(&resp, "x-switchyard-pipeline"),
            "features>classify"
        );
        assert_eq!(
            header_of(&resp, "x-switchyard-target"),
            "pipeline(digits_pca/1>digits_pca_mlp/1)"
        );
        let got = probabilities(resp.get_ref());
        assert_close(
            &format!("digits-pipeline row {i}"),
            &got[0],
            &pipeline.probabilities[i],
        );
        right_pipeline += usize::from(argmax(&got[0]) == data.labels[i]);

        let resp = infer_with(
            &mut client,
            infer_request("digits-switch", "", std::slice::from_ref(row)),
            &[],
        )
        .await
        .unwrap_or_else(|s| panic!("row {i}: {s:?}"));
        let to_specialist = switch.model_calls[i] == 2;
        specialist_rows += u64::from(to_specialist);
        let (case, target) = if to_specialist {
            ("case=1; plan=specialist", "digits_specialist/1")
        } else {
            ("default; plan=linear", "digits_linear/1")
        };
        assert_eq!(header_of(&resp, "x-switchyard-switch"), case, "row {i}");
        assert_eq!(header_of(&resp, "x-switchyard-target"), target, "row {i}");
        let got = probabilities(resp.get_ref());
        assert_close(
            &format!("digits-switch row {i}"),
            &got[0],
            &switch.probabilities[i],
        );
        right_switch += usize::from(argmax(&got[0]) == data.labels[i]);
    }
    let n = data.features.len();
    let rows_right = |accuracy: f64| (accuracy * n as f64).round() as usize;
    assert_eq!(right_pipeline, rows_right(pipeline.accuracy));
    assert_eq!(right_switch, rows_right(switch.accuracy));
    assert_eq!(refs.confusable_digits, [1, 8, 9]);

    // Each model ran as often as the composition says: the pipeline's two steps once per
    // row, the specialist only for the rows the linear model put in a confusable class.
    assert_eq!(inference_count(&gw.stable, "digits_pca").await, n as u64);
    assert_eq!(
        inference_count(&gw.canary, "digits_pca_mlp").await,
        n as u64
    );
    assert_eq!(inference_count(&gw.stable, "digits_linear").await, n as u64);
    assert_eq!(
        inference_count(&gw.canary, "digits_specialist").await,
        specialist_rows
    );
    let metrics = gw.metrics().await;
    for step in ["features", "classify"] {
        assert_eq!(
            metric(
                &metrics,
                "switchyard_pipeline_step_total",
                &[
                    ("route", "digits-pipeline"),
                    ("step", step),
                    ("outcome", "ok")
                ]
            ),
            n as f64
        );
        assert_eq!(
            metric(
                &metrics,
                "switchyard_pipeline_step_seconds_count",
                &[("route", "digits-pipeline"), ("step", step)]
            ),
            n as f64
        );
    }
    assert_eq!(
        metric(
            &metrics,
            "switchyard_switch_total",
            &[("route", "digits-switch"), ("case", "1")]
        ),
        specialist_rows as f64
    );
    assert_eq!(
        metric(
            &metrics,
            "switchyard_switch_total",
            &[("route", "digits-switch"), ("case", "default")]
        ),
        (n as u64 - specialist_rows) as f64
    );

    // A batch: the pipeline maps whole tensors, so eight rows answer as eight.
    let rows: Vec<Vec<f32>> = data.features[40..48].to_vec();
    let resp = infer_with(
        &mut client,
        infer_request("digits-pipeline", "", &rows),
        &[],
    )
    .await
    .unwrap();
    for (k, got) in probabilities(resp.get_ref()).iter().enumerate() {
        assert_close("batch", got, &pipeline.probabilities[40 + k]);
    }

    // The route's metadata is the pipeline's: the request tensor it maps, the output it gives.
    let meta = client
        .model_metadata(ModelMetadataRequest {
            name: "digits-pipeline".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let io = |ts: &[switchyard_proto::inference::model_metadata_response::TensorMetadata]| {
        ts.iter()
            .map(|t| format!("{} {} {:?}", t.name, t.datatype, t.shape))
            .collect::<Vec<_>>()
    };
    assert_eq!(io(&meta.inputs), ["INPUT__0 FP32 [-1, 64]"]);
    assert_eq!(io(&meta.outputs), ["probabilities FP32 [-1, 10]"]);
    let ready = client
        .model_ready(switchyard_proto::inference::ModelReadyRequest {
            name: "digits-pipeline".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ready.ready, "every step's model is ready");

    // And over REST, the same answer.
    let body = rest_infer_body(&[data.features[7].clone()]);
    let resp = http(
        gw.http,
        "POST",
        "/v2/models/digits-pipeline/infer",
        &[("content-type", "application/json")],
        &body,
    )
    .await;
    assert_eq!(
        resp.status,
        200,
        "{:?}",
        String::from_utf8_lossy(&resp.body)
    );
    assert_eq!(
        resp.header("x-switchyard-pipeline"),
        Some("features>classify")
    );
    let json = resp.json();
    let data_out: Vec<f32> = json["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(json["outputs"][0]["name"], "probabilities");
    assert_close("rest", &data_out, &pipeline.probabilities[7]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_middle_step_fails_the_request_naming_it() {
    // The middle step's pool refuses connections (port 1): the metadata check cannot
    // reach it, so the policy loads, and requests fail at that step.
    let policy = r#"version: 1
route: three-steps
targets:
  pca: { backend: stable, model: digits_pca, version: 1 }
  down: { backend: dead, model: digits_pca_mlp, version: 1 }
  pca-mlp: { backend: canary, model: digits_pca_mlp, version: 1 }
plans:
  three:
    pipeline:
      steps:
        - { name: features, plan: pca, inputs: { INPUT__0: request.INPUT__0 } }
        - { name: check, plan: down, inputs: { FEATURES: features.features } }
        - { name: classify, plan: pca-mlp, inputs: { FEATURES: features.features } }
      outputs: { probabilities: classify.probabilities }
default: three
"#;
    let gw = TestGateway::digits()
        .policy("three.yaml", policy)
        .start()
        .await;
    let mut client = gw.client().await;
    let row = holdout().features[0].clone();
    let status = infer_with(&mut client, infer_request("three-steps", "", &[row]), &[])
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("pipeline 'three' step 'check'"),
        "{}",
        status.message()
    );
    let metrics = gw.metrics().await;
    let step = |step: &str, outcome: &str| {
        metric(
            &metrics,
            "switchyard_pipeline_step_total",
            &[
                ("route", "three-steps"),
                ("step", step),
                ("outcome", outcome),
            ],
        )
    };
    assert_eq!(
        (
            step("features", "ok"),
            step("check", "error"),
            step("classify", "ok")
        ),
        (1.0, 1.0, 0.0)
    );
    assert_eq!(
        inference_count(&gw.canary, "digits_pca_mlp").await,
        0,
        "the step after the failed one never ran"
    );
    // Nor is the route ready: a pipeline answers only when every step can, though its
    // first step's model (which used to stand for the route) is ready.
    let ready = |name: &str| {
        let mut client = client.clone();
        let name = name.to_owned();
        async move {
            client
                .model_ready(switchyard_proto::inference::ModelReadyRequest {
                    name,
                    version: String::new(),
                })
                .await
                .unwrap()
                .into_inner()
                .ready
        }
    };
    assert!(!ready("three-steps").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_refuses_mappings_the_models_metadata_do_not_fit() {
    let gw = TestGateway::digits()
        .sample("digits-pipeline.yaml")
        .extra("reload: { watch: false }\n")
        .start()
        .await;
    let corpus = root().join("tests/policies/invalid-metadata");
    let mut files: Vec<_> = std::fs::read_dir(&corpus)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 5);
    let mut client = gw.client().await;
    let data = holdout();
    let row = &data.features[0];
    let mut failures = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let expect = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .unwrap();
        let line: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("# line: ")?.parse().ok())
            .unwrap();
        let name = file.file_name().unwrap().to_str().unwrap();
        gw.write_policy(name, &text);
        let (status, reply) = gw.admin_reload().await;
        let errors: Vec<&str> = reply["errors"]
            .as_array()
            .map(|a| a.iter().filter_map(|e| e.as_str()).collect())
            .unwrap_or_default();
        let at = format!("{name}:{line}:");
        if status != 422 || !errors.iter().any(|e| e.contains(expect) && e.contains(&at)) {
            failures.push(format!("{name}: {status} {errors:?}"));
        }
        std::fs::remove_file(gw.policy_dir().join(name)).unwrap();
        // The table in force still serves the pipeline.
        let resp = infer_with(
            &mut client,
            infer_request("digits-pipeline", "", std::slice::from_ref(row)),
            &[],
        )
        .await
        .unwrap();
        assert_eq!(
            header_of(&resp, "x-switchyard-pipeline"),
            "features>classify"
        );
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelines_and_switches_stand_wherever_a_plan_does() {
    // A split between a pipeline and a switch, a cascade whose first stage is the switch,
    // the pipeline as the shadow, and a cached route over the pipeline.
    let policy = r#"version: 1
route: composed
targets:
  pca: { backend: stable, model: digits_pca, version: 1 }
  pca-mlp: { backend: canary, model: digits_pca_mlp, version: 1 }
  linear: { backend: stable, model: digits_linear, version: 1 }
  specialist: { backend: canary, model: digits_specialist, version: 1 }
  mlp: { backend: canary, model: digits_mlp, version: 2 }
plans:
  two-step:
    pipeline:
      steps:
        - { name: features, plan: pca }
        - { name: classify, plan: pca-mlp, inputs: { FEATURES: features.features } }
  unsure:
    switch:
      on: { step: linear }
      cases:
        - { when: { argmax: [1, 8, 9] }, plan: specialist }
  careful:
    cascade:
      - { plan: unsure, accept: { max_probability: 0.3 } }
      - { plan: mlp }
rules:
  - match: { headers: { x-plan: careful } }
    plan: careful
default:
  split: { sticky: header:x-user, weights: { two-step: 50, unsure: 50 } }
shadow: { target: two-step, percent: 100 }
"#;
    let cached = r#"version: 1
route: cached-pipeline
targets:
  pca: { backend: stable, model: digits_pca, version: 1 }
  pca-mlp: { backend: canary, model: digits_pca_mlp, version: 1 }
default:
  pipeline:
    steps:
      - { name: features, plan: pca }
      - { name: classify, plan: pca-mlp, inputs: { FEATURES: features.features } }
cache: { ttl: 60s }
"#;
    let gw = TestGateway::digits()
        .policy("composed.yaml", policy)
        .policy("cached.yaml", cached)
        .start()
        .await;
    let data = holdout();
    let refs = composed();
    let mut client = gw.client().await;
    let mut seen = HashMap::new();
    for (i, row) in data.features.iter().take(40).enumerate() {
        let user = format!("user-{i}");
        let resp = infer_with(
            &mut client,
            infer_request("composed", "", std::slice::from_ref(row)),
            &[("x-user", &user)],
        )
        .await
        .unwrap_or_else(|s| panic!("row {i}: {s:?}"));
        let route = if header_of(&resp, "x-switchyard-pipeline").is_empty() {
            "digits-switch"
        } else {
            "digits-pipeline"
        };
        *seen.entry(route).or_insert(0) += 1;
        assert_close(
            &format!("composed row {i} ({route})"),
            &probabilities(resp.get_ref())[0],
            &refs.routes[route].probabilities[i],
        );
    }
    assert_eq!(seen.len(), 2, "both members answered: {seen:?}");

    // The switch as a cascade stage: the cascade header and the switch header both say.
    let row = &data.features[0];
    let resp = infer_with(
        &mut client,
        infer_request("composed", "", std::slice::from_ref(row)),
        &[("x-plan", "careful")],
    )
    .await
    .unwrap();
    assert_eq!(header_of(&resp, "x-switchyard-cascade-stage"), "1");
    assert!(!header_of(&resp, "x-switchyard-switch").is_empty());

    // The pipeline shadowed the switch's answers (its own requests are not copied).
    let metrics = gw.metrics().await;
    let compared = metric(
        &metrics,
        "switchyard_shadow_requests_total",
        &[("route", "composed")],
    );
    assert!(compared >= 1.0, "shadow copies: {compared}");

    // A cached pipeline: the second identical request is a hit and runs no step.
    for want in ["miss", "hit"] {
        let resp = infer_with(
            &mut client,
            infer_request("cached-pipeline", "", std::slice::from_ref(row)),
            &[],
        )
        .await
        .unwrap();
        assert_eq!(header_of(&resp, "x-switchyard-cache"), want);
        assert_eq!(
            header_of(&resp, "x-switchyard-pipeline"),
            "features>classify"
        );
        assert_close(
            "cached",
            &probabilities(resp.get_ref())[0],
            &refs.routes["digits-pipeline"].probabilities[0],
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_can_be_a_rollouts_candidate() {
    // The pipeline takes half of the MLP's requests; the gates wait for more evidence
    // than this test sends, so the rollout stays at its step.
    let policy = r#"version: 1
route: pipeline-canary
targets:
  pca: { backend: stable, model: digits_pca, version: 1 }
  pca-mlp: { backend: canary, model: digits_pca_mlp, version: 1 }
  mlp: { backend: stable, model: digits_mlp, version: 2 }
plans:
  two-step:
    pipeline:
      steps:
        - { name: features, plan: pca }
        - { name: classify, plan: pca-mlp, inputs: { FEATURES: features.features } }
default: mlp
rollout:
  candidate: two-step
  baseline: mlp
  steps: [50, 100]
  interval: 1h
  min_requests: 100000
  gates: { error_rate: { max_increase: 0.01 } }
"#;
    let gw = TestGateway::digits()
        .policy("canary.yaml", policy)
        .start()
        .await;
    let data = holdout();
    let refs = composed();
    let mut client = gw.client().await;
    let mut sides = HashMap::new();
    for (i, row) in data.features.iter().take(60).enumerate() {
        let resp = infer_with(
            &mut client,
            infer_request("pipeline-canary", "", std::slice::from_ref(row)),
            &[],
        )
        .await
        .unwrap_or_else(|s| panic!("row {i}: {s:?}"));
        assert_eq!(
            header_of(&resp, "x-switchyard-rollout"),
            "step=1/2; weight=50"
        );
        let got = probabilities(resp.get_ref());
        let want = if header_of(&resp, "x-switchyard-pipeline") == "features>classify" {
            *sides.entry("pipeline").or_insert(0) += 1;
            &refs.routes["digits-pipeline"].probabilities[i]
        } else {
            *sides.entry("mlp").or_insert(0) += 1;
            assert_eq!(header_of(&resp, "x-switchyard-target"), "digits_mlp/2");
            &data.models["digits_mlp/2"].probabilities[i]
        };
        assert_close(&format!("row {i}"), &got[0], want);
    }
    assert_eq!(sides.len(), 2, "both sides answered: {sides:?}");
}
