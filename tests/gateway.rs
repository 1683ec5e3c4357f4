//! End-to-end tests of the gateway: the real pingora gateway in-process on ephemeral ports
//! in front of real backends serving the sample ONNX models, over REST and gRPC.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::gateway::*;
use common::*;
use tonic::Code;

fn setup(
    stable: &TestBackend,
    canary: &TestBackend,
    policies: Vec<(&str, String)>,
    extra: &str,
) -> GatewaySetup {
    GatewaySetup {
        backends: vec![
            ("stable".into(), vec![stable.addr]),
            ("canary".into(), vec![canary.addr]),
        ],
        policies: policies
            .into_iter()
            .map(|(n, t)| (n.to_owned(), t))
            .collect(),
        extra: extra.to_owned(),
    }
}

fn header_rules_policy() -> String {
    digits_policy(
        "digits",
        "rules:\n  - match: { headers: { x-canary: { present: true } } }\n    plan: v2\n  - match: { headers: { x-user-id: { prefix: qa- } } }\n    plan: v2\n  - match: { headers: { x-model: { regex: \"lin(ear)?\" } } }\n    plan: linear\ndefault: v1\n",
    )
}

async fn grpc_infer(
    client: &mut Client,
    route: &str,
    version: &str,
    headers: &[(&str, &str)],
) -> Result<tonic::Response<switchyard_proto::inference::ModelInferResponse>, tonic::Status> {
    infer_with(
        client,
        infer_request(route, version, &holdout().features[..1]),
        headers,
    )
    .await
}

fn target_of<T>(resp: &tonic::Response<T>) -> String {
    resp.metadata()
        .get("x-switchyard-target")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_rules_route_over_grpc_and_rest() {
    let (stable, canary) = pools().await;
    let gw = TestGateway::start(setup(
        &stable,
        &canary,
        vec![("digits.yaml", header_rules_policy())],
        "",
    ))
    .await;
    let mut client = gw.client().await;
    let data = holdout();
    let cases: [(&[(&str, &str)], &str); 5] = [
        (&[], "digits_mlp/1"),
        (&[("x-canary", "yes")], "digits_mlp/2"),
        (&[("x-user-id", "qa-17")], "digits_mlp/2"),
        (&[("x-user-id", "alice")], "digits_mlp/1"),
        (&[("x-model", "linear")], "digits_linear/1"),
    ];
    for (headers, want) in cases {
        let resp = grpc_infer(&mut client, "digits", "", headers)
            .await
            .unwrap();
        assert_eq!(target_of(&resp), want, "gRPC {headers:?}");
        assert_eq!(resp.metadata().get("x-switchyard-route").unwrap(), "digits");
        assert_eq!(resp.metadata().get("x-switchyard-policy").unwrap(), "1");
        let body = resp.into_inner();
        let (model, version) = want.split_once('/').unwrap();
        assert_eq!(
            (body.model_name.as_str(), body.model_version.as_str()),
            (model, version)
        );
        let reference = &data.models[want].probabilities[0];
        assert!(
            probabilities(&body)[0]
                .iter()
                .zip(reference)
                .all(|(a, b)| (a - b).abs() < 1e-5)
        );

        let r = http(
            gw.http,
            "POST",
            "/v2/models/digits/infer",
            headers,
            &rest_infer_body(&data.features[..1]),
        )
        .await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(
            r.header("x-switchyard-target"),
            Some(want),
            "REST {headers:?}"
        );
        let got: Vec<f32> = r.json()["outputs"][0]["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert!(got.iter().zip(reference).all(|(a, b)| (a - b).abs() < 1e-5));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_version_pins_a_target_by_release_or_triton_version() {
    let (stable, canary) = pools().await;
    let gw = TestGateway::start(setup(
        &stable,
        &canary,
        vec![("digits.yaml", header_rules_policy())],
        "",
    ))
    .await;
    let mut client = gw.client().await;
    for (version, want) in [
        ("v1.1.0", "digits_mlp/2"),
        ("v0.1.0", "digits_linear/1"),
        ("2", "digits_mlp/2"),
    ] {
        let resp = grpc_infer(&mut client, "digits", version, &[("x-canary", "1")])
            .await
            .unwrap();
        assert_eq!(target_of(&resp), want, "{version}");
    }
    let r = http(
        gw.http,
        "POST",
        "/v2/models/digits/versions/v0.1.0/infer",
        &[],
        &rest_infer_body(&holdout().features[..1]),
    )
    .await;
    assert_eq!(r.header("x-switchyard-target"), Some("digits_linear/1"));
    let status = grpc_infer(&mut client, "digits", "v9.9.9", &[])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(
        status
            .message()
            .contains("route 'digits' has no target with release or version 'v9.9.9'"),
        "{}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_config_and_health_answer_for_routes() {
    let (stable, canary) = pools().await;
    let gw = TestGateway::start(setup(
        &stable,
        &canary,
        vec![("digits.yaml", header_rules_policy())],
        "",
    ))
    .await;
    let mut client = gw.client().await;
    use switchyard_proto::inference::*;
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
    assert!(
        client
            .model_ready(ModelReadyRequest {
                name: "digits".into(),
                version: String::new()
            })
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    assert!(
        !client
            .model_ready(ModelReadyRequest {
                name: "nope".into(),
                version: String::new()
            })
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let meta = client
        .model_metadata(ModelMetadataRequest {
            name: "digits".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.name, "digits");
    // Triton version numbers, each once: releases pin targets but are no versions.
    assert_eq!(meta.versions, vec!["1", "2"]);
    assert_eq!(meta.inputs[0].shape, vec![-1, 64]);
    let config = client
        .model_config(ModelConfigRequest {
            name: "digits".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    assert_eq!(
        (config.name.as_str(), config.max_batch_size),
        ("digits", 64)
    );
    let _ = grpc_infer(&mut client, "digits", "", &[]).await.unwrap();
    let stats = client
        .model_statistics(ModelStatisticsRequest {
            name: "digits".into(),
            version: "v1.0.0".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.model_stats.len(), 1);
    assert_eq!(
        (
            stats.model_stats[0].name.as_str(),
            stats.model_stats[0].version.as_str()
        ),
        ("digits", "1")
    );
    assert!(stats.model_stats[0].inference_count >= 1);
    // Every version: one entry per number (v1 and linear share version 1).
    let all = client
        .model_statistics(ModelStatisticsRequest {
            name: "digits".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let versions: Vec<&str> = all.model_stats.iter().map(|s| s.version.as_str()).collect();
    assert_eq!(versions, ["1", "2"]);
    assert!(all.model_stats.iter().all(|s| s.name == "digits"));

    for (path, status) in [
        ("/v2/health/live", 200),
        ("/v2/health/ready", 200),
        ("/v2/models/digits/ready", 200),
        ("/v2/models/nope/ready", 400),
    ] {
        assert_eq!(
            http(gw.http, "GET", path, &[], b"").await.status,
            status,
            "{path}"
        );
    }
    let meta = http(gw.http, "GET", "/v2/models/digits", &[], b"")
        .await
        .json();
    assert_eq!(meta["name"], "digits");
    assert_eq!(meta["inputs"][0]["shape"], serde_json::json!([-1, 64]));
    let config = http(gw.http, "GET", "/v2/models/digits/config", &[], b"")
        .await
        .json();
    assert_eq!(
        (config["name"].as_str(), config["max_batch_size"].as_i64()),
        (Some("digits"), Some(64))
    );
    assert_eq!(config["input"][0]["data_type"], "TYPE_FP32");
    // Triton's HTTP JSON: 64-bit integers as numbers, numeric versions in paths.
    assert_eq!(config["input"][0]["dims"], serde_json::json!([64]));
    let meta = http(gw.http, "GET", "/v2/models/digits/versions/2", &[], b"")
        .await
        .json();
    assert_eq!(meta["versions"], serde_json::json!(["1", "2"]));
    let stats = http(
        gw.http,
        "GET",
        "/v2/models/digits/versions/1/stats",
        &[],
        b"",
    )
    .await
    .json();
    assert_eq!(stats["model_stats"][0]["version"], "1");
    assert!(stats["model_stats"][0]["inference_count"].as_u64() >= Some(1));
    assert!(stats["model_stats"][0]["inference_stats"]["queue"]["count"].is_u64());
    let server = http(gw.http, "GET", "/v2", &[], b"").await.json();
    assert_eq!(server["name"], "switchyard-gateway");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_precise_errors_and_the_gateway_keeps_serving() {
    let (stable, canary) = pools().await;
    let gw = TestGateway::start(setup(
        &stable,
        &canary,
        vec![("digits.yaml", header_rules_policy())],
        "limits: { max_body_bytes: 4KiB }\n",
    ))
    .await;
    let mut client = gw.client().await;
    let rows = &holdout().features[..1];

    // gRPC: unknown route, backend's own validation passed through, oversize body.
    let status = grpc_infer(&mut client, "nope", "", &[]).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(
        status
            .message()
            .contains("unknown route 'nope'; the gateway serves: digits"),
        "{}",
        status.message()
    );
    let mut bad = infer_request("digits", "", rows);
    bad.inputs[0].shape = vec![1, 32];
    let status = client.model_infer(bad).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("Expected [-1,64], got [1,32]"),
        "{}",
        status.message()
    );
    let big = infer_request("digits", "", &vec![rows[0].clone(); 20]);
    let status = client.model_infer(big).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status
            .message()
            .contains("exceeds the 4096-byte limit (limits.max_body_bytes)"),
        "{}",
        status.message()
    );

    // Malformed protobuf bytes.
    let mut raw = tonic::client::Grpc::new(
        tonic::transport::Channel::from_shared(format!("http://{}", gw.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    raw.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/inference.GRPCInferenceService/ModelInfer",
    );
    let status = raw
        .unary(tonic::Request::new(vec![0x0a, 0xff, 0x01]), path, RawCodec)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("ModelInferRequest"),
        "{}",
        status.message()
    );

    // REST: malformed JSON, wrong element count, oversize, unknown path, wrong method.
    for (method, path, body, status, words) in [
        (
            "POST",
            "/v2/models/digits/infer",
            b"{not json".to_vec(),
            400,
            "invalid inference request JSON",
        ),
        (
            "POST",
            "/v2/models/digits/infer",
            br#"{"inputs":[{"name":"INPUT__0","shape":[1,64],"datatype":"FP32","data":[1,2]}]}"#
                .to_vec(),
            400,
            "holds 64 elements but data has 2",
        ),
        (
            "POST",
            "/v2/models/digits/infer",
            vec![b' '; 5000],
            413,
            "exceeds the 4096-byte limit",
        ),
        (
            "POST",
            "/v2/models/nope/infer",
            rest_infer_body(rows),
            404,
            "unknown route 'nope'",
        ),
        (
            "GET",
            "/v2/models/digits/infer",
            Vec::new(),
            400,
            "takes POST",
        ),
        (
            "GET",
            "/v3/anything",
            Vec::new(),
            400,
            "unknown path /v3/anything",
        ),
    ] {
        let r = http(gw.http, method, path, &[], &body).await;
        assert_eq!(
            r.status,
            status,
            "{method} {path}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let error = r.json()["error"].as_str().unwrap().to_owned();
        assert!(
            error.contains(words),
            "{method} {path}: {error:?} lacks {words:?}"
        );
        assert!(
            r.header("x-switchyard-policy").is_some(),
            "every response says the policy version"
        );
    }
    assert!(
        grpc_infer(&mut client, "digits", "", &[]).await.is_ok(),
        "still serving"
    );
    let metrics = gw.metrics().await;
    assert!(metrics.contains("switchyard_requests_total{protocol=\"grpc\",result=\"client_error\",route=\"digits\",target=\"digits_mlp/1\"} 1"), "{metrics}");
}

fn count_targets(seen: &HashMap<String, usize>, target: &str) -> usize {
    seen.get(target).copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_proportions_follow_the_weights() {
    let (stable, canary) = pools().await;
    let policy = digits_policy(
        "digits",
        "default: { split: { weights: { v1: 70, v2: 30 } } }\n",
    );
    let gw = TestGateway::start(setup(&stable, &canary, vec![("digits.yaml", policy)], "")).await;
    let n = 2000usize;
    let seen = Arc::new(parking_lot::Mutex::new(HashMap::<String, usize>::new()));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut client = gw.client().await;
        let seen = seen.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..n / 8 {
                let resp = grpc_infer(&mut client, "digits", "", &[]).await.unwrap();
                *seen.lock().entry(target_of(&resp)).or_default() += 1;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let seen = seen.lock().clone();
    let v2 = count_targets(&seen, "digits_mlp/2") as f64;
    assert_eq!(
        count_targets(&seen, "digits_mlp/1") + v2 as usize,
        n,
        "{seen:?}"
    );
    // Binomial: mean n·p, standard deviation sqrt(n·p·(1-p)); allow five of them.
    let (mean, sd) = (n as f64 * 0.3, (n as f64 * 0.3 * 0.7).sqrt());
    assert!(
        (v2 - mean).abs() < 5.0 * sd,
        "v2 got {v2} of {n}, expected {mean} ± {:.0}",
        5.0 * sd
    );
}

fn sticky_policy(canary_pct: u32) -> String {
    digits_policy(
        "digits",
        &format!(
            "default:\n  split: {{ sticky: header:x-user-id, salt: ramp-1, weights: {{ v1: {}, v2: {canary_pct} }} }}\n",
            100 - canary_pct
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_users_stay_on_the_canary_while_it_ramps() {
    let (stable, canary) = pools().await;
    let gw = TestGateway::start(setup(
        &stable,
        &canary,
        vec![("digits.yaml", sticky_policy(5))],
        "reload: { watch: false }\n",
    ))
    .await;
    let users: Vec<String> = (0..400).map(|i| format!("user-{i}")).collect();
    let body = rest_infer_body(&holdout().features[..1]);
    let mut client = gw.client().await;
    let mut on_canary = vec![false; users.len()];
    for (step, pct) in [5u32, 20, 50].into_iter().enumerate() {
        if step > 0 {
            gw.write_policy("digits.yaml", &sticky_policy(pct));
            let (status, reply) = gw.admin_reload().await;
            assert_eq!(
                (status, reply["version"].as_u64()),
                (200, Some(step as u64 + 1)),
                "{reply}"
            );
        }
        let mut now = vec![false; users.len()];
        for (i, user) in users.iter().enumerate() {
            // Alternate protocols: both must agree on the assignment.
            let target = if i % 2 == 0 {
                target_of(
                    &grpc_infer(&mut client, "digits", "", &[("x-user-id", user)])
                        .await
                        .unwrap(),
                )
            } else {
                let r = http(
                    gw.http,
                    "POST",
                    "/v2/models/digits/infer",
                    &[("x-user-id", user)],
                    &body,
                )
                .await;
                r.header("x-switchyard-target").unwrap().to_owned()
            };
            now[i] = target == "digits_mlp/2";
            // Asking again gives the same answer.
            if i % 50 == 0 {
                let again = target_of(
                    &grpc_infer(&mut client, "digits", "", &[("x-user-id", user)])
                        .await
                        .unwrap(),
                );
                assert_eq!(again, target, "{user} flipped between two requests");
            }
        }
        let left: Vec<&String> = users
            .iter()
            .zip(on_canary.iter().zip(&now))
            .filter(|(_, (b, a))| **b && !**a)
            .map(|(u, _)| u)
            .collect();
        assert!(
            left.is_empty(),
            "at {pct}% these users left the canary: {left:?}"
        );
        let share = now.iter().filter(|x| **x).count() as f64 / users.len() as f64;
        let sd =
            (0.01 * f64::from(pct) * (1.0 - 0.01 * f64::from(pct)) / users.len() as f64).sqrt();
        assert!(
            (share - 0.01 * f64::from(pct)).abs() < 5.0 * sd + 0.01,
            "at {pct}% the canary has {share}"
        );
        on_canary = now;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_fail_no_request() {
    let (stable, canary) = pools().await;
    let gw = TestGateway::start(setup(
        &stable,
        &canary,
        vec![("digits.yaml", sticky_policy(10))],
        "reload: { watch: false }\n",
    ))
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let versions = Arc::new(parking_lot::Mutex::new(Vec::<u64>::new()));
    let mut load = Vec::new();
    for i in 0..4 {
        let (stop, served, versions) = (stop.clone(), served.clone(), versions.clone());
        let mut client = gw.client().await;
        let http_addr = gw.http;
        load.push(tokio::spawn(async move {
            let body = rest_infer_body(&holdout().features[..1]);
            while !stop.load(Ordering::Relaxed) {
                let version = if i % 2 == 0 {
                    let resp = grpc_infer(&mut client, "digits", "", &[("x-user-id", "u")])
                        .await
                        .expect("no request fails during reloads");
                    resp.metadata()
                        .get("x-switchyard-policy")
                        .unwrap()
                        .to_str()
                        .unwrap()
                        .parse::<u64>()
                        .unwrap()
                } else {
                    let r = http(http_addr, "POST", "/v2/models/digits/infer", &[], &body).await;
                    assert_eq!(
                        r.status,
                        200,
                        "no request fails during reloads: {}",
                        String::from_utf8_lossy(&r.body)
                    );
                    r.header("x-switchyard-policy")
                        .unwrap()
                        .parse::<u64>()
                        .unwrap()
                };
                versions.lock().push(version);
                served.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for round in 0..8u32 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        if round % 3 == 2 {
            // A broken edit in between: rejected, the table in force keeps serving.
            gw.write_policy(
                "digits.yaml",
                "version: 1\nroute: digits\ntargets: {}\ndefault: nope\n",
            );
            assert_eq!(gw.admin_reload().await.0, 422);
        }
        gw.write_policy("digits.yaml", &sticky_policy(10 + round * 10));
        assert_eq!(gw.admin_reload().await.0, 200);
    }
    tokio::time::sleep(Duration::from_millis(60)).await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    assert!(served.load(Ordering::Relaxed) > 50, "the load loop ran");
    let versions = versions.lock().clone();
    assert_eq!(
        versions.iter().max(),
        Some(&9),
        "eight good reloads after version 1"
    );
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("switchyard_policy_reload_total{result=\"ok\"} 8"),
        "{metrics}"
    );
    assert!(
        metrics.contains("switchyard_policy_reload_total{result=\"error\"} 2"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_invalid_policy_is_rejected_live_and_the_old_table_keeps_serving() {
    let (stable, canary) = pools().await;
    let gw = TestGateway::start(setup(
        &stable,
        &canary,
        vec![("digits.yaml", header_rules_policy())],
        "reload: { watch: false }\n",
    ))
    .await;
    let mut client = gw.client().await;
    let corpus = root().join("tests/policies/invalid");
    let mut files: Vec<_> = std::fs::read_dir(&corpus)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 15);
    let mut failures = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let expect = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .unwrap();
        let name = file.file_name().unwrap().to_str().unwrap();
        gw.write_policy(name, &text);
        let (status, reply) = gw.admin_reload().await;
        let errors: Vec<&str> = reply["errors"]
            .as_array()
            .map(|a| a.iter().filter_map(|e| e.as_str()).collect())
            .unwrap_or_default();
        if status != 422 || !errors.iter().any(|e| e.contains(expect)) {
            failures.push(format!("{name}: {status} {errors:?}"));
        }
        assert_eq!(
            reply["version"], 1,
            "{name}: the table in force is still version 1"
        );
        let resp = grpc_infer(&mut client, "digits", "", &[("x-canary", "1")])
            .await
            .unwrap();
        assert_eq!(
            target_of(&resp),
            "digits_mlp/2",
            "{name}: routing unchanged"
        );
        let policy = http(gw.admin, "GET", "/admin/policy", &[], b"")
            .await
            .json();
        assert_eq!(policy["last_reload"]["result"], "error");
        std::fs::remove_file(gw.policy_dir().join(name)).unwrap();
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(&format!(
            "switchyard_policy_reload_total{{result=\"error\"}} {}",
            files.len()
        )),
        "{metrics}"
    );
    assert_eq!(gw.admin_reload().await.0, 200, "the folder is clean again");
}

async fn poll<F: std::future::Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    for _ in 0..200 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_backend_opens_its_breaker_traffic_moves_and_it_closes_on_return() {
    let stable = TestBackend::start(&sample_repo()).await;
    let canary = BackendProcess::start(&sample_repo(), "127.0.0.1:0".parse().unwrap());
    let canary_addr = canary.addr;
    let policy = digits_policy(
        "digits",
        "default: { split: { weights: { v1: 50, v2: 50 } } }\nfallback: [linear]\nretry: { attempts: 2, idempotent: true }\n",
    );
    let extra = "breaker: { consecutive_failures: 3, base_ejection: 1s, max_ejection: 2s, half_open_probes: 1 }\nhealth_check: { interval: 1s, timeout: 200ms, unhealthy_after: 3 }\nreload: { watch: false }\n";
    let gw = TestGateway::start(GatewaySetup {
        backends: vec![
            ("stable".into(), vec![stable.addr]),
            ("canary".into(), vec![canary_addr]),
        ],
        policies: vec![("digits.yaml".into(), policy)],
        extra: extra.into(),
    })
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(parking_lot::Mutex::new(HashMap::<String, usize>::new()));
    let failures = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, seen, failures) = (stop.clone(), seen.clone(), failures.clone());
        let mut client = gw.client().await;
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match grpc_infer(&mut client, "digits", "", &[]).await {
                    Ok(resp) => *seen.lock().entry(target_of(&resp)).or_default() += 1,
                    Err(status) => {
                        eprintln!("client error: {status:?}");
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    poll("traffic on both targets", || {
        let seen = seen.clone();
        async move {
            count_targets(&seen.lock(), "digits_mlp/2") > 20
                && count_targets(&seen.lock(), "digits_mlp/1") > 20
        }
    })
    .await;
    canary.kill();
    let breaker_open = "switchyard_breaker_state{target=\"canary:digits_mlp/2\"} 1";
    poll("the canary's breaker to open", || async {
        gw.metrics().await.contains(breaker_open)
    })
    .await;
    seen.lock().clear();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        count_targets(&seen.lock(), "digits_mlp/2"),
        0,
        "no traffic reaches the dead target"
    );
    assert!(
        count_targets(&seen.lock(), "digits_mlp/1") > 20,
        "the healthy target takes it: {:?}",
        seen.lock()
    );

    // The backend returns where it was; a probe succeeds and the breaker closes.
    let _canary = BackendProcess::start(&sample_repo(), canary_addr);
    let breaker_closed = "switchyard_breaker_state{target=\"canary:digits_mlp/2\"} 0";
    poll("the canary's breaker to close", || async {
        gw.metrics().await.contains(breaker_closed)
    })
    .await;
    seen.lock().clear();
    poll("traffic back on the canary", || {
        let seen = seen.clone();
        async move { count_targets(&seen.lock(), "digits_mlp/2") > 20 }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "a healthy target existed throughout: no client error"
    );
    let metrics = gw.metrics().await;
    let transitions = |to: &str| {
        metric(
            &metrics,
            "switchyard_breaker_transitions_total",
            &[("target", "canary:digits_mlp/2"), ("to", to)],
        )
    };
    assert!(transitions("open") >= 1.0, "{metrics}");
    assert!(transitions("half_open") >= 1.0, "{metrics}");
    assert!(transitions("closed") >= 1.0, "{metrics}");
    assert_eq!(
        metric(
            &metrics,
            "switchyard_endpoint_healthy",
            &[("backend", "canary")]
        ),
        1.0,
        "the endpoint is healthy again: {metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_nothing_healthy_the_client_gets_unavailable_naming_the_route() {
    let stable = TestBackend::start(&sample_repo()).await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap(); // bound, then closed
    let policy = "version: 1\nroute: lonely\ntargets:\n  only: { backend: canary, model: digits_mlp, version: 2 }\ndefault: only\n";
    let gw = TestGateway::start(GatewaySetup {
        backends: vec![
            ("stable".into(), vec![stable.addr]),
            ("canary".into(), vec![dead]),
        ],
        policies: vec![("lonely.yaml".into(), policy.into())],
        extra: "reload: { watch: false }\n".into(),
    })
    .await;
    let mut client = gw.client().await;
    let status = grpc_infer(&mut client, "lonely", "", &[])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
    assert!(
        status.message().contains("route 'lonely'"),
        "{}",
        status.message()
    );
    let r = http(
        gw.http,
        "POST",
        "/v2/models/lonely/infer",
        &[],
        &rest_infer_body(&holdout().features[..1]),
    )
    .await;
    assert!(r.status == 502 || r.status == 503, "{}", r.status);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("route 'lonely'")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_from_the_route_and_from_grpc_timeout() {
    // A model whose requests wait a full second in the batch queue.
    let repo = patient_repo("slow", 8, 1_000_000);
    let backend = TestBackend::start(repo.path()).await;
    let slow = "version: 1\nroute: slow\ntargets:\n  s: { backend: stable, model: slow, version: 1 }\ndefault: s\ndeadline: 100ms\n";
    let patient = "version: 1\nroute: patient\ntargets:\n  s: { backend: stable, model: slow, version: 1 }\ndefault: s\ndeadline: 10s\n";
    let gw = TestGateway::start(GatewaySetup {
        backends: vec![("stable".into(), vec![backend.addr])],
        policies: vec![
            ("slow.yaml".into(), slow.into()),
            ("patient.yaml".into(), patient.into()),
        ],
        extra: "reload: { watch: false }\n".into(),
    })
    .await;
    let mut client = gw.client().await;
    let status = grpc_infer(&mut client, "slow", "", &[]).await.unwrap_err();
    assert_eq!(
        status.code(),
        Code::DeadlineExceeded,
        "{}",
        status.message()
    );
    // Either the gateway's timer or the backend's queue timeout (the remaining budget,
    // forwarded as Triton's `timeout` parameter) ends the request: both say so.
    let message = status.message();
    assert!(
        message.contains("route 'slow': deadline of 100ms exceeded")
            || message.contains("Request timeout expired"),
        "{message}"
    );
    let r = http(
        gw.http,
        "POST",
        "/v2/models/slow/infer",
        &[],
        &rest_infer_body(&holdout().features[..1]),
    )
    .await;
    assert_eq!(r.status, 504);
    // The client's grpc-timeout, shorter than the route's 10 s, is the deadline. tonic's
    // client enforces it too and may give up first (CANCELLED); the gateway's metrics say
    // that it, too, stopped at 150 ms rather than waiting the route's 10 s.
    let status = grpc_infer(&mut client, "patient", "", &[("grpc-timeout", "150m")])
        .await
        .unwrap_err();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    let patient = "result=\"deadline_exceeded\",route=\"patient\",target=\"slow/1\"} 1";
    poll("the gateway to record the deadline", || async {
        gw.metrics().await.contains(patient)
    })
    .await;
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("result=\"deadline_exceeded\",route=\"slow\""),
        "{metrics}"
    );
}

async fn wait_for_target(client: &Client, want: &str) {
    poll(want, || {
        let mut client = client.clone();
        async move {
            grpc_infer(&mut client, "digits", "", &[])
                .await
                .is_ok_and(|r| target_of(&r) == want)
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_file_changes_reload_including_configmap_symlink_swaps() {
    let (stable, canary) = pools().await;
    let first = vec![("digits.yaml", digits_policy("digits", "default: v1\n"))];
    let gw = TestGateway::start(setup(
        &stable,
        &canary,
        first,
        "reload: { debounce: 100ms }\n",
    ))
    .await;
    let dir = gw.policy_dir();
    let client = gw.client().await;
    wait_for_target(&client, "digits_mlp/1").await;
    // An in-place edit.
    std::fs::write(
        dir.join("digits.yaml"),
        digits_policy("digits", "default: linear\n"),
    )
    .unwrap();
    wait_for_target(&client, "digits_linear/1").await;
    // Kubernetes' ConfigMap layout: the file is a link through the `..data` link, and
    // kubelet updates by writing a new timestamped folder and renaming `..data_tmp` over
    // `..data`: one atomic rename, no file written in place.
    std::fs::remove_file(dir.join("digits.yaml")).unwrap();
    for (i, default) in ["v1", "v2"].into_iter().enumerate() {
        let stamp = format!("..2026_11_26_{i}");
        std::fs::create_dir(dir.join(&stamp)).unwrap();
        std::fs::write(
            dir.join(&stamp).join("digits.yaml"),
            digits_policy("digits", &format!("default: {default}\n")),
        )
        .unwrap();
        std::os::unix::fs::symlink(&stamp, dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        if i == 0 {
            std::os::unix::fs::symlink("..data/digits.yaml", dir.join("digits.yaml")).unwrap();
        }
        wait_for_target(&client, &format!("digits_mlp/{}", i + 1)).await;
    }
    let policy = http(gw.admin, "GET", "/admin/policy", &[], b"")
        .await
        .json();
    assert_eq!(policy["last_reload"]["trigger"], "file change");
    assert!(policy["version"].as_u64().unwrap() >= 4, "{policy}");
}
