//! The routing table: policies compiled into per-route rules, plans and targets, and the
//! pure decision of which target a request goes to.
//!
//! # Invariants
//! * Routing is a pure function of the table, the request's headers and `model_version`,
//!   a random number and a health predicate: no IO, no clock, no lock, no allocation.
//! * Everything a decision needs (parsed header names, anchored regexes, weighted tables)
//!   is built by [`compile`] when policies load.

mod compile;
mod explain;
mod matcher;
pub mod rollout;
mod split;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;

#[cfg(test)]
pub(crate) use compile::compile_unvalidated;
pub use compile::{CompileError, InvalidRoute, compile, load};
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
    /// The plan that takes this target's requests when its pool is full.
    pub overflow: Option<PlanId>,
}

/// A confidence test on one output of a cascade stage's answer.
pub use switchyard_config::rules::Accept;

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

/// Where a pipeline mapping reads its tensor.
pub use switchyard_config::rules::Source;

/// A tensor of a pipeline step's request or of its answer, read from the client's request
/// or an earlier step's answer.
#[derive(Debug, Clone)]
pub struct Mapping {
    /// The tensor it becomes: the step's input, or the client's output.
    pub name: Arc<str>,
    /// Where it is read.
    pub from: Source,
    /// The tensor there.
    pub tensor: Arc<str>,
    /// The mapping's position in the policy file (for the load-time metadata check).
    pub line: u64,
    /// Its column.
    pub column: u64,
}

/// One pipeline step.
#[derive(Debug, Clone)]
pub struct Step {
    /// The step's name.
    pub name: Arc<str>,
    /// What runs.
    pub plan: PlanId,
    /// Its request's tensors; `None`: the client's request as it is.
    pub inputs: Option<Box<[Mapping]>>,
    /// The step's position in the policy file.
    pub line: u64,
}

/// A pipeline: steps in order, each fed the request or earlier steps' outputs.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// The steps.
    pub steps: Box<[Step]>,
    /// The client's outputs; empty: the last step's answer as it is.
    pub outputs: Box<[Mapping]>,
}

/// A switch case's condition on every row of an output.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct When {
    /// The row's top class is one of these.
    pub argmax: Option<Box<[usize]>>,
    /// The row's highest value is below this.
    pub max_probability_below: Option<f64>,
    /// The row's top-two margin is below this.
    pub margin_below: Option<f64>,
}

impl When {
    /// The condition in words: `top class in [3, 5] and top value < 0.6`.
    pub fn describe(&self) -> String {
        let mut conds = Vec::new();
        if let Some(classes) = &self.argmax {
            conds.push(format!("top class in {classes:?}"));
        }
        if let Some(x) = self.max_probability_below {
            conds.push(format!("top value < {x}"));
        }
        if let Some(x) = self.margin_below {
            conds.push(format!("top-two margin < {x}"));
        }
        conds.join(" and ")
    }
}

/// One switch case.
#[derive(Debug, Clone)]
pub struct Case {
    /// Its condition.
    pub when: When,
    /// The plan that answers when it holds.
    pub plan: PlanId,
}

/// A switch: `on`'s answer picks the plan that answers.
#[derive(Debug, Clone)]
pub struct Switch {
    /// The plan that runs first.
    pub on: PlanId,
    /// The output the cases read (`None`: the first).
    pub output: Option<Arc<str>>,
    /// Cases in order.
    pub cases: Box<[Case]>,
    /// The plan when no case holds (`on` itself when the policy names none: its answer).
    pub default: PlanId,
    /// The position of `on` in the policy file.
    pub line: u64,
    /// Its column.
    pub column: u64,
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
    /// Steps in order, outputs feeding inputs.
    Pipeline(Pipeline),
    /// A first answer picks the plan that answers.
    Switch(Switch),
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
    /// The canary rollout, if any.
    pub rollout: Option<rollout::RolloutSpec>,
    /// Priority classes of its requests, if any (else every request is one class).
    pub priority: Option<Priority>,
}

/// A request's priority class: `index` of `of` (0 the lowest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Class {
    /// Its place among the route's classes, 0 the lowest.
    pub index: u8,
    /// How many classes the route has.
    pub of: u8,
}

impl Class {
    /// A route without classes: its one class fills endpoints to `max_in_flight`.
    pub const ONLY: Class = Class { index: 0, of: 1 };

    /// The load at which an endpoint is full for this class when the pool's limit is
    /// `limit`: `limit × (1 + index/of)`, so the lowest class stops at the limit and each
    /// higher one may go further into the headroom above it.
    pub fn limit(self, limit: u64) -> u64 {
        limit + limit * u64::from(self.index) / u64::from(self.of.max(1))
    }
}

/// A route's priority classes, read from one request header.
#[derive(Debug, Clone)]
pub struct Priority {
    /// The request header that names the class.
    pub header: http::HeaderName,
    /// Class names, lowest first.
    pub classes: Box<[Arc<str>]>,
    /// The class of a request without the header or with an unknown value.
    pub default: u8,
}

impl Priority {
    /// The class `headers` ask for.
    pub fn class(&self, headers: &http::HeaderMap) -> Class {
        let of = self.classes.len() as u8;
        let index = headers
            .get(&self.header)
            .and_then(|v| {
                self.classes
                    .iter()
                    .position(|c| c.as_bytes() == v.as_bytes())
            })
            .map_or(self.default, |i| i as u8);
        Class { index, of }
    }
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
    /// target, following splits, cascades (their last, largest stage), ensembles, pipelines
    /// (their first step) and switches (the plan they look at).
    pub fn default_target(&self) -> TargetId {
        self.face_target(self.default)
    }

    /// The target that represents `plan`, as [`Route::default_target`] follows it.
    pub fn face_target(&self, plan: PlanId) -> TargetId {
        let mut plan = plan;
        for _ in 0..self.plans.len() {
            plan = match self.plan(plan) {
                Plan::Target(t) => return *t,
                other => match self.face_step(other) {
                    Some(next) => next,
                    None => break,
                },
            };
        }
        TargetId(0)
    }

    /// The pipeline whose tensors the route's default plan takes and gives, if it reaches
    /// one before a target (following splits, cascades, ensembles and switches as
    /// [`Route::default_target`] does).
    pub fn default_pipeline(&self) -> Option<(PlanId, &Pipeline)> {
        let mut plan = self.default;
        for _ in 0..self.plans.len() {
            match self.plan(plan) {
                Plan::Pipeline(p) => return Some((plan, p)),
                Plan::Target(_) => return None,
                other => plan = self.face_step(other)?,
            }
        }
        None
    }

    /// The plan a composed plan's face follows.
    fn face_step(&self, plan: &Plan) -> Option<PlanId> {
        match plan {
            Plan::Split(s) => Some(s.members()[0].0),
            Plan::Cascade(stages) => Some(stages[stages.len() - 1].plan),
            Plan::Ensemble(e) => Some(e.members[0].0),
            Plan::Switch(s) => Some(s.on),
            Plan::Pipeline(p) => Some(p.steps[0].plan),
            Plan::Target(_) | Plan::Route(_) => None,
        }
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
    pub(super) routes: HashMap<Box<str>, Arc<Route>>,
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
