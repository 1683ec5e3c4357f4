//! `switchyard explain`: which plan and target a request with given headers would get,
//! and why, in words. The same decision code as live traffic, with every target healthy.

use std::fmt::Write;

use http::HeaderMap;

use super::{Draw, Plan, Reason, Route, Split};

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
    let plan = match decision.reason {
        Reason::Rule(i) => Some(&route.rules[i].plan),
        Reason::Default => Some(&route.default),
        Reason::Pinned => None,
    };
    if let Some(Plan::Split(split)) = plan {
        describe_split(&mut out, route, split, headers, decision.draw);
    }
    let t = route.target(decision.target);
    let _ = writeln!(
        out,
        "target {}: model {} version {} on backend {}{}",
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
    let fallbacks: Vec<&str> = route
        .candidates(&decision)
        .skip(1)
        .map(|id| &*route.target(id).name)
        .collect();
    if !fallbacks.is_empty() {
        let _ = writeln!(out, "if it is unavailable: {}", fallbacks.join(", then "));
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
        .map(|(t, w)| {
            format!(
                "{} {:.1}%",
                route.target(*t).name,
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
