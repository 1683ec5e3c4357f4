//! Rollouts shared by the replicas of a gateway (`shared_state: { redis: ... }`): every
//! `sync_interval` each replica adds the counts it made since the last exchange to the
//! step's shared counts, reads the shared state, and follows it; the step is judged over
//! every replica's counts, and a step is taken by one compare-and-set on the server
//! (a Lua script, so two replicas judging at once take it once).
//!
//! Keys, under `{prefix}:rollout:{route}:{generation}`: a hash with the epoch (transitions
//! so far), the encoded phase, when the step began (the server's clock) and why; `:history`,
//! the transitions as JSON; `:counts:{epoch}`, the step's counters summed over replicas;
//! `:counts:total`, since the generation began. Everything expires after a week unused.
//!
//! A replica that cannot reach the server keeps its last known step and never promotes
//! (the local controller takes no step in a shared rollout). It still rolls back on what it
//! sees: that is made locally at once and told to the server once it answers again, where
//! a rollback wins over any step another replica took meanwhile. A server that lost its
//! data is seeded again by the first replica that reaches it, with that replica's step.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde_json::json;
use tracing::{info, warn};

use super::{
    BUCKETS, Control, Counts, GateReport, Phase, Readings, Rollout, StepSummary, StepView, Verdict,
    judge,
};
use crate::Shared;
use crate::routing::rollout::ALL;

/// How long unused keys live on the server.
const KEY_TTL_SECONDS: u64 = 7 * 24 * 3600;

/// Seeds the state when the server has none, adds the replica's counts, and reads the
/// state with the counts of its step and of the whole generation, all at once.
///
/// KEYS: state, history, counts of the replica's epoch, total counts.
/// ARGV: epoch, phase, step start (ms; 0: now), reason, history entry (the seed), the
/// counts key prefix, key TTL, then (field, increment) pairs.
const SYNC: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('EXISTS', KEYS[1]) == 0 then
  local started = tonumber(ARGV[3])
  if started == 0 then started = now end
  redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'phase', ARGV[2], 'started_ms', started, 'reason', ARGV[4])
  redis.call('RPUSH', KEYS[2], ARGV[5])
end
for i = 8, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[3], ARGV[i], ARGV[i + 1])
  redis.call('HINCRBY', KEYS[4], ARGV[i], ARGV[i + 1])
end
for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ARGV[7]) end
local s = redis.call('HMGET', KEYS[1], 'epoch', 'phase', 'started_ms', 'reason')
local counts = redis.call('HGETALL', ARGV[6] .. s[1])
local total = redis.call('HGETALL', KEYS[4])
return {now, s[1], s[2], s[3], s[4] or '', counts, total}
";

/// Takes a transition: only from `expected` epoch, or, for a rollback (`force`), from
/// any phase but rolled back, to an epoch past the replica's own too (a server that lost
/// its data may hold a lower one). Returns {1, new epoch} or {0, epoch in force}.
///
/// KEYS: state, history. ARGV: expected epoch or `force`, new phase, reason, history
/// entry, the rolled-back phase, key TTL, the replica's epoch.
const TRANSITION: &str = r"
local e = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '-1')
local phase = redis.call('HGET', KEYS[1], 'phase')
if ARGV[1] == 'force' then
  if phase == ARGV[5] then return {0, e} end
elseif tonumber(ARGV[1]) ~= e then
  return {0, e}
end
local next = math.max(e + 1, tonumber(ARGV[7]))
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'epoch', next, 'phase', ARGV[2], 'started_ms', now, 'reason', ARGV[3])
redis.call('RPUSH', KEYS[2], ARGV[4])
redis.call('LTRIM', KEYS[2], -200, -1)
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('EXPIRE', KEYS[2], ARGV[6])
return {1, next}
";

/// What the last exchange with the shared state said, for the status.
#[derive(Debug, Default)]
pub(super) struct Seen {
    /// When an exchange last succeeded.
    synced: Option<Instant>,
    /// Why the last one failed, if it did.
    error: Option<String>,
    /// The step's counts over every replica and the gates over them.
    counts: Option<(Readings, Vec<GateReport>)>,
}

impl Seen {
    /// The `shared_state` part of the rollout's status.
    pub(super) fn status(&self, c: &Control) -> serde_json::Value {
        json!({
            "synced_seconds_ago": self.synced.map(|t| t.elapsed().as_secs_f64()),
            "error": self.error,
            "pending": c.pending.as_ref().map(|p| p.to.label()),
            "counts": self.counts.as_ref().map(|(r, _)| json!({
                "candidate": { "requests": r.candidate.requests, "errors": r.candidate.errors },
                "baseline": { "requests": r.baseline.requests, "errors": r.baseline.errors },
                "compared": r.agreed + r.disagreed,
                "agreed": r.agreed,
            })),
            "gates": self.counts.as_ref().map(|(_, g)| g),
        })
    }
}

/// Keeps the replicas' rollouts in step, every `shared_state.sync_interval`, until `stop`.
pub(crate) async fn run(shared: Arc<Shared>, stop: tokio::sync::watch::Receiver<bool>) {
    let Some(config) = shared.config.shared_state.clone() else {
        return;
    };
    let mut link = Link {
        client: redis::Client::open(config.redis.as_str()).map_err(|e| e.to_string()),
        conn: None,
        timeout: config.timeout.0,
        prefix: config.prefix.clone(),
        sync: Script::new(SYNC),
        transition: Script::new(TRANSITION),
        down: false,
    };
    info!(redis = %config.redis, "rollouts are shared through Redis");
    let mut ticks = crate::ticker::Ticker::new(config.sync_interval.0, stop);
    while ticks.next().await {
        let snapshot = shared.snapshot.load_full();
        let mut ok = true;
        for entry in snapshot.routes.values() {
            let Some(r) = &entry.rollout else { continue };
            if !r.shared {
                continue;
            }
            let result = link.sync(r).await;
            if result.is_err() {
                // A fresh connection next time: the server may have restarted elsewhere.
                link.conn = None;
            }
            if let Err((kind, e)) = &result {
                shared
                    .metrics
                    .shared_state_errors
                    .with_label_values(&[kind])
                    .inc();
                ok = false;
                if !link.down {
                    warn!(route = %r.route, "the shared rollout state is unreachable: {e}; this replica keeps its step and takes none until it answers");
                }
            }
            r.synced(result.map_err(|(_, e)| e));
        }
        if ok && link.down {
            info!("the shared rollout state answers again");
        }
        link.down = !ok;
        shared.metrics.shared_state_up.set(i64::from(ok));
    }
}

/// The connection to the server and the scripts.
struct Link {
    client: Result<redis::Client, String>,
    conn: Option<ConnectionManager>,
    timeout: Duration,
    prefix: String,
    sync: Script,
    transition: Script,
    /// Whether the last round failed (logged once per outage).
    down: bool,
}

/// A failed exchange: its kind (a metric label) and why.
type Failed = (&'static str, String);

/// What the shared state says of one rollout.
struct Read {
    now_ms: u64,
    epoch: u64,
    phase: u32,
    started_ms: u64,
    reason: String,
    step: Readings,
    baseline_total: Counts,
}

impl Link {
    async fn connection(&mut self) -> Result<ConnectionManager, Failed> {
        if let Some(c) = &self.conn {
            return Ok(c.clone());
        }
        let client = self.client.clone().map_err(|e| ("connect", e))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1);
        let conn = tokio::time::timeout(
            self.timeout * 2,
            ConnectionManager::new_with_config(client, config),
        )
        .await
        .map_err(|_| {
            (
                "connect",
                format!("no connection within {:?}", self.timeout * 2),
            )
        })?
        .map_err(|e| ("connect", e.to_string()))?;
        self.conn = Some(conn.clone());
        Ok(conn)
    }

    /// One exchange for `r`: tell a pending transition, add the counts, read and follow
    /// the shared state, and take the next step if the shared counts say so.
    async fn sync(&mut self, r: &Rollout) -> Result<(), Failed> {
        let mut conn = self.connection().await?;
        let keys = Keys::new(&self.prefix, &r.route, r.spec.generation);
        let n = r.spec.steps.len();
        let (pending, local_epoch) = {
            let c = r.control.lock();
            (c.pending.clone(), c.epoch)
        };
        if let Some(p) = pending {
            let force = p.to == Phase::RolledBack;
            let proposal = Proposal {
                expected: if force {
                    "force".to_owned()
                } else {
                    p.base_epoch.to_string()
                },
                to: p.to,
                reason: &p.reason,
                entry: &p.transition,
                epoch: local_epoch,
            };
            let (took, epoch) = self.transition(&mut conn, &keys, proposal, n).await?;
            let mut c = r.control.lock();
            if c.pending.as_ref() == Some(&p) {
                c.pending = None;
                if took == 1 {
                    c.epoch = epoch;
                } else if !force {
                    warn!(route = %r.route, to = p.to.label(), "this replica's transition is dropped: the shared rollout moved on first");
                }
            }
        }
        // The counts since the last exchange, and the state to seed a server that has none.
        let (epoch, args, readings) = {
            let c = r.control.lock();
            let now = r.readings();
            let mut args: Vec<String> = vec![
                c.epoch.to_string(),
                r.phase().encode(n).to_string(),
                (c.step_started
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_millis() as u64)
                    .to_string(),
                c.reason
                    .clone()
                    .unwrap_or_else(|| "seeded by a replica".into()),
                serde_json::to_string(&c.history.last()).unwrap_or_default(),
                keys.counts_prefix.clone(),
                KEY_TTL_SECONDS.to_string(),
            ];
            deltas(&now, &c.pushed, &mut args);
            (c.epoch, args, now)
        };
        let mut call = self.sync.key(&keys.state);
        call.key(&keys.history)
            .key(format!("{}{epoch}", keys.counts_prefix))
            .key(format!("{}total", keys.counts_prefix));
        for a in &args {
            call.arg(a);
        }
        type Reply = (
            u64,
            u64,
            u32,
            u64,
            String,
            HashMap<String, u64>,
            HashMap<String, u64>,
        );
        let reply: Reply = tokio::time::timeout(self.timeout, call.invoke_async(&mut conn))
            .await
            .map_err(|_| ("sync", format!("no answer within {:?}", self.timeout)))?
            .map_err(|e| ("sync", e.to_string()))?;
        let (now_ms, shared_epoch, phase, started_ms, reason, step, total) = reply;
        r.control.lock().pushed = readings;
        let read = Read {
            now_ms,
            epoch: shared_epoch,
            phase,
            started_ms,
            reason,
            step: readings_of(&step),
            baseline_total: counts_of(&total, "b"),
        };
        let Some((to, reason, summary)) = r.follow(epoch, read) else {
            return Ok(());
        };
        // A step: taken on the server first, so that only one replica takes it.
        let entry = super::Transition {
            at_ms: super::unix_ms(std::time::SystemTime::now()),
            from: r.phase().label(),
            to: to.label(),
            reason: reason.clone(),
            step: summary.clone(),
        };
        let proposal = Proposal {
            expected: epoch.to_string(),
            to,
            reason: &reason,
            entry: &entry,
            epoch: epoch + 1,
        };
        let (took, _) = self.transition(&mut conn, &keys, proposal, n).await?;
        if took == 1 {
            let mut c = r.control.lock();
            if c.epoch == epoch && c.pending.is_none() {
                info!(route = %r.route, to = to.label(), "shared rollout step passed");
                r.transition(&mut c, to, reason, summary);
            }
        }
        Ok(())
    }

    async fn transition(
        &self,
        conn: &mut ConnectionManager,
        keys: &Keys,
        p: Proposal<'_>,
        steps: usize,
    ) -> Result<(u8, u64), Failed> {
        let mut call = self.transition.key(&keys.state);
        call.key(&keys.history)
            .arg(p.expected)
            .arg(p.to.encode(steps))
            .arg(p.reason)
            .arg(serde_json::to_string(p.entry).unwrap_or_default())
            .arg(Phase::RolledBack.encode(steps))
            .arg(KEY_TTL_SECONDS)
            .arg(p.epoch);
        let (took, epoch): (u8, i64) = tokio::time::timeout(self.timeout, call.invoke_async(conn))
            .await
            .map_err(|_| ("transition", format!("no answer within {:?}", self.timeout)))?
            .map_err(|e| ("transition", e.to_string()))?;
        Ok((took, epoch.max(0) as u64))
    }
}

/// A transition to take on the server.
struct Proposal<'a> {
    /// The epoch it is made from, or `force` (a rollback).
    expected: String,
    to: Phase,
    reason: &'a str,
    entry: &'a super::Transition,
    /// The replica's epoch once it is taken: the server's goes at least that far.
    epoch: u64,
}

/// The keys of one rollout generation.
struct Keys {
    state: String,
    history: String,
    counts_prefix: String,
}

impl Keys {
    fn new(prefix: &str, route: &str, generation: u64) -> Self {
        let base = format!("{prefix}:rollout:{route}:{generation:016x}");
        Self {
            history: format!("{base}:history"),
            counts_prefix: format!("{base}:counts:"),
            state: base,
        }
    }
}

/// Appends the (field, increment) pairs from `before` to `now`, non-zero ones only.
fn deltas(now: &Readings, before: &Readings, out: &mut Vec<String>) {
    let mut add = |field: String, d: u64| {
        if d > 0 {
            out.push(field);
            out.push(d.to_string());
        }
    };
    for (side, a, b) in [
        ("c", &now.candidate, &before.candidate),
        ("b", &now.baseline, &before.baseline),
    ] {
        add(format!("{side}.r"), a.requests.saturating_sub(b.requests));
        add(format!("{side}.e"), a.errors.saturating_sub(b.errors));
        for (i, (x, y)) in a.latency.iter().zip(&b.latency).enumerate() {
            add(format!("{side}.l{i}"), x.saturating_sub(*y));
        }
    }
    add("agree".into(), now.agreed.saturating_sub(before.agreed));
    add(
        "disagree".into(),
        now.disagreed.saturating_sub(before.disagreed),
    );
}

fn counts_of(m: &HashMap<String, u64>, side: &str) -> Counts {
    let get = |f: &str| m.get(&format!("{side}.{f}")).copied().unwrap_or(0);
    Counts {
        requests: get("r"),
        errors: get("e"),
        latency: (0..BUCKETS).map(|i| get(&format!("l{i}"))).collect(),
    }
}

fn readings_of(m: &HashMap<String, u64>) -> Readings {
    Readings {
        candidate: counts_of(m, "c"),
        baseline: counts_of(m, "b"),
        agreed: m.get("agree").copied().unwrap_or(0),
        disagreed: m.get("disagree").copied().unwrap_or(0),
    }
}

impl Rollout {
    /// Follows what the shared state says, given the epoch this exchange was made at:
    /// another replica's transition is taken over; at the same epoch the step is judged
    /// over every replica's counts. Returns the step to take, if the counts say so.
    fn follow(&self, sent_at: u64, read: Read) -> Option<(Phase, String, StepSummary)> {
        let n = self.spec.steps.len();
        let mut c = self.control.lock();
        if let Some(seen) = c.shared.as_mut() {
            seen.synced = Some(Instant::now());
            seen.error = None;
        }
        if c.epoch != sent_at || c.pending.is_some() {
            return None; // a transition here since: the next exchange tells it first
        }
        let shared = Phase::decode(read.phase, n);
        let started = UNIX_EPOCH + Duration::from_millis(read.started_ms);
        // Another replica's transition, or a server that lost its data and was seeded
        // again: what the server says is the rollout.
        if read.epoch != c.epoch || shared != self.phase() {
            if shared != self.phase() {
                info!(route = %self.route, to = shared.label(), "following the shared rollout");
                self.transition(
                    &mut c,
                    shared,
                    format!("another replica: {}", read.reason),
                    StepSummary::default(),
                );
            }
            c.epoch = read.epoch;
            c.step_started = started;
            c.step_instant = Instant::now()
                .checked_sub(Duration::from_millis(
                    read.now_ms.saturating_sub(read.started_ms),
                ))
                .unwrap_or_else(Instant::now);
            self.persist(&mut c);
            return None;
        }
        let Phase::Ramping { step } = shared else {
            return None;
        };
        let view = &read.step;
        let gates = judge(
            &self.spec,
            StepView {
                candidate: &view.candidate,
                baseline: &view.baseline,
                baseline_total: &read.baseline_total,
                agreed: view.agreed,
                disagreed: view.disagreed,
                all: self.spec.threshold(step) >= ALL,
            },
        );
        let summary = StepSummary {
            candidate_requests: view.candidate.requests,
            candidate_errors: view.candidate.errors,
            baseline_requests: view.baseline.requests,
            baseline_errors: view.baseline.errors,
            compared: view.agreed + view.disagreed,
            agreed: view.agreed,
        };
        let failed = gates.iter().find(|g| g.verdict == Verdict::Fail).cloned();
        let judged = gates
            .iter()
            .all(|g| matches!(g.verdict, Verdict::Pass | Verdict::NotApplicable));
        if let Some(seen) = c.shared.as_mut() {
            seen.counts = Some((read.step.clone(), gates));
        }
        if let Some(g) = failed {
            // Over every replica's counts: rolled back here at once, and told to all.
            let to = match self.spec.on_failure {
                super::OnFailure::Rollback => Phase::RolledBack,
                super::OnFailure::Pause => Phase::Paused { step },
            };
            let reason = format!(
                "gate failed over every replica: {} {} against {} over {}",
                g.gate,
                g.value.map_or("-".into(), |v| format!("{v:.4}")),
                g.threshold,
                g.have
            );
            self.metrics.gate_failed(g.gate);
            warn!(route = %self.route, %reason, to = to.label(), "shared rollout gate failed");
            self.decide(&mut c, to, reason, summary);
            return None;
        }
        let ended =
            read.now_ms.saturating_sub(read.started_ms) >= self.spec.interval.as_millis() as u64;
        (ended && judged).then(|| {
            (
                self.next(step),
                "every gate held over the step, over every replica".to_owned(),
                summary,
            )
        })
    }

    /// Keeps the outcome of an exchange for the status.
    fn synced(&self, result: Result<(), String>) {
        if let Err(e) = result
            && let Some(seen) = self.control.lock().shared.as_mut()
        {
            seen.error = Some(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(requests: u64, errors: u64, at: usize) -> Counts {
        let mut latency = vec![0; BUCKETS];
        latency[at] = requests - errors;
        Counts {
            requests,
            errors,
            latency,
        }
    }

    #[test]
    fn counts_travel_as_non_zero_deltas_and_come_back_whole() {
        let before = Readings {
            candidate: counts(10, 1, 5),
            baseline: counts(90, 0, 7),
            agreed: 8,
            disagreed: 1,
        };
        let now = Readings {
            candidate: counts(15, 1, 5),
            baseline: counts(100, 2, 7),
            agreed: 12,
            disagreed: 1,
        };
        let mut args = Vec::new();
        deltas(&now, &before, &mut args);
        assert_eq!(
            args,
            [
                "c.r", "5", "c.l5", "5", "b.r", "10", "b.e", "2", "b.l7", "8", "agree", "4"
            ]
        );
        // What the server sums from the pairs reads back as the same counts.
        let mut server: HashMap<String, u64> = HashMap::new();
        for pair in args.chunks(2) {
            *server.entry(pair[0].clone()).or_default() += pair[1].parse::<u64>().unwrap();
        }
        let back = readings_of(&server);
        assert_eq!(back.candidate.requests, 5);
        assert_eq!(back.candidate.latency[5], 5);
        assert_eq!(back.baseline.errors, 2);
        assert_eq!(back.agreed, 4);
        assert_eq!(back.disagreed, 0);
    }

    #[test]
    fn keys_name_the_route_and_generation() {
        let k = Keys::new("sy", "digits", 0xab);
        assert_eq!(k.state, "sy:rollout:digits:00000000000000ab");
        assert_eq!(k.history, "sy:rollout:digits:00000000000000ab:history");
        assert_eq!(
            k.counts_prefix,
            "sy:rollout:digits:00000000000000ab:counts:"
        );
    }
}
