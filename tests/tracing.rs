//! Distributed tracing and the access log, end to end: the real gateway and backends
//! export their spans over OTLP/gRPC to a receiver this test runs (built on the official
//! `opentelemetry-proto` service definition), and the trace of one cascade request is
//! checked span by span, parent by parent, from the client's `traceparent` to the
//! backends' queue and compute spans.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use parking_lot::Mutex;
use switchyard_backend::BackendConfig;

use common::gateway::*;
use common::*;

/// One received span, flattened.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    name: String,
    trace: String,
    id: String,
    parent: String,
    kind: i32,
    attributes: HashMap<String, String>,
    error: bool,
    /// Start and end, ns since the epoch.
    start: u64,
    end: u64,
}

/// The OTLP receiver: keeps every span it is sent.
#[derive(Debug, Default, Clone)]
struct Receiver {
    spans: Arc<Mutex<Vec<Got>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let text = |v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>| match v
            .as_ref()
            .and_then(|v| v.value.as_ref())
        {
            Some(Value::StringValue(s)) => s.clone(),
            Some(Value::IntValue(i)) => i.to_string(),
            Some(Value::DoubleValue(d)) => d.to_string(),
            Some(Value::BoolValue(b)) => b.to_string(),
            other => format!("{other:?}"),
        };
        let mut spans = self.spans.lock();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .map(|a| text(&a.value))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    spans.push(Got {
                        service: service.clone(),
                        name: s.name,
                        trace: hex::encode(&s.trace_id),
                        id: hex::encode(&s.span_id),
                        parent: hex::encode(&s.parent_span_id),
                        kind: s.kind,
                        attributes: s
                            .attributes
                            .iter()
                            .map(|a| (a.key.clone(), text(&a.value)))
                            .collect(),
                        error: s.status.as_ref().is_some_and(|st| st.code == 2),
                        start: s.start_time_unix_nano,
                        end: s.end_time_unix_nano,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Receiver {
    async fn start() -> (Self, SocketAddr) {
        let receiver = Self::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(receiver.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (receiver, addr)
    }

    /// The spans of `trace`, once `done` holds for them (or panics after 30 s).
    async fn until(&self, trace: &str, done: impl Fn(&[Got]) -> bool) -> Vec<Got> {
        let start = Instant::now();
        loop {
            let spans: Vec<Got> = self
                .spans
                .lock()
                .iter()
                .filter(|s| s.trace == trace)
                .cloned()
                .collect();
            if done(&spans) {
                return spans;
            }
            if start.elapsed() > Duration::from_secs(30) {
                panic!("trace {trace} never completed; received: {spans:#?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn settings(addr: SocketAddr) -> switchyard_proto::trace::Settings {
    switchyard_proto::trace::Settings {
        endpoint: format!("http://{addr}"),
        sample_ratio: 1.0,
        service_name: "switchyard-backend".into(),
        max_queue: 4096,
    }
}

/// Two backends (both tracing to the receiver unless `untraced`), and a gateway with
/// the sample cascade and `extra`.
async fn setup(addr: SocketAddr, extra: &str) -> (TestGateway, TestBackend, TestBackend) {
    let backend = || BackendConfig {
        tracing: Some(settings(addr)),
        ..BackendConfig::new(sample_repo())
    };
    let stable = TestBackend::start_with(backend()).await;
    let canary = TestBackend::start_with(backend()).await;
    let cascade = std::fs::read_to_string(root().join("policies/digits-cascade.yaml"))
        .unwrap()
        .replace("deadline: 250ms", "deadline: 5s");
    let gw = TestGateway::start(GatewaySetup {
        backends: vec![
            ("stable".into(), vec![stable.addr]),
            ("canary".into(), vec![canary.addr]),
        ],
        policies: vec![("digits-cascade.yaml".into(), cascade)],
        extra: extra.to_owned(),
    })
    .await;
    (gw, stable, canary)
}

/// A held-out row that the linear stage is not sure of (top-two margin under the
/// cascade's 0.2), so both stages run.
fn unsure_row() -> Vec<f32> {
    let h = holdout();
    let linear = &h.models["digits_linear/1"].probabilities;
    let i = linear
        .iter()
        .position(|p| {
            let mut s = p.clone();
            s.sort_by(|a, b| b.total_cmp(a));
            s[0] - s[1] < 0.1
        })
        .expect("an unsure row");
    h.features[i].clone()
}

fn one<'a>(spans: &'a [Got], what: &str, pick: impl Fn(&Got) -> bool) -> &'a Got {
    let found: Vec<&Got> = spans.iter().filter(|s| pick(s)).collect();
    assert_eq!(
        found.len(),
        1,
        "expected one span that is {what}, found {}: {spans:#?}",
        found.len()
    );
    found[0]
}

/// The trace as an indented tree: offset from the root's start, duration, service,
/// name and the attributes worth reading (the README shows one).
fn render(spans: &[Got], root: &Got) -> String {
    fn walk(spans: &[Got], span: &Got, t0: u64, depth: usize, out: &mut String) {
        let keys = [
            "switchyard.plan",
            "switchyard.target",
            "switchyard.model",
            "switchyard.cascade",
            "switchyard.cascade.stage",
            "switchyard.policy_version",
            "server.address",
            "switchyard.outcome",
            "switchyard.batch_rows",
        ];
        let attrs: Vec<String> = keys
            .iter()
            .filter_map(|k| {
                span.attributes
                    .get(*k)
                    .map(|v| format!("{}={v}", k.trim_start_matches("switchyard.")))
            })
            .collect();
        out.push_str(&format!(
            "{:>8.3} ms {:>7.3} ms  {}{} [{}] {}\n",
            span.start.saturating_sub(t0) as f64 / 1e6,
            span.end.saturating_sub(span.start) as f64 / 1e6,
            "  ".repeat(depth),
            span.name,
            span.service,
            attrs.join(" ")
        ));
        let mut children: Vec<&Got> = spans.iter().filter(|s| s.parent == span.id).collect();
        children.sort_by_key(|s| s.start);
        for c in children {
            walk(spans, c, t0, depth + 1, out);
        }
    }
    let mut out = format!(
        "trace {}\n   start    duration  span [service] attributes\n",
        root.trace
    );
    walk(spans, root, root.start, 0, &mut out);
    out
}

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";
/// OTLP span kinds.
const INTERNAL: i32 = 1;
const SERVER: i32 = 2;
const CLIENT: i32 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cascade_request_is_one_trace_from_the_client_through_the_gateway_to_the_backends() {
    let (receiver, addr) = Receiver::start().await;
    let (gw, stable, canary) = setup(
        addr,
        &format!("tracing: {{ otlp_endpoint: \"http://{addr}\", sample_ratio: 1.0 }}\n"),
    )
    .await;
    // gRPC, with the caller's context in the metadata and a vendor tracestate.
    let mut request = tonic::Request::new(infer_request("digits-cascade", "", &[unsure_row()]));
    let m = request.metadata_mut();
    m.insert(
        "traceparent",
        format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01")
            .parse()
            .unwrap(),
    );
    m.insert("tracestate", "vendor=abc".parse().unwrap());
    let reply = client(gw.grpc).await.model_infer(request).await.unwrap();
    assert_eq!(header_of(&reply, "x-switchyard-cascade-stage"), "2");

    // 1 request + 2 stages + 2 attempts at the gateway; 2 × (infer, queue, compute) at
    // the backends.
    let spans = receiver.until(CLIENT_TRACE, |s| s.len() >= 11).await;
    assert_eq!(spans.len(), 11, "{spans:#?}");
    let request = one(&spans, "the gateway's request span", |s| {
        s.service == "switchyard-gateway" && s.kind == SERVER
    });
    assert_eq!(request.name, "infer digits-cascade");
    assert_eq!(
        request.parent, CLIENT_SPAN,
        "the client's span is the parent"
    );
    let a = &request.attributes;
    assert_eq!(a["switchyard.route"], "digits-cascade");
    assert_eq!(a["switchyard.plan"], "cascade");
    assert_eq!(a["switchyard.target"], "digits_mlp/2");
    assert_eq!(a["switchyard.cascade"], "last");
    assert_eq!(a["switchyard.cascade.stage"], "2");
    assert_eq!(a["switchyard.policy_version"], "1");
    assert_eq!(a["switchyard.protocol"], "grpc");
    assert_eq!(a["switchyard.result"], "ok");
    assert!(!request.error);

    for (stage, target, model, at) in [
        (1, "linear", "digits_linear", stable.addr),
        (2, "mlp", "digits_mlp", canary.addr),
    ] {
        let st = one(&spans, &format!("cascade stage {stage}"), |s| {
            s.name == format!("cascade stage {stage}")
        });
        assert_eq!(
            st.parent, request.id,
            "stage {stage} hangs under the request"
        );
        assert_eq!(st.kind, INTERNAL);
        assert_eq!(st.attributes["switchyard.plan"], target);
        let attempt = one(&spans, &format!("the attempt of stage {stage}"), |s| {
            s.parent == st.id
        });
        assert_eq!(attempt.name, format!("attempt {target}"));
        assert_eq!(attempt.kind, CLIENT);
        assert_eq!(attempt.attributes["switchyard.outcome"], "ok");
        let served = one(
            &spans,
            &format!("the backend's span of stage {stage}"),
            |s| s.parent == attempt.id,
        );
        assert_eq!(served.service, "switchyard-backend");
        assert_eq!(served.kind, SERVER);
        assert_eq!(served.name, format!("ModelInfer {model}"));
        assert_eq!(attempt.attributes["server.address"], at.to_string());
        assert_eq!(served.attributes["switchyard.model"], model);
        let mut children: Vec<&str> = spans
            .iter()
            .filter(|s| s.parent == served.id)
            .map(|s| s.name.as_str())
            .collect();
        children.sort_unstable();
        assert_eq!(
            children,
            ["compute", "queue"],
            "stage {stage}'s backend spans"
        );
        let compute = one(&spans, "compute", |s| {
            s.parent == served.id && s.name == "compute"
        });
        assert_eq!(compute.attributes["switchyard.batch_rows"], "1");
    }
    assert!(spans.iter().all(|s| s.trace == CLIENT_TRACE));
    assert!(
        spans.iter().all(|s| s.start >= request.start),
        "no span starts before the request it is part of: {spans:#?}"
    );
    let tree = render(&spans, request);
    let dir = root().join("target/traces");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cascade.txt"), &tree).unwrap();
    eprintln!("{tree}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_traceparent_starts_a_trace_that_the_access_log_names() {
    let (receiver, addr) = Receiver::start().await;
    let (gw, _stable, _canary) = setup(
        addr,
        &format!(
            "tracing: {{ otlp_endpoint: \"http://{addr}\" }}\naccess_log: {{ path: access.log }}\n"
        ),
    )
    .await;
    let body = rest_infer_body(&[unsure_row()]);
    let r = http(
        gw.http,
        "POST",
        "/v2/models/digits-cascade/infer",
        &[],
        &body,
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = http(gw.http, "POST", "/v2/models/nope/infer", &[], &body).await;
    assert_eq!(r.status, 404);
    // Refused before routing: a body that is not JSON.
    let r = http(
        gw.http,
        "POST",
        "/v2/models/digits-cascade/infer",
        &[],
        b"{not json",
    )
    .await;
    assert_eq!(r.status, 400);
    // And over gRPC: bytes that are no ModelInferRequest (field 1 claims 100 bytes).
    let mut raw = raw_client(gw.grpc).await;
    raw.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/inference.GRPCInferenceService/ModelInfer",
    );
    let status = raw
        .unary(tonic::Request::new(vec![0x0a, 100, b'x']), path, RawCodec)
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let log = gw.dir.path().join("access.log");
    let lines = {
        let start = Instant::now();
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<serde_json::Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
                .collect();
            if lines.len() >= 4 || start.elapsed() > Duration::from_secs(10) {
                break lines;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert_eq!(lines.len(), 4, "{lines:#?}");
    let ok = &lines[0];
    assert_eq!(ok["route"], "digits-cascade");
    assert_eq!(ok["plan"], "cascade");
    assert_eq!(ok["target"], "digits_mlp/2");
    assert_eq!(ok["protocol"], "rest");
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["result"], "ok");
    assert_eq!(ok["cascade"], "last");
    assert_eq!(ok["cascade_stage"], "2");
    assert_eq!(ok["policy_version"], 1);
    assert!(ok["latency_ms"].as_f64().unwrap() > 0.0);
    assert!(ok["time"].as_str().unwrap().ends_with('Z'));
    let trace = ok["trace_id"].as_str().expect("a trace id").to_owned();
    assert_eq!(trace.len(), 32);
    let refused = &lines[1];
    assert_eq!(refused["route"], "nope");
    assert_eq!(refused["status"], 404);
    assert_eq!(refused["grpc_status"], 5);
    assert_eq!(refused["result"], "client_error");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("digits-cascade"),
        "the error names the routes there are: {refused}"
    );
    let malformed = &lines[2];
    assert_eq!(malformed["route"], "digits-cascade");
    assert_eq!(malformed["status"], 400);
    assert_eq!(malformed["result"], "client_error");
    assert!(malformed.get("plan").is_none(), "{malformed}");
    assert!(
        malformed["error"].as_str().unwrap().contains("JSON"),
        "{malformed}"
    );
    let undecodable = &lines[3];
    assert_eq!(
        undecodable["route"], "-",
        "the route is in the unreadable message"
    );
    assert_eq!(undecodable["protocol"], "grpc");
    assert_eq!(undecodable["grpc_status"], 3);
    assert_eq!(undecodable["result"], "client_error");

    // The trace the gateway started is the one the log names, and it reached the
    // backends.
    let spans = receiver.until(&trace, |s| s.len() >= 11).await;
    let root = one(&spans, "the root", |s| s.parent.is_empty());
    assert_eq!(root.name, "infer digits-cascade");
    assert_eq!(root.attributes["switchyard.protocol"], "rest");
    assert_eq!(
        spans
            .iter()
            .filter(|s| s.service == "switchyard-backend" && s.kind == SERVER)
            .count(),
        2
    );
    let metrics = gw.metrics().await;
    assert_eq!(
        metric(&metrics, "switchyard_access_log_lines_total", &[]),
        4.0
    );
    assert_eq!(
        metric(&metrics, "switchyard_access_log_dropped_total", &[]),
        0.0
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_does_not_trace_passes_the_callers_context_to_the_backends() {
    let (receiver, addr) = Receiver::start().await;
    let (gw, _stable, _canary) = setup(addr, "").await;
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let parent = "b7ad6b7169203331";
    let body = rest_infer_body(&[unsure_row()]);
    let traceparent = format!("00-{trace}-{parent}-01");
    let r = http(
        gw.http,
        "POST",
        "/v2/models/digits-cascade/infer",
        &[("traceparent", &traceparent)],
        &body,
    )
    .await;
    assert_eq!(r.status, 200);
    let spans = receiver.until(trace, |s| s.len() >= 6).await;
    // No gateway spans: both backend calls hang under the caller's span.
    assert!(spans.iter().all(|s| s.service == "switchyard-backend"));
    let served: Vec<&Got> = spans.iter().filter(|s| s.kind == SERVER).collect();
    assert_eq!(served.len(), 2, "{spans:#?}");
    assert!(served.iter().all(|s| s.parent == parent));
    gw.stop().await;
}
