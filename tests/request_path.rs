//! The request path's contracts, end to end through the real gateway and backends: what
//! the client causes never counts against a backend, the cache answers only from the
//! right place and with the caller's own id, and nested splits draw independently.

mod common;

use std::time::Duration;

use common::gateway::*;
use common::*;
use prost::Message;
use switchyard_proto::inference::ModelInferResponse;
use tonic::Code;

/// The test gateway on the sample pools (and `dead`, a pool nobody listens on), with one
/// policy file and extra gateway.yaml lines.
async fn start(policy: &str, extra: &str) -> DigitsGateway {
    TestGateway::digits()
        .policy("route.yaml", policy)
        .extra(extra)
        .start()
        .await
}

fn sample_policy(name: &str) -> String {
    std::fs::read_to_string(root().join("policies").join(name)).unwrap()
}

fn one_row() -> Vec<Vec<f32>> {
    holdout().features[..1].to_vec()
}

/// Breaker openings of every target, from the gateway's metrics.
async fn openings(gw: &TestGateway) -> f64 {
    metric(
        &gw.metrics().await,
        "switchyard_breaker_transitions_total",
        &[("to", "open")],
    )
}

async fn grpc_infer_with(
    client: &mut Client,
    route: &str,
    id: &str,
    headers: &[(&str, &str)],
) -> tonic::Response<ModelInferResponse> {
    let mut msg = infer_request(route, "", &one_row());
    msg.id = id.to_owned();
    infer_with(client, msg, headers)
        .await
        .unwrap_or_else(|s| panic!("{route}: {s:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_client_causes_never_opens_a_breaker() {
    // One failure would open a breaker: any client fault counted against a target shows.
    let s = start(
        &sample_policy("digits.yaml"),
        "breaker: { consecutive_failures: 1 }\n",
    )
    .await;
    let gw = &s.gw;

    // Triton's own `timeout` parameter (µs), as a REST client sends it.
    let body = serde_json::to_vec(&serde_json::json!({
        "parameters": { "timeout": 1 },
        "inputs": [{ "name": "INPUT__0", "shape": [1, 64], "datatype": "FP32", "data": one_row().concat() }]
    }))
    .unwrap();
    for _ in 0..6 {
        let r = http(gw.http, "POST", "/v2/models/digits/infer", &[], &body).await;
        assert_eq!(r.status, 504, "{}", String::from_utf8_lossy(&r.body));
        assert!(
            String::from_utf8_lossy(&r.body).contains("deadline"),
            "{}",
            String::from_utf8_lossy(&r.body)
        );
    }

    // A gRPC deadline far shorter than the route's: answered in time or expired, never
    // UNAVAILABLE.
    let mut client = gw.client().await;
    for _ in 0..6 {
        let mut req = tonic::Request::new(infer_request("digits", "", &one_row()));
        req.set_timeout(Duration::from_millis(1));
        if let Err(status) = client.model_infer(req).await {
            assert!(
                matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
                "{status:?}"
            );
        }
    }

    // A request the backend cannot decode: `id` (field 3, a string) sent as a varint.
    let mut bytes = infer_request("digits", "", &one_row()).encode_to_vec();
    bytes.extend_from_slice(&[0x18, 0x05]);
    let mut raw = raw_client(gw.grpc).await;
    for _ in 0..6 {
        raw.ready().await.unwrap();
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(
            "/inference.GRPCInferenceService/ModelInfer",
        );
        let status = raw
            .unary(tonic::Request::new(bytes.clone()), path, RawCodec)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }

    // Let the 1 ms requests' upstream calls settle, then: nothing opened, all serve.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(openings(gw).await, 0.0, "{}", gw.metrics().await);
    for route in ["digits"] {
        for version in ["", "v1.1.0", "v0.1.0"] {
            let mut req = tonic::Request::new(infer_request(route, version, &one_row()));
            req.set_timeout(Duration::from_secs(5));
            client
                .model_infer(req)
                .await
                .unwrap_or_else(|s| panic!("{route} {version}: {s:?}"));
        }
    }
    let metrics = gw.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "switchyard_requests_total",
            &[
                ("route", "digits"),
                ("protocol", "rest"),
                ("result", "deadline_exceeded")
            ]
        ),
        6.0,
        "the deadlines are the client's: {metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_answer_carries_the_callers_own_request_id() {
    let s = start(&sample_policy("digits-cached.yaml"), "").await;
    let mut client = s.gw.client().await;
    let first = grpc_infer_with(&mut client, "digits-cached", "first-caller", &[]).await;
    assert_eq!(header_of(&first, "x-switchyard-cache"), "miss");
    assert_eq!(first.get_ref().id, "first-caller");
    let second = grpc_infer_with(&mut client, "digits-cached", "second-caller", &[]).await;
    assert_eq!(header_of(&second, "x-switchyard-cache"), "hit");
    assert_eq!(second.get_ref().id, "second-caller");
    assert_eq!(second.get_ref().outputs, first.get_ref().outputs);
    let third = grpc_infer_with(&mut client, "digits-cached", "", &[]).await;
    assert_eq!(header_of(&third, "x-switchyard-cache"), "hit");
    assert_eq!(third.get_ref().id, "", "no id asked, none given");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_comment_keeps_the_cache_and_a_changed_plan_frees_it() {
    let policy = sample_policy("digits-cached.yaml");
    let s = start(&policy, "reload: { watch: false }\n").await;
    let gw = &s.gw;
    let mut client = gw.client().await;
    let miss = grpc_infer_with(&mut client, "digits-cached", "", &[]).await;
    assert_eq!(header_of(&miss, "x-switchyard-cache"), "miss");
    let bytes = || async {
        metric(
            &gw.metrics().await,
            "switchyard_cache_bytes",
            &[("route", "digits-cached")],
        )
    };
    assert!(bytes().await > 0.0);

    gw.write_policy(
        "route.yaml",
        &format!("# A comment, a blank line and nothing else.\n\n{policy}"),
    );
    assert_eq!(gw.admin_reload().await.0, 200);
    let hit = grpc_infer_with(&mut client, "digits-cached", "", &[]).await;
    assert_eq!(header_of(&hit, "x-switchyard-policy"), "2");
    assert_eq!(
        header_of(&hit, "x-switchyard-cache"),
        "hit",
        "a comment changes nothing"
    );

    gw.write_policy(
        "route.yaml",
        &policy.replace(
            "model: digits_mlp, version: 1",
            "model: digits_mlp, version: 2",
        ),
    );
    assert_eq!(gw.admin_reload().await.0, 200);
    assert_eq!(bytes().await, 0.0, "the old cache was let go");
    let fresh = grpc_infer_with(&mut client, "digits-cached", "", &[]).await;
    assert_eq!(header_of(&fresh, "x-switchyard-cache"), "miss");
    assert_eq!(header_of(&fresh, "x-switchyard-target"), "digits_mlp/2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_answer_is_returned_but_never_cached() {
    let policy = "version: 1\nroute: r\ntargets:\n  down: { backend: dead, model: digits_mlp, version: 1 }\n  linear: { backend: stable, model: digits_linear, version: 1 }\ndefault: down\nfallback: [linear]\ncache: { ttl: 5m }\ndeadline: 2s\n";
    let s = start(policy, "").await;
    let mut client = s.gw.client().await;
    for i in 0..3 {
        let r = grpc_infer_with(&mut client, "r", "", &[]).await;
        assert_eq!(header_of(&r, "x-switchyard-target"), "digits_linear/1");
        assert_eq!(
            header_of(&r, "x-switchyard-cache"),
            "miss",
            "request {i}: a fallback's answer is not the decided target's"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_inline_plans_on_one_cached_route_never_share_answers() {
    // Two unnamed cascades: the rule's always answers with the linear model, the
    // default's always with the MLP (every softmax row's top value is above 0.01).
    let policy = digits_policy(
        "r",
        "rules:\n  - match: { headers: { x-linear: { present: true } } }\n    plan: { cascade: [ { plan: linear, accept: { max_probability: 0.01 } }, { plan: v1 } ] }\ndefault: { cascade: [ { plan: v1, accept: { max_probability: 0.01 } }, { plan: linear } ] }\ncache: { ttl: 5m }\n",
    );
    let s = start(&policy, "").await;
    let mut client = s.gw.client().await;
    let linear = grpc_infer_with(&mut client, "r", "", &[("x-linear", "1")]).await;
    assert_eq!(header_of(&linear, "x-switchyard-target"), "digits_linear/1");
    assert_eq!(header_of(&linear, "x-switchyard-cache"), "miss");
    let mlp = grpc_infer_with(&mut client, "r", "", &[]).await;
    assert_eq!(header_of(&mlp, "x-switchyard-cache"), "miss");
    assert_eq!(header_of(&mlp, "x-switchyard-target"), "digits_mlp/1");
    assert_ne!(
        mlp.get_ref().raw_output_contents,
        linear.get_ref().raw_output_contents
    );
    let again = grpc_infer_with(&mut client, "r", "", &[("x-linear", "1")]).await;
    assert_eq!(header_of(&again, "x-switchyard-cache"), "hit");
    assert_eq!(header_of(&again, "x-switchyard-target"), "digits_linear/1");
    let metrics = s.gw.metrics().await;
    for plan in ["cascade-1", "cascade-2"] {
        assert!(
            metric(
                &metrics,
                "switchyard_cascade_stage_total",
                &[("route", "r"), ("plan", plan)]
            ) >= 1.0,
            "{plan} has counters of its own: {metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_inside_a_cascade_draws_independently_of_the_outer_split() {
    // The outer split sends its upper half to the cascade; a nested split that reused the
    // request's draw would then always pick its own upper half (v2), never v1.
    let policy = digits_policy(
        "r",
        "plans:\n  inner: { split: { weights: { v1: 50, v2: 50 } } }\n  c: { cascade: [ { plan: inner, accept: { max_probability: 0.01 } }, { plan: linear } ] }\ndefault: { split: { weights: { linear: 50, c: 50 } } }\n",
    );
    let s = start(&policy, "").await;
    let mut client = s.gw.client().await;
    let mut by_target = std::collections::HashMap::<String, usize>::new();
    for _ in 0..96 {
        let r = grpc_infer_with(&mut client, "r", "", &[]).await;
        if !header_of(&r, "x-switchyard-cascade-stage").is_empty() {
            *by_target
                .entry(header_of(&r, "x-switchyard-target"))
                .or_default() += 1;
        }
    }
    for target in ["digits_mlp/1", "digits_mlp/2"] {
        assert!(
            by_target.get(target).copied().unwrap_or(0) > 0,
            "{target} never answered inside the cascade: {by_target:?}"
        );
    }
}
