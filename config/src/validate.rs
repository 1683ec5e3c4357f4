//! Semantic checks of policy files against each other and against gateway.yaml. Every
//! problem is reported (not only the first), each with file, line, field path and message.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use crate::diagnostic::Diagnostic;
use crate::gateway::GatewayConfig;
use crate::policy::{HeaderMatchConfig, PlanConfig, PolicyFile, RuleConfig};
use crate::units::At;

/// Longest deadline a route may set.
const MAX_DEADLINE_SECS: u64 = 600;
/// Most retries a route may ask for.
const MAX_RETRY_ATTEMPTS: u32 = 5;

/// Checks one policy file; returns every problem found.
pub fn validate_policy(
    file: &Path,
    policy: &PolicyFile,
    gateway: &GatewayConfig,
) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    let mut at = |line: u64, column: u64, path: String, message: String| {
        out.push(Diagnostic::new(file, line, column, path, message));
    };
    if policy.version.value != 1 {
        at(
            policy.version.line,
            policy.version.column,
            "version".into(),
            format!(
                "unsupported policy version {}; this gateway reads version 1",
                policy.version.value
            ),
        );
    }
    let route = &policy.route;
    if !valid_route_name(&route.value) {
        at(
            route.line,
            route.column,
            "route".into(),
            format!(
                "'{}' is not a route name: use 1 to 128 letters, digits, '_', '-' or '.'",
                route.value
            ),
        );
    }
    if policy.targets.is_empty() {
        at(
            0,
            0,
            "targets".into(),
            "a route needs at least one target".into(),
        );
    }
    let mut releases: HashMap<&str, &str> = HashMap::new();
    for (name, target) in &policy.targets {
        let path = format!("targets.{name}");
        let t = &target.value;
        if !gateway.backends.contains_key(&t.backend) {
            let known: Vec<&str> = gateway.backends.keys().map(String::as_str).collect();
            at(
                target.line,
                target.column,
                format!("{path}.backend"),
                format!(
                    "unknown backend '{}'; gateway.yaml defines: {}",
                    t.backend,
                    list(&known)
                ),
            );
        }
        if t.model.is_empty() {
            at(
                target.line,
                target.column,
                format!("{path}.model"),
                "the model name is empty".into(),
            );
        }
        if t.version == Some(0) {
            at(
                target.line,
                target.column,
                format!("{path}.version"),
                "Triton versions start at 1".into(),
            );
        }
        if let Some(release) = &t.release {
            if !valid_release(release) {
                at(
                    target.line,
                    target.column,
                    format!("{path}.release"),
                    format!(
                        "'{release}' is not a release label: expected v<major>.<minor>.<patch>, like v1.2.0"
                    ),
                );
            } else if let Some(other) = releases.insert(release, name) {
                at(
                    target.line,
                    target.column,
                    format!("{path}.release"),
                    format!(
                        "release {release} is already the release of target '{other}'; a release names one target"
                    ),
                );
            }
        }
    }
    let targets: Vec<&str> = policy.targets.keys().map(String::as_str).collect();
    for (i, rule) in policy.rules.iter().enumerate() {
        check_rule(&format!("rules[{i}]"), rule, &mut at);
        check_plan(&format!("rules[{i}].plan"), &rule.plan, &targets, &mut at);
    }
    check_reachability(&policy.rules, &mut at);
    check_plan("default", &policy.default, &targets, &mut at);
    let mut seen = HashSet::new();
    for (i, f) in policy.fallback.iter().enumerate() {
        if !targets.contains(&f.value.as_str()) {
            at(
                f.line,
                f.column,
                format!("fallback[{i}]"),
                unknown_target(&f.value, &targets),
            );
        } else if !seen.insert(&f.value) {
            at(
                f.line,
                f.column,
                format!("fallback[{i}]"),
                format!("target '{}' is listed twice", f.value),
            );
        }
    }
    if let Some(d) = &policy.deadline {
        let secs = d.value.0.as_secs_f64();
        if d.value.0.is_zero() || secs > MAX_DEADLINE_SECS as f64 {
            at(
                d.line,
                d.column,
                "deadline".into(),
                format!("deadline must be above 0 and at most {MAX_DEADLINE_SECS}s, got {secs}s"),
            );
        }
    }
    if let Some(r) = &policy.retry
        && r.value.attempts > MAX_RETRY_ATTEMPTS
    {
        at(
            r.line,
            r.column,
            "retry.attempts".into(),
            format!(
                "at most {MAX_RETRY_ATTEMPTS} retries, got {}",
                r.value.attempts
            ),
        );
    }
    out
}

fn check_rule(path: &str, rule: &RuleConfig, at: &mut impl FnMut(u64, u64, String, String)) {
    let (line, column) = (rule.when.line, rule.when.column);
    for (name, cond) in &rule.when.value.headers {
        let hpath = format!("{path}.match.headers.{name}");
        if !valid_header_name(name) {
            at(
                line,
                column,
                hpath.clone(),
                format!(
                    "'{name}' is not a valid HTTP header name (letters, digits and !#$%&'*+-.^_`|~ only)"
                ),
            );
        }
        match cond {
            HeaderMatchConfig::Regex(re) => {
                if let Err(e) = regex::Regex::new(re) {
                    let first = e
                        .to_string()
                        .lines()
                        .last()
                        .unwrap_or_default()
                        .trim()
                        .to_owned();
                    at(
                        line,
                        column,
                        hpath,
                        format!("invalid regex '{re}': {first}"),
                    );
                }
            }
            HeaderMatchConfig::Prefix(p) if p.is_empty() => {
                at(
                    line,
                    column,
                    hpath,
                    "an empty prefix matches any value; use { present: true }".into(),
                );
            }
            _ => {}
        }
    }
}

/// A rule is unreachable when an earlier rule's conditions are a subset of its own: every
/// request it would match, the earlier rule took first. A rule with no condition makes all
/// later rules and the default plan unreachable.
fn check_reachability(rules: &[RuleConfig], at: &mut impl FnMut(u64, u64, String, String)) {
    for (j, later) in rules.iter().enumerate() {
        let shadowed_by = rules[..j].iter().position(|earlier| {
            earlier.when.value.headers.iter().all(|(name, cond)| {
                later
                    .when
                    .value
                    .headers
                    .get(name)
                    .is_some_and(|c| c == cond)
            })
        });
        if let Some(i) = shadowed_by {
            at(
                later.when.line,
                later.when.column,
                format!("rules[{j}]"),
                format!(
                    "unreachable: rules[{i}] matches every request this rule matches, and comes first"
                ),
            );
        }
    }
    if let Some(i) = rules.iter().position(|r| r.when.value.headers.is_empty()) {
        let r = &rules[i];
        at(r.when.line, r.when.column, format!("rules[{i}].match"), 
            "this rule has no condition, so it matches every request and the default plan is unreachable; make it the default instead".into());
    }
}

fn check_plan(
    path: &str,
    plan: &At<PlanConfig>,
    targets: &[&str],
    at: &mut impl FnMut(u64, u64, String, String),
) {
    let (line, column) = (plan.line, plan.column);
    match &plan.value {
        PlanConfig::Target(t) => {
            if !targets.contains(&t.as_str()) {
                at(line, column, path.into(), unknown_target(t, targets));
            }
        }
        PlanConfig::Split(split) => {
            if split.weights.is_empty() {
                at(
                    line,
                    column,
                    format!("{path}.split.weights"),
                    "a split needs at least one target".into(),
                );
            }
            for (name, w) in &split.weights {
                let wpath = format!("{path}.split.weights.{name}");
                if !targets.contains(&name.as_str()) {
                    at(
                        w.line,
                        w.column,
                        wpath.clone(),
                        unknown_target(name, targets),
                    );
                }
                if w.value <= 0 || w.value > 1_000_000 {
                    at(
                        w.line,
                        w.column,
                        wpath,
                        format!(
                            "weight must be between 1 and 1000000, got {}; remove the target to send it nothing",
                            w.value
                        ),
                    );
                }
            }
            if let Some(sticky) = &split.sticky {
                match sticky.value.strip_prefix("header:") {
                    Some(h) if valid_header_name(h) => {}
                    Some(h) => at(
                        sticky.line,
                        sticky.column,
                        format!("{path}.split.sticky"),
                        format!("'{h}' is not a valid HTTP header name"),
                    ),
                    None => at(
                        sticky.line,
                        sticky.column,
                        format!("{path}.split.sticky"),
                        format!(
                            "'{}' is not a sticky key: expected header:NAME, like header:x-user-id",
                            sticky.value
                        ),
                    ),
                }
            }
        }
    }
}

fn unknown_target(name: &str, targets: &[&str]) -> String {
    format!(
        "unknown target '{name}'; this route's targets are: {}",
        list(targets)
    )
}

fn list(names: &[&str]) -> String {
    if names.is_empty() {
        "(none)".to_owned()
    } else {
        names.join(", ")
    }
}

/// Route names: 1 to 128 of `[A-Za-z0-9_.-]`, so they fit a URL path segment unescaped.
pub(crate) fn valid_route_name(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
}

/// `v<major>.<minor>.<patch>` with decimal numbers.
pub(crate) fn valid_release(s: &str) -> bool {
    let Some(rest) = s.strip_prefix('v') else {
        return false;
    };
    let parts: Vec<&str> = rest.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// An RFC 9110 token.
pub(crate) fn valid_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_releases() {
        assert!(valid_release("v1.10.0"));
        assert!(
            !valid_release("1.0.0")
                && !valid_release("v1.0")
                && !valid_release("v1.0.x")
                && !valid_release("v1..0")
        );
        assert!(
            valid_route_name("digits-cascade_2.b")
                && !valid_route_name("a/b")
                && !valid_route_name("")
        );
        assert!(
            valid_header_name("x-user-id")
                && !valid_header_name("x user")
                && !valid_header_name("")
        );
    }
}
