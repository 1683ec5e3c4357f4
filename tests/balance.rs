//! Load-aware endpoint picking inside a pool: three replicas of one model, one of them
//! slow (its batcher holds every request 50ms for company), served through the gateway by
//! eight concurrent clients; the share of calls each replica got is read from
//! `switchyard_upstream_requests_total`.

mod common;

use common::gateway::{GatewaySetup, TestGateway, http};
use common::{TestBackend, holdout, infer_request, metric, patient_repo};

/// Calls each of `[fast, fast, slow]` got for 240 requests under `balance`.
async fn calls_per_replica(balance: &str) -> Vec<f64> {
    let fast = patient_repo("m", 8, 0);
    let slow = patient_repo("m", 64, 50_000);
    let backends = [
        TestBackend::start(fast.path()).await,
        TestBackend::start(fast.path()).await,
        TestBackend::start(slow.path()).await,
    ];
    let list: Vec<String> = backends.iter().map(|b| format!("\"{}\"", b.addr)).collect();
    let gw = pool_gateway(&format!(
        "endpoints: [{}], balance: {balance}",
        list.join(", ")
    ))
    .await;
    send(&gw, 8, 30).await;
    calls(&gw, &backends).await
}

/// A gateway whose route `r` targets model `m` on pool `p`, written `{ <pool> }`.
async fn pool_gateway(pool: &str) -> TestGateway {
    TestGateway::start(GatewaySetup {
        backends: vec![],
        policies: vec![(
            "r.yaml".into(),
            "version: 1\nroute: r\ntargets:\n  t: { backend: p, model: m, version: 1 }\ndefault: t\n"
                .into(),
        )],
        // The pool is written here, ahead of the admin section.
        extra: format!("  p: {{ {pool} }}\nadmin: {{ token_file: admin-token }}\n"),
    })
    .await
}

/// `clients` concurrent clients send `n` requests each to route `r`, every one answered.
async fn send(gw: &TestGateway, clients: usize, n: usize) {
    let row = holdout().features[0].clone();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let mut client = gw.client().await;
        let row = row.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..n {
                client
                    .model_infer(infer_request("r", "", std::slice::from_ref(&row)))
                    .await
                    .expect("every request is answered");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// The calls each of `backends` got through pool `p`.
async fn calls(gw: &TestGateway, backends: &[TestBackend]) -> Vec<f64> {
    let text = gw.metrics().await;
    backends
        .iter()
        .map(|b| {
            metric(
                &text,
                "switchyard_upstream_requests_total",
                &[("backend", "p"), ("endpoint", &b.addr.to_string())],
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_gives_the_slow_replica_its_third() {
    let calls = calls_per_replica("round_robin").await;
    assert_eq!(calls.iter().sum::<f64>(), 240.0, "{calls:?}");
    for c in &calls {
        assert!(
            (c - 80.0).abs() <= 1.0,
            "round robin spreads evenly: {calls:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_sends_the_slow_replica_clearly_less() {
    // Before picking by load, the pool was round robin whatever it was told: each replica
    // got a third, the slow one too.
    let calls = calls_per_replica("least_request").await;
    assert_eq!(calls.iter().sum::<f64>(), 240.0, "{calls:?}");
    let fastest = calls[0].min(calls[1]);
    assert!(
        calls[2] * 2.0 < fastest,
        "the slow replica gets less than half of a fast one's calls: {calls:?}"
    );
}

/// Two replicas `a` and `b` of model `m` (and their repository), and a gateway whose pool
/// `p`, which route `r` targets, holds `a` only.
async fn one_of_two(extra: &str) -> (tempfile::TempDir, TestBackend, TestBackend, TestGateway) {
    let repo = patient_repo("m", 8, 0);
    let (a, b) = (
        TestBackend::start(repo.path()).await,
        TestBackend::start(repo.path()).await,
    );
    let gw = TestGateway::start(GatewaySetup {
        backends: vec![("p".into(), vec![a.addr])],
        policies: vec![(
            "r.yaml".into(),
            "version: 1\nroute: r\ntargets:\n  t: { backend: p, model: m, version: 1 }\ndefault: t\n"
                .into(),
        )],
        extra: extra.into(),
    })
    .await;
    (repo, a, b, gw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_reload_without_a_restart_and_a_bad_edit_keeps_the_pools() {
    let (_repo, a, b, gw) = one_of_two("reload: { watch: false }\n").await;
    let file = gw.policy_dir().parent().unwrap().join("gateway.yaml");
    let before = std::fs::read_to_string(&file).unwrap();
    let row = holdout().features[0].clone();
    let client = gw.client().await;
    let send = |n: usize| {
        let mut client = client.clone();
        let row = row.clone();
        async move {
            for _ in 0..n {
                client
                    .model_infer(infer_request("r", "", std::slice::from_ref(&row)))
                    .await
                    .expect("answered");
            }
        }
    };
    send(10).await;
    let calls = |text: &str, addr: std::net::SocketAddr| {
        metric(
            text,
            "switchyard_upstream_requests_total",
            &[("backend", "p"), ("endpoint", &addr.to_string())],
        )
    };
    // An edit that names an endpoint which is not host:port is refused whole.
    std::fs::write(
        &file,
        before.replace(&format!("\"{}\"", a.addr), "\"nonsense\""),
    )
    .unwrap();
    let (status, body) = gw.admin_reload().await;
    assert_ne!(status, 200, "{body}");
    assert!(body.to_string().contains("is not host:port"), "{body}");
    send(4).await;
    // Adding b to the pool: both serve from now on, a's endpoint (its counts) kept.
    std::fs::write(
        &file,
        before.replace(
            &format!("\"{}\"", a.addr),
            &format!("\"{}\", \"{}\"", a.addr, b.addr),
        ),
    )
    .unwrap();
    let (status, body) = gw.admin_reload().await;
    assert_eq!(status, 200, "{body}");
    send(40).await;
    let text = gw.metrics().await;
    assert!(calls(&text, a.addr) >= 14.0, "a kept its endpoint state");
    assert!(
        calls(&text, b.addr) > 0.0,
        "b joined the pool: {}",
        calls(&text, b.addr)
    );
    assert_eq!(calls(&text, a.addr) + calls(&text, b.addr), 54.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saving_gateway_yaml_reloads_its_backends_by_itself() {
    // Before, only the policy folder was watched: a `backends:` edit waited for SIGHUP.
    let (_repo, a, b, gw) = one_of_two("reload: { debounce: 100ms }\n").await;
    let file = gw.policy_dir().parent().unwrap().join("gateway.yaml");
    let before = std::fs::read_to_string(&file).unwrap();
    // The watcher says what it watches once it does (the gateway serves before that).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let policy = http(gw.admin, "GET", "/admin/policy", &[], b"")
            .await
            .json();
        let watching = policy["watching"].as_array().cloned().unwrap_or_default();
        if watching
            .iter()
            .any(|w| w.as_str().is_some_and(|w| w.ends_with("gateway.yaml")))
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{policy}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // Saved as editors do: a new file renamed over the old one.
    let saved = file.with_extension("yaml.swp");
    std::fs::write(
        &saved,
        before.replace(&format!("\"{}\"", a.addr), &format!("\"{}\"", b.addr)),
    )
    .unwrap();
    std::fs::rename(&saved, &file).unwrap();
    let row = holdout().features[0].clone();
    let mut client = gw.client().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        client
            .model_infer(infer_request("r", "", std::slice::from_ref(&row)))
            .await
            .expect("answered while the pool changes");
        let text = gw.metrics().await;
        let on_b = metric(
            &text,
            "switchyard_upstream_requests_total",
            &[("backend", "p"), ("endpoint", &b.addr.to_string())],
        );
        if on_b > 0.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "gateway.yaml's save was not picked up: {}",
            String::from_utf8_lossy(&http(gw.admin, "GET", "/admin/policy", &[], b"").await.body)
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // And it settles: the reload's own reading of the files is no edit. (Before, notify's
    // open events made each reload trigger the next, about twenty a second.)
    let version = || async {
        http(gw.admin, "GET", "/admin/policy", &[], b"")
            .await
            .json()["version"]
            .as_u64()
            .unwrap()
    };
    let settled = version().await;
    tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
    assert_eq!(version().await, settled, "no reload without an edit");
}

/// Calls each of three equal replicas got of 120 requests through a pool of `balance`,
/// while a client outside the gateway keeps 32 requests waiting at the third.
async fn calls_with_outside_load(balance: &str) -> Vec<f64> {
    let repo = patient_repo("m", 64, 20_000);
    let backends = [
        TestBackend::start(repo.path()).await,
        TestBackend::start(repo.path()).await,
        TestBackend::start(repo.path()).await,
    ];
    let list: Vec<String> = backends
        .iter()
        .map(|b| {
            format!(
                "{{ address: \"{}\", metrics: \"{}\" }}",
                b.addr, b.metrics_addr
            )
        })
        .collect();
    let gw = pool_gateway(&format!(
        "endpoints: [{}], balance: {balance}, scrape_interval: 50ms",
        list.join(", ")
    ))
    .await;
    let row = holdout().features[0].clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut outside = Vec::new();
    for _ in 0..32 {
        let mut direct = backends[2].client().await;
        let (row, stop) = (row.clone(), stop.clone());
        outside.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                direct
                    .model_infer(infer_request("m", "1", std::slice::from_ref(&row)))
                    .await
                    .expect("the outside client is answered");
            }
        }));
    }
    // The scrape sees the queue before the gateway's clients start.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    send(&gw, 4, 30).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for o in outside {
        o.await.unwrap();
    }
    calls(&gw, &backends).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_aware_sees_load_from_outside_the_gateway_and_least_request_does_not() {
    // The third replica is as fast as the others, but other clients keep its queue full:
    // only its scraped nv_inference_pending_request_count says so.
    let blind = calls_with_outside_load("least_request").await;
    let aware = calls_with_outside_load("queue_aware").await;
    assert_eq!(blind.iter().sum::<f64>(), 120.0, "{blind:?}");
    assert_eq!(aware.iter().sum::<f64>(), 120.0, "{aware:?}");
    assert!(
        blind[2] >= 20.0,
        "least_request sees only its own calls, and sends the busy replica its share: {blind:?}"
    );
    // Typically 0-6 against 40; a scrape that lands between two of the busy replica's
    // batches, or comes late on a loaded machine, lets a few more through.
    assert!(
        aware[2] * 2.0 < blind[2],
        "queue_aware avoids the replica whose queue is full: {aware:?} against {blind:?}"
    );
    eprintln!(
        "calls per replica, the third busy from outside: least_request {blind:?}, queue_aware {aware:?}"
    );
}
