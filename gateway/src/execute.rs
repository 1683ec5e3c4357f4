//! Runs a route's plans over the real upstreams: the gateway's [`Invoker`]. A target runs
//! through `invoke` (breakers, deadline), a split resolves and runs its member, a cascade
//! and an ensemble run their strategies, and a route reference runs that route's decision.
//!
//! The executor owns what it needs (`Arc`s and a copy of the message and headers), so a
//! shadow copy can run on it after the primary's request has finished.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use tokio::time::Instant;

use crate::Shared;
use crate::error::GatewayError;
use crate::invoke::{self, How};
use crate::routing::{Decision, Plan, PlanId, Reason};
use crate::snapshot::{RouteEntry, Snapshot};
use crate::strategy::{self, Answer, Invoker, Verdict, tensors};
use crate::wire::InferMessage;

/// Route references may chain (validation rejects cycles); this bounds them anyway.
const MAX_ROUTE_DEPTH: u8 = 8;

/// One request's plans, run against one snapshot.
#[derive(Clone)]
pub(crate) struct Executor {
    pub(crate) shared: Arc<Shared>,
    pub(crate) snapshot: Arc<Snapshot>,
    pub(crate) entry: Arc<RouteEntry>,
    pub(crate) message: Arc<InferMessage>,
    pub(crate) headers: Arc<HeaderMap>,
    /// Feeds splits without a sticky key.
    pub(crate) random: u64,
    /// The request's whole budget (for deadline messages).
    pub(crate) total: Duration,
    /// Whether this runs a shadow copy.
    pub(crate) shadow: bool,
    depth: u8,
}

impl Executor {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        shared: Arc<Shared>,
        snapshot: Arc<Snapshot>,
        entry: Arc<RouteEntry>,
        message: Arc<InferMessage>,
        headers: Arc<HeaderMap>,
        random: u64,
        total: Duration,
    ) -> Self {
        Self {
            shared,
            snapshot,
            entry,
            message,
            headers,
            random,
            total,
            shadow: false,
            depth: 0,
        }
    }

    /// The same request as a shadow copy (marked for the backends).
    pub(crate) fn as_shadow(&self) -> Self {
        Self {
            shadow: true,
            ..self.clone()
        }
    }

    /// Runs a top-level decision: a target with the route's fallbacks, anything else by
    /// its strategy.
    pub(crate) async fn decided(
        &self,
        decision: &Decision,
        deadline: Instant,
    ) -> Result<Answer, GatewayError> {
        match decision.target {
            Some(_) => self.target(decision, deadline, true).await,
            None => self.plan(decision.plan, deadline).await,
        }
    }

    async fn target(
        &self,
        decision: &Decision,
        deadline: Instant,
        fallback: bool,
    ) -> Result<Answer, GatewayError> {
        let e = &self.shared;
        let how = How {
            fallback,
            shadow: self.shadow,
        };
        match invoke::infer(
            &e.upstreams,
            &e.budget,
            &self.entry,
            decision,
            &self.message,
            deadline,
            self.total,
            how,
        )
        .await
        {
            Ok(a) => Ok(Answer {
                response: a.response,
                label: self.entry.route.target(a.target).label.clone(),
                cascade: None,
            }),
            Err(f) => Err(f.error),
        }
    }

    async fn plan(&self, plan: PlanId, deadline: Instant) -> Result<Answer, GatewayError> {
        let route = &self.entry.route;
        match route.plan(plan) {
            Plan::Target(t) => {
                let decision = Decision {
                    plan,
                    target: Some(*t),
                    split: None,
                    reason: Reason::Default,
                    draw: None,
                };
                self.target(&decision, deadline, false).await
            }
            Plan::Split(_) => {
                let entry = &self.entry;
                let decision =
                    route.resolve(plan, Reason::Default, &self.headers, self.random, &|t| {
                        entry.available(t)
                    });
                match decision.target {
                    Some(_) => self.target(&decision, deadline, false).await,
                    None => self.run(decision.plan, deadline).await,
                }
            }
            Plan::Cascade(stages) => {
                let stats = self
                    .entry
                    .cascades
                    .get(&plan.0)
                    .cloned()
                    .ok_or_else(|| self.internal("cascade without statistics"))?;
                let c = strategy::cascade(stages, self, deadline, &stats)
                    .await
                    .map_err(|e| e.in_route(&route.name))?;
                Ok(Answer {
                    cascade: Some((c.stage, c.verdict)),
                    ..c.answer
                })
            }
            Plan::Ensemble(ensemble) => {
                let counters = self
                    .entry
                    .ensembles
                    .get(&plan.0)
                    .ok_or_else(|| self.internal("ensemble without counters"))?;
                let names: Vec<Arc<str>> = ensemble
                    .members
                    .iter()
                    .map(|(m, _)| route.plan_name(*m))
                    .collect();
                match strategy::ensemble(ensemble, self, deadline, &names).await {
                    Ok(c) => {
                        counters[0].inc();
                        let label: Arc<str> =
                            format!("{}({})", route.plan_name(plan), c.labels.join(",")).into();
                        Ok(Answer {
                            response: tensors::encode(
                                &self.message.model_name,
                                "",
                                &c.id,
                                &c.tensors,
                            ),
                            label,
                            cascade: None,
                        })
                    }
                    Err(e) => {
                        counters[if matches!(e, GatewayError::NoTarget { .. }) {
                            1
                        } else {
                            2
                        }]
                        .inc();
                        Err(e.in_route(&route.name))
                    }
                }
            }
            Plan::Route(name) => self.other_route(name, deadline).await,
        }
    }

    /// Runs another route's decision for the same request.
    async fn other_route(&self, name: &str, deadline: Instant) -> Result<Answer, GatewayError> {
        if self.depth >= MAX_ROUTE_DEPTH {
            return Err(self.internal(&format!(
                "route references nest deeper than {MAX_ROUTE_DEPTH} at '{name}'"
            )));
        }
        let entry = self
            .snapshot
            .routes
            .get(name)
            .cloned()
            .ok_or_else(|| self.internal(&format!("route '{name}' is not loaded")))?;
        let decision = entry
            .route
            .decide(&self.headers, "", self.random, &|t| entry.available(t))?;
        let inner = Self {
            entry,
            depth: self.depth + 1,
            ..self.clone()
        };
        match decision.target {
            Some(_) => inner.target(&decision, deadline, false).await,
            None => inner.run(decision.plan, deadline).await,
        }
    }

    fn internal(&self, what: &str) -> GatewayError {
        GatewayError::UpstreamFailed {
            route: self.entry.route.name.to_string(),
            reason: what.to_owned(),
        }
    }
}

impl Invoker for Executor {
    fn run(
        &self,
        plan: PlanId,
        deadline: Instant,
    ) -> Pin<Box<dyn Future<Output = Result<Answer, GatewayError>> + Send + '_>> {
        Box::pin(self.plan(plan, deadline))
    }
}

/// The value of `x-switchyard-cascade`: the verdict of the stage that answered.
pub(crate) fn verdict_label(v: Verdict) -> &'static str {
    match v {
        Verdict::Accepted => "accepted",
        Verdict::Last => "last",
        Verdict::Deadline => "deadline",
        Verdict::Fallback => "fallback",
    }
}
