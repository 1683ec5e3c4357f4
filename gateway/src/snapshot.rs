//! The snapshot: everything a request needs, built whole at (re)load and swapped in one
//! `ArcSwap` store. A request loads it once and never sees two policy versions.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use http::HeaderValue;
use switchyard_config::{GatewayConfig, PolicySet};

use crate::metrics::{Metrics, RouteMetrics, TargetMetrics};
use crate::routing::{self, Route, TargetId};
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
}

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
            let entry = RouteEntry {
                name_header: header(&route.name),
                metrics: metrics.route(&route.name),
                route: route.clone(),
                targets,
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
