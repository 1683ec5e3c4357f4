//! Compiling validated policy files into routes: targets, the plan arena (targets, then
//! named plans, then inline ones), rules, shadow, and each plan's key (a hash of what it
//! means). The checks are `switchyard_config::rules`, the same functions validation runs,
//! and a policy that still does not fit is a typed [`InvalidRoute`], never a default.

use std::collections::HashMap;
use std::sync::Arc;

use http::HeaderName;
use switchyard_config::At;
use switchyard_config::policy::{HeaderMatchConfig, PipelineConfig, PlanConfig, SwitchConfig};
use switchyard_config::{GatewayConfig, LoadedPolicy, PolicySet, rules};
use xxhash_rust::xxh3::Xxh3;

use super::rollout::{Gates, RolloutSpec};
use super::{
    Accept, CacheSpec, Case, Ensemble, HeaderMatcher, Mapping, Pipeline, Plan, PlanId, Priority,
    RetryPolicy, Route, RoutingTable, Rule, Shadow, Source, Split, Stage, Step, Switch, Target,
    TargetId, When,
};

/// Loads and compiles policies as a reload would, for `switchyard check` and `explain`.
pub fn load(
    policies: &std::path::Path,
    gateway: &GatewayConfig,
) -> Result<RoutingTable, switchyard_config::Diagnostics> {
    let set = switchyard_config::load_policies(policies, gateway)?;
    compile(&set, gateway).map_err(|e| e.diagnostics())
}

/// What a validated policy still cannot become: validation reports these first, with
/// line and column; the compiler refuses rather than substitute a default.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    /// A plan reference names nothing.
    #[error("'{0}' names no target or plan of the route")]
    UnknownName(String),
    /// A value the shared rules refuse (`switchyard_config::rules`).
    #[error("{field}: {reason}")]
    Invalid {
        /// The field path within the policy file.
        field: String,
        /// What is wrong.
        reason: String,
    },
}

/// A route that did not compile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: route '{route}': {error}")]
pub struct InvalidRoute {
    /// The policy file.
    pub file: String,
    /// The route it defines.
    pub route: String,
    /// What did not compile.
    pub error: CompileError,
}

impl InvalidRoute {
    /// As the diagnostics a reload and `switchyard check` report.
    pub fn diagnostics(&self) -> switchyard_config::Diagnostics {
        switchyard_config::Diagnostics(vec![switchyard_config::Diagnostic::file(
            std::path::Path::new(&self.file),
            format!("route '{}': {}", self.route, self.error),
        )])
    }
}

fn invalid(field: impl Into<String>) -> impl FnOnce(String) -> CompileError {
    let field = field.into();
    move |reason| CompileError::Invalid { field, reason }
}

/// Builds a route's plan arena: targets first, then named plans, then inline plans.
struct Arena<'a> {
    plans: Vec<Plan>,
    names: HashMap<&'a str, PlanId>,
}

impl<'a> Arena<'a> {
    fn push(&mut self, plan: Plan) -> PlanId {
        self.plans.push(plan);
        PlanId((self.plans.len() - 1) as u16)
    }

    fn named(&self, name: &str) -> Result<PlanId, CompileError> {
        self.names
            .get(name)
            .copied()
            .ok_or_else(|| CompileError::UnknownName(name.to_owned()))
    }

    fn compile(&mut self, cfg: &PlanConfig) -> Result<PlanId, CompileError> {
        let plan = match cfg {
            PlanConfig::Target(name) => return self.named(name),
            PlanConfig::Split(s) => {
                let mut members = Vec::with_capacity(s.weights.len());
                for (name, w) in &s.weights {
                    let weight =
                        rules::weight(w.value).map_err(invalid(format!("split.weights.{name}")))?;
                    members.push((self.named(name)?, weight));
                }
                let sticky = match &s.sticky {
                    None => None,
                    Some(st) => {
                        let h = rules::sticky_header(&st.value).map_err(invalid("split.sticky"))?;
                        Some(
                            HeaderName::from_bytes(h.as_bytes())
                                .map_err(|e| invalid("split.sticky")(e.to_string()))?,
                        )
                    }
                };
                Plan::Split(Split::new(members, sticky, &s.salt))
            }
            PlanConfig::Cascade(stages) => {
                let last = stages.len().saturating_sub(1);
                let mut compiled = Vec::with_capacity(stages.len());
                for (i, st) in stages.iter().enumerate() {
                    let accept = match (&st.accept, i == last) {
                        (Some(a), false) => Some(
                            rules::accept(a.value.max_probability, a.value.margin)
                                .map_err(invalid(format!("cascade[{i}].accept")))?,
                        ),
                        (None, true) => None,
                        (None, false) => {
                            return Err(invalid(format!("cascade[{i}].accept"))(
                                "every stage but the last needs an accept test".into(),
                            ));
                        }
                        (Some(_), true) => {
                            return Err(invalid(format!("cascade[{i}].accept"))(
                                "the last stage always answers".into(),
                            ));
                        }
                    };
                    compiled.push(Stage {
                        plan: self.compile(&st.plan.value)?,
                        accept,
                        output: st
                            .accept
                            .as_ref()
                            .and_then(|a| a.value.output.as_deref().map(Into::into)),
                    });
                }
                if compiled.is_empty() {
                    return Err(invalid("cascade")("a cascade needs stages".into()));
                }
                Plan::Cascade(compiled.into())
            }
            PlanConfig::Ensemble(e) => {
                let mut members = Vec::with_capacity(e.members.len());
                for (i, m) in e.members.iter().enumerate() {
                    members.push((
                        self.compile(&m.value)?,
                        e.weights.get(i).copied().unwrap_or(1.0),
                    ));
                }
                let quorum = e.quorum.unwrap_or(members.len());
                if quorum == 0 || quorum > members.len() {
                    return Err(invalid("ensemble.quorum")(format!(
                        "must be between 1 and the {} members",
                        members.len()
                    )));
                }
                Plan::Ensemble(Ensemble {
                    members: members.into(),
                    combine: e.combine,
                    quorum,
                    member_timeout: e
                        .member_timeout
                        .map(|t| rules::within("member_timeout", t.0, rules::MAX_DEADLINE))
                        .transpose()
                        .map_err(invalid("ensemble.member_timeout"))?,
                })
            }
            PlanConfig::Route(r) => Plan::Route(r.as_str().into()),
            PlanConfig::Pipeline(p) => self.pipeline(p)?,
            PlanConfig::Switch(sw) => self.switch(sw)?,
        };
        Ok(self.push(plan))
    }

    fn pipeline(&mut self, p: &PipelineConfig) -> Result<Plan, CompileError> {
        if p.steps.is_empty() {
            return Err(invalid("pipeline.steps")(
                "a pipeline needs at least one step".into(),
            ));
        }
        let names: Vec<&str> = p
            .steps
            .iter()
            .map(|s| s.value.name.value.as_str())
            .collect();
        let mapping = |name: &str, source: &At<String>, reader: Option<usize>, field: String| {
            let (from, tensor) =
                rules::mapping(&source.value, &names, reader).map_err(invalid(field))?;
            Ok::<_, CompileError>(Mapping {
                name: name.into(),
                from,
                tensor: tensor.into(),
                line: source.line,
                column: source.column,
            })
        };
        let mut steps = Vec::with_capacity(p.steps.len());
        for (i, st) in p.steps.iter().enumerate() {
            let s = &st.value;
            rules::step_name(&s.name.value)
                .map_err(invalid(format!("pipeline.steps[{i}].name")))?;
            if names[..i].contains(&s.name.value.as_str()) {
                return Err(invalid(format!("pipeline.steps[{i}].name"))(format!(
                    "two steps are named '{}'",
                    s.name.value
                )));
            }
            let inputs = match &s.inputs {
                None if i > 0 => {
                    return Err(invalid(format!("pipeline.steps[{i}].inputs"))(
                        "only the first step may take the client's request as it is".into(),
                    ));
                }
                None => None,
                Some(m) if m.is_empty() => {
                    return Err(invalid(format!("pipeline.steps[{i}].inputs"))(
                        "inputs is empty".into(),
                    ));
                }
                Some(m) => Some(
                    m.iter()
                        .map(|(name, src)| {
                            mapping(
                                name,
                                src,
                                Some(i),
                                format!("pipeline.steps[{i}].inputs.{name}"),
                            )
                        })
                        .collect::<Result<Box<[_]>, _>>()?,
                ),
            };
            steps.push(Step {
                name: s.name.value.as_str().into(),
                plan: self.compile(&s.plan.value)?,
                inputs,
                line: st.line,
            });
        }
        let outputs = p
            .outputs
            .iter()
            .map(|(name, src)| mapping(name, src, None, format!("pipeline.outputs.{name}")))
            .collect::<Result<Box<[_]>, _>>()?;
        Ok(Plan::Pipeline(Pipeline {
            steps: steps.into(),
            outputs,
        }))
    }

    fn switch(&mut self, sw: &SwitchConfig) -> Result<Plan, CompileError> {
        let on = self.named(&sw.on.value.plan.value)?;
        if sw.cases.is_empty() {
            return Err(invalid("switch.cases")(
                "a switch needs at least one case".into(),
            ));
        }
        let mut cases = Vec::with_capacity(sw.cases.len());
        for (i, c) in sw.cases.iter().enumerate() {
            let w = &c.value.when.value;
            let field = |f: &str| format!("switch.cases[{i}].when.{f}");
            let when = When {
                argmax: w
                    .argmax
                    .as_deref()
                    .map(rules::argmax_classes)
                    .transpose()
                    .map_err(invalid(field("argmax")))?,
                max_probability_below: w
                    .max_probability_below
                    .map(|x| rules::below("max_probability_below", x))
                    .transpose()
                    .map_err(invalid(field("max_probability_below")))?,
                margin_below: w
                    .margin_below
                    .map(|x| rules::below("margin_below", x))
                    .transpose()
                    .map_err(invalid(field("margin_below")))?,
            };
            if when == When::default() {
                return Err(invalid(field(""))("a case needs a condition".into()));
            }
            cases.push(Case {
                when,
                plan: self.compile(&c.value.plan.value)?,
            });
        }
        let default = match &sw.default {
            Some(d) => self.compile(&d.value)?,
            None => on,
        };
        Ok(Plan::Switch(Switch {
            on,
            output: sw.on.value.output.as_deref().map(Into::into),
            cases: cases.into(),
            default,
            line: sw.on.value.plan.line,
            column: sw.on.value.plan.column,
        }))
    }
}

/// Compiles a validated policy set into routes. Validation reports every problem first,
/// with file and line; what it lets through compiles, and anything else is an
/// [`InvalidRoute`], never a silent default.
pub fn compile(
    policies: &PolicySet,
    gateway: &GatewayConfig,
) -> Result<RoutingTable, InvalidRoute> {
    let mut routes: HashMap<Box<str>, Route> = HashMap::new();
    for loaded in &policies.files {
        let p = &loaded.policy;
        let route = compile_route(loaded, gateway).map_err(|error| InvalidRoute {
            file: loaded.file.display().to_string(),
            route: p.route.value.clone(),
            error,
        })?;
        routes.insert(p.route.value.as_str().into(), route);
    }
    // What a plan means can depend on another route (a `{ route: }` reference): key the
    // plans once every route is compiled.
    let keys: HashMap<Box<str>, Box<[u64]>> = routes
        .iter()
        .map(|(name, route)| (name.clone(), plan_keys(route, &routes)))
        .collect();
    let routes = routes
        .into_iter()
        .map(|(name, mut route)| {
            route.plan_keys = keys[&name].clone();
            route.fingerprint = {
                let mut h = Xxh3::new();
                route
                    .plan_keys
                    .iter()
                    .for_each(|k| h.update(&k.to_le_bytes()));
                h.digest()
            };
            if let Some(r) = route.rollout.as_mut() {
                r.generation = rollout_generation(r, &route.plan_keys);
            }
            (name, Arc::new(route))
        })
        .collect();
    Ok(RoutingTable { routes })
}

/// What makes a rollout generation: every setting of the section and what its candidate
/// and baseline mean (a comment or an unrelated edit changes nothing).
fn rollout_generation(r: &RolloutSpec, keys: &[u64]) -> u64 {
    let mut h = Xxh3::new();
    for k in [keys[r.candidate.0 as usize], keys[r.baseline.0 as usize]] {
        h.update(&k.to_le_bytes());
    }
    for s in r.steps.iter() {
        h.update(&s.to_bits().to_le_bytes());
    }
    h.update(&r.interval.as_nanos().to_le_bytes());
    h.update(&r.min_requests.to_le_bytes());
    for g in [
        r.gates.error_rate,
        r.gates.latency_p99,
        r.gates.shadow_agreement,
    ] {
        h.update(&g.map_or(u64::MAX, f64::to_bits).to_le_bytes());
    }
    h.update(&[r.on_failure as u8]);
    h.update(&r.max_consecutive_errors.to_le_bytes());
    h.update(
        r.sticky
            .as_ref()
            .map_or(&b""[..], |n| n.as_str().as_bytes()),
    );
    h.update(&r.salt);
    h.digest()
}

/// Compiles one policy file's route (its plan keys and fingerprint come later, once every
/// route is known).
fn compile_route(loaded: &LoadedPolicy, gateway: &GatewayConfig) -> Result<Route, CompileError> {
    let p = &loaded.policy;
    let model_version = |t: &switchyard_config::policy::TargetConfig| match t.version {
        Some(v) => format!("{}/{v}", t.model),
        None => t.model.clone(),
    };
    // Two targets that serve the same model version from different pools would share a
    // label, in their metrics and their `x-switchyard-target`: those are told apart by
    // their pool (`pool:model/version`). Labels of every other target stay as they are.
    let shared_label = |t: &switchyard_config::policy::TargetConfig| {
        p.targets
            .values()
            .any(|o| o.value.backend != t.backend && model_version(&o.value) == model_version(t))
    };
    let targets: Box<[Target]> = p
        .targets
        .iter()
        .map(|(name, t)| {
            let t = &t.value;
            let version: Arc<str> = t.version.map(|v| v.to_string()).unwrap_or_default().into();
            let label = if shared_label(t) {
                format!("{}:{}", t.backend, model_version(t))
            } else {
                model_version(t)
            };
            Target {
                name: name.as_str().into(),
                backend: t.backend.as_str().into(),
                model: t.model.as_str().into(),
                version,
                release: t.release.as_deref().map(Into::into),
                label: label.into(),
                overflow: None,
            }
        })
        .collect();
    let mut arena = Arena {
        plans: Vec::new(),
        names: HashMap::new(),
    };
    for (i, name) in p.targets.keys().enumerate() {
        arena.push(Plan::Target(TargetId(i as u16)));
        arena.names.insert(name.as_str(), PlanId(i as u16));
    }
    // Named plans get their ids first (they may refer to each other), then bodies.
    let mut named_plans: HashMap<u16, Arc<str>> = HashMap::new();
    let reserved: Vec<(PlanId, &PlanConfig)> = p
        .plans
        .iter()
        .map(|(name, plan)| {
            let id = arena.push(Plan::Route("".into()));
            arena.names.insert(name.as_str(), id);
            named_plans.insert(id.0, Arc::<str>::from(name.as_str()));
            (id, &plan.value)
        })
        .collect();
    for (id, cfg) in reserved {
        // A named plan that is only a name is an alias: copy what it names.
        let compiled = arena.compile(cfg)?;
        arena.plans[id.0 as usize] = arena.plans[compiled.0 as usize].clone();
    }
    let mut rules = Vec::with_capacity(p.rules.len());
    for (i, r) in p.rules.iter().enumerate() {
        let mut matchers = Vec::with_capacity(r.when.value.headers.len());
        for (name, cond) in &r.when.value.headers {
            matchers.push(
                matcher(name, cond).map_err(invalid(format!("rules[{i}].match.headers.{name}")))?,
            );
        }
        rules.push(Rule {
            matchers: matchers.into(),
            plan: arena.compile(&r.plan.value)?,
        });
    }
    let default = arena.compile(&p.default.value)?;
    let shadow = match &p.shadow {
        None => None,
        Some(sh) => {
            let sh = &sh.value;
            let (plan, name) = match (&sh.target, &sh.plan) {
                (Some(t), None) => (arena.named(t)?, Arc::<str>::from(t.as_str())),
                (None, Some(plan)) => (arena.compile(plan)?, Arc::<str>::from("plan")),
                _ => {
                    return Err(invalid("shadow")(
                        "give exactly one of target or plan".into(),
                    ));
                }
            };
            Some(Shadow {
                plan,
                name,
                threshold: rules::percent_threshold(sh.percent)
                    .map_err(invalid("shadow.percent"))?,
                max_in_flight: sh.max_in_flight,
            })
        }
    };
    let rollout = match &p.rollout {
        None => None,
        Some(r) => Some(compile_rollout(&r.value, &p.route.value, &mut arena)?),
    };
    let mut targets = targets;
    for (i, t) in p.targets.values().enumerate() {
        if let Some(o) = &t.value.overflow {
            targets[i].overflow = Some(arena.named(&o.value)?);
        }
    }
    let priority = p
        .priority
        .as_ref()
        .map(|c| compile_priority(&c.value))
        .transpose()?;
    let plan_names = plan_names(&targets, &arena.plans, &named_plans);
    let route = Route {
        name: p.route.value.as_str().into(),
        file: loaded.file.display().to_string().into(),
        fallback: p
            .fallback
            .iter()
            .map(|f| {
                p.targets
                    .get_index_of(&f.value)
                    .map(|i| TargetId(i as u16))
                    .ok_or_else(|| CompileError::UnknownName(f.value.clone()))
            })
            .collect::<Result<_, _>>()?,
        targets,
        plans: arena.plans.into(),
        plan_names,
        plan_keys: Box::new([]),
        rules: rules.into(),
        default,
        deadline: rules::within(
            "deadline",
            p.deadline
                .as_ref()
                .map_or(gateway.limits.default_deadline.0, |d| d.value.0),
            rules::MAX_DEADLINE,
        )
        .map_err(invalid("deadline"))?,
        retry: p.retry.as_ref().map_or(
            RetryPolicy {
                attempts: 0,
                idempotent: false,
            },
            |r| RetryPolicy {
                attempts: r.value.attempts,
                idempotent: r.value.idempotent,
            },
        ),
        version_pinning: p.version_pinning,
        shadow,
        cache: p
            .cache
            .as_ref()
            .map(|c| {
                Ok::<_, CompileError>(CacheSpec {
                    ttl: rules::within("ttl", c.value.ttl.0, rules::MAX_CACHE_TTL)
                        .map_err(invalid("cache.ttl"))?,
                    max_bytes: c.value.max_bytes.0,
                })
            })
            .transpose()?,
        fingerprint: 0,
        rollout,
        priority,
    };
    Ok(route)
}

fn compile_priority(
    c: &switchyard_config::policy::PriorityConfig,
) -> Result<Priority, CompileError> {
    let header = HeaderName::from_bytes(c.header.as_bytes())
        .map_err(|e| invalid("priority.header")(e.to_string()))?;
    if c.classes.is_empty() || c.classes.len() > switchyard_config::validate::MAX_PRIORITY_CLASSES {
        return Err(invalid("priority.classes")(
            "give 1 to 8 classes, lowest first".into(),
        ));
    }
    let default = match &c.default {
        None => 0,
        Some(d) => c
            .classes
            .iter()
            .position(|x| x == d)
            .ok_or_else(|| invalid("priority.default")(format!("'{d}' is not a class")))?
            as u8,
    };
    Ok(Priority {
        header,
        classes: c.classes.iter().map(|c| Arc::from(c.as_str())).collect(),
        default,
    })
}

/// Compiles a rollout section; its generation is set once the plans are keyed.
fn compile_rollout(
    r: &switchyard_config::policy::RolloutConfig,
    route: &str,
    arena: &mut Arena<'_>,
) -> Result<RolloutSpec, CompileError> {
    let runnable = |id: PlanId, field: &str, arena: &Arena<'_>| match arena.plans[id.0 as usize] {
        Plan::Split(_) | Plan::Route(_) => Err(invalid(format!("rollout.{field}"))(
            "a rollout's candidate and baseline are targets, cascades or ensembles".into(),
        )),
        _ => Ok(id),
    };
    let candidate = runnable(arena.named(&r.candidate.value)?, "candidate", arena)?;
    let baseline = runnable(arena.named(&r.baseline.value)?, "baseline", arena)?;
    if r.candidate.value == r.baseline.value {
        return Err(invalid("rollout.candidate")(
            "the candidate is the baseline".into(),
        ));
    }
    let mut thresholds = Vec::with_capacity(r.steps.value.len());
    for (i, step) in r.steps.value.iter().enumerate() {
        let t = rules::percent_threshold(*step).map_err(invalid(format!("rollout.steps[{i}]")))?;
        // Steps closer than 2^-32 may share a threshold: harmless; the order is validation's.
        if i > 0 && r.steps.value[i - 1] >= *step {
            return Err(invalid(format!("rollout.steps[{i}]"))(
                "steps must increase".into(),
            ));
        }
        thresholds.push(if *step >= 100.0 {
            super::rollout::ALL
        } else {
            t
        });
    }
    if thresholds.is_empty() {
        return Err(invalid("rollout.steps")(
            "a rollout needs at least one step".into(),
        ));
    }
    let sticky = match &r.sticky {
        Some(st) => Some(sticky_name(&st.value, "rollout.sticky")?),
        // The route's first sticky split: the rollout moves the same clients together.
        None => arena.plans.iter().find_map(|p| match p {
            Plan::Split(s) => s.sticky.clone(),
            _ => None,
        }),
    };
    Ok(RolloutSpec {
        candidate,
        baseline,
        candidate_name: r.candidate.value.as_str().into(),
        baseline_name: r.baseline.value.as_str().into(),
        steps: r.steps.value.clone().into(),
        thresholds: thresholds.into(),
        interval: rules::within(
            "interval",
            r.interval.value.0,
            std::time::Duration::from_secs(7 * 24 * 3600),
        )
        .map_err(invalid("rollout.interval"))?,
        min_requests: r.min_requests.max(1),
        gates: Gates {
            error_rate: r.gates.error_rate.as_ref().map(|g| g.value.max_increase),
            latency_p99: r.gates.latency_p99.as_ref().map(|g| g.value.max_ratio),
            shadow_agreement: r.gates.shadow_agreement.as_ref().map(|g| g.value.min),
        },
        on_failure: r.on_failure,
        max_consecutive_errors: r.max_consecutive_errors.max(1),
        sticky,
        salt: format!("rollout:{route}").into_bytes().into(),
        generation: 0,
    })
}

fn sticky_name(key: &str, field: &str) -> Result<HeaderName, CompileError> {
    let h = rules::sticky_header(key).map_err(invalid(field.to_owned()))?;
    HeaderName::from_bytes(h.as_bytes()).map_err(|e| invalid(field.to_owned())(e.to_string()))
}

/// Names every plan: targets and named plans by their names, unnamed plans by their kind,
/// numbered in plan order when a route has more than one of that kind (so that two inline
/// cascades never share metrics).
fn plan_names(
    targets: &[Target],
    plans: &[Plan],
    named: &HashMap<u16, Arc<str>>,
) -> Box<[Arc<str>]> {
    let kind = |plan: &Plan| match plan {
        Plan::Target(_) => "target",
        Plan::Split(_) => "split",
        Plan::Cascade(_) => "cascade",
        Plan::Ensemble(_) => "ensemble",
        Plan::Route(_) => "route",
        Plan::Pipeline(_) => "pipeline",
        Plan::Switch(_) => "switch",
    };
    let unnamed =
        |i: usize| !named.contains_key(&(i as u16)) && !matches!(plans[i], Plan::Target(_));
    let mut seen: HashMap<&str, usize> = HashMap::new();
    (0..plans.len())
        .map(|i| {
            if let Some(n) = named.get(&(i as u16)) {
                return n.clone();
            }
            match &plans[i] {
                Plan::Target(t) => targets[t.0 as usize].name.clone(),
                Plan::Route(r) => format!("route:{r}").into(),
                plan => {
                    let k = kind(plan);
                    let of_kind = (0..plans.len())
                        .filter(|&j| unnamed(j) && kind(&plans[j]) == k)
                        .count();
                    let n = seen.entry(k).or_insert(0);
                    *n += 1;
                    if of_kind > 1 {
                        format!("{k}-{n}").into()
                    } else {
                        k.into()
                    }
                }
            }
        })
        .collect()
}

/// The key of every plan of `route`: a hash of what it runs, recursively, with route
/// references resolved through `routes` (validation rejects cycles; depth is bounded).
fn plan_keys(route: &Route, routes: &HashMap<Box<str>, Route>) -> Box<[u64]> {
    (0..route.plans.len())
        .map(|i| {
            let mut h = Xxh3::new();
            hash_plan(route, PlanId(i as u16), routes, &mut h, 0);
            h.digest()
        })
        .collect()
}

fn hash_plan(
    route: &Route,
    plan: PlanId,
    routes: &HashMap<Box<str>, Route>,
    h: &mut Xxh3,
    depth: usize,
) {
    let put = |h: &mut Xxh3, bytes: &[u8]| {
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    if depth > 64 {
        put(h, b"too deep");
        return;
    }
    match route.plan(plan) {
        Plan::Target(t) => {
            let t = route.target(*t);
            put(h, b"target");
            put(h, t.backend.as_bytes());
            put(h, t.model.as_bytes());
            put(h, t.version.as_bytes());
        }
        Plan::Split(s) => {
            put(h, b"split");
            put(
                h,
                s.sticky
                    .as_ref()
                    .map_or(&b""[..], |n| n.as_str().as_bytes()),
            );
            put(h, s.salt());
            for (m, w) in s.members() {
                hash_plan(route, *m, routes, h, depth + 1);
                put(h, &w.to_le_bytes());
            }
        }
        Plan::Cascade(stages) => {
            put(h, b"cascade");
            for st in stages {
                hash_plan(route, st.plan, routes, h, depth + 1);
                match st.accept {
                    Some(Accept::MaxProbability(x)) => {
                        put(h, &[&b"p"[..], &x.to_le_bytes()].concat())
                    }
                    Some(Accept::Margin(x)) => put(h, &[&b"m"[..], &x.to_le_bytes()].concat()),
                    None => put(h, b"-"),
                }
                put(h, st.output.as_deref().unwrap_or("").as_bytes());
            }
        }
        Plan::Ensemble(e) => {
            put(h, b"ensemble");
            put(h, format!("{:?}", e.combine).as_bytes());
            put(h, &(e.quorum as u64).to_le_bytes());
            put(
                h,
                &e.member_timeout.map_or(0, |t| t.as_nanos()).to_le_bytes(),
            );
            for (m, w) in e.members.iter() {
                hash_plan(route, *m, routes, h, depth + 1);
                put(h, &w.to_le_bytes());
            }
        }
        Plan::Pipeline(p) => {
            put(h, b"pipeline");
            let mapping = |h: &mut Xxh3, m: &Mapping| {
                put(h, m.name.as_bytes());
                match m.from {
                    Source::Request => put(h, b"request"),
                    Source::Step(i) => put(h, &(i as u64).to_le_bytes()),
                }
                put(h, m.tensor.as_bytes());
            };
            for st in p.steps.iter() {
                hash_plan(route, st.plan, routes, h, depth + 1);
                match &st.inputs {
                    None => put(h, b"as-is"),
                    Some(inputs) => {
                        put(h, &(inputs.len() as u64).to_le_bytes());
                        inputs.iter().for_each(|m| mapping(h, m));
                    }
                }
            }
            put(h, b"outputs");
            p.outputs.iter().for_each(|m| mapping(h, m));
        }
        Plan::Switch(sw) => {
            put(h, b"switch");
            hash_plan(route, sw.on, routes, h, depth + 1);
            put(h, sw.output.as_deref().unwrap_or("").as_bytes());
            for c in sw.cases.iter() {
                put(h, format!("{:?}", c.when).as_bytes());
                hash_plan(route, c.plan, routes, h, depth + 1);
            }
            put(h, b"default");
            hash_plan(route, sw.default, routes, h, depth + 1);
        }
        Plan::Route(name) => {
            put(h, b"route");
            put(h, name.as_bytes());
            if let Some(other) = routes.get(&**name) {
                for rule in other.rules.iter() {
                    put(h, format!("{:?}", rule.matchers).as_bytes());
                    hash_plan(other, rule.plan, routes, h, depth + 1);
                }
                hash_plan(other, other.default, routes, h, depth + 1);
            }
        }
    }
}

fn matcher(name: &str, cond: &HeaderMatchConfig) -> Result<HeaderMatcher, String> {
    let name = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
        .map_err(|_| format!("'{name}' is not a valid HTTP header name"))?;
    Ok(match cond {
        HeaderMatchConfig::Exact(v) => HeaderMatcher::Exact(name, v.as_bytes().into()),
        HeaderMatchConfig::Prefix(p) => HeaderMatcher::Prefix(name, p.as_bytes().into()),
        HeaderMatchConfig::Regex(re) => HeaderMatcher::Regex(name, rules::header_regex(re)?),
        HeaderMatchConfig::Present(p) => HeaderMatcher::Present(name, *p),
    })
}

/// Compiles one policy as parsed, without validation: what the compiler does when a
/// rule slips past `switchyard check`.
#[cfg(test)]
pub(crate) fn compile_unvalidated(text: &str) -> Result<RoutingTable, InvalidRoute> {
    let file = std::path::PathBuf::from("policies/r.yaml");
    let policy = switchyard_config::parse_yaml(&file, text).unwrap_or_else(|d| panic!("{d}"));
    let gateway: GatewayConfig = switchyard_config::parse_yaml(
        std::path::Path::new("gateway.yaml"),
        "policies: policies\nbackends:\n  stable: { endpoints: [\"127.0.0.1:1\"] }\n",
    )
    .unwrap();
    compile(
        &PolicySet {
            files: vec![LoadedPolicy { file, policy }],
        },
        &gateway,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_model_version_from_two_pools_gets_two_labels() {
        let table = compile_unvalidated(
            "version: 1\nroute: r\ntargets:\n  a: { backend: stable, model: m, version: 1 }\n  b: { backend: other, model: m, version: 1 }\n  c: { backend: stable, model: m, version: 2 }\ndefault: a\n",
        )
        .unwrap();
        let route = table.get("r").unwrap();
        let labels: Vec<&str> = route.targets.iter().map(|t| &*t.label).collect();
        assert_eq!(labels, ["stable:m/1", "other:m/1", "m/2"]);
    }

    const HEAD: &str = "version: 1\nroute: r\ntargets:\n  a: { backend: stable, model: m, version: 1 }\n  b: { backend: stable, model: m, version: 2 }\n";

    #[test]
    fn what_validation_would_refuse_is_a_typed_error_not_a_default() {
        let cases = [
            (
                "default: nope\n",
                "'nope' names no target or plan of the route",
            ),
            (
                "default: { split: { weights: { a: 0 } } }\n",
                "split.weights.a: weight must be between 1 and 1000000",
            ),
            (
                "default: { split: { sticky: cookie:x, weights: { a: 1 } } }\n",
                "split.sticky: 'cookie:x' is not a sticky key",
            ),
            (
                "default: { cascade: [ { plan: a, accept: { max_probability: 2 } }, { plan: b } ] }\n",
                "cascade[0].accept: the threshold must be above 0 and at most 1, got 2",
            ),
            (
                "rules:\n  - match: { headers: { x: { regex: \"(\" } } }\n    plan: a\ndefault: a\n",
                "rules[0].match.headers.x: invalid regex '('",
            ),
            (
                "default: a\nshadow: { target: b, percent: 0 }\n",
                "shadow.percent: percent must be above 0 and at most 100, got 0",
            ),
            ("default: a\nfallback: [c]\n", "'c' names no target or plan"),
        ];
        for (body, want) in cases {
            let e = compile_unvalidated(&format!("{HEAD}{body}")).unwrap_err();
            assert!(e.to_string().contains(want), "{body}: {e}");
            assert!(
                e.to_string().starts_with("policies/r.yaml: route 'r': "),
                "{e}"
            );
        }
        assert!(compile_unvalidated(&format!("{HEAD}default: a\n")).is_ok());
    }

    #[test]
    fn plan_keys_follow_meaning_not_text() {
        let key = |body: &str| {
            let table = compile_unvalidated(&format!("{HEAD}{body}")).unwrap();
            let route = table.get("r").unwrap().clone();
            (route.plan_keys[route.default.0 as usize], route.fingerprint)
        };
        let cascade = |t: f64| {
            format!(
                "default: {{ cascade: [ {{ plan: a, accept: {{ max_probability: {t} }} }}, {{ plan: b }} ] }}\n"
            )
        };
        let base = key(&cascade(0.5));
        assert_eq!(base, key(&format!("# a comment\n\n{}", cascade(0.5))));
        assert_ne!(
            base.0,
            key(&cascade(0.6)).0,
            "a threshold is part of the meaning"
        );
        assert_ne!(base.1, key(&cascade(0.6)).1);
        assert_ne!(key("default: a\n").0, key("default: b\n").0);
    }
}
