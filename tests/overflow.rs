//! Spill-over and shedding when a pool is full: a target's `overflow` plan takes its
//! requests when its backends answer that they are full or every endpoint is at the pool's
//! `max_in_flight`; without an overflow, requests are refused by priority class, the
//! lowest first, with 429 / RESOURCE_EXHAUSTED and `Retry-After`. Real backends (one slow:
//! its batcher holds each request 50ms for company) and the real gateway on 127.0.0.1:0.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::gateway::{GatewaySetup, TestGateway, http, rest_infer_body};
use common::{TestBackend, holdout, infer_request, metric, patient_repo};
use switchyard_backend::BackendConfig;

/// A route `r` whose target `main` (pool `p`) overflows to `spare` (pool `q`).
const OVERFLOWING: &str = "version: 1\nroute: r\ntargets:\n  main: { backend: p, model: m, version: 1, overflow: spare }\n  spare: { backend: q, model: m, version: 1 }\ndefault: main\n";

/// Runs `clients` concurrent gRPC clients of `n` requests each on route `r`; returns how
/// many answers named `main` as overflowing (`x-switchyard-overflow`).
async fn load(gw: &TestGateway, clients: usize, n: usize) -> usize {
    let row = holdout().features[0].clone();
    let overflowed = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let mut client = gw.client().await;
        let row = row.clone();
        let overflowed = overflowed.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..n {
                let answer = client
                    .model_infer(infer_request("r", "", std::slice::from_ref(&row)))
                    .await
                    .expect("every request is answered: a full pool spills to its overflow");
                if let Some(v) = answer.metadata().get("x-switchyard-overflow") {
                    assert_eq!(v, "main");
                    overflowed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    overflowed.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_answers_full_sends_its_requests_to_the_overflow() {
    // The slow backend holds 300 input bytes at once: one 256-byte request; a second
    // gets RESOURCE_EXHAUSTED. Before, that went to the client as it was.
    let slow = patient_repo("m", 64, 50_000);
    let fast = patient_repo("m", 8, 0);
    let mut config = BackendConfig::new(slow.path());
    config.repository.max_queue_bytes = 300;
    let full = TestBackend::start_with(config).await;
    let spare = TestBackend::start(fast.path()).await;
    let gw = TestGateway::start(GatewaySetup {
        backends: vec![
            ("p".into(), vec![full.addr]),
            ("q".into(), vec![spare.addr]),
        ],
        policies: vec![("r.yaml".into(), OVERFLOWING.into())],
        extra: String::new(),
    })
    .await;
    let overflowed = load(&gw, 4, 10).await;
    assert!(overflowed > 0, "some requests overflowed");
    let text = gw.metrics().await;
    assert_eq!(
        metric(&text, "switchyard_overflow_total", &[("route", "r")]),
        overflowed as f64
    );
    assert!(
        metric(
            &text,
            "switchyard_upstream_attempts_total",
            &[("route", "r"), ("outcome", "full")]
        ) > 0.0
    );
    // Busy is not broken: the full backend's breaker stayed closed.
    assert_eq!(
        metric(&text, "switchyard_breaker_state", &[]),
        0.0,
        "every breaker closed (0): {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_at_max_in_flight_spills_to_the_overflow() {
    let slow = patient_repo("m", 64, 50_000);
    let fast = patient_repo("m", 8, 0);
    let (main, spare) = (
        TestBackend::start(slow.path()).await,
        TestBackend::start(fast.path()).await,
    );
    let gw = TestGateway::start(GatewaySetup {
        backends: vec![],
        policies: vec![("r.yaml".into(), OVERFLOWING.into())],
        extra: format!(
            "  p: {{ endpoints: [\"{}\"], max_in_flight: 2 }}\n  q: {{ endpoints: [\"{}\"] }}\nadmin: {{ token_file: admin-token }}\n",
            main.addr, spare.addr
        ),
    })
    .await;
    let overflowed = load(&gw, 6, 10).await;
    let text = gw.metrics().await;
    let on_main = metric(
        &text,
        "switchyard_upstream_requests_total",
        &[("backend", "p")],
    );
    assert_eq!(on_main + overflowed as f64, 60.0, "{text}");
    assert!(overflowed > 0, "the slow pool's limit sent requests over");
    assert!(
        on_main > 0.0,
        "the pool itself kept serving up to its limit"
    );
    assert!(
        metric(
            &text,
            "switchyard_upstream_attempts_total",
            &[("route", "r"), ("outcome", "saturated")]
        ) > 0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_everything_is_full_the_lowest_class_is_refused_first() {
    let slow = patient_repo("m", 64, 50_000);
    let backend = TestBackend::start(slow.path()).await;
    let gw = TestGateway::start(GatewaySetup {
        backends: vec![],
        policies: vec![(
            "r.yaml".into(),
            "version: 1\nroute: r\ntargets:\n  t: { backend: p, model: m, version: 1 }\ndefault: t\npriority: { header: x-priority, classes: [batch, interactive], default: batch }\n".into(),
        )],
        extra: format!(
            "  p: {{ endpoints: [\"{}\"], max_in_flight: 2 }}\nadmin: {{ token_file: admin-token }}\n",
            backend.addr
        ),
    })
    .await;
    let body = Arc::new(rest_infer_body(std::slice::from_ref(
        &holdout().features[0],
    )));
    // Six batch clients (the default class: no header) against the pool's limit of two,
    // and one interactive client, whose class may fill the endpoint to three.
    let run = |class: Option<&'static str>, n: usize| {
        let (addr, body) = (gw.http, body.clone());
        tokio::spawn(async move {
            let (mut ok, mut refused) = (0, 0);
            for _ in 0..n {
                let headers: Vec<(&str, &str)> =
                    class.map(|c| ("x-priority", c)).into_iter().collect();
                let r = http(addr, "POST", "/v2/models/r/infer", &headers, &body).await;
                match r.status {
                    200 => ok += 1,
                    429 => {
                        assert_eq!(r.header("retry-after"), Some("1"));
                        let text = String::from_utf8_lossy(&r.body).to_string();
                        assert!(text.contains("every endpoint of pool 'p' has"), "{text}");
                        refused += 1;
                        // A client that honours Retry-After would wait; this one comes
                        // back soon, to keep the pool full.
                        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    }
                    s => panic!("{s}: {}", String::from_utf8_lossy(&r.body)),
                }
            }
            (ok, refused)
        })
    };
    let batch: Vec<_> = (0..6).map(|_| run(None, 30)).collect();
    let interactive = run(Some("interactive"), 20);
    let (i_ok, i_refused) = interactive.await.unwrap();
    let (mut b_ok, mut b_refused) = (0, 0);
    for b in batch {
        let (ok, refused) = b.await.unwrap();
        b_ok += ok;
        b_refused += refused;
    }
    assert!(
        b_refused > 0 && b_ok > 0,
        "batch: {b_ok} served, {b_refused} refused"
    );
    // The interactive client finds at most the two batch calls the limit admits (a
    // check and its call are not one step, so a race may let a third through now and
    // then): it is served nearly always, batch is refused most of the time.
    let b_share = b_refused as f64 / (b_ok + b_refused) as f64;
    let i_share = i_refused as f64 / (i_ok + i_refused) as f64;
    assert!(
        i_share * 4.0 < b_share,
        "interactive refused {i_refused} of {}, batch {b_refused} of {}",
        i_ok + i_refused,
        b_ok + b_refused
    );
    let text = gw.metrics().await;
    assert_eq!(
        metric(
            &text,
            "switchyard_priority_shed_total",
            &[("route", "r"), ("class", "batch")]
        ),
        b_refused as f64
    );
    assert_eq!(
        metric(
            &text,
            "switchyard_requests_total",
            &[("route", "r"), ("result", "shed")]
        ),
        (b_refused + i_refused) as f64
    );
}
