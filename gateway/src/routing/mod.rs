//! The routing table: policies compiled into per-route rules, plans and targets, and the
//! pure decision of which target a request goes to.
//!
//! # Invariants
//! * Routing is a pure function of the table, the request's headers and `model_version`,
//!   a random number and a health predicate: no IO, no clock, no lock, no allocation.
//! * Everything a decision needs (parsed header names, anchored regexes, weighted tables)
//!   is built by [`compile`] when policies load.

mod explain;
mod matcher;
mod split;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName};
use switchyard_config::policy::{HeaderMatchConfig, PlanConfig};
use switchyard_config::{GatewayConfig, PolicySet};
use xxhash_rust::xxh3::Xxh3;

pub use explain::explain;
pub use matcher::HeaderMatcher;
pub use split::{Draw, Split};

/// Index of a target within its route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TargetId(pub u16);

/// Index of a plan within its route. The first plans are the targets, in order, so
/// `PlanId(i)` for `i < targets.len()` is target `i`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PlanId(pub u16);

/// A model version on a backend pool, as one route names it.
#[derive(Debug, Clone)]
pub struct Target {
    /// The policy's name for it.
    pub name: Arc<str>,
    /// The backend pool.
    pub backend: Arc<str>,
    /// The model name on the backend.
    pub model: Arc<str>,
    /// The Triton version, as sent in `model_version` (`""`: the backend's newest).
    pub version: Arc<str>,
    /// The release label, if any.
    pub release: Option<Arc<str>>,
    /// `model/version` for the `x-switchyard-target` header and metric labels.
    pub label: Arc<str>,
}

/// A confidence test on one output of a cascade stage's answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Accept {
    /// Every row's highest value is at least this.
    MaxProbability(f64),
    /// Every row's highest value minus its second highest is at least this.
    Margin(f64),
}

/// One cascade stage.
#[derive(Debug, Clone)]
pub struct Stage {
    /// What runs.
    pub plan: PlanId,
    /// The test its answer must pass (`None` on the last stage).
    pub accept: Option<Accept>,
    /// The output the test reads (`None`: the first output).
    pub output: Option<Arc<str>>,
}

/// How an ensemble combines outputs.
pub use switchyard_config::policy::Combine;

/// An ensemble.
#[derive(Debug, Clone)]
pub struct Ensemble {
    /// Members and their weights (1.0 unless `weighted_mean`).
    pub members: Box<[(PlanId, f64)]>,
    /// How outputs combine.
    pub combine: Combine,
    /// Members needed.
    pub quorum: usize,
    /// Time a member may take (`None`: the request's deadline).
    pub member_timeout: Option<Duration>,
}

/// How a plan picks a target, or combines several.
#[derive(Debug, Clone)]
pub enum Plan {
    /// One target.
    Target(TargetId),
    /// A weighted split across plans.
    Split(Split),
    /// Stages in order.
    Cascade(Box<[Stage]>),
    /// Members in parallel, combined.
    Ensemble(Ensemble),
    /// Another route's decision.
    Route(Arc<str>),
}

/// A header rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// All must match.
    pub matchers: Box<[HeaderMatcher]>,
    /// What matching requests get.
    pub plan: PlanId,
}

/// Retry settings of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts after the first for failures after the request was sent.
    pub attempts: u32,
    /// Whether a request that reached a backend may run again.
    pub idempotent: bool,
}

/// Shadow traffic of a route.
#[derive(Debug, Clone)]
pub struct Shadow {
    /// What the copy runs.
    pub plan: PlanId,
    /// A name for metrics and logs (the target or plan name).
    pub name: Arc<str>,
    /// Share of requests copied, as a fraction of 2^32 (compared with a random u32).
    pub threshold: u64,
    /// Copies in flight at most.
    pub max_in_flight: u32,
}

/// The response cache settings of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheSpec {
    /// How long an entry serves.
    pub ttl: Duration,
    /// Memory for entries.
    pub max_bytes: u64,
}

/// One compiled route.
#[derive(Debug, Clone)]
pub struct Route {
    /// The name clients call.
    pub name: Arc<str>,
    /// The policy file it came from.
    pub file: Arc<str>,
    /// Targets, indexed by `TargetId`.
    pub targets: Box<[Target]>,
    /// All plans; the first `targets.len()` are the targets.
    pub plans: Box<[Plan]>,
    /// Every plan's name, by plan id: its target's or named plan's, else its kind (with
    /// a number when the route has several unnamed plans of that kind).
    pub plan_names: Box<[Arc<str>]>,
    /// What each plan means, by plan id, as a hash of its compiled content (targets by
    /// backend, model and version; thresholds, weights, salts), so that comments, key
    /// order and names change nothing: the cache keys answers by it.
    pub plan_keys: Box<[u64]>,
    /// Rules in order.
    pub rules: Box<[Rule]>,
    /// The plan when no rule matches.
    pub default: PlanId,
    /// Targets to try, in order, when the chosen one is unavailable.
    pub fallback: Box<[TargetId]>,
    /// Time budget per request.
    pub deadline: Duration,
    /// Retry settings.
    pub retry: RetryPolicy,
    /// Whether `model_version` may pin a target.
    pub version_pinning: bool,
    /// Shadow traffic, if any.
    pub shadow: Option<Shadow>,
    /// The response cache, if any.
    pub cache: Option<CacheSpec>,
    /// A hash of what every plan of the route means (its `plan_keys`): a reload that
    /// changes it starts the route's cache afresh and frees the old one.
    pub fingerprint: u64,
}

/// Why a decision came out as it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// `model_version` named this target's release or version.
    Pinned,
    /// Rule number `n` matched.
    Rule(usize),
    /// No rule matched.
    Default,
}

/// Which plan a request runs, and why. Splits are resolved: `plan` is a target, a
/// cascade, an ensemble or a route reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// The plan to run.
    pub plan: PlanId,
    /// The target, when the plan is one.
    pub target: Option<TargetId>,
    /// The split that chose it, if one did (its fallback candidates).
    pub split: Option<PlanId>,
    /// Which part of the policy chose it.
    pub reason: Reason,
    /// How a split drew it, if a split did.
    pub draw: Option<Draw>,
}

/// Why a request could not be routed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// `model_version` names no target of the route.
    #[error("route '{route}' has no target with release or version '{version}'")]
    UnknownVersion {
        /// The route.
        route: Arc<str>,
        /// What the client asked for.
        version: String,
    },
    /// The route does not allow pinning.
    #[error(
        "route '{route}' does not allow choosing a version (version_pinning: false); leave model_version empty"
    )]
    PinningDisabled {
        /// The route.
        route: Arc<str>,
    },
}

impl Route {
    /// Routes a request: pin by `model_version`, else the first matching rule, else the
    /// default plan; splits are resolved. `random` feeds splits without a sticky key;
    /// `healthy` says which targets are available (splits skip the others).
    pub fn decide(
        &self,
        headers: &HeaderMap,
        model_version: &str,
        random: u64,
        healthy: &dyn Fn(TargetId) -> bool,
    ) -> Result<Decision, RouteError> {
        if !model_version.is_empty() {
            if !self.version_pinning {
                return Err(RouteError::PinningDisabled {
                    route: self.name.clone(),
                });
            }
            return self
                .pinned(model_version)
                .map(|t| Decision {
                    plan: PlanId(t.0),
                    target: Some(t),
                    split: None,
                    reason: Reason::Pinned,
                    draw: None,
                })
                .ok_or_else(|| RouteError::UnknownVersion {
                    route: self.name.clone(),
                    version: model_version.to_owned(),
                });
        }
        let (plan, reason) = self
            .rules
            .iter()
            .enumerate()
            .find(|(_, rule)| rule.matchers.iter().all(|m| m.matches(headers)))
            .map_or((self.default, Reason::Default), |(i, rule)| {
                (rule.plan, Reason::Rule(i))
            });
        Ok(self.resolve(plan, reason, headers, random, healthy))
    }

    /// Resolves splits down to a plan that runs, sticky keys and health included.
    pub fn resolve(
        &self,
        mut plan: PlanId,
        reason: Reason,
        headers: &HeaderMap,
        mut random: u64,
        healthy: &dyn Fn(TargetId) -> bool,
    ) -> Decision {
        let mut split = None;
        let mut draw = None;
        // Splits may nest; validation bounds the depth (no cycles), this loop too.
        for _ in 0..self.plans.len() {
            let Plan::Split(s) = self.plan(plan) else {
                break;
            };
            let key = s
                .sticky
                .as_ref()
                .and_then(|h| headers.get(h))
                .map(|v| v.as_bytes());
            let available = |p: PlanId| self.available(p, healthy);
            let (member, d) = s.pick(key, random, &available);
            split = Some(plan);
            draw = Some(d);
            plan = member;
            // A nested split draws afresh: reusing the point would tie its choice to the
            // outer one (a member chosen from the top of the range would pick the top too).
            random = remix(random);
        }
        let target = match self.plan(plan) {
            Plan::Target(t) => Some(*t),
            _ => None,
        };
        Decision {
            plan,
            target,
            split,
            reason,
            draw,
        }
    }

    /// Whether a plan can take traffic: a target by `healthy`, a split if any member can,
    /// anything else (it degrades by its own rules) always.
    fn available(&self, plan: PlanId, healthy: &dyn Fn(TargetId) -> bool) -> bool {
        match self.plan(plan) {
            Plan::Target(t) => healthy(*t),
            Plan::Split(s) => s
                .members()
                .iter()
                .any(|(m, _)| *m != plan && self.available(*m, healthy)),
            _ => true,
        }
    }

    /// The target a `model_version` pins: a release label first, then a Triton version.
    pub fn pinned(&self, model_version: &str) -> Option<TargetId> {
        let by_release = self
            .targets
            .iter()
            .position(|t| t.release.as_deref() == Some(model_version));
        let by_version = || {
            self.targets
                .iter()
                .position(|t| &*t.version == model_version)
        };
        by_release.or_else(by_version).map(|i| TargetId(i as u16))
    }

    /// A target that represents the route (metadata, config): the default plan's first
    /// target, following splits, cascades (their last, largest stage) and ensembles.
    pub fn default_target(&self) -> TargetId {
        let mut plan = self.default;
        for _ in 0..self.plans.len() {
            plan = match self.plan(plan) {
                Plan::Target(t) => return *t,
                Plan::Split(s) => s.members()[0].0,
                Plan::Cascade(stages) => stages[stages.len() - 1].plan,
                Plan::Ensemble(e) => e.members[0].0,
                Plan::Route(_) => break,
            };
        }
        TargetId(0)
    }

    /// Targets to try in order for a decision that chose a target: it, then the fallback
    /// list, then the other target members of the split that chose it.
    pub fn candidates(&self, decision: &Decision) -> impl Iterator<Item = TargetId> + '_ {
        let members: &[(PlanId, u32)] = match decision.split.map(|s| self.plan(s)) {
            Some(Plan::Split(s)) => s.members(),
            _ => &[],
        };
        let first = decision.target;
        first
            .into_iter()
            .chain(
                self.fallback
                    .iter()
                    .copied()
                    .filter(move |t| Some(*t) != first),
            )
            .chain(
                members
                    .iter()
                    .filter_map(|(p, _)| match self.plan(*p) {
                        Plan::Target(t) => Some(*t),
                        _ => None,
                    })
                    .filter(move |t| Some(*t) != first && !self.fallback.contains(t)),
            )
    }

    /// The target by id.
    pub fn target(&self, id: TargetId) -> &Target {
        &self.targets[id.0 as usize]
    }

    /// The plan by id.
    pub fn plan(&self, id: PlanId) -> &Plan {
        &self.plans[id.0 as usize]
    }

    /// A plan's name: its target's or named plan's, else its kind.
    pub fn plan_name(&self, id: PlanId) -> Arc<str> {
        self.plan_names[id.0 as usize].clone()
    }
}

/// SplitMix64's finaliser: a fresh, well-spread number from a used one.
pub fn remix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// All routes of one policy set, by name.
#[derive(Debug, Clone, Default)]
pub struct RoutingTable {
    routes: HashMap<Box<str>, Arc<Route>>,
}

impl RoutingTable {
    /// The route clients call by `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Route>> {
        self.routes.get(name)
    }

    /// Route names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.routes.keys().map(|k| &**k).collect();
        names.sort_unstable();
        names
    }

    /// All routes.
    pub fn routes(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.routes.values()
    }
}

/// Loads and compiles policies as a reload would, for `switchyard check` and `explain`.
pub fn load(
    policies: &std::path::Path,
    gateway: &GatewayConfig,
) -> Result<RoutingTable, switchyard_config::Diagnostics> {
    Ok(compile(
        &switchyard_config::load_policies(policies, gateway)?,
        gateway,
    ))
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

    fn named(&self, name: &str) -> PlanId {
        // Invariant: validation checked every name; an unknown one maps to the first target.
        self.names.get(name).copied().unwrap_or(PlanId(0))
    }

    fn compile(&mut self, cfg: &PlanConfig) -> PlanId {
        match cfg {
            PlanConfig::Target(name) => self.named(name),
            PlanConfig::Split(s) => {
                let members = s
                    .weights
                    .iter()
                    .filter_map(|(name, w)| Some((self.named(name), u32::try_from(w.value).ok()?)))
                    .collect();
                let sticky = s
                    .sticky
                    .as_ref()
                    .and_then(|st| st.value.strip_prefix("header:"))
                    .and_then(|h| HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).ok());
                self.push(Plan::Split(Split::new(members, sticky, &s.salt)))
            }
            PlanConfig::Cascade(stages) => {
                let stages = stages
                    .iter()
                    .map(|st| Stage {
                        plan: self.compile(&st.plan.value),
                        accept: st.accept.as_ref().and_then(|a| {
                            match (a.value.max_probability, a.value.margin) {
                                (Some(x), _) => Some(Accept::MaxProbability(x)),
                                (None, Some(x)) => Some(Accept::Margin(x)),
                                _ => None,
                            }
                        }),
                        output: st
                            .accept
                            .as_ref()
                            .and_then(|a| a.value.output.as_deref().map(Into::into)),
                    })
                    .collect();
                self.push(Plan::Cascade(stages))
            }
            PlanConfig::Ensemble(e) => {
                let members: Box<[(PlanId, f64)]> = e
                    .members
                    .iter()
                    .enumerate()
                    .map(|(i, m)| {
                        (
                            self.compile(&m.value),
                            e.weights.get(i).copied().unwrap_or(1.0),
                        )
                    })
                    .collect();
                let quorum = e.quorum.unwrap_or(members.len());
                self.push(Plan::Ensemble(Ensemble {
                    members,
                    combine: e.combine,
                    quorum,
                    member_timeout: e.member_timeout.map(|t| t.0),
                }))
            }
            PlanConfig::Route(r) => self.push(Plan::Route(r.as_str().into())),
        }
    }
}

/// Compiles a validated policy set. Validation has already rejected everything that could
/// fail here, so unknown references cannot occur; they would be mapped, not panic.
pub fn compile(policies: &PolicySet, gateway: &GatewayConfig) -> RoutingTable {
    let mut routes: HashMap<Box<str>, Route> = HashMap::new();
    for loaded in &policies.files {
        let p = &loaded.policy;
        let targets: Box<[Target]> = p
            .targets
            .iter()
            .map(|(name, t)| {
                let t = &t.value;
                let version: Arc<str> = t.version.map(|v| v.to_string()).unwrap_or_default().into();
                let label = if version.is_empty() {
                    t.model.clone()
                } else {
                    format!("{}/{}", t.model, version)
                };
                Target {
                    name: name.as_str().into(),
                    backend: t.backend.as_str().into(),
                    model: t.model.as_str().into(),
                    version,
                    release: t.release.as_deref().map(Into::into),
                    label: label.into(),
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
            let compiled = arena.compile(cfg);
            arena.plans[id.0 as usize] = arena.plans[compiled.0 as usize].clone();
        }
        let rules: Box<[Rule]> = p
            .rules
            .iter()
            .map(|r| Rule {
                matchers: r
                    .when
                    .value
                    .headers
                    .iter()
                    .filter_map(|(name, cond)| matcher(name, cond))
                    .collect(),
                plan: arena.compile(&r.plan.value),
            })
            .collect();
        let default = arena.compile(&p.default.value);
        let shadow = p.shadow.as_ref().map(|sh| {
            let sh = &sh.value;
            let (plan, name) = match (&sh.target, &sh.plan) {
                (Some(t), _) => (arena.named(t), Arc::<str>::from(t.as_str())),
                (None, Some(plan)) => (arena.compile(plan), Arc::<str>::from("plan")),
                (None, None) => (PlanId(0), Arc::<str>::from("invalid")),
            };
            Shadow {
                plan,
                name,
                threshold: ((sh.percent / 100.0) * 4_294_967_296.0) as u64,
                max_in_flight: sh.max_in_flight,
            }
        });
        let plan_names = plan_names(&targets, &arena.plans, &named_plans);
        let route = Route {
            name: p.route.value.as_str().into(),
            file: loaded.file.display().to_string().into(),
            fallback: p
                .fallback
                .iter()
                .filter_map(|f| p.targets.get_index_of(&f.value))
                .map(|i| TargetId(i as u16))
                .collect(),
            targets,
            plans: arena.plans.into(),
            plan_names,
            plan_keys: Box::new([]),
            rules,
            default,
            deadline: p
                .deadline
                .as_ref()
                .map_or(gateway.limits.default_deadline.0, |d| d.value.0),
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
            cache: p.cache.as_ref().map(|c| CacheSpec {
                ttl: c.value.ttl.0,
                max_bytes: c.value.max_bytes.0,
            }),
            fingerprint: 0,
        };
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
            (name, Arc::new(route))
        })
        .collect();
    RoutingTable { routes }
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

fn matcher(name: &str, cond: &HeaderMatchConfig) -> Option<HeaderMatcher> {
    let name = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).ok()?;
    Some(match cond {
        HeaderMatchConfig::Exact(v) => HeaderMatcher::Exact(name, v.as_bytes().into()),
        HeaderMatchConfig::Prefix(p) => HeaderMatcher::Prefix(name, p.as_bytes().into()),
        HeaderMatchConfig::Regex(re) => {
            HeaderMatcher::Regex(name, regex::bytes::Regex::new(&format!("^(?:{re})$")).ok()?)
        }
        HeaderMatchConfig::Present(p) => HeaderMatcher::Present(name, *p),
    })
}
