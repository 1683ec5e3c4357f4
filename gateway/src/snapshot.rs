//! The snapshot: everything a request needs, built whole at (re)load and swapped in one
//! `ArcSwap` store. A request loads it once and never sees two policy versions.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use http::HeaderValue;
use switchyard_config::{GatewayConfig, PolicySet};

use std::sync::atomic::AtomicU32;

use parking_lot::Mutex;
use prometheus::IntCounter;

use crate::metrics::{Metrics, RouteMetrics, TargetMetrics};
use crate::routing::{self, Plan, Route, TargetId};
use crate::strategy::CascadeStats;
use crate::strategy::cache::RouteCache;
use crate::strategy::shadow::ShadowStats;
use crate::upstream::{Pool, TargetKey, TargetState, Upstreams};

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
}

/// A route with its runtime pieces.
#[derive(Debug)]
pub(crate) struct RouteEntry {
    pub(crate) route: Arc<Route>,
    /// `x-switchyard-route`.
    pub(crate) name_header: HeaderValue,
    pub(crate) targets: Box<[TargetEntry]>,
    pub(crate) metrics: RouteMetrics,
    /// Stage statistics of each cascade plan, by plan id.
    pub(crate) cascades: HashMap<u16, Arc<CascadeStats>>,
    /// Ok, below-quorum and error counters of each ensemble plan, by plan id.
    pub(crate) ensembles: HashMap<u16, [IntCounter; 3]>,
    /// Request metrics of answers that plans other than a single target gave, by plan id
    /// (labelled with the plan's name as the target).
    pub(crate) plan_metrics: HashMap<u16, TargetMetrics>,
    pub(crate) shadow: Option<Arc<ShadowStats>>,
    pub(crate) cache: Option<RouteCache>,
}

/// Strategy state that outlives snapshots: a route's cache survives a reload that keeps
/// its settings (entries of a changed plan become unreachable through the key), and the
/// shadow bound is shared by the old and new snapshot's copies in flight.
#[derive(Debug, Default)]
pub(crate) struct Kept {
    caches: Mutex<HashMap<(String, CacheSpecKey), RouteCache>>,
    shadow_in_flight: Mutex<HashMap<String, Arc<AtomicU32>>>,
}

type CacheSpecKey = (u128, u64);

/// A target with its breaker, pool, header value and metric handles.
#[derive(Debug)]
pub(crate) struct TargetEntry {
    pub(crate) state: Arc<TargetState>,
    pub(crate) pool: Arc<Pool>,
    /// `x-switchyard-target`: `model/version`.
    pub(crate) label_header: HeaderValue,
    pub(crate) metrics: TargetMetrics,
}

impl RouteEntry {
    pub(crate) fn target(&self, id: TargetId) -> &TargetEntry {
        &self.targets[id.0 as usize]
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
    /// Builds a snapshot; targets reuse the breakers and readiness they had before.
    pub(crate) fn build(
        version: u64,
        policies: &PolicySet,
        config: &GatewayConfig,
        upstreams: &Upstreams,
        metrics: &Metrics,
        kept: &Kept,
    ) -> Self {
        let table = routing::compile(policies, config);
        let mut routes = HashMap::new();
        for route in table.routes() {
            let targets = route
                .targets
                .iter()
                .filter_map(|t| {
                    // Invariant: validation checked that every backend exists.
                    let pool = upstreams.pool(&t.backend)?.clone();
                    let state = upstreams.target(TargetKey {
                        backend: t.backend.clone(),
                        model: t.model.clone(),
                        version: t.version.clone(),
                    });
                    Some(TargetEntry {
                        state,
                        pool,
                        label_header: header(&t.label),
                        metrics: metrics.target(&route.name, &t.label),
                    })
                })
                .collect::<Box<[_]>>();
            if targets.len() != route.targets.len() {
                continue;
            }
            let mut cascades = HashMap::new();
            let mut ensembles = HashMap::new();
            let mut plan_metrics = HashMap::new();
            for (i, plan) in route.plans.iter().enumerate() {
                let name = route.plan_name(routing::PlanId(i as u16));
                if !matches!(plan, Plan::Target(_)) {
                    plan_metrics.insert(i as u16, metrics.target(&route.name, &name));
                }
                match plan {
                    Plan::Cascade(stages) => {
                        cascades.insert(
                            i as u16,
                            Arc::new(metrics.cascade(&route.name, &name, stages.len())),
                        );
                    }
                    Plan::Ensemble(_) => {
                        ensembles.insert(i as u16, metrics.ensemble(&route.name, &name));
                    }
                    _ => {}
                }
            }
            let shadow = route.shadow.as_ref().map(|sh| {
                let in_flight = kept
                    .shadow_in_flight
                    .lock()
                    .entry(route.name.to_string())
                    .or_default()
                    .clone();
                Arc::new(metrics.shadow(&route.name, &sh.name, in_flight, sh.max_in_flight))
            });
            let cache = route.cache.map(|spec| {
                let key = (
                    route.name.to_string(),
                    (spec.ttl.as_nanos(), spec.max_bytes),
                );
                kept.caches
                    .lock()
                    .entry(key)
                    .or_insert_with(|| {
                        RouteCache::new(spec.ttl, spec.max_bytes, metrics.cache(&route.name))
                    })
                    .clone()
            });
            let entry = RouteEntry {
                name_header: header(&route.name),
                metrics: metrics.route(&route.name),
                route: route.clone(),
                targets,
                cascades,
                ensembles,
                plan_metrics,
                shadow,
                cache,
            };
            routes.insert(route.name.to_string().into_boxed_str(), Arc::new(entry));
        }
        let route_list = table.names().join(", ");
        Self {
            version,
            version_header: header(&version.to_string()),
            routes,
            route_list: if route_list.is_empty() {
                "(none)".into()
            } else {
                route_list
            },
            loaded_at: SystemTime::now(),
            files: policies
                .files
                .iter()
                .map(|f| f.file.display().to_string())
                .collect(),
        }
    }
}
