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

pub use explain::explain;
pub use matcher::HeaderMatcher;
pub use split::{Draw, Split};

/// Index of a target within its route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TargetId(pub u16);

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

/// How a plan picks a target.
#[derive(Debug, Clone)]
pub enum Plan {
    /// One target.
    Target(TargetId),
    /// A weighted split.
    Split(Split),
}

/// A header rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// All must match.
    pub matchers: Box<[HeaderMatcher]>,
    /// What matching requests get.
    pub plan: Plan,
}

/// Retry settings of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts after the first for failures after the request was sent.
    pub attempts: u32,
    /// Whether a request that reached a backend may run again.
    pub idempotent: bool,
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
    /// Rules in order.
    pub rules: Box<[Rule]>,
    /// The plan when no rule matches.
    pub default: Plan,
    /// Targets to try, in order, when the chosen one is unavailable.
    pub fallback: Box<[TargetId]>,
    /// Time budget per request.
    pub deadline: Duration,
    /// Retry settings.
    pub retry: RetryPolicy,
    /// Whether `model_version` may pin a target.
    pub version_pinning: bool,
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

/// Which target a request goes to, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// The chosen target.
    pub target: TargetId,
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
    /// default plan. `random` feeds splits without a sticky key; `healthy` says which
    /// targets are available (splits skip the others).
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
                .map(|target| Decision {
                    target,
                    reason: Reason::Pinned,
                    draw: None,
                })
                .ok_or_else(|| RouteError::UnknownVersion {
                    route: self.name.clone(),
                    version: model_version.to_owned(),
                });
        }
        for (i, rule) in self.rules.iter().enumerate() {
            if rule.matchers.iter().all(|m| m.matches(headers)) {
                let (target, draw) = pick(&rule.plan, headers, random, healthy);
                return Ok(Decision {
                    target,
                    reason: Reason::Rule(i),
                    draw,
                });
            }
        }
        let (target, draw) = pick(&self.default, headers, random, healthy);
        Ok(Decision {
            target,
            reason: Reason::Default,
            draw,
        })
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

    /// The target of the default plan with no headers (for metadata: the route's face).
    pub fn default_target(&self) -> TargetId {
        match &self.default {
            Plan::Target(t) => *t,
            Plan::Split(s) => s.members()[0].0,
        }
    }

    /// Targets to try in order for a request whose decision was `first`: `first`, then
    /// the fallback list, then the other members of the plan that chose it.
    pub fn candidates(&self, decision: &Decision) -> impl Iterator<Item = TargetId> + '_ {
        let plan = match decision.reason {
            Reason::Rule(i) => Some(&self.rules[i].plan),
            Reason::Default => Some(&self.default),
            Reason::Pinned => None,
        };
        let members: &[(TargetId, u32)] = match plan {
            Some(Plan::Split(s)) => s.members(),
            _ => &[],
        };
        let first = decision.target;
        std::iter::once(first)
            .chain(self.fallback.iter().copied().filter(move |t| *t != first))
            .chain(
                members
                    .iter()
                    .map(|(t, _)| *t)
                    .filter(move |t| *t != first && !self.fallback.contains(t)),
            )
    }

    /// The target by id.
    pub fn target(&self, id: TargetId) -> &Target {
        &self.targets[id.0 as usize]
    }
}

fn pick(
    plan: &Plan,
    headers: &HeaderMap,
    random: u64,
    healthy: &dyn Fn(TargetId) -> bool,
) -> (TargetId, Option<Draw>) {
    match plan {
        Plan::Target(t) => (*t, None),
        Plan::Split(split) => {
            let key = split
                .sticky
                .as_ref()
                .and_then(|h| headers.get(h))
                .map(|v| v.as_bytes());
            let (t, draw) = split.pick(key, random, healthy);
            (t, Some(draw))
        }
    }
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

/// Compiles a validated policy set. Validation has already rejected everything that could
/// fail here, so unknown references cannot occur; they would be skipped, not panic.
pub fn compile(policies: &PolicySet, gateway: &GatewayConfig) -> RoutingTable {
    let mut routes = HashMap::new();
    for loaded in &policies.files {
        let p = &loaded.policy;
        let names: Vec<&str> = p.targets.keys().map(String::as_str).collect();
        let id = |name: &str| {
            names
                .iter()
                .position(|n| *n == name)
                .map(|i| TargetId(i as u16))
        };
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
        let plan = |cfg: &PlanConfig| -> Plan {
            match cfg {
                PlanConfig::Target(t) => Plan::Target(id(t).unwrap_or(TargetId(0))),
                PlanConfig::Split(s) => {
                    let members = s
                        .weights
                        .iter()
                        .filter_map(|(name, w)| Some((id(name)?, u32::try_from(w.value).ok()?)))
                        .collect();
                    let sticky = s
                        .sticky
                        .as_ref()
                        .and_then(|st| st.value.strip_prefix("header:"))
                        .and_then(|h| {
                            HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).ok()
                        });
                    Plan::Split(Split::new(members, sticky, &s.salt))
                }
            }
        };
        let rules = p
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
                plan: plan(&r.plan.value),
            })
            .collect();
        let route = Route {
            name: p.route.value.as_str().into(),
            file: loaded.file.display().to_string().into(),
            targets,
            rules,
            default: plan(&p.default.value),
            fallback: p.fallback.iter().filter_map(|f| id(&f.value)).collect(),
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
        };
        routes.insert(p.route.value.as_str().into(), Arc::new(route));
    }
    RoutingTable { routes }
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
