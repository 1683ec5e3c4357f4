//! Canary rollouts through the real gateway and backends (issue 10): a good candidate
//! ramps to complete, a confidently wrong one (`digits_shuffled`) is rolled back on shadow
//! agreement, a killed one on its errors with no client request failing, the state
//! survives a restart (and a corrupt state file restarts at step 1), reload edits keep or
//! restart the generation as they should, and the admin API and CLI drive it.
//! Intervals are scaled down; every wait is bounded.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::gateway::*;
use common::*;
use parking_lot::Mutex;

/// One answered request as the client saw it.
#[derive(Debug, Clone)]
struct Seen {
    /// When it was sent, in ms since the Unix epoch (the state file's clock).
    sent_ms: f64,
    target: String,
    rollout: String,
}

/// What the driving clients saw, shared with their tasks.
type Driven = (
    Arc<Mutex<Vec<Seen>>>,
    Arc<Mutex<Vec<String>>>,
    Vec<tokio::task::JoinHandle<()>>,
);

/// Drives `route` with `clients` gRPC clients over the held-out rows until `stop`; every
/// answer is recorded, every failure too.
fn drive(gw: &TestGateway, route: &'static str, clients: usize, stop: Arc<AtomicBool>) -> Driven {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let failed = Arc::new(Mutex::new(Vec::new()));
    let rows = Arc::new(holdout().features);
    let tasks = (0..clients)
        .map(|c| {
            let (seen, failed, rows, stop) =
                (seen.clone(), failed.clone(), rows.clone(), stop.clone());
            let grpc = gw.grpc;
            tokio::spawn(async move {
                let mut client = common::client(grpc).await;
                let mut i = c * 37;
                while !stop.load(Ordering::Relaxed) {
                    let row = &rows[i % rows.len()];
                    i += 1;
                    let sent_ms = now_ms();
                    match infer_with(
                        &mut client,
                        infer_request(route, "", std::slice::from_ref(row)),
                        &[],
                    )
                    .await
                    {
                        Ok(resp) => {
                            let h = |k: &str| {
                                resp.metadata()
                                    .get(k)
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or_default()
                                    .to_owned()
                            };
                            seen.lock().push(Seen {
                                sent_ms,
                                target: h("x-switchyard-target"),
                                rollout: h("x-switchyard-rollout"),
                            });
                        }
                        Err(s) => failed
                            .lock()
                            .push(format!("{:?}: {}", s.code(), s.message())),
                    }
                }
            })
        })
        .collect();
    (seen, failed, tasks)
}

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        * 1000.0
}

fn policy(route: &str, candidate: &str, rollout: &str) -> String {
    format!(
        "version: 1\nroute: {route}\ntargets:\n  stable: {{ backend: stable, model: digits_mlp, version: 1 }}\n  cand: {candidate}\ndefault: stable\nfallback: [stable]\nretry: {{ attempts: 1, idempotent: true }}\ndeadline: 5s\nshadow: {{ target: cand, percent: 100 }}\nrollout:\n{rollout}"
    )
}

const GOOD: &str = "{ backend: canary, model: digits_mlp, version: 2 }";
const SHUFFLED: &str = "{ backend: canary, model: digits_shuffled, version: 1 }";

/// `digits_mlp` v2 gives v1's top class on 354 of the 360 held-out rows; the 6 others lie at
/// least 19 rows apart. The clients walk the rows in order, so a short run of comparisons
/// can hold several of them: 4 in 28 once rolled a good candidate back at `min_requests:
/// 20`, `min: 0.9`. In any 60 comparisons each of the 4 clients meets at most one such row
/// per 19 of its rows, plus one: at most 7, and `min: 0.85` needs 10 to fail.
const GOOD_GATES: &str = "  candidate: cand\n  baseline: stable\n  steps: [10, 50, 100]\n  interval: 300ms\n  min_requests: 60\n  gates:\n    error_rate: { max_increase: 0.02 }\n    latency_p99: { max_ratio: 10 }\n    shadow_agreement: { min: 0.85 }\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_candidate_ramps_through_every_step_to_complete() {
    let state = tempfile::tempdir().unwrap();
    let gw = TestGateway::digits()
        .policy("ramp.yaml", &policy("ramp", GOOD, GOOD_GATES))
        .extra(&format!("state_dir: {}\n", state.path().display()))
        .start()
        .await;
    let stop = Arc::new(AtomicBool::new(false));
    let (seen, failed, tasks) = drive(&gw, "ramp", 4, stop.clone());
    let done = until_rollout(&gw, "ramp", Duration::from_secs(90), |s| {
        s["state"] == "complete"
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        failed.lock().len(),
        0,
        "failed requests: {:?}",
        failed.lock()
    );
    let path: Vec<&str> = done["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["to"].as_str().unwrap())
        .collect();
    assert_eq!(path, ["step-1", "step-2", "step-3", "complete"], "{done:#}");
    let headers: std::collections::BTreeSet<String> =
        seen.lock().iter().map(|s| s.rollout.clone()).collect();
    for h in [
        "step=1/3; weight=10",
        "step=2/3; weight=50",
        "step=3/3; weight=100",
    ] {
        assert!(headers.contains(h), "no response said {h}: {headers:?}");
    }
    // At 100% every default request is the candidate's.
    assert!(
        seen.lock()
            .iter()
            .filter(|s| s.rollout.starts_with("step=3/3"))
            .all(|s| s.target == "digits_mlp/2"),
        "a request at 100% went elsewhere"
    );
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("switchyard_rollout_weight{route=\"ramp\"} 100"),
        "{metrics}"
    );
    assert!(metrics.contains("switchyard_rollout_state{route=\"ramp\",state=\"complete\"} 1"));
    assert!(metrics.contains(
        "switchyard_rollout_transitions_total{from=\"step-3\",route=\"ramp\",to=\"complete\"} 1"
    ));
    // The state file says the same.
    let file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.path().join("ramp.rollout.json")).unwrap())
            .unwrap();
    assert_eq!(file["phase"]["state"], "complete");
    eprintln!(
        "good candidate: {} requests, steps {path:?}",
        seen.lock().len()
    );
    gw.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confidently_wrong_candidate_is_rolled_back_on_shadow_agreement_at_the_first_step() {
    let gw = TestGateway::digits()
        .policy(
            "wrong.yaml",
            &policy(
                "wrong",
                SHUFFLED,
                "  candidate: cand\n  baseline: stable\n  steps: [10, 50, 100]\n  interval: 60s\n  min_requests: 30\n  gates:\n    error_rate: { max_increase: 0.01 }\n    shadow_agreement: { min: 0.95 }\n",
            ),
        )
        .start()
        .await;
    let stop = Arc::new(AtomicBool::new(false));
    let (seen, failed, tasks) = drive(&gw, "wrong", 4, stop.clone());
    let back = until_rollout(&gw, "wrong", Duration::from_secs(60), |s| {
        s["state"] == "rolled_back"
    })
    .await;
    // Keep driving a little: nothing more may reach the candidate.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(failed.lock().len(), 0, "{:?}", failed.lock());
    let last = back["history"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (last["from"].as_str(), last["to"].as_str()),
        (Some("step-1"), Some("rolled_back")),
        "{back:#}"
    );
    let reason = last["reason"].as_str().unwrap();
    assert!(reason.contains("shadow_agreement"), "{reason}");
    assert!(last["step"]["compared"].as_u64().unwrap() >= 30, "{last}");
    assert!(
        (last["step"]["agreed"].as_u64().unwrap() as f64)
            < 0.1 * last["step"]["compared"].as_u64().unwrap() as f64,
        "{last}"
    );
    // From the responses: no request sent after the rollback reached the candidate, and
    // every answer after it says so.
    let at = last["at_ms"].as_f64().unwrap();
    let seen = seen.lock().clone();
    let on_candidate: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.target == "digits_shuffled/1")
        .collect();
    assert!(
        !on_candidate.is_empty(),
        "the candidate served nothing before its rollback"
    );
    let last_candidate = on_candidate
        .iter()
        .map(|s| s.sent_ms)
        .fold(f64::MIN, f64::max);
    // The state file's clock is in whole milliseconds.
    assert!(
        last_candidate <= at + 1.0,
        "a request sent {:.1} ms after the rollback reached the candidate",
        last_candidate - at
    );
    let after: Vec<&Seen> = seen.iter().filter(|s| s.sent_ms > at + 1.0).collect();
    assert!(!after.is_empty());
    assert!(
        after
            .iter()
            .all(|s| s.rollout == "rolled-back; weight=0" && s.target == "digits_mlp/1")
    );
    let first_after = after.iter().map(|s| s.sent_ms).fold(f64::MAX, f64::min);
    eprintln!(
        "shuffled candidate: rolled back after {} comparisons ({} agreed); last candidate request sent {:.2} ms before the rollback, first request after it {:.2} ms after: {reason}",
        last["step"]["compared"],
        last["step"]["agreed"],
        at - last_candidate,
        first_after - at
    );
    gw.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_whose_backend_dies_is_rolled_back_and_no_client_request_fails() {
    let any = "127.0.0.1:0".parse().unwrap();
    let candidate = BackendProcess::start(&sample_repo(), any);
    let (stable, _unused) = pools().await;
    let gw = TestGateway::start(GatewaySetup {
        backends: vec![
            ("stable".into(), vec![stable.addr]),
            ("canary".into(), vec![candidate.addr]),
        ],
        policies: vec![(
            "dies.yaml".into(),
            policy(
                "dies",
                GOOD,
                "  candidate: cand\n  baseline: stable\n  steps: [50, 100]\n  interval: 60s\n  min_requests: 50\n  gates:\n    error_rate: { max_increase: 0.01 }\n",
            ),
        )],
        extra: String::new(),
    })
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let (seen, failed, tasks) = drive(&gw, "dies", 4, stop.clone());
    until_rollout(&gw, "dies", Duration::from_secs(30), |s| {
        s["counts"]["candidate"]["requests"].as_u64() > Some(20)
    })
    .await;
    let killed = now_ms();
    candidate.kill();
    let back = until_rollout(&gw, "dies", Duration::from_secs(30), |s| {
        s["state"] == "rolled_back"
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(failed.lock().len(), 0, "{:?}", failed.lock());
    let last = back["history"].as_array().unwrap().last().unwrap().clone();
    let reason = last["reason"].as_str().unwrap();
    assert!(
        ["error_rate", "breaker", "in a row"]
            .iter()
            .any(|w| reason.contains(w)),
        "{reason}"
    );
    let at = last["at_ms"].as_f64().unwrap();
    eprintln!(
        "killed candidate: rolled back {:.1} ms after the kill, {} requests, none failed: {reason}",
        at - killed,
        seen.lock().len()
    );
    assert!(at - killed < 10_000.0);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_the_step_and_a_corrupt_state_file_restarts_at_step_one() {
    let state = tempfile::tempdir().unwrap();
    let text = policy(
        "resume",
        GOOD,
        "  candidate: cand\n  baseline: stable\n  steps: [10, 50, 100]\n  interval: 1h\n",
    );
    let start = || {
        TestGateway::digits()
            .policy("resume.yaml", &text)
            .extra(&format!("state_dir: {}\n", state.path().display()))
            .start()
    };
    let gw = start().await;
    assert_eq!(rollout_status(&gw, "resume").await["step"], 1);
    let r = rollout_command(&gw, "resume", "promote").await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["step"], 2);
    gw.gw.stop().await;

    let gw = start().await;
    let s = rollout_status(&gw, "resume").await;
    assert_eq!(
        (s["state"].as_str(), s["step"].as_u64()),
        (Some("ramping"), Some(2)),
        "{s:#}"
    );
    assert!(
        s["history"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["reason"] == "promote by the admin API")
    );
    // A request says so.
    let mut client = gw.client().await;
    let resp = infer_with(
        &mut client,
        infer_request("resume", "", &[holdout().features[0].clone()]),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(
        resp.metadata().get("x-switchyard-rollout").unwrap(),
        "step=2/3; weight=50"
    );
    // `switchyard explain` reads the step from the state file.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["explain", "resume", "--config"])
        .arg(gw.dir.path().join("gateway.yaml"))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.contains(
            "rollout: cand takes 50% of stable's default-plan requests (step-2 of 3; from "
        ) && out.contains("this request is drawn at random: 50% go to cand"),
        "{out}"
    );
    gw.gw.stop().await;

    let file = state.path().join("resume.rollout.json");
    std::fs::write(&file, b"{ this is not json").unwrap();
    let gw = start().await;
    let s = rollout_status(&gw, "resume").await;
    assert_eq!(s["step"], 1, "{s:#}");
    let error = s["state_error"].as_str().unwrap();
    assert!(
        error.contains("resume.rollout.json") && error.contains("restarts at step 1"),
        "{error}"
    );
    // The file is whole again, at step 1.
    let back: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(
        back["phase"],
        serde_json::json!({ "state": "ramping", "step": 0 })
    );
    gw.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrelated_edit_keeps_the_step_and_an_edit_of_the_rollout_starts_a_new_generation() {
    let text = policy(
        "edits",
        GOOD,
        "  candidate: cand\n  baseline: stable\n  steps: [10, 50, 100]\n  interval: 1h\n",
    );
    let gw = TestGateway::digits()
        .policy("edits.yaml", &text)
        .start()
        .await;
    assert_eq!(rollout_command(&gw, "edits", "promote").await.status, 200);
    let generation = rollout_status(&gw, "edits").await["generation"].clone();
    // A deadline and a comment: the rollout stays where it is.
    gw.write_policy(
        "edits.yaml",
        &format!("# tuned\n{}", text.replace("deadline: 5s", "deadline: 4s")),
    );
    let (code, body) = gw.admin_reload().await;
    assert_eq!(code, 200, "{body}");
    let s = rollout_status(&gw, "edits").await;
    assert_eq!(
        (s["step"].as_u64(), &s["generation"]),
        (Some(2), &generation),
        "{s:#}"
    );
    // New steps: a new generation at step 1.
    gw.write_policy("edits.yaml", &text.replace("[10, 50, 100]", "[5, 50, 100]"));
    assert_eq!(gw.admin_reload().await.0, 200);
    let s = rollout_status(&gw, "edits").await;
    assert_eq!(s["step"], 1, "{s:#}");
    assert_ne!(s["generation"], generation);
    assert_eq!(s["weight"], 5.0);
    // An invalid rollout is refused with file:line and the rollout in force stays.
    gw.write_policy("edits.yaml", &text.replace("[10, 50, 100]", "[10, 50, 40]"));
    let (code, body) = gw.admin_reload().await;
    assert_eq!(code, 422, "{body}");
    let errors = body["errors"].to_string();
    assert!(
        errors.contains("edits.yaml:") && errors.contains("rollout.steps[2]: steps must increase"),
        "{errors}"
    );
    assert_eq!(rollout_status(&gw, "edits").await["weight"], 5.0);
    gw.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_pause_resume_abort_and_finish_through_the_admin_api_and_the_cli() {
    let text = policy(
        "ops",
        GOOD,
        "  candidate: cand\n  baseline: stable\n  steps: [10, 100]\n  interval: 1h\n",
    );
    let gw = TestGateway::digits()
        .policy("ops.yaml", &text)
        .start()
        .await;
    // Commands need the token.
    let r = http(gw.admin, "POST", "/admin/rollouts/ops/pause", &[], b"").await;
    assert_eq!(r.status, 401);
    assert_eq!(rollout_command(&gw, "nope", "pause").await.status, 404);
    let r = rollout_command(&gw, "ops", "pause").await;
    assert_eq!(
        (r.status, r.json()["state"].as_str()),
        (200, Some("paused"))
    );
    let r = rollout_command(&gw, "ops", "pause").await;
    assert_eq!(r.status, 409);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("it is paused 1"),
        "{}",
        r.json()
    );
    assert_eq!(
        rollout_command(&gw, "ops", "resume").await.json()["state"],
        "ramping"
    );

    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .arg("rollout")
            .args(args)
            .arg("--config")
            .arg(gw.dir.path().join("gateway.yaml"))
            .arg("--admin")
            .arg(gw.admin.to_string())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = cli(&["status"]);
    assert!(ok, "{err}");
    assert!(
        out.contains(
            "route ops: ramping, step 1/2: cand takes 10% of stable's default-plan requests"
        ),
        "{out}"
    );
    let (ok, _, err) = cli(&["finish", "ops"]);
    assert!(
        !ok && err.contains("finish it once it is complete or rolled back"),
        "{err}"
    );
    let (ok, out, err) = cli(&["promote", "ops"]);
    assert!(ok && out.contains("step 2/2"), "{out}{err}");
    let (ok, out, err) = cli(&["promote", "ops"]);
    assert!(ok && out.contains("route ops: complete"), "{out}{err}");
    // finish prints the permanent policy; --write writes it and the gateway reloads it.
    let (ok, out, err) = cli(&["finish", "ops"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("\ndefault: cand\n") && !out.contains("rollout"),
        "{out}"
    );
    let (ok, _, err) = cli(&["finish", "ops", "--write"]);
    assert!(ok, "{err}");
    let start = Instant::now();
    loop {
        let r = http(gw.admin, "GET", "/admin/rollouts/ops", &[], b"").await;
        if r.status == 404 {
            assert!(
                r.json()["error"]
                    .as_str()
                    .unwrap()
                    .contains("has no rollout section")
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the finished policy was not reloaded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut client = gw.client().await;
    let resp = infer_with(
        &mut client,
        infer_request("ops", "", &[holdout().features[0].clone()]),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(
        resp.metadata().get("x-switchyard-target").unwrap(),
        "digits_mlp/2"
    );
    assert!(resp.metadata().get("x-switchyard-rollout").is_none());
    // abort of a rollout that is gone is a 404; a new rollout can be aborted at once.
    gw.write_policy("ops.yaml", &text);
    assert_eq!(gw.admin_reload().await.0, 200);
    let r = rollout_command(&gw, "ops", "abort").await;
    assert_eq!(r.json()["state"], "rolled_back");
    let (ok, out, err) = cli(&["finish", "ops"]);
    assert!(
        ok && out.contains("\ndefault: stable\n") && !out.contains("rollout:"),
        "{out}{err}"
    );
    gw.gw.stop().await;
}
