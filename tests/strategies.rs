//! End-to-end tests of the strategies with the real sample models: the sample policies'
//! cascade, ensemble, shadow and cache routes through the real gateway over the held-out
//! split, each checked against what the reference probabilities give offline.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::gateway::*;
use common::*;
use switchyard_config::policy::PlanConfig;
use switchyard_proto::inference::{ModelInferResponse, ModelStatisticsRequest};

fn sample_policy(name: &str) -> String {
    std::fs::read_to_string(root().join("policies").join(name)).unwrap()
}

fn setup(stable: SocketAddr, canary: SocketAddr, policies: Vec<(&str, String)>) -> GatewaySetup {
    GatewaySetup {
        backends: vec![
            ("stable".into(), vec![stable]),
            ("canary".into(), vec![canary]),
        ],
        policies: policies
            .into_iter()
            .map(|(n, t)| (n.to_owned(), t))
            .collect(),
        extra: String::new(),
    }
}

/// One row through the gateway over gRPC: the answer and the response headers.
async fn infer_one(
    client: &mut Client,
    route: &str,
    row: &[f32],
    headers: &[(&str, &str)],
) -> (ModelInferResponse, HashMap<String, String>) {
    let resp = infer_with(client, infer_request(route, "", &[row.to_vec()]), headers)
        .await
        .unwrap_or_else(|s| panic!("{route}: {s:?}"));
    let headers = resp
        .metadata()
        .iter()
        .filter_map(|kv| match kv {
            tonic::metadata::KeyAndValueRef::Ascii(k, v) => {
                Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned()))
            }
            _ => None,
        })
        .collect();
    (resp.into_inner(), headers)
}

/// Successful inferences a backend counted for one model version.
async fn inference_count(backend: &TestBackend, model: &str, version: &str) -> u64 {
    let stats = backend
        .client()
        .await
        .model_statistics(ModelStatisticsRequest {
            name: model.into(),
            version: version.into(),
        })
        .await
        .unwrap()
        .into_inner();
    stats.model_stats.iter().map(|s| s.inference_count).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cascade_matches_the_offline_computation_over_the_held_out_split() {
    let (stable, canary) = pools().await;
    let gw = TestGateway::start(setup(
        stable.addr,
        canary.addr,
        vec![("digits-cascade.yaml", sample_policy("digits-cascade.yaml"))],
    ))
    .await;
    // The threshold as the shipped policy states it.
    let gateway =
        switchyard_config::load_gateway_config(&root().join("config/gateway.yaml")).unwrap();
    let set = switchyard_config::load_policies(&root().join("policies"), &gateway).unwrap();
    let policy = set
        .files
        .iter()
        .find(|f| f.policy.route.value == "digits-cascade")
        .unwrap();
    let PlanConfig::Cascade(stages) = &policy.policy.default.value else {
        panic!("digits-cascade is a cascade")
    };
    let threshold = stages[0].accept.as_ref().unwrap().value.margin.unwrap() as f32;

    let data = holdout();
    let linear = &data.models["digits_linear/1"].probabilities;
    let mlp = &data.models["digits_mlp/2"].probabilities;
    let mut client = gw.client().await;
    let (mut escalated, mut correct) = (0usize, 0usize);
    let (mut want_escalated, mut want_correct) = (0usize, 0usize);
    for (i, row) in data.features.iter().enumerate() {
        // Offline: the linear model answers when its margin passes, else the MLP.
        let passes = margin(&linear[i]) >= threshold;
        let offline = if passes { &linear[i] } else { &mlp[i] };
        want_escalated += usize::from(!passes);
        want_correct += usize::from(argmax(offline) == data.labels[i]);

        let (resp, headers) = infer_one(&mut client, "digits-cascade", row, &[]).await;
        let stage = &headers["x-switchyard-cascade-stage"];
        let expected_stage = if passes { "1" } else { "2" };
        assert_eq!(
            stage,
            expected_stage,
            "row {i}: margin {}",
            margin(&linear[i])
        );
        let verdict = &headers["x-switchyard-cascade"];
        assert_eq!(verdict, if passes { "accepted" } else { "last" });
        let target = &headers["x-switchyard-target"];
        assert_eq!(
            target,
            if passes {
                "digits_linear/1"
            } else {
                "digits_mlp/2"
            }
        );
        let got = &probabilities(&resp)[0];
        assert!(got.iter().zip(offline).all(|(a, b)| (a - b).abs() < 1e-5));
        escalated += usize::from(stage == "2");
        correct += usize::from(argmax(got) == data.labels[i]);
    }
    let n = data.features.len();
    assert_eq!((escalated, correct), (want_escalated, want_correct));
    eprintln!(
        "cascade: accuracy {:.4} ({correct}/{n}), escalated {:.4} ({escalated}/{n})",
        correct as f64 / n as f64,
        escalated as f64 / n as f64
    );
    // The metrics say the same.
    let m = gw.metrics().await;
    let stage = |s: &str, outcome: &str| {
        metric(
            &m,
            "switchyard_cascade_stage_total",
            &[
                ("route", "digits-cascade"),
                ("stage", s),
                ("outcome", outcome),
            ],
        ) as usize
    };
    assert_eq!(stage("1", "answered"), n - want_escalated);
    assert_eq!(stage("1", "escalated"), want_escalated);
    assert_eq!(stage("2", "answered"), want_escalated);
    // The backends ran the MLP only for escalated rows.
    assert_eq!(
        inference_count(&canary, "digits_mlp", "2").await,
        want_escalated as u64
    );

    // REST gives the same stage header.
    let r = http(
        gw.http,
        "POST",
        "/v2/models/digits-cascade/infer",
        &[],
        &rest_infer_body(&data.features[..1]),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let first = if margin(&linear[0]) >= threshold {
        "1"
    } else {
        "2"
    };
    assert_eq!(r.header("x-switchyard-cascade-stage"), Some(first));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ensemble_equals_the_offline_mean_over_the_held_out_split() {
    let (stable, canary) = pools().await;
    let gw = TestGateway::start(setup(
        stable.addr,
        canary.addr,
        vec![(
            "digits-ensemble.yaml",
            sample_policy("digits-ensemble.yaml"),
        )],
    ))
    .await;
    let data = holdout();
    let members = ["digits_mlp/1", "digits_mlp/2", "digits_linear/1"];
    let mut client = gw.client().await;
    let mut correct = 0usize;
    for (i, row) in data.features.iter().enumerate() {
        let mean: Vec<f32> = (0..10)
            .map(|k| {
                members
                    .iter()
                    .map(|m| data.models[*m].probabilities[i][k])
                    .sum::<f32>()
                    / 3.0
            })
            .collect();
        let (resp, headers) = infer_one(&mut client, "digits-ensemble", row, &[]).await;
        let got = &probabilities(&resp)[0];
        assert!(
            got.iter().zip(&mean).all(|(a, b)| (a - b).abs() < 1e-5),
            "row {i}: {got:?} vs {mean:?}"
        );
        assert_eq!(argmax(got), argmax(&mean), "row {i}");
        assert_eq!(resp.model_name, "digits-ensemble");
        assert_eq!(
            headers["x-switchyard-target"],
            "ensemble(digits_mlp/1,digits_mlp/2,digits_linear/1)"
        );
        correct += usize::from(argmax(got) == data.labels[i]);
    }
    let n = data.features.len();
    eprintln!(
        "ensemble: accuracy {:.4} ({correct}/{n})",
        correct as f64 / n as f64
    );
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "switchyard_ensemble_total",
            &[("route", "digits-ensemble"), ("result", "ok")]
        ) as usize,
        n
    );

    // REST with JSON tensors and with binary tensors in and out.
    let mean0: Vec<f32> = (0..10)
        .map(|k| {
            members
                .iter()
                .map(|m| data.models[*m].probabilities[0][k])
                .sum::<f32>()
                / 3.0
        })
        .collect();
    let r = http(
        gw.http,
        "POST",
        "/v2/models/digits-ensemble/infer",
        &[],
        &rest_infer_body(&data.features[..1]),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let json: Vec<f32> = r.json()["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert!(json.iter().zip(&mean0).all(|(a, b)| (a - b).abs() < 1e-5));
    let (header_len, body) = binary_body(&data.features[0]);
    let r = http(
        gw.http,
        "POST",
        "/v2/models/digits-ensemble/infer",
        &[("inference-header-content-length", &header_len.to_string())],
        &body,
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let json_len: usize = r
        .header("inference-header-content-length")
        .unwrap()
        .parse()
        .unwrap();
    let raw: Vec<f32> = r.body[json_len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert!(
        raw.iter().zip(&mean0).all(|(a, b)| (a - b).abs() < 1e-5),
        "{raw:?}"
    );
}

/// A binary-tensor REST body (KServe v2 binary extension) for one row, asking for binary
/// output: (JSON header length, body).
fn binary_body(row: &[f32]) -> (usize, Vec<u8>) {
    let header = serde_json::to_vec(&serde_json::json!({
        "inputs": [{ "name": "INPUT__0", "shape": [1, 64], "datatype": "FP32",
                     "parameters": { "binary_data_size": 256 } }],
        "outputs": [{ "name": "probabilities", "parameters": { "binary_data": true } }]
    }))
    .unwrap();
    let mut body = header.clone();
    for v in row {
        body.extend_from_slice(&v.to_le_bytes());
    }
    (header.len(), body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_agreement_equals_the_offline_agreement_and_never_touches_the_answer() {
    let (stable, canary) = pools().await;
    // The sample route with every request on v1, so each one is a v1/v2 pair.
    let policy = sample_policy("digits.yaml").replace(
        "  split: { sticky: header:x-user-id, salt: digits-ab-1, weights: { mlp-v1: 90, mlp-v2: 10 } }",
        "  mlp-v1",
    );
    assert!(policy.contains("shadow: { target: mlp-v2"));
    let gw = TestGateway::start(setup(
        stable.addr,
        canary.addr,
        vec![("digits.yaml", policy)],
    ))
    .await;
    let data = holdout();
    let v1 = &data.models["digits_mlp/1"].probabilities;
    let v2 = &data.models["digits_mlp/2"].probabilities;
    let mut client = gw.client().await;
    for (i, row) in data.features.iter().enumerate() {
        let (resp, headers) = infer_one(&mut client, "digits", row, &[]).await;
        assert_eq!(headers["x-switchyard-target"], "digits_mlp/1");
        assert_eq!(headers["x-switchyard-shadow"], "sent");
        let got = &probabilities(&resp)[0];
        assert!(
            got.iter().zip(&v1[i]).all(|(a, b)| (a - b).abs() < 1e-5),
            "the primary's answer, untouched"
        );
    }
    let n = data.features.len();
    let want_agree = (0..n).filter(|&i| argmax(&v1[i]) == argmax(&v2[i])).count();
    // Shadows finish in the background: wait until every pair is compared.
    let mut shadow = serde_json::Value::Null;
    for _ in 0..200 {
        let r = http(gw.admin, "GET", "/admin/shadow", &[], b"").await;
        shadow = r.json()["shadows"][0].clone();
        if shadow["compared"].as_u64() == Some(n as u64) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(shadow["route"], "digits");
    assert_eq!(shadow["shadow"], "mlp-v2");
    assert_eq!(shadow["compared"].as_u64(), Some(n as u64), "{shadow}");
    assert_eq!(
        shadow["agreed"].as_u64(),
        Some(want_agree as u64),
        "{shadow}"
    );
    assert_eq!(shadow["dropped"].as_u64(), Some(0));
    eprintln!("shadow v1 vs v2: agreement {want_agree}/{n}");
    let m = gw.metrics().await;
    let agree = |a: &str| {
        metric(
            &m,
            "switchyard_shadow_agreement_total",
            &[("route", "digits"), ("shadow", "mlp-v2"), ("agree", a)],
        ) as usize
    };
    assert_eq!(
        (agree("true"), agree("false")),
        (want_agree, n - want_agree)
    );
    assert_eq!(
        metric(
            &m,
            "switchyard_shadow_requests_total",
            &[("route", "digits"), ("result", "ok")]
        ) as usize,
        n
    );
    assert_eq!(
        metric(
            &m,
            "switchyard_shadow_max_abs_difference_count",
            &[("route", "digits")]
        ) as usize,
        n
    );
    // The copies really ran on the candidate, and the primary's on v1 only.
    assert_eq!(inference_count(&canary, "digits_mlp", "2").await, n as u64);
    assert_eq!(inference_count(&stable, "digits_mlp", "1").await, n as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_shadow_never_fails_the_primary() {
    let stable = TestBackend::start(&sample_repo()).await;
    // The canary pool points at a port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let policy = digits_policy("digits", "default: v1\nshadow: { target: v2 }\n");
    let gw = TestGateway::start(setup(stable.addr, closed, vec![("digits.yaml", policy)])).await;
    let data = holdout();
    let mut client = gw.client().await;
    for row in &data.features[..20] {
        let (_, headers) = infer_one(&mut client, "digits", row, &[]).await;
        assert_eq!(headers["x-switchyard-target"], "digits_mlp/1");
    }
    let mut errors = 0.0;
    for _ in 0..100 {
        let m = gw.metrics().await;
        errors = metric(
            &m,
            "switchyard_shadow_requests_total",
            &[("route", "digits"), ("result", "error")],
        );
        if errors >= 20.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(errors, 20.0, "every copy failed and was counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_repeat_returns_identical_bytes_without_a_backend_call() {
    let (stable, canary) = pools().await;
    let gw = TestGateway::start(setup(
        stable.addr,
        canary.addr,
        vec![("digits-cached.yaml", sample_policy("digits-cached.yaml"))],
    ))
    .await;
    let data = holdout();
    let mut client = gw.client().await;
    let row = &data.features[3];
    let (first, h) = infer_one(&mut client, "digits-cached", row, &[]).await;
    assert_eq!(h["x-switchyard-cache"], "miss");
    let calls = inference_count(&stable, "digits_mlp", "1").await;
    assert_eq!(calls, 1);
    let (again, h) = infer_one(&mut client, "digits-cached", row, &[]).await;
    assert_eq!(h["x-switchyard-cache"], "hit");
    assert_eq!(h["x-switchyard-target"], "digits_mlp/1");
    assert_eq!(
        prost::Message::encode_to_vec(&again),
        prost::Message::encode_to_vec(&first),
        "identical bytes"
    );
    assert_eq!(
        inference_count(&stable, "digits_mlp", "1").await,
        calls,
        "no backend call"
    );

    // Cache-Control: no-cache asks the backend and refreshes; no-store bypasses.
    let (_, h) = infer_one(
        &mut client,
        "digits-cached",
        row,
        &[("cache-control", "no-cache")],
    )
    .await;
    assert_eq!(h["x-switchyard-cache"], "miss");
    let (_, h) = infer_one(
        &mut client,
        "digits-cached",
        &data.features[4],
        &[("cache-control", "no-store")],
    )
    .await;
    assert_eq!(h["x-switchyard-cache"], "bypass");
    let (_, h) = infer_one(&mut client, "digits-cached", &data.features[4], &[]).await;
    assert_eq!(h["x-switchyard-cache"], "miss", "no-store stored nothing");
    assert_eq!(inference_count(&stable, "digits_mlp", "1").await, calls + 3);

    // REST: a repeat is a hit with the same body.
    let body = rest_infer_body(&data.features[5..6]);
    let a = http(
        gw.http,
        "POST",
        "/v2/models/digits-cached/infer",
        &[],
        &body,
    )
    .await;
    let b = http(
        gw.http,
        "POST",
        "/v2/models/digits-cached/infer",
        &[],
        &body,
    )
    .await;
    assert_eq!(
        (
            a.header("x-switchyard-cache"),
            b.header("x-switchyard-cache")
        ),
        (Some("miss"), Some("hit"))
    );
    assert_eq!(a.body, b.body);

    // Concurrent identical misses share one backend call.
    let before = inference_count(&stable, "digits_mlp", "1").await;
    let row = data.features[6].clone();
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (mut c, row) = (client.clone(), row.clone());
            tokio::spawn(async move {
                infer_one(&mut c, "digits-cached", &row, &[]).await.1["x-switchyard-cache"].clone()
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.unwrap());
    }
    assert_eq!(
        outcomes.iter().filter(|o| *o == "miss").count(),
        1,
        "{outcomes:?}"
    );
    assert_eq!(
        inference_count(&stable, "digits_mlp", "1").await,
        before + 1
    );

    // A reload that changes the plan stops serving the old entries.
    gw.write_policy(
        "digits-cached.yaml",
        &sample_policy("digits-cached.yaml").replace(
            "model: digits_mlp, version: 1",
            "model: digits_mlp, version: 2",
        ),
    );
    let (status, _) = gw.admin_reload().await;
    assert_eq!(status, 200);
    let (_, h) = infer_one(&mut client, "digits-cached", &data.features[3], &[]).await;
    assert_eq!(
        (
            h["x-switchyard-cache"].as_str(),
            h["x-switchyard-target"].as_str()
        ),
        ("miss", "digits_mlp/2")
    );
    let m = gw.metrics().await;
    assert!(
        metric(
            &m,
            "switchyard_cache_requests_total",
            &[("route", "digits-cached"), ("result", "hit")]
        ) >= 2.0
    );
    assert!(metric(&m, "switchyard_cache_bytes", &[("route", "digits-cached")]) > 0.0);
}
