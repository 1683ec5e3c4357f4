//! The operator dashboard on the admin port: `GET /` serves the page (`index.html`,
//! compiled into the binary: vanilla JavaScript, nothing fetched from elsewhere) and
//! `GET /admin/overview` the JSON it polls every second: each route's plan as a tree, who
//! answered its requests in the last seconds and the last minute (share, rate, p50/p99,
//! error rate), breakers and endpoints, shadow agreement over the minute, the cache, the
//! rollout, and the policy version with the last reload's errors.
//!
//! The numbers come from the request metrics' own counters and histograms: a sampler
//! reads them once a second into a minute of history ([`Window`]), off the request path,
//! which adds nothing for the dashboard.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use parking_lot::Mutex;
use serde_json::{Value, json};

use crate::Shared;
use crate::metrics::{DURATION_BUCKETS, Totals};
use crate::routing::{Plan, PlanId, Route};
use crate::snapshot::{RouteEntry, Snapshot};

/// The page, with its style and script inline.
pub(crate) const PAGE: &str = include_str!("index.html");

/// The page's content security policy: its own inline script and style, requests to
/// its own origin, nothing else.
pub(crate) const PAGE_CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The longer window: rates, shares, latency and errors "over the last minute".
const MINUTE: Duration = Duration::from_secs(60);
/// The shorter window: the share "now", which follows a weight edit within seconds.
const RECENT: Duration = Duration::from_secs(5);
/// Points of the shadow agreement series, [`RECENT`] apart.
const SHADOW_POINTS: u32 = 12;
/// Samples older than this are dropped.
const KEEP: Duration = Duration::from_secs(66);

/// Counter readings over time, per route and answer (a target, a plan, `-`), and per
/// shadowed route.
#[derive(Debug, Default)]
pub(crate) struct Window {
    series: Mutex<HashMap<Key, Series>>,
}

/// A series' route and answer (or [`SHADOW_KEY`]).
type Key = (Box<str>, Box<str>);

/// Readings of one set of counters, oldest first, one a second.
#[derive(Debug, Default)]
struct Series {
    samples: VecDeque<(Instant, Reading)>,
}

/// One reading: request totals, or shadow comparisons.
#[derive(Debug, Clone, Copy)]
enum Reading {
    Requests(Totals),
    Shadow { agreed: u64, disagreed: u64 },
}

/// The key of a route's shadow series (no answer is called this: it has a space).
const SHADOW_KEY: &str = "shadow agreement";

impl Series {
    /// The reading at or just before `t`, else the oldest (a window that reaches back
    /// further than the history starts where the history does).
    fn at(&self, t: Instant) -> Option<(Instant, Reading)> {
        self.samples
            .iter()
            .rev()
            .find(|(at, _)| *at <= t)
            .or_else(|| self.samples.front())
            .copied()
    }
}

impl Window {
    /// Takes a reading of every route's counters.
    pub(crate) fn sample(&self, snapshot: &Snapshot) {
        let now = Instant::now();
        let mut series = self.series.lock();
        let mut seen = std::collections::HashSet::new();
        for entry in snapshot.routes.values() {
            for (name, _, totals) in answers(entry) {
                let key = (Box::from(&*entry.route.name), Box::from(name));
                push(
                    series.entry(key.clone()).or_default(),
                    now,
                    Reading::Requests(totals),
                );
                seen.insert(key);
            }
            if let Some(s) = &entry.shadow {
                let key = (Box::from(&*entry.route.name), Box::from(SHADOW_KEY));
                let reading = Reading::Shadow {
                    agreed: s.metrics.agree.get(),
                    disagreed: s.metrics.disagree.get(),
                };
                push(series.entry(key.clone()).or_default(), now, reading);
                seen.insert(key);
            }
        }
        series.retain(|k, _| seen.contains(k));
    }

    /// The past reading of `route`'s `name` closest before `t`.
    fn reading(&self, route: &str, name: &str, t: Instant) -> Option<(Instant, Reading)> {
        let series = self.series.lock();
        series.get(&(Box::from(route), Box::from(name)))?.at(t)
    }
}

fn push(series: &mut Series, now: Instant, reading: Reading) {
    series.samples.push_back((now, reading));
    while series
        .samples
        .front()
        .is_some_and(|(at, _)| now.duration_since(*at) > KEEP)
    {
        series.samples.pop_front();
    }
}

/// Who answers a route's requests, with what they counted so far: its targets, its plans
/// that are not single targets (a cascade's answer is the cascade's), and `-` for requests
/// refused before a target was chosen.
fn answers(entry: &RouteEntry) -> Vec<(&str, &'static str, Totals)> {
    let route = &entry.route;
    let mut out: Vec<(&str, &'static str, Totals)> = entry
        .targets
        .iter()
        .zip(route.targets.iter())
        .map(|(t, spec)| (&*spec.name, "target", t.metrics.totals()))
        .collect();
    for (i, plan) in entry.plans.iter().enumerate() {
        if let Some(m) = &plan.metrics {
            out.push((&*route.plan_names[i], "plan", m.totals()));
        }
    }
    out.push(("-", "unrouted", entry.metrics.unrouted.totals()));
    out
}

/// A request window's numbers: what changed between two readings.
#[derive(Debug, Clone, Copy, Default)]
struct Delta {
    seconds: f64,
    totals: Totals,
}

impl Delta {
    fn between(old: Option<(Instant, Reading)>, now: Instant, current: Totals) -> Self {
        match old {
            Some((at, Reading::Requests(old))) => {
                let mut totals = Totals {
                    requests: current.requests.saturating_sub(old.requests),
                    errors: current.errors.saturating_sub(old.errors),
                    ..Totals::default()
                };
                for (d, (c, o)) in totals
                    .buckets
                    .iter_mut()
                    .zip(current.buckets.iter().zip(old.buckets))
                {
                    *d = c.saturating_sub(o);
                }
                Self {
                    seconds: now.duration_since(at).as_secs_f64(),
                    totals,
                }
            }
            _ => Self::default(),
        }
    }

    fn rate(&self) -> f64 {
        if self.seconds > 0.0 {
            self.totals.requests as f64 / self.seconds
        } else {
            0.0
        }
    }

    fn add(&mut self, other: &Self) {
        self.seconds = self.seconds.max(other.seconds);
        self.totals.requests += other.totals.requests;
        self.totals.errors += other.totals.errors;
        for (a, b) in self.totals.buckets.iter_mut().zip(other.totals.buckets) {
            *a += b;
        }
    }

    /// Rate, latency and errors, as the page shows them.
    fn json(&self) -> Value {
        let t = &self.totals;
        json!({
            "rps": self.rate(),
            "requests": t.requests,
            "errors": t.errors,
            "error_rate": (t.requests > 0).then(|| t.errors as f64 / t.requests as f64),
            "p50_ms": quantile(&t.buckets, 0.5).map(ms),
            "p99_ms": quantile(&t.buckets, 0.99).map(ms),
        })
    }
}

/// Seconds as milliseconds, to the microsecond.
fn ms(seconds: f64) -> f64 {
    (seconds * 1e6).round() / 1e3
}

/// The `q` quantile of bucketed durations, interpolated inside its bucket as Prometheus'
/// `histogram_quantile` does; the last finite bound when it falls in +Inf.
fn quantile(buckets: &[u64; DURATION_BUCKETS.len() + 1], q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut below = 0u64;
    for (i, &n) in buckets.iter().enumerate() {
        if n > 0 && (below + n) as f64 >= rank {
            let Some(&upper) = DURATION_BUCKETS.get(i) else {
                return DURATION_BUCKETS.last().copied();
            };
            let lower = if i == 0 { 0.0 } else { DURATION_BUCKETS[i - 1] };
            return Some(
                lower + (upper - lower) * ((rank - below as f64) / n as f64).clamp(0.0, 1.0),
            );
        }
        below += n;
    }
    DURATION_BUCKETS.last().copied()
}

/// `GET /admin/overview`.
pub(crate) fn overview(shared: &Shared, snapshot: &Snapshot) -> Value {
    let now = Instant::now();
    let mut names: Vec<&str> = snapshot.routes.keys().map(|k| &**k).collect();
    names.sort_unstable();
    let routes: Vec<Value> = names
        .iter()
        .filter_map(|n| snapshot.routes.get(*n))
        .map(|e| route(&shared.dashboard, e, now))
        .collect();
    json!({
        "now": UNIX_EPOCH.elapsed().map_or(0.0, |d| d.as_secs_f64()),
        "version": snapshot.version,
        "loaded_at": snapshot.loaded_at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        "policies": shared.config.policies.display().to_string(),
        "last_reload": last_reload(shared),
        "window_seconds": MINUTE.as_secs(),
        "recent_seconds": RECENT.as_secs(),
        "routes": routes,
    })
}

/// The last reload's outcome (`GET /admin/policy` and the dashboard).
pub(crate) fn last_reload(shared: &Shared) -> Value {
    let last = shared.reloads.last.load();
    match last.as_ref() {
        None => Value::Null,
        Some(r) => json!({
            "at": r.at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            "trigger": r.trigger,
            "result": if r.version.is_some() { "ok" } else { "error" },
            "version": r.version,
            "errors": r.errors,
        }),
    }
}

fn route(window: &Window, entry: &RouteEntry, now: Instant) -> Value {
    let r = &entry.route;
    let answered: Vec<(&str, &str, Delta, Delta)> = answers(entry)
        .into_iter()
        .map(|(name, kind, totals)| {
            let past = |span: Duration| {
                let t = now.checked_sub(span).unwrap_or(now);
                Delta::between(window.reading(&r.name, name, t), now, totals)
            };
            (name, kind, past(RECENT), past(MINUTE))
        })
        .collect();
    let (mut recent, mut minute) = (Delta::default(), Delta::default());
    for (_, _, a, b) in &answered {
        recent.add(a);
        minute.add(b);
    }
    let share = |part: &Delta, whole: &Delta| {
        (whole.totals.requests > 0)
            .then(|| part.totals.requests as f64 / whole.totals.requests as f64)
    };
    let answers: Vec<Value> = answered
        .iter()
        // A target is listed even when idle; a plan (a split never answers itself) and
        // the refused only when they answered in the minute.
        .filter(|(_, kind, _, m)| *kind == "target" || m.totals.requests > 0)
        .map(|(name, kind, a, m)| {
            let mut v = m.json();
            v["name"] = json!(name);
            v["kind"] = json!(kind);
            v["rps_recent"] = json!(a.rate());
            v["share_recent"] = json!(share(a, &recent));
            v["share"] = json!(share(m, &minute));
            v
        })
        .collect();
    let mut traffic = minute.json();
    traffic["rps_recent"] = json!(recent.rate());
    let targets: Vec<Value> = entry
        .targets
        .iter()
        .zip(r.targets.iter())
        .map(|(t, spec)| {
            json!({
                "name": &*spec.name,
                "backend": &*spec.backend,
                "model": &*spec.model,
                "version": &*spec.version,
                "release": spec.release.as_deref(),
                "breaker": t.state.breaker.state().name(),
                "available": t.state.available(&t.pool),
                "endpoints": t.pool.members().endpoints.iter().map(|e| json!({ "address": e.address, "healthy": e.is_healthy() })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let shadow = match (&r.shadow, &entry.shadow) {
        (Some(spec), Some(s)) => {
            let (agreed, disagreed) = (s.metrics.agree.get(), s.metrics.disagree.get());
            let rate = |a: u64, d: u64| (a + d > 0).then(|| a as f64 / (a + d) as f64);
            let wall = UNIX_EPOCH.elapsed().map_or(0.0, |d| d.as_secs_f64());
            let read = |t: Instant| match window.reading(&r.name, SHADOW_KEY, t) {
                Some((_, Reading::Shadow { agreed, disagreed })) => (agreed, disagreed),
                _ => (agreed, disagreed),
            };
            let series: Vec<Value> = (0..SHADOW_POINTS)
                .rev()
                .map(|k| {
                    let end = now.checked_sub(RECENT * k).unwrap_or(now);
                    let start = end.checked_sub(RECENT).unwrap_or(end);
                    let (a1, d1) = if k == 0 {
                        (agreed, disagreed)
                    } else {
                        read(end)
                    };
                    let (a0, d0) = read(start);
                    let (a, d) = (a1.saturating_sub(a0), d1.saturating_sub(d0));
                    json!({
                        "t": wall - (RECENT * k).as_secs_f64(),
                        "agreement_rate": rate(a, d),
                        "compared": a + d,
                    })
                })
                .collect();
            json!({
                "name": &*spec.name,
                "percent": switchyard_config::rules::threshold_percent(spec.threshold),
                "compared": agreed + disagreed,
                "agreed": agreed,
                "agreement_rate": rate(agreed, disagreed),
                "series": series,
            })
        }
        _ => Value::Null,
    };
    let cache = entry.cache.as_ref().map(|c| {
        let m = c.metrics();
        json!({
            "hits": m.hits.get(),
            "misses": m.misses.get(),
            "coalesced": m.coalesced.get(),
            "bypass": m.bypass.get(),
            "bytes": m.bytes.get(),
            "evictions": m.evictions.get(),
        })
    });
    json!({
        "name": &*r.name,
        "file": &*r.file,
        "deadline_ms": r.deadline.as_millis() as u64,
        "rules": r.rules.iter().map(|rule| json!({
            "match": rule.matchers.iter().map(|m| m.describe()).collect::<Vec<_>>().join(" and "),
            "plan": plan(r, rule.plan, 0),
        })).collect::<Vec<_>>(),
        "default": plan(r, r.default, 0),
        "fallback": r.fallback.iter().map(|t| &*r.target(*t).name).collect::<Vec<_>>(),
        "traffic": traffic,
        "answers": answers,
        "targets": targets,
        "shadow": shadow,
        "cache": cache,
        "rollout": entry.rollout.as_ref().map(|ro| ro.status(&r.file)),
    })
}

/// A plan as a tree of nodes by `kind`, for the page to draw.
fn plan(route: &Route, id: PlanId, depth: usize) -> Value {
    if depth > 8 {
        return json!({ "kind": "truncated" });
    }
    let name = route.plan_name(id);
    let sub = |p: PlanId| plan(route, p, depth + 1);
    match route.plan(id) {
        Plan::Target(_) => json!({ "kind": "target", "name": &*name }),
        Plan::Split(s) => json!({
            "kind": "split",
            "name": &*name,
            "sticky": s.sticky.as_ref().map(|h| format!("header:{h}")),
            "arms": s.members().iter().map(|(p, w)| json!({ "weight": w, "plan": sub(*p) })).collect::<Vec<_>>(),
        }),
        Plan::Cascade(stages) => json!({
            "kind": "cascade",
            "name": &*name,
            "stages": stages.iter().map(|st| {
                let output = st.output.as_deref().unwrap_or("the first output");
                json!({
                    "plan": sub(st.plan),
                    "accept": st.accept.as_ref().map(|a| a.describe(output)),
                })
            }).collect::<Vec<_>>(),
        }),
        Plan::Ensemble(e) => json!({
            "kind": "ensemble",
            "name": &*name,
            "combine": e.combine.name(),
            "quorum": e.quorum,
            "members": e.members.iter().map(|(p, w)| json!({ "weight": w, "plan": sub(*p) })).collect::<Vec<_>>(),
        }),
        Plan::Route(other) => json!({ "kind": "route", "name": &**other }),
        Plan::Pipeline(p) => json!({
            "kind": "pipeline",
            "name": &*name,
            "steps": p.steps.iter().map(|s| json!({ "name": &*s.name, "plan": sub(s.plan) })).collect::<Vec<_>>(),
        }),
        Plan::Switch(s) => json!({
            "kind": "switch",
            "name": &*name,
            "on": sub(s.on),
            "cases": s.cases.iter().map(|c| json!({ "when": c.when.describe(), "plan": sub(c.plan) })).collect::<Vec<_>>(),
            "default": sub(s.default),
        }),
    }
}

/// Samples the counters once a second until the gateway stops.
pub(crate) async fn run(shared: Arc<Shared>, stop: tokio::sync::watch::Receiver<bool>) {
    let mut ticks = crate::ticker::Ticker::new(Duration::from_secs(1), stop);
    while ticks.next().await {
        shared.dashboard.sample(&shared.snapshot.load());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_inside_their_bucket() {
        let mut b = [0u64; DURATION_BUCKETS.len() + 1];
        assert_eq!(quantile(&b, 0.5), None);
        // 100 in (1ms, 2ms]: the median is halfway.
        b[3] = 100;
        let p50 = quantile(&b, 0.5).unwrap();
        assert!((p50 - 0.0015).abs() < 1e-9, "{p50}");
        // One slow answer beyond the last bound: p99 of 100 stays in the bucket, the max
        // is the last finite bound.
        b[DURATION_BUCKETS.len()] = 1;
        assert!(quantile(&b, 0.99).unwrap() <= 0.002);
        assert_eq!(quantile(&b, 1.0), Some(10.0));
    }

    #[test]
    fn a_window_compares_with_the_reading_before_its_start() {
        let t0 = Instant::now();
        let mut s = Series::default();
        let reading = |n: u64| {
            Reading::Requests(Totals {
                requests: n,
                ..Totals::default()
            })
        };
        for i in 0..10u64 {
            push(&mut s, t0 + Duration::from_secs(i), reading(i * 10));
        }
        let now = t0 + Duration::from_secs(10);
        let current = Totals {
            requests: 100,
            ..Totals::default()
        };
        let d = Delta::between(s.at(now - Duration::from_secs(5)), now, current);
        assert_eq!(d.totals.requests, 50);
        assert!((d.rate() - 10.0).abs() < 1e-9);
        // Further back than the history: from its start.
        let d = Delta::between(s.at(now - Duration::from_secs(60)), now, current);
        assert_eq!(d.totals.requests, 100);
        assert!((d.seconds - 10.0).abs() < 1e-9);
    }
}
