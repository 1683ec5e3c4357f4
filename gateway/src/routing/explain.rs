//! `switchyard explain`: which plan and target a request with given headers would get,
//! and why, in words. The same decision code as live traffic, with every target healthy.

use std::fmt::Write;

use http::HeaderMap;

use super::{Draw, Mapping, Plan, PlanId, Reason, Route, Source, Split};

/// Explains the decision for a request to `route` with `headers` and `model_version`.
pub fn explain(route: &Route, headers: &HeaderMap, model_version: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "route {} (from {})", route.name, route.file);
    let decision = match route.decide(headers, model_version, 0, &|_| true) {
        Ok(d) => d,
        Err(e) => {
            let _ = writeln!(out, "refused: {e}");
            return out;
        }
    };
    match decision.reason {
        Reason::Pinned => {
            let _ = writeln!(out, "model_version '{model_version}' pins a target");
        }
        Reason::Rule(_) | Reason::Default => {
            for (i, rule) in route.rules.iter().enumerate() {
                let conds: Vec<String> = rule
                    .matchers
                    .iter()
                    .map(|m| {
                        format!(
                            "{} [{}]",
                            m.describe(),
                            if m.matches(headers) { "yes" } else { "no" }
                        )
                    })
                    .collect();
                let verdict = if decision.reason == Reason::Rule(i) {
                    "MATCHES"
                } else {
                    "no match"
                };
                let _ = writeln!(out, "rule {i}: {} -> {verdict}", conds.join(" and "));
                if decision.reason == Reason::Rule(i) {
                    break;
                }
            }
            if decision.reason == Reason::Default {
                let _ = writeln!(out, "no rule matched: default plan");
            }
        }
    }
    if let Some(split) = decision.split
        && let Plan::Split(s) = route.plan(split)
    {
        describe_split(&mut out, route, s, headers, decision.draw);
    }
    describe_plan(&mut out, route, decision.plan, 0);
    if decision.target.is_some() {
        let fallbacks: Vec<&str> = route
            .candidates(&decision)
            .skip(1)
            .map(|id| &*route.target(id).name)
            .collect();
        if !fallbacks.is_empty() {
            let _ = writeln!(out, "if it is unavailable: {}", fallbacks.join(", then "));
        }
    }
    if let Some(sh) = &route.shadow {
        let percent = switchyard_config::rules::threshold_percent(sh.threshold);
        let _ = writeln!(
            out,
            "shadow: {percent:.0}% of requests are copied to {} (at most {} in flight); answers compared, never returned",
            route.plan_name(sh.plan),
            sh.max_in_flight
        );
    }
    if let Some(c) = &route.cache {
        let _ = writeln!(
            out,
            "cache: successful answers served for {:?} (up to {} bytes)",
            c.ttl, c.max_bytes
        );
    }
    let _ = writeln!(
        out,
        "deadline {:?}; retries after sending: {} ({})",
        route.deadline,
        route.retry.attempts,
        if route.retry.idempotent {
            "idempotent"
        } else {
            "not idempotent: none"
        }
    );
    out
}

fn describe_plan(out: &mut String, route: &Route, plan: PlanId, depth: usize) {
    let pad = "  ".repeat(depth);
    if depth > 8 {
        let _ = writeln!(out, "{pad}...");
        return;
    }
    match route.plan(plan) {
        Plan::Target(t) => {
            let t = route.target(*t);
            let _ = writeln!(
                out,
                "{pad}target {}: model {} version {} on backend {}{}",
                t.name,
                t.model,
                if t.version.is_empty() {
                    "(newest)"
                } else {
                    &t.version
                },
                t.backend,
                t.release
                    .as_deref()
                    .map(|r| format!(", release {r}"))
                    .unwrap_or_default()
            );
        }
        Plan::Split(s) => {
            let members: Vec<String> = s
                .members()
                .iter()
                .map(|(m, w)| format!("{} ({w})", route.plan_name(*m)))
                .collect();
            let _ = writeln!(out, "{pad}split: {}", members.join(", "));
        }
        Plan::Cascade(stages) => {
            let _ = writeln!(out, "{pad}cascade of {} stages:", stages.len());
            for (i, st) in stages.iter().enumerate() {
                let test = match &st.accept {
                    Some(a) => format!(
                        "answers if every row's {}",
                        a.describe(st.output.as_deref().unwrap_or("the first output"))
                    ),
                    None => "always answers".to_owned(),
                };
                let _ = writeln!(
                    out,
                    "{pad}  stage {} ({}): {test}",
                    i + 1,
                    route.plan_name(st.plan)
                );
                describe_plan(out, route, st.plan, depth + 2);
            }
        }
        Plan::Ensemble(e) => {
            let _ = writeln!(
                out,
                "{pad}ensemble ({}) of {} members, quorum {}{}:",
                e.combine.name(),
                e.members.len(),
                e.quorum,
                e.member_timeout
                    .map(|t| format!(", member timeout {t:?}"))
                    .unwrap_or_default()
            );
            for (m, w) in e.members.iter() {
                let _ = writeln!(out, "{pad}  member {} (weight {w})", route.plan_name(*m));
                describe_plan(out, route, *m, depth + 2);
            }
        }
        Plan::Pipeline(p) => {
            let _ = writeln!(out, "{pad}pipeline of {} steps:", p.steps.len());
            let source = |m: &Mapping| match m.from {
                Source::Request => format!("request.{}", m.tensor),
                Source::Step(i) => format!("{}.{}", p.steps[i].name, m.tensor),
            };
            let list = |maps: &[Mapping]| {
                maps.iter()
                    .map(|m| format!("{} <- {}", m.name, source(m)))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            for (i, st) in p.steps.iter().enumerate() {
                let inputs = match &st.inputs {
                    None => "the client's request as it is".to_owned(),
                    Some(maps) => list(maps),
                };
                let _ = writeln!(
                    out,
                    "{pad}  step {} '{}' ({}): {inputs}",
                    i + 1,
                    st.name,
                    route.plan_name(st.plan)
                );
                describe_plan(out, route, st.plan, depth + 2);
            }
            let outputs = if p.outputs.is_empty() {
                "the last step's answer".to_owned()
            } else {
                list(&p.outputs)
            };
            let _ = writeln!(out, "{pad}  answer: {outputs}");
        }
        Plan::Switch(sw) => {
            let _ = writeln!(
                out,
                "{pad}switch on the answer of {} ({}):",
                route.plan_name(sw.on),
                sw.output.as_deref().unwrap_or("its first output")
            );
            describe_plan(out, route, sw.on, depth + 2);
            for (i, c) in sw.cases.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "{pad}  case {} (every row: {}): {}",
                    i + 1,
                    c.when.describe(),
                    route.plan_name(c.plan)
                );
                describe_plan(out, route, c.plan, depth + 2);
            }
            if sw.default == sw.on {
                let _ = writeln!(
                    out,
                    "{pad}  otherwise: the answer of {}",
                    route.plan_name(sw.on)
                );
            } else {
                let _ = writeln!(out, "{pad}  otherwise: {}", route.plan_name(sw.default));
                describe_plan(out, route, sw.default, depth + 2);
            }
        }
        Plan::Route(r) => {
            let _ = writeln!(
                out,
                "{pad}delegates to route {r}: its rules and plan decide"
            );
        }
    }
}

fn describe_split(
    out: &mut String,
    route: &Route,
    split: &Split,
    headers: &HeaderMap,
    draw: Option<Draw>,
) {
    let total: u64 = split.members().iter().map(|(_, w)| u64::from(*w)).sum();
    let shares: Vec<String> = split
        .members()
        .iter()
        .map(|(p, w)| {
            format!(
                "{} {:.1}%",
                route.plan_name(*p),
                100.0 * f64::from(*w) / total as f64
            )
        })
        .collect();
    let _ = writeln!(out, "split: {}", shares.join(", "));
    match (&split.sticky, draw) {
        (Some(h), Some(Draw::Sticky)) => {
            let key = headers
                .get(h)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .unwrap_or_default();
            let _ = writeln!(out, "sticky on {h}: '{key}' always gets the same target");
        }
        (Some(h), _) => {
            let _ = writeln!(
                out,
                "sticky on {h}, but the request has no {h}: a random draw by weight (the target below is one such draw)"
            );
        }
        (None, _) => {
            let _ = writeln!(
                out,
                "no sticky key: a random draw by weight per request (the target below is one such draw)"
            );
        }
    }
}
