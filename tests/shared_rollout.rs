//! Several gateway replicas, one rollout (issue 12 part 4): two real gateways share a real
//! Redis server (Debian's `redis-server`, started here on 127.0.0.1) through
//! `shared_state`, in front of the same real backends. Traffic through one replica moves
//! both through the steps; a rollback on one reaches the other; a replica that loses Redis
//! keeps its step, never promotes, still rolls back, and tells the others once Redis is back.
//! Intervals are scaled down; every wait is bounded.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::gateway::*;
use common::*;

/// A redis-server of the test's own, on loopback, with nothing persisted.
struct Redis {
    port: u16,
    child: Child,
}

impl Redis {
    async fn start_on(port: u16) -> Self {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start redis-server ({e}): .ci/run installs it with apt-get install redis-server")
            });
        // Owned at once: a failed wait below kills it on the way out.
        let redis = Self { port, child };
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let start = Instant::now();
        loop {
            if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut pong = [0u8; 7];
                if s.write_all(b"PING\r\n").await.is_ok()
                    && s.read_exact(&mut pong).await.is_ok()
                    && &pong == b"+PONG\r\n"
                {
                    return redis;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "redis-server did not answer"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self::start_on(port).await
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

const GOOD: &str = "{ backend: canary, model: digits_mlp, version: 2 }";

/// Two gateways on the same backends and Redis, with one route `route` rolling `GOOD` out.
async fn replicas(
    stable: &TestBackend,
    canary: &TestBackend,
    redis: &Redis,
    route: &str,
    rollout: &str,
) -> (TestGateway, TestGateway) {
    let policy = format!(
        "version: 1\nroute: {route}\ntargets:\n  stable: {{ backend: stable, model: digits_mlp, version: 1 }}\n  cand: {GOOD}\ndefault: stable\nfallback: [stable]\ndeadline: 5s\nrollout:\n{rollout}"
    );
    let setup = || GatewaySetup {
        backends: vec![
            ("stable".into(), vec![stable.addr]),
            ("canary".into(), vec![canary.addr]),
        ],
        policies: vec![(format!("{route}.yaml"), policy.clone())],
        extra: format!(
            "shared_state: {{ redis: \"redis://127.0.0.1:{}\", prefix: \"test-{route}\", sync_interval: 100ms, timeout: 300ms }}\n",
            redis.port
        ),
    };
    (
        TestGateway::start(setup()).await,
        TestGateway::start(setup()).await,
    )
}

/// Sends requests to `route` through `gw` from 4 clients until `stop`; returns the tasks,
/// which panic on a failed request.
fn drive(
    gw: &TestGateway,
    route: &'static str,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<usize>> {
    let rows = Arc::new(holdout().features);
    (0..4)
        .map(|c| {
            let (rows, stop, grpc) = (rows.clone(), stop.clone(), gw.grpc);
            tokio::spawn(async move {
                let mut client = common::client(grpc).await;
                let mut i = c * 37;
                while !stop.load(Ordering::Relaxed) {
                    let row = &rows[i % rows.len()];
                    i += 1;
                    client
                        .model_infer(infer_request(route, "", std::slice::from_ref(row)))
                        .await
                        .expect("answered");
                }
                i - c * 37
            })
        })
        .collect()
}

async fn finish(stop: &AtomicBool, tasks: Vec<tokio::task::JoinHandle<usize>>) -> usize {
    stop.store(true, Ordering::Relaxed);
    let mut n = 0;
    for t in tasks {
        n += t.await.unwrap();
    }
    n
}

fn path(s: &serde_json::Value) -> Vec<String> {
    s["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["to"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_move_through_the_steps_together_and_a_rollback_reaches_all() {
    let redis = Redis::start().await;
    let (stable, canary) = pools().await;
    let (a, b) = replicas(
        &stable,
        &canary,
        &redis,
        "together",
        "  candidate: cand\n  baseline: stable\n  steps: [10, 50]\n  interval: 400ms\n  min_requests: 20\n  gates:\n    error_rate: { max_increase: 0.05 }\n",
    )
    .await;
    // Only `a` serves traffic; `b` follows the shared state.
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = drive(&a, "together", stop.clone());
    let done = until_rollout(&b, "together", Duration::from_secs(60), |s| {
        s["state"] == "complete"
    })
    .await;
    let sent = finish(&stop, tasks).await;
    assert_eq!(path(&done), ["step-1", "step-2", "complete"], "{done:#}");
    let a_status = until_rollout(&a, "together", Duration::from_secs(10), |s| {
        s["state"] == "complete"
    })
    .await;
    assert_eq!(a_status["epoch"], done["epoch"]);
    assert!(
        done["shared_state"]["error"].is_null(),
        "{:#}",
        done["shared_state"]
    );
    // A rollback on one replica is applied by the other.
    assert_eq!(rollout_command(&a, "together", "abort").await.status, 200);
    let aborted = Instant::now();
    let rolled = until_rollout(&b, "together", Duration::from_secs(10), |s| {
        s["state"] == "rolled_back"
    })
    .await;
    let took = aborted.elapsed();
    assert!(
        rolled["reason"].as_str().unwrap().contains("abort by"),
        "{rolled:#}"
    );
    // `b` answers as the shared state says, with no traffic of its own judged.
    let mut client = b.client().await;
    let row = holdout().features[0].clone();
    let answer = infer_with(
        &mut client,
        infer_request("together", "", std::slice::from_ref(&row)),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(
        answer.metadata().get("x-switchyard-rollout").unwrap(),
        "rolled-back; weight=0"
    );
    assert!(b.metrics().await.contains("switchyard_shared_state_up 1"));
    eprintln!(
        "{sent} requests through one replica moved both to complete; the other replica applied the rollback {took:?} after the abort"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_loses_redis_keeps_its_step_never_promotes_and_still_rolls_back() {
    let mut redis = Redis::start().await;
    let port = redis.port;
    let (stable, canary) = pools().await;
    let (a, b) = replicas(
        &stable,
        &canary,
        &redis,
        "apart",
        "  candidate: cand\n  baseline: stable\n  steps: [10, 50, 100]\n  interval: 300ms\n  min_requests: 5\n  gates:\n    error_rate: { max_increase: 0.05 }\n",
    )
    .await;
    for gw in [&a, &b] {
        until_rollout(gw, "apart", Duration::from_secs(10), |s| {
            s["shared_state"]["synced_seconds_ago"].is_number()
        })
        .await;
    }
    redis.stop();
    // Traffic that passes every gate, over many intervals: no step without Redis.
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = drive(&a, "apart", stop.clone());
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let sent = finish(&stop, tasks).await;
    let held = rollout_status(&a, "apart").await;
    assert_eq!(
        held["step"], 1,
        "no promotion without the shared state: {held:#}"
    );
    assert!(held["shared_state"]["error"].is_string(), "{held:#}");
    assert!(a.metrics().await.contains("switchyard_shared_state_up 0"));
    // A rollback needs no one: `b` rolls back at once and keeps it to tell.
    assert_eq!(rollout_command(&b, "apart", "abort").await.status, 200);
    let alone = rollout_status(&b, "apart").await;
    assert_eq!(alone["state"], "rolled_back");
    assert_eq!(alone["shared_state"]["pending"], "rolled_back", "{alone:#}");
    assert_eq!(rollout_status(&a, "apart").await["state"], "ramping");
    // Redis comes back empty (nothing was persisted): the replicas seed it again, and
    // `b`'s rollback wins over `a`'s step.
    let _redis = Redis::start_on(port).await;
    let back = Instant::now();
    let rolled = until_rollout(&a, "apart", Duration::from_secs(15), |s| {
        s["state"] == "rolled_back"
    })
    .await;
    let took = back.elapsed();
    assert!(
        rolled["reason"]
            .as_str()
            .unwrap()
            .contains("another replica"),
        "{rolled:#}"
    );
    eprintln!(
        "{sent} requests over 2 s without Redis: no promotion; the rollback reached the other replica {took:?} after Redis came back"
    );
}
