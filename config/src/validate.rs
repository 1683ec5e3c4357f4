//! Semantic checks of policy files against each other and against gateway.yaml. Every
//! problem is reported (not only the first), each with file, line, field path and message.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use crate::diagnostic::Diagnostic;
use crate::gateway::GatewayConfig;
use crate::policy::{
    Combine, HeaderMatchConfig, PlanConfig, PolicyFile, PriorityConfig, RolloutConfig, RuleConfig,
};
use crate::rules;
use crate::units::At;

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
    for (name, plan) in &policy.plans {
        if policy.targets.contains_key(name) {
            at(
                plan.line,
                plan.column,
                format!("plans.{name}"),
                format!("'{name}' is both a target and a plan; names must be unique"),
            );
        }
    }
    // Anything that names a plan member may name a target or a named plan.
    let names: Vec<&str> = policy
        .targets
        .keys()
        .chain(policy.plans.keys())
        .map(String::as_str)
        .collect();
    for (name, plan) in &policy.plans {
        check_plan(&format!("plans.{name}"), plan, &names, &mut at);
    }
    check_plan_cycles(policy, &mut at);
    check_overflow(policy, &names, &mut at);
    for (i, rule) in policy.rules.iter().enumerate() {
        check_rule(&format!("rules[{i}]"), rule, &mut at);
        check_plan(&format!("rules[{i}].plan"), &rule.plan, &names, &mut at);
    }
    check_reachability(&policy.rules, &mut at);
    check_plan("default", &policy.default, &names, &mut at);
    if let Some(shadow) = &policy.shadow {
        let (line, column) = (shadow.line, shadow.column);
        let sh = &shadow.value;
        match (&sh.target, &sh.plan) {
            (Some(t), None) => {
                if !names.contains(&t.as_str()) {
                    at(
                        line,
                        column,
                        "shadow.target".into(),
                        unknown_target(t, &names),
                    );
                }
            }
            (None, Some(plan)) => {
                check_plan(
                    "shadow.plan",
                    &At {
                        value: plan.clone(),
                        line,
                        column,
                    },
                    &names,
                    &mut at,
                );
            }
            _ => at(
                line,
                column,
                "shadow".into(),
                "give exactly one of target or plan".into(),
            ),
        }
        if let Err(e) = rules::percent_threshold(sh.percent) {
            at(line, column, "shadow.percent".into(), e);
        }
        if sh.max_in_flight == 0 {
            at(
                line,
                column,
                "shadow.max_in_flight".into(),
                "max_in_flight must be at least 1".into(),
            );
        }
    }
    if let Some(cache) = &policy.cache {
        if let Err(e) = rules::within("ttl", cache.value.ttl.0, rules::MAX_CACHE_TTL) {
            at(cache.line, cache.column, "cache.ttl".into(), e);
        }
        if cache.value.max_bytes.0 < 1024 {
            at(
                cache.line,
                cache.column,
                "cache.max_bytes".into(),
                format!(
                    "max_bytes must be at least 1KiB, got {}",
                    cache.value.max_bytes.0
                ),
            );
        }
    }
    if let Some(rollout) = &policy.rollout {
        check_rollout(policy, rollout, &names, &mut at);
    }
    // Fallbacks are targets: they answer when the chosen target cannot.
    let targets: Vec<&str> = policy.targets.keys().map(String::as_str).collect();
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
    if let Some(p) = &policy.priority {
        check_priority(p, &mut at);
    }
    if let Some(d) = &policy.deadline
        && let Err(e) = rules::within("deadline", d.value.0, rules::MAX_DEADLINE)
    {
        at(d.line, d.column, "deadline".into(), e);
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

/// The longest a rollout step may last: a week.
const MAX_ROLLOUT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

fn check_rollout(
    policy: &PolicyFile,
    rollout: &At<RolloutConfig>,
    names: &[&str],
    at: &mut impl FnMut(u64, u64, String, String),
) {
    let r = &rollout.value;
    // A plan a request can be decided to: a target or a named plan that is not a split
    // (a split's requests are decided to its members) nor another route's plan.
    let runnable = |name: &At<String>,
                    field: &str,
                    at: &mut dyn FnMut(u64, u64, String, String)| {
        let path = format!("rollout.{field}");
        if !names.contains(&name.value.as_str()) {
            at(
                name.line,
                name.column,
                path,
                unknown_target(&name.value, names),
            );
            return false;
        }
        match policy.plans.get(&name.value).map(|p| &p.value) {
            Some(PlanConfig::Split(_)) => {
                at(
                    name.line,
                    name.column,
                    path,
                    format!(
                        "'{}' is a split: a split's requests go to its members, so roll out one of them instead",
                        name.value
                    ),
                );
                false
            }
            Some(PlanConfig::Route(_)) => {
                at(
                    name.line,
                    name.column,
                    path,
                    format!(
                        "'{}' is another route's plan: roll it out in that route's policy",
                        name.value
                    ),
                );
                false
            }
            _ => true,
        }
    };
    let candidate_ok = runnable(&r.candidate, "candidate", at);
    let baseline_ok = runnable(&r.baseline, "baseline", at);
    if candidate_ok && baseline_ok {
        if r.candidate.value == r.baseline.value {
            at(
                r.candidate.line,
                r.candidate.column,
                "rollout.candidate".into(),
                format!(
                    "the candidate is the baseline ('{}'): a rollout moves traffic from one to another",
                    r.candidate.value
                ),
            );
        } else if !decided_plans(policy).contains(&r.baseline.value) {
            at(
                r.baseline.line,
                r.baseline.column,
                "rollout.baseline".into(),
                format!(
                    "the default plan never decides a request to '{}' (it is neither the default nor a split member of it), so the candidate would never get traffic; rules' requests are left alone",
                    r.baseline.value
                ),
            );
        }
    }
    let steps = &r.steps;
    if steps.value.is_empty() {
        at(
            steps.line,
            steps.column,
            "rollout.steps".into(),
            "a rollout needs at least one step, like [10, 50, 100]".into(),
        );
    }
    for (i, step) in steps.value.iter().enumerate() {
        if !(*step > 0.0 && *step <= 100.0) {
            at(
                steps.line,
                steps.column,
                format!("rollout.steps[{i}]"),
                format!("a step is a percent above 0 and at most 100, got {step}"),
            );
        } else if i > 0 && *step <= steps.value[i - 1] {
            at(
                steps.line,
                steps.column,
                format!("rollout.steps[{i}]"),
                format!("steps must increase: {step} follows {}", steps.value[i - 1]),
            );
        }
    }
    if let Err(e) = rules::within("interval", r.interval.value.0, MAX_ROLLOUT_INTERVAL) {
        at(
            r.interval.line,
            r.interval.column,
            "rollout.interval".into(),
            e,
        );
    }
    let (line, column) = (rollout.line, rollout.column);
    if r.min_requests == 0 {
        at(
            line,
            column,
            "rollout.min_requests".into(),
            "min_requests must be at least 1".into(),
        );
    }
    if r.max_consecutive_errors == 0 {
        at(
            line,
            column,
            "rollout.max_consecutive_errors".into(),
            "max_consecutive_errors must be at least 1".into(),
        );
    }
    if let Some(sticky) = &r.sticky
        && let Err(e) = rules::sticky_header(&sticky.value)
    {
        at(sticky.line, sticky.column, "rollout.sticky".into(), e);
    }
    let gates = &r.gates;
    if let Some(g) = &gates.error_rate {
        let x = g.value.max_increase;
        if !(0.0..=1.0).contains(&x) {
            at(
                g.line,
                g.column,
                "rollout.gates.error_rate.max_increase".into(),
                format!("max_increase is a difference of rates, from 0 to 1, got {x}"),
            );
        }
    }
    if let Some(g) = &gates.latency_p99 {
        let x = g.value.max_ratio;
        if !(1.0..=100.0).contains(&x) {
            at(
                g.line,
                g.column,
                "rollout.gates.latency_p99.max_ratio".into(),
                format!("max_ratio is candidate p99 over baseline p99, from 1 to 100, got {x}"),
            );
        }
    }
    if let Some(g) = &gates.shadow_agreement {
        let x = g.value.min;
        if !(x > 0.0 && x <= 1.0) {
            at(
                g.line,
                g.column,
                "rollout.gates.shadow_agreement.min".into(),
                format!("min is a share of agreeing answers, above 0 and at most 1, got {x}"),
            );
        }
        let shadows_candidate = policy
            .shadow
            .as_ref()
            .is_some_and(|s| s.value.target.as_deref() == Some(r.candidate.value.as_str()));
        if !shadows_candidate {
            at(
                g.line,
                g.column,
                "rollout.gates.shadow_agreement".into(),
                format!(
                    "agreement is measured on shadow copies of the baseline's requests: add `shadow: {{ target: {} }}`",
                    r.candidate.value
                ),
            );
        }
    }
}

/// The names a request that no rule matches can be decided to: the default plan, through
/// named plans and split members. (A rule's plan is an explicit choice: a rollout leaves
/// it alone.)
fn decided_plans(policy: &PolicyFile) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut todo: Vec<PlanConfig> = vec![policy.default.value.clone()];
    while let Some(plan) = todo.pop() {
        match plan {
            PlanConfig::Target(name) => {
                if out.contains(&name) {
                    continue;
                }
                if let Some(named @ PlanConfig::Split(_)) =
                    policy.plans.get(&name).map(|p| &p.value)
                {
                    todo.push(named.clone());
                }
                out.push(name);
            }
            PlanConfig::Split(s) => {
                todo.extend(s.weights.keys().map(|k| PlanConfig::Target(k.clone())))
            }
            _ => {}
        }
        if out.len() > policy.targets.len() + policy.plans.len() {
            break;
        }
    }
    out
}

fn check_rule(path: &str, rule: &RuleConfig, at: &mut impl FnMut(u64, u64, String, String)) {
    let (line, column) = (rule.when.line, rule.when.column);
    for (name, cond) in &rule.when.value.headers {
        let hpath = format!("{path}.match.headers.{name}");
        if !rules::valid_header_name(name) {
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
                if let Err(e) = rules::header_regex(re) {
                    at(line, column, hpath, e);
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
    let here = |p: &At<PlanConfig>| {
        if p.line == 0 {
            (line, column)
        } else {
            (p.line, p.column)
        }
    };
    match &plan.value {
        PlanConfig::Target(t) => {
            if !targets.contains(&t.as_str()) {
                at(line, column, path.into(), unknown_target(t, targets));
            }
        }
        PlanConfig::Route(r) => {
            if !valid_route_name(r) {
                at(
                    line,
                    column,
                    format!("{path}.route"),
                    format!("'{r}' is not a route name"),
                );
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
                if let Err(e) = rules::weight(w.value) {
                    at(w.line, w.column, wpath, e);
                }
            }
            if let Some(sticky) = &split.sticky
                && let Err(e) = rules::sticky_header(&sticky.value)
            {
                at(
                    sticky.line,
                    sticky.column,
                    format!("{path}.split.sticky"),
                    e,
                );
            }
        }
        PlanConfig::Cascade(stages) => {
            if stages.len() < 2 {
                at(
                    line,
                    column,
                    format!("{path}.cascade"),
                    format!("a cascade needs at least two stages, got {}", stages.len()),
                );
            }
            let last = stages.len().saturating_sub(1);
            for (i, stage) in stages.iter().enumerate() {
                let spath = format!("{path}.cascade[{i}]");
                let (l, c) = here(&stage.plan);
                check_plan(&format!("{spath}.plan"), &stage.plan, targets, at);
                match (&stage.accept, i == last) {
                    (None, false) => at(
                        l,
                        c,
                        format!("{spath}.accept"),
                        "every stage but the last needs an accept test (max_probability or margin)"
                            .into(),
                    ),
                    (Some(a), true) => at(
                        a.line,
                        a.column,
                        format!("{spath}.accept"),
                        "the last stage always answers: remove its accept test".into(),
                    ),
                    (Some(a), false) => {
                        if let Err(e) = rules::accept(a.value.max_probability, a.value.margin) {
                            at(a.line, a.column, format!("{spath}.accept"), e);
                        }
                    }
                    (None, true) => {}
                }
            }
        }
        PlanConfig::Ensemble(e) => {
            if e.members.len() < 2 {
                at(
                    line,
                    column,
                    format!("{path}.ensemble.members"),
                    format!(
                        "an ensemble needs at least two members, got {}",
                        e.members.len()
                    ),
                );
            }
            for (i, m) in e.members.iter().enumerate() {
                check_plan(&format!("{path}.ensemble.members[{i}]"), m, targets, at);
            }
            match e.combine {
                Combine::WeightedMean => {
                    if e.weights.len() != e.members.len() {
                        at(
                            line,
                            column,
                            format!("{path}.ensemble.weights"),
                            format!(
                                "weighted_mean needs one weight per member: {} members, {} weights",
                                e.members.len(),
                                e.weights.len()
                            ),
                        );
                    } else if let Some(w) = e.weights.iter().find(|w| !(**w > 0.0 && w.is_finite()))
                    {
                        at(
                            line,
                            column,
                            format!("{path}.ensemble.weights"),
                            format!("weights must be above 0, got {w}"),
                        );
                    }
                }
                _ if !e.weights.is_empty() => at(
                    line,
                    column,
                    format!("{path}.ensemble.weights"),
                    "weights apply to combine: weighted_mean only".into(),
                ),
                _ => {}
            }
            if let Some(q) = e.quorum
                && (q == 0 || q > e.members.len())
            {
                at(
                    line,
                    column,
                    format!("{path}.ensemble.quorum"),
                    format!(
                        "quorum must be between 1 and the {} members, got {q}",
                        e.members.len()
                    ),
                );
            }
            if let Some(t) = e.member_timeout
                && let Err(e) = rules::within("member_timeout", t.0, rules::MAX_DEADLINE)
            {
                at(line, column, format!("{path}.ensemble.member_timeout"), e);
            }
        }
        PlanConfig::Pipeline(p) => check_pipeline(path, plan, p, targets, at),
        PlanConfig::Switch(sw) => check_switch(path, plan, sw, targets, at),
    }
}

fn check_pipeline(
    path: &str,
    plan: &At<PlanConfig>,
    p: &crate::policy::PipelineConfig,
    targets: &[&str],
    at: &mut impl FnMut(u64, u64, String, String),
) {
    let (line, column) = (plan.line, plan.column);
    let path = format!("{path}.pipeline");
    if p.steps.is_empty() {
        at(
            line,
            column,
            format!("{path}.steps"),
            "a pipeline needs at least one step".into(),
        );
    }
    let names: Vec<&str> = p
        .steps
        .iter()
        .map(|s| s.value.name.value.as_str())
        .collect();
    for (i, step) in p.steps.iter().enumerate() {
        let spath = format!("{path}.steps[{i}]");
        let s = &step.value;
        if let Err(e) = rules::step_name(&s.name.value) {
            at(s.name.line, s.name.column, format!("{spath}.name"), e);
        } else if names[..i].contains(&s.name.value.as_str()) {
            at(
                s.name.line,
                s.name.column,
                format!("{spath}.name"),
                format!(
                    "two steps are named '{}'; step names must be unique",
                    s.name.value
                ),
            );
        }
        check_plan(&format!("{spath}.plan"), &s.plan, targets, at);
        match &s.inputs {
            None if i > 0 => at(
                step.line,
                step.column,
                format!("{spath}.inputs"),
                format!(
                    "step '{}' needs inputs: only the first step may take the client's request as it is (write inputs: {{ NAME: STEP.TENSOR }})",
                    s.name.value
                ),
            ),
            None => {}
            Some(inputs) if inputs.is_empty() => at(
                step.line,
                step.column,
                format!("{spath}.inputs"),
                "inputs is empty: map each input the step's model takes".into(),
            ),
            Some(inputs) => {
                for (name, source) in inputs {
                    if let Err(e) = rules::mapping(&source.value, &names, Some(i)) {
                        at(
                            source.line,
                            source.column,
                            format!("{spath}.inputs.{name}"),
                            e,
                        );
                    }
                }
            }
        }
    }
    for (name, source) in &p.outputs {
        if let Err(e) = rules::mapping(&source.value, &names, None) {
            at(
                source.line,
                source.column,
                format!("{path}.outputs.{name}"),
                e,
            );
        }
    }
}

fn check_switch(
    path: &str,
    plan: &At<PlanConfig>,
    sw: &crate::policy::SwitchConfig,
    targets: &[&str],
    at: &mut impl FnMut(u64, u64, String, String),
) {
    let path = format!("{path}.switch");
    let on = &sw.on.value.plan;
    if !targets.contains(&on.value.as_str()) {
        at(
            on.line,
            on.column,
            format!("{path}.on.plan"),
            unknown_target(&on.value, targets),
        );
    }
    if sw.cases.is_empty() {
        at(
            plan.line,
            plan.column,
            format!("{path}.cases"),
            "a switch needs at least one case".into(),
        );
    }
    for (i, case) in sw.cases.iter().enumerate() {
        let cpath = format!("{path}.cases[{i}]");
        let when = &case.value.when;
        let w = &when.value;
        let mut problem = |field: &str, e: String| {
            let path = if field.is_empty() {
                format!("{cpath}.when")
            } else {
                format!("{cpath}.when.{field}")
            };
            at(when.line, when.column, path, e)
        };
        if w.argmax.is_none() && w.max_probability_below.is_none() && w.margin_below.is_none() {
            problem(
                "",
                "a case needs a condition: argmax, max_probability_below or margin_below".into(),
            );
        }
        if let Some(classes) = &w.argmax
            && let Err(e) = rules::argmax_classes(classes)
        {
            problem("argmax", e);
        }
        if let Some(x) = w.max_probability_below
            && let Err(e) = rules::below("max_probability_below", x)
        {
            problem("max_probability_below", e);
        }
        if let Some(x) = w.margin_below
            && let Err(e) = rules::below("margin_below", x)
        {
            problem("margin_below", e);
        }
        check_plan(&format!("{cpath}.plan"), &case.value.plan, targets, at);
    }
    if let Some(d) = &sw.default {
        check_plan(&format!("{path}.default"), d, targets, at);
    }
}

/// Names a plan refers to (targets or named plans), in order.
pub(crate) fn plan_refs(plan: &PlanConfig, out: &mut Vec<String>) {
    match plan {
        PlanConfig::Target(t) => out.push(t.clone()),
        PlanConfig::Split(s) => out.extend(s.weights.keys().cloned()),
        PlanConfig::Cascade(stages) => stages.iter().for_each(|s| plan_refs(&s.plan.value, out)),
        PlanConfig::Ensemble(e) => e.members.iter().for_each(|m| plan_refs(&m.value, out)),
        PlanConfig::Route(_) => {}
        PlanConfig::Pipeline(p) => p
            .steps
            .iter()
            .for_each(|s| plan_refs(&s.value.plan.value, out)),
        PlanConfig::Switch(sw) => {
            out.push(sw.on.value.plan.value.clone());
            sw.cases
                .iter()
                .for_each(|c| plan_refs(&c.value.plan.value, out));
            if let Some(d) = &sw.default {
                plan_refs(&d.value, out);
            }
        }
    }
}

/// Routes a plan delegates to (`{ route: .. }`), with positions.
pub(crate) fn route_refs(plan: &At<PlanConfig>, out: &mut Vec<(String, u64, u64)>) {
    match &plan.value {
        PlanConfig::Route(r) => out.push((r.clone(), plan.line, plan.column)),
        PlanConfig::Cascade(stages) => stages.iter().for_each(|s| route_refs(&s.plan, out)),
        PlanConfig::Ensemble(e) => e.members.iter().for_each(|m| route_refs(m, out)),
        PlanConfig::Pipeline(p) => p.steps.iter().for_each(|s| route_refs(&s.value.plan, out)),
        PlanConfig::Switch(sw) => {
            sw.cases.iter().for_each(|c| route_refs(&c.value.plan, out));
            if let Some(d) = &sw.default {
                route_refs(d, out);
            }
        }
        PlanConfig::Target(_) | PlanConfig::Split(_) => {}
    }
}

/// Every plan of a policy file: named plans, rules, the default, the shadow.
pub(crate) fn all_plans(policy: &PolicyFile) -> Vec<At<PlanConfig>> {
    let mut plans: Vec<At<PlanConfig>> = policy.plans.values().cloned().collect();
    plans.extend(policy.rules.iter().map(|r| r.plan.clone()));
    plans.push(policy.default.clone());
    if let Some(sh) = &policy.shadow
        && let Some(p) = &sh.value.plan
    {
        plans.push(At {
            value: p.clone(),
            line: sh.line,
            column: sh.column,
        });
    }
    plans
}

/// A target's `overflow` names another target or plan, and overflows never lead back
/// to where they started (a full pool would send a request round in a circle).
fn check_overflow(
    policy: &PolicyFile,
    names: &[&str],
    at: &mut impl FnMut(u64, u64, String, String),
) {
    for (name, target) in &policy.targets {
        let Some(o) = &target.value.overflow else {
            continue;
        };
        let path = format!("targets.{name}.overflow");
        if !names.contains(&o.value.as_str()) {
            at(o.line, o.column, path, unknown_target(&o.value, names));
        } else if o.value == *name {
            at(
                o.line,
                o.column,
                path,
                format!("target '{name}' cannot overflow to itself"),
            );
        }
    }
    // Targets lead to their overflow, plans to what they name: a cycle with a target in
    // it goes through an overflow (cycles of plans alone are reported as such).
    let edges = |node: &str| -> Vec<String> {
        if let Some(t) = policy.targets.get(node) {
            return t.value.overflow.iter().map(|o| o.value.clone()).collect();
        }
        let mut refs = Vec::new();
        if let Some(p) = policy.plans.get(node) {
            plan_refs(&p.value, &mut refs);
        }
        refs
    };
    let overflowing: Vec<String> = policy
        .targets
        .iter()
        .filter(|(_, t)| t.value.overflow.is_some())
        .map(|(n, _)| n.clone())
        .collect();
    for cycle in find_cycles(&overflowing, &edges) {
        let Some(start) = cycle.iter().find(|n| policy.targets.contains_key(*n)) else {
            continue;
        };
        let Some(o) = &policy.targets[start].value.overflow else {
            continue;
        };
        if cycle.len() <= 2 {
            continue; // a target overflowing to itself, reported above
        }
        at(
            o.line,
            o.column,
            format!("targets.{start}.overflow"),
            format!(
                "overflows lead back to where they start: {}",
                cycle.join(" -> ")
            ),
        );
    }
}

/// The most priority classes a route may define.
pub const MAX_PRIORITY_CLASSES: usize = 8;

fn check_priority(p: &At<PriorityConfig>, at: &mut impl FnMut(u64, u64, String, String)) {
    let (line, column) = (p.line, p.column);
    let c = &p.value;
    if !rules::valid_header_name(&c.header) {
        at(
            line,
            column,
            "priority.header".into(),
            format!("'{}' is not an HTTP header name", c.header),
        );
    }
    if c.classes.is_empty() || c.classes.len() > MAX_PRIORITY_CLASSES {
        at(
            line,
            column,
            "priority.classes".into(),
            format!(
                "give 1 to {MAX_PRIORITY_CLASSES} classes, lowest first; got {}",
                c.classes.len()
            ),
        );
    }
    let mut seen = HashSet::new();
    for (i, class) in c.classes.iter().enumerate() {
        if class.is_empty() || !class.bytes().all(|b| b.is_ascii_graphic()) {
            at(
                line,
                column,
                format!("priority.classes[{i}]"),
                format!("'{class}' is not a header value: use visible ASCII characters, no spaces"),
            );
        } else if !seen.insert(class) {
            at(
                line,
                column,
                format!("priority.classes[{i}]"),
                format!("class '{class}' is listed twice"),
            );
        }
    }
    if let Some(d) = &c.default
        && !c.classes.contains(d)
    {
        at(
            line,
            column,
            "priority.default".into(),
            format!("'{d}' is not one of the classes: {}", c.classes.join(", ")),
        );
    }
}

/// Named plans that refer to each other in a circle.
fn check_plan_cycles(policy: &PolicyFile, at: &mut impl FnMut(u64, u64, String, String)) {
    let edges = |name: &str| -> Vec<String> {
        let mut refs = Vec::new();
        if let Some(p) = policy.plans.get(name) {
            plan_refs(&p.value, &mut refs);
        }
        refs.retain(|r| policy.plans.contains_key(r));
        refs
    };
    let names: Vec<String> = policy.plans.keys().cloned().collect();
    for cycle in find_cycles(&names, &edges) {
        let start = &cycle[0];
        let plan = &policy.plans[start];
        at(
            plan.line,
            plan.column,
            format!("plans.{start}"),
            format!(
                "plans refer to each other in a cycle: {}",
                cycle.join(" -> ")
            ),
        );
    }
}

/// The cycles a depth-first search over `nodes` meets through `edges`, each as the path
/// from a node back to itself (`a -> b -> a`). Every node is entered once, so the search
/// is linear in the graph, and it keeps its own stack: a long chain of plans cannot
/// overflow the thread's.
pub(crate) fn find_cycles(
    nodes: &[String],
    edges: &dyn Fn(&str) -> Vec<String>,
) -> Vec<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    let mut marks: HashMap<String, Mark> = HashMap::new();
    let mut cycles = Vec::new();
    for root in nodes {
        if marks.contains_key(root) {
            continue;
        }
        // The path from `root`, each node with the successors it has yet to visit.
        let mut stack: Vec<(String, std::vec::IntoIter<String>)> =
            vec![(root.clone(), edges(root).into_iter())];
        marks.insert(root.clone(), Mark::Open);
        while let Some((_, next)) = stack.last_mut() {
            let Some(next) = next.next() else {
                let (done, _) = stack.pop().unwrap_or_default();
                marks.insert(done, Mark::Done);
                continue;
            };
            match marks.get(&next) {
                Some(Mark::Done) => {}
                Some(Mark::Open) => {
                    let at = stack.iter().position(|(n, _)| *n == next).unwrap_or(0);
                    let mut cycle: Vec<String> =
                        stack[at..].iter().map(|(n, _)| n.clone()).collect();
                    cycle.push(next);
                    cycles.push(cycle);
                }
                None => {
                    marks.insert(next.clone(), Mark::Open);
                    let successors = edges(&next).into_iter();
                    stack.push((next, successors));
                }
            }
        }
    }
    cycles
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
            rules::valid_header_name("x-user-id")
                && !rules::valid_header_name("x user")
                && !rules::valid_header_name("")
        );
    }
}
