//! The snapshot: everything a request needs, built whole at (re)load and swapped in one
//! `ArcSwap` store. A request loads it once and never sees two policy versions.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use http::HeaderValue;

use std::sync::atomic::AtomicU32;

use parking_lot::Mutex;

use crate::metrics::{EnsembleMetrics, Metrics, RouteMetrics, SwitchMetrics, TargetMetrics};
use crate::rollout::Rollout;
use crate::routing::{
    CacheSpec, CompileError, InvalidRoute, Plan, PlanId, Route, RoutingTable, TargetId,
};
use crate::strategy::CascadeStats;
use crate::strategy::cache::RouteCache;
use crate::strategy::pipeline::PipelineStats;
use crate::strategy::shadow::ShadowStats;
use crate::upstream::{Pool, Pools, TargetKey, TargetState, Upstreams};

/// One immutable policy version.
#[derive(Debug)]
pub(crate) struct Snapshot {
    pub(crate) version: u64,
    /// `x-switchyard-policy`.
    pub(crate) version_header: HeaderValue,
    pub(crate) routes: HashMap<Box<str>, Arc<RouteEntry>>,
    /// Route names, for error messages.
    pub(crate) route_list: String,
    pub(crate) loaded_at: SystemTime,
    pub(crate) files: Vec<String>,
    /// The longest deadline of its routes: how long a request it serves can last.
    pub(crate) longest_deadline: std::time::Duration,
}

/// A route with its runtime pieces.
#[derive(Debug)]
pub(crate) struct RouteEntry {
    pub(crate) route: Arc<Route>,
    /// `x-switchyard-route`.
    pub(crate) name_header: HeaderValue,
    pub(crate) targets: Box<[TargetEntry]>,
    pub(crate) metrics: RouteMetrics,
    /// The runtime of each plan, indexed by `PlanId`.
    pub(crate) plans: Box<[PlanEntry]>,
    pub(crate) shadow: Option<Arc<ShadowStats>>,
    pub(crate) cache: Option<RouteCache>,
    /// The live rollout, when the route has one (kept across reloads of its generation).
    pub(crate) rollout: Option<Arc<Rollout>>,
}

/// The runtime pieces of one plan.
#[derive(Debug, Default)]
pub(crate) struct PlanEntry {
    /// Request metrics of answers this plan gave when it is not a single target
    /// (labelled with the plan's name as the target).
    pub(crate) metrics: Option<TargetMetrics>,
    /// Stage statistics, when the plan is a cascade.
    pub(crate) cascade: Option<Arc<CascadeStats>>,
    /// Counters and member names, when the plan is an ensemble.
    pub(crate) ensemble: Option<EnsembleRuntime>,
    /// Step statistics and the header, when the plan is a pipeline.
    pub(crate) pipeline: Option<PipelineRuntime>,
    /// Case counters and headers, when the plan is a switch.
    pub(crate) switch: Option<SwitchRuntime>,
}

/// What a pipeline plan needs at run time, built once per snapshot.
#[derive(Debug)]
pub(crate) struct PipelineRuntime {
    pub(crate) name: Arc<str>,
    pub(crate) stats: PipelineStats,
    /// `x-switchyard-pipeline`: the step names joined by `>`.
    pub(crate) header: HeaderValue,
}

/// What a switch plan needs at run time, built once per snapshot.
#[derive(Debug)]
pub(crate) struct SwitchRuntime {
    pub(crate) name: Arc<str>,
    pub(crate) metrics: SwitchMetrics,
    /// `x-switchyard-switch` for each case, then for the default: `case=1; plan=NAME`,
    /// `default; plan=NAME`.
    pub(crate) headers: Box<[HeaderValue]>,
}

/// What an ensemble plan needs at run time, built once per snapshot.
#[derive(Debug)]
pub(crate) struct EnsembleRuntime {
    pub(crate) name: Arc<str>,
    pub(crate) member_names: Box<[Arc<str>]>,
    pub(crate) counters: EnsembleMetrics,
}

/// Strategy state that outlives snapshots: a route's cache survives a reload that keeps
/// its settings and what its plans mean, and the shadow bound is shared by the old and
/// new snapshot's copies in flight. A cache no snapshot uses any more is let go (freed
/// once the requests of the old snapshot finish).
#[derive(Debug, Default)]
pub(crate) struct Kept {
    caches: Mutex<HashMap<CacheIdentity, RouteCache>>,
    shadow_in_flight: Mutex<HashMap<String, Arc<AtomicU32>>>,
    /// Live rollouts by route; a route's entry is replaced when its generation changes.
    rollouts: Mutex<HashMap<String, Arc<Rollout>>>,
    /// `state_dir` of gateway.yaml: where rollouts keep their state.
    state_dir: Option<std::path::PathBuf>,
    /// Whether rollouts move through the replicas' shared state (`shared_state`).
    shared_state: bool,
}

impl Kept {
    /// Nothing kept yet; rollouts keep their state under `state_dir`, and move through
    /// the replicas' shared state when `shared_state`.
    pub(crate) fn new(state_dir: Option<std::path::PathBuf>, shared_state: bool) -> Self {
        Self {
            state_dir,
            shared_state,
            ..Self::default()
        }
    }
}

/// What a cache is the cache of: the route, its settings, and what its plans mean.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CacheIdentity {
    route: Arc<str>,
    spec: CacheSpec,
    fingerprint: u64,
}

/// A target with its breaker, pool, header value and metric handles.
#[derive(Debug)]
pub(crate) struct TargetEntry {
    pub(crate) state: Arc<TargetState>,
    pub(crate) pool: Arc<Pool>,
    /// `x-switchyard-target`: `model/version`.
    pub(crate) label_header: HeaderValue,
    /// The policy's name for it (`x-switchyard-overflow`).
    pub(crate) name_header: HeaderValue,
    pub(crate) metrics: TargetMetrics,
}

impl RouteEntry {
    pub(crate) fn target(&self, id: TargetId) -> &TargetEntry {
        &self.targets[id.0 as usize]
    }

    /// The stage statistics of a cascade plan.
    pub(crate) fn cascade(&self, plan: PlanId) -> Option<&CascadeStats> {
        self.plans.get(plan.0 as usize)?.cascade.as_deref()
    }

    /// The runtime of an ensemble plan.
    pub(crate) fn ensemble(&self, plan: PlanId) -> Option<&EnsembleRuntime> {
        self.plans.get(plan.0 as usize)?.ensemble.as_ref()
    }

    /// The runtime of a pipeline plan.
    pub(crate) fn pipeline(&self, plan: PlanId) -> Option<&PipelineRuntime> {
        self.plans.get(plan.0 as usize)?.pipeline.as_ref()
    }

    /// The runtime of a switch plan.
    pub(crate) fn switch(&self, plan: PlanId) -> Option<&SwitchRuntime> {
        self.plans.get(plan.0 as usize)?.switch.as_ref()
    }

    /// Whether the rollout's candidate, when it is a target, has its breaker open.
    pub(crate) fn rollout_candidate_open(&self) -> bool {
        match self
            .route
            .rollout
            .as_ref()
            .map(|r| self.route.plan(r.candidate))
        {
            Some(Plan::Target(t)) => {
                self.target(*t).state.breaker.state() == crate::upstream::breaker::State::Open
            }
            _ => false,
        }
    }

    /// Whether a target can take traffic now (routing's health predicate).
    pub(crate) fn available(&self, id: TargetId) -> bool {
        let t = self.target(id);
        t.state.available(&t.pool)
    }
}

fn header(s: &str) -> HeaderValue {
    // Invariant: names are validated ([A-Za-z0-9_.-], model names from config); a value
    // that still does not fit a header is replaced rather than panicking.
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

impl Snapshot {
    /// Builds a snapshot of compiled routes; targets reuse the breakers and readiness they
    /// had before. A route naming a pool that gateway.yaml lacks is refused whole.
    pub(crate) fn build(
        version: u64,
        table: &RoutingTable,
        upstreams: &Upstreams,
        pools: &Pools,
        metrics: &Metrics,
        kept: &Kept,
    ) -> Result<Self, InvalidRoute> {
        let mut routes = HashMap::new();
        let mut used = Vec::new();
        for route in table.routes() {
            let targets = route
                .targets
                .iter()
                .map(|t| {
                    let pool = pools
                        .get(&*t.backend)
                        .ok_or_else(|| InvalidRoute {
                            file: route.file.to_string(),
                            route: route.name.to_string(),
                            error: CompileError::Invalid {
                                field: format!("targets.{}.backend", t.name),
                                reason: format!("gateway.yaml has no backend pool '{}'", t.backend),
                            },
                        })?
                        .clone();
                    let state = upstreams.target(TargetKey {
                        backend: t.backend.clone(),
                        model: t.model.clone(),
                        version: t.version.clone(),
                    });
                    Ok(TargetEntry {
                        state,
                        pool,
                        label_header: header(&t.label),
                        name_header: header(&t.name),
                        metrics: metrics.target(&route.name, &t.label),
                    })
                })
                .collect::<Result<Box<[_]>, _>>()?;
            let plans = route
                .plans
                .iter()
                .enumerate()
                .map(|(i, plan)| {
                    let name = route.plan_name(PlanId(i as u16));
                    let mut entry = PlanEntry::default();
                    if !matches!(plan, Plan::Target(_)) {
                        entry.metrics = Some(metrics.target(&route.name, &name));
                    }
                    match plan {
                        Plan::Cascade(stages) => {
                            entry.cascade = Some(Arc::new(CascadeStats::new(metrics.cascade(
                                &route.name,
                                &name,
                                stages.len(),
                            ))));
                        }
                        Plan::Ensemble(e) => {
                            entry.ensemble = Some(EnsembleRuntime {
                                member_names: e
                                    .members
                                    .iter()
                                    .map(|(m, _)| route.plan_name(*m))
                                    .collect(),
                                counters: metrics.ensemble(&route.name, &name),
                                name,
                            });
                        }
                        Plan::Pipeline(p) => {
                            let steps: Vec<&str> = p.steps.iter().map(|s| &*s.name).collect();
                            entry.pipeline = Some(PipelineRuntime {
                                stats: PipelineStats::new(metrics.pipeline(
                                    &route.name,
                                    &name,
                                    &steps,
                                )),
                                header: header(&steps.join(">")),
                                name,
                            });
                        }
                        Plan::Switch(sw) => {
                            let headers = sw
                                .cases
                                .iter()
                                .enumerate()
                                .map(|(i, c)| {
                                    header(&format!(
                                        "case={}; plan={}",
                                        i + 1,
                                        route.plan_name(c.plan)
                                    ))
                                })
                                .chain(std::iter::once(header(&format!(
                                    "default; plan={}",
                                    route.plan_name(sw.default)
                                ))))
                                .collect();
                            entry.switch = Some(SwitchRuntime {
                                metrics: metrics.switch(&route.name, &name, sw.cases.len()),
                                headers,
                                name,
                            });
                        }
                        _ => {}
                    }
                    entry
                })
                .collect();
            let shadow = route.shadow.as_ref().map(|sh| {
                let in_flight = kept
                    .shadow_in_flight
                    .lock()
                    .entry(route.name.to_string())
                    .or_default()
                    .clone();
                Arc::new(ShadowStats {
                    metrics: metrics.shadow(&route.name, &sh.name),
                    in_flight,
                    max_in_flight: sh.max_in_flight,
                })
            });
            let cache = route.cache.map(|spec| {
                let identity = CacheIdentity {
                    route: route.name.clone(),
                    spec,
                    fingerprint: route.fingerprint,
                };
                let cache = kept
                    .caches
                    .lock()
                    .entry(identity.clone())
                    .or_insert_with(|| {
                        RouteCache::new(spec.ttl, spec.max_bytes, metrics.cache(&route.name))
                    })
                    .clone();
                used.push(identity);
                cache
            });
            let rollout = route.rollout.as_ref().map(|spec| {
                let mut live = kept.rollouts.lock();
                match live.get(&*route.name) {
                    Some(r) if r.spec.generation == spec.generation => r.clone(),
                    _ => {
                        let r = Rollout::start(
                            &route.name,
                            spec,
                            metrics.rollout(&route.name),
                            kept.state_dir.as_deref(),
                            kept.shared_state,
                        );
                        live.insert(route.name.to_string(), r.clone());
                        r
                    }
                }
            });
            let entry = RouteEntry {
                rollout,
                name_header: header(&route.name),
                metrics: {
                    let classes: Vec<&str> = route.priority.as_ref().map_or(vec!["default"], |p| {
                        p.classes.iter().map(|c| &**c).collect()
                    });
                    metrics.route(&route.name, &classes)
                },
                route: route.clone(),
                targets,
                plans,
                shadow,
                cache,
            };
            routes.insert(route.name.to_string().into_boxed_str(), Arc::new(entry));
        }
        // A rollout whose route is gone or no longer has one ends, and its state with it:
        // the same section added again later is a new rollout.
        kept.rollouts.lock().retain(|name, r| {
            let keep = table.get(name).is_some_and(|route| route.rollout.is_some());
            if !keep {
                r.remove_state();
            }
            keep
        });
        // A cache whose route is gone or now means something else is let go.
        kept.caches
            .lock()
            .retain(|identity, _| used.contains(identity));
        let route_list = table.names().join(", ");
        Ok(Self {
            version,
            version_header: header(&version.to_string()),
            routes,
            route_list: if route_list.is_empty() {
                "(none)".into()
            } else {
                route_list
            },
            loaded_at: SystemTime::now(),
            longest_deadline: table.routes().map(|r| r.deadline).max().unwrap_or_default(),
            files: {
                let mut files: Vec<String> = table.routes().map(|r| r.file.to_string()).collect();
                files.sort();
                files.dedup();
                files
            },
        })
    }
}
