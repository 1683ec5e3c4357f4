//! Runs a route's plans over the real upstreams: the gateway's [`Invoker`]. A target runs
//! through `upstream::attempt` (breakers, retries, deadline), a split resolves and runs its
//! member, a cascade and an ensemble run their strategies, and a route reference runs that
//! route's decision.
//!
//! The executor borrows the request (message, headers, snapshot), so the single-target
//! case, the cheapest, copies nothing. A shadow copy outlives the request: it owns a
//! [`ShadowCopy`] of what it needs and runs an executor over that.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use http::HeaderMap;
use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;
use tokio::time::Instant;

use crate::Shared;
use crate::error::GatewayError;
use crate::grpc::infer::InferMessage;
use crate::routing::{Class, Decision, Plan, PlanId, Reason, remix};
use crate::snapshot::{RouteEntry, Snapshot};
use crate::strategy::{self, Answer, AnsweredBy, Invoker, Part, Verdict, tensors};
use crate::trace::{self, Cx};
use crate::upstream::Upstreams;
use crate::upstream::attempt::{self, Deadline, Failure, Options, Upstream};

/// Route references may chain (validation rejects cycles); this bounds them anyway.
const MAX_ROUTE_DEPTH: u8 = 8;

/// One request's plans, run against one snapshot.
#[derive(Clone, Copy)]
pub(crate) struct Executor<'a> {
    pub(crate) upstream: Upstream<'a, Upstreams>,
    pub(crate) snapshot: &'a Snapshot,
    pub(crate) entry: &'a RouteEntry,
    pub(crate) message: &'a InferMessage,
    pub(crate) headers: &'a HeaderMap,
    /// Feeds splits without a sticky key; each nested split draws from a remix of it.
    pub(crate) random: u64,
    pub(crate) deadline: Deadline,
    /// Whether this runs a shadow copy (marked for the backends).
    pub(crate) shadow: bool,
    /// The request's priority class: how full an endpoint may be for it.
    pub(crate) class: Class,
    /// Where this run's spans hang in the request's trace.
    pub(crate) trace: Cx<'a>,
    depth: u8,
}

impl<'a> Executor<'a> {
    /// The primary run of a request on `entry`.
    pub(crate) fn new(
        shared: &'a Shared,
        snapshot: &'a Snapshot,
        entry: &'a RouteEntry,
        request: (&'a InferMessage, &'a HeaderMap),
        random: u64,
        deadline: Deadline,
    ) -> Self {
        Self {
            upstream: Upstream {
                call: &shared.upstreams,
                budget: &shared.budget,
            },
            snapshot,
            entry,
            message: request.0,
            headers: request.1,
            random,
            deadline,
            shadow: false,
            class: entry
                .route
                .priority
                .as_ref()
                .map_or(Class::ONLY, |p| p.class(request.1)),
            trace: Cx::default(),
            depth: 0,
        }
    }

    /// The same run, with its spans under `trace`.
    pub(crate) fn traced<'b>(self, trace: Cx<'b>) -> Executor<'b>
    where
        'a: 'b,
    {
        Executor { trace, ..self }
    }

    /// Runs a top-level decision: a target with the route's fallbacks, anything else by
    /// its strategy. A failure names the target last tried, when one was.
    pub(crate) async fn decided(&self, decision: &Decision) -> Result<Answer, Failure> {
        let result = match decision.target {
            Some(_) => self.target(decision, self.deadline, true).await,
            // A strategy's future is boxed: a single target's path does not carry the
            // size of every strategy's state (futures are moved whole).
            None => Box::pin(self.plan(decision.plan, self.deadline.at))
                .await
                .map_err(|error| Failure {
                    error,
                    target: None,
                }),
        };
        if let Err(Failure {
            error: GatewayError::Saturated { .. },
            ..
        }) = &result
            && let Some(shed) = self.entry.metrics.shed.get(usize::from(self.class.index))
        {
            shed.inc();
        }
        result
    }

    async fn target(
        &self,
        decision: &Decision,
        deadline: Deadline,
        fallback: bool,
    ) -> Result<Answer, Failure> {
        let options = Options {
            fallback,
            shadow: self.shadow,
            class: self.class,
            trace: self.trace,
        };
        let result = attempt::infer(
            self.upstream,
            self.entry,
            decision,
            self.message,
            deadline,
            options,
        )
        .await;
        let a = match result {
            Ok(a) => a,
            Err(failure) => return self.overflow(failure, deadline).await,
        };
        Ok(Answer {
            response: a.response,
            by: AnsweredBy::Target(a.target),
            label: self.entry.route.target(a.target).label.clone(),
            cascade: None,
            degraded: decision.target != Some(a.target),
            pipeline: None,
            switch: None,
            overflow: None,
        })
    }

    /// A target whose pool is full hands the request to its overflow plan, if it has one;
    /// any other failure stands.
    async fn overflow(&self, failure: Failure, deadline: Deadline) -> Result<Answer, Failure> {
        let (GatewayError::Saturated { .. }, Some(full)) = (&failure.error, failure.target) else {
            return Err(failure);
        };
        let Some(plan) = self.entry.route.target(full).overflow else {
            return Err(failure);
        };
        if self.depth >= MAX_ROUTE_DEPTH {
            return Err(failure);
        }
        self.entry.target(full).metrics.overflow.inc();
        let inner = Self {
            depth: self.depth + 1,
            ..*self
        };
        // Boxed: the overflow may be any plan, this target's own path included.
        let answer = Box::pin(inner.plan(plan, deadline.at))
            .await
            .map_err(|error| Failure {
                error,
                target: Some(full),
            })?;
        Ok(Answer {
            degraded: true,
            overflow: Some(full),
            ..answer
        })
    }

    /// A nested plan's own target, without fallbacks.
    async fn member(&self, decision: &Decision, until: Instant) -> Result<Answer, GatewayError> {
        let deadline = Deadline {
            at: until.min(self.deadline.at),
            ..self.deadline
        };
        self.target(decision, deadline, false)
            .await
            .map_err(|f| f.error)
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
                self.member(&decision, deadline).await
            }
            Plan::Split(_) => {
                let entry = self.entry;
                // A split nested in a cascade, an ensemble or a shadow plan draws afresh:
                // the request's own number already chose the outer plan.
                let random = remix(self.random ^ u64::from(plan.0));
                let decision = route.resolve(plan, Reason::Default, self.headers, random, &|t| {
                    entry.available(t)
                });
                match decision.target {
                    Some(_) => self.member(&decision, deadline).await,
                    None => self.boxed(decision.plan, deadline).await,
                }
            }
            Plan::Cascade(stages) => {
                let stats = self
                    .entry
                    .cascade(plan)
                    .ok_or_else(|| self.internal("cascade without statistics"))?;
                let c = strategy::cascade(stages, self, deadline, stats)
                    .await
                    .map_err(|e| e.in_route(&route.name))?;
                let degraded = matches!(c.verdict, Verdict::Deadline | Verdict::Fallback);
                Ok(Answer {
                    cascade: Some((c.stage, c.verdict)),
                    degraded: c.answer.degraded || degraded,
                    ..c.answer
                })
            }
            Plan::Ensemble(ensemble) => {
                let runtime = self
                    .entry
                    .ensemble(plan)
                    .ok_or_else(|| self.internal("ensemble without counters"))?;
                match strategy::ensemble(ensemble, self, deadline, &runtime.member_names).await {
                    Ok(c) => {
                        runtime.counters.ok.inc();
                        let label: Arc<str> =
                            format!("{}({})", runtime.name, c.labels.join(",")).into();
                        Ok(Answer {
                            response: tensors::encode(
                                &self.message.model_name,
                                "",
                                &c.id,
                                &c.tensors,
                            ),
                            by: AnsweredBy::Plan(plan),
                            label,
                            cascade: None,
                            degraded: c.degraded,
                            pipeline: None,
                            switch: None,
                            overflow: None,
                        })
                    }
                    Err(e) => {
                        if matches!(e, GatewayError::NoTarget { .. }) {
                            runtime.counters.below_quorum.inc();
                        } else {
                            runtime.counters.error.inc();
                        }
                        Err(e.in_route(&route.name))
                    }
                }
            }
            Plan::Pipeline(p) => {
                let runtime = self
                    .entry
                    .pipeline(plan)
                    .ok_or_else(|| self.internal("pipeline without statistics"))?;
                let done = strategy::pipeline::pipeline(
                    p,
                    plan,
                    &runtime.name,
                    self,
                    self.message,
                    deadline,
                    &runtime.stats,
                )
                .await
                .map_err(|e| e.in_route(&route.name))?;
                Ok(Answer {
                    label: format!("{}({})", runtime.name, done.labels.join(">")).into(),
                    ..done.answer
                })
            }
            Plan::Switch(sw) => {
                let runtime = self
                    .entry
                    .switch(plan)
                    .ok_or_else(|| self.internal("switch without counters"))?;
                let what = || format!("switch '{}' on '{}'", runtime.name, route.plan_name(sw.on));
                let first = match self.boxed(sw.on, deadline).await {
                    Ok(a) => a,
                    Err(e) => {
                        runtime.metrics.error.inc();
                        return Err(e.in_step(&what()).in_route(&route.name));
                    }
                };
                let case = match tensors::decode(&first.response)
                    .and_then(|(_, ts)| tensors::first_case(&ts, sw.output.as_deref(), &sw.cases))
                {
                    Ok(case) => case,
                    Err(reason) => {
                        runtime.metrics.error.inc();
                        return Err(GatewayError::UpstreamFailed {
                            route: route.name.to_string(),
                            reason: format!("{}: {reason}", what()),
                        });
                    }
                };
                let (index, chosen) = match case {
                    Some(i) => (i, sw.cases[i].plan),
                    None => (sw.cases.len(), sw.default),
                };
                runtime.metrics.cases[index].inc();
                let answer = if chosen == sw.on {
                    first
                } else {
                    let name = route.plan_name(chosen);
                    self.boxed(chosen, deadline).await.map_err(|e| {
                        e.in_step(&format!("switch '{}' case plan '{name}'", runtime.name))
                            .in_route(&route.name)
                    })?
                };
                Ok(Answer {
                    by: AnsweredBy::Plan(plan),
                    switch: Some((plan, index as u16)),
                    ..answer
                })
            }
            Plan::Route(name) => {
                let answer = self.other_route(name, plan, deadline).await?;
                // The other route's targets are not this route's: the reference answered.
                Ok(Answer {
                    by: AnsweredBy::Plan(plan),
                    ..answer
                })
            }
        }
    }

    /// Runs another route's decision for the same request.
    async fn other_route(
        &self,
        name: &str,
        plan: PlanId,
        deadline: Instant,
    ) -> Result<Answer, GatewayError> {
        if self.depth >= MAX_ROUTE_DEPTH {
            return Err(self.internal(&format!(
                "route references nest deeper than {MAX_ROUTE_DEPTH} at '{name}'"
            )));
        }
        let entry = self
            .snapshot
            .routes
            .get(name)
            .ok_or_else(|| self.internal(&format!("route '{name}' is not loaded")))?;
        let random = remix(self.random ^ u64::from(plan.0));
        let decision = entry
            .route
            .decide(self.headers, "", random, &|t| entry.available(t))?;
        let inner = Self {
            entry,
            random,
            depth: self.depth + 1,
            ..*self
        };
        match decision.target {
            Some(_) => inner.member(&decision, deadline).await,
            None => inner.boxed(decision.plan, deadline).await,
        }
    }

    /// A nested plan, boxed: plans nest (a cascade's stage may be a split of cascades).
    fn boxed(
        &self,
        plan: PlanId,
        deadline: Instant,
    ) -> Pin<Box<dyn Future<Output = Result<Answer, GatewayError>> + Send + '_>> {
        Box::pin(self.plan(plan, deadline))
    }

    /// Runs `plan` as `part` of a strategy, in a span of its own when the request is
    /// traced.
    async fn part(
        &self,
        plan: PlanId,
        deadline: Instant,
        part: Part<'_>,
    ) -> Result<Answer, GatewayError> {
        let route = &self.entry.route;
        let span = self.trace.child(
            || match part {
                Part::Stage(i) => format!("cascade stage {}", i + 1),
                Part::Member(i) => format!("ensemble member {}", i + 1),
                Part::Step(_, name) => format!("pipeline step {name}"),
            },
            SpanKind::Internal,
            || {
                let mut a = vec![KeyValue::new(
                    "switchyard.plan",
                    route.plan_name(plan).to_string(),
                )];
                match part {
                    Part::Stage(i) => {
                        a.push(KeyValue::new("switchyard.cascade.stage", i as i64 + 1))
                    }
                    Part::Member(i) => {
                        a.push(KeyValue::new("switchyard.ensemble.member", i as i64 + 1))
                    }
                    Part::Step(i, name) => {
                        a.push(KeyValue::new("switchyard.pipeline.step", i as i64 + 1));
                        a.push(KeyValue::new(
                            "switchyard.pipeline.step_name",
                            name.to_owned(),
                        ));
                    }
                }
                a
            },
        );
        let Some(cx) = trace::context(&span) else {
            return self.plan(plan, deadline).await;
        };
        let inner = Executor {
            trace: self.trace.under(&cx),
            ..*self
        };
        let result = inner.plan(plan, deadline).await;
        trace::end(
            span,
            || match &result {
                Ok(a) => vec![
                    KeyValue::new("switchyard.answered_by", a.label.to_string()),
                    KeyValue::new("switchyard.outcome", "ok"),
                ],
                Err(e) => vec![KeyValue::new("switchyard.outcome", e.outcome().label())],
            },
            result.as_ref().err().map(|e| e.outcome().label()),
        );
        result
    }

    fn internal(&self, what: &str) -> GatewayError {
        GatewayError::UpstreamFailed {
            route: self.entry.route.name.to_string(),
            reason: what.to_owned(),
        }
    }
}

impl Invoker for Executor<'_> {
    fn run<'b>(
        &'b self,
        plan: PlanId,
        deadline: Instant,
        part: Part<'b>,
    ) -> Pin<Box<dyn Future<Output = Result<Answer, GatewayError>> + Send + 'b>> {
        Box::pin(self.part(plan, deadline, part))
    }

    fn run_with<'b>(
        &'b self,
        plan: PlanId,
        message: &'b InferMessage,
        deadline: Instant,
        part: Part<'b>,
    ) -> Pin<Box<dyn Future<Output = Result<Answer, GatewayError>> + Send + 'b>> {
        Box::pin(async move {
            let step = Executor { message, ..*self };
            step.part(plan, deadline, part).await
        })
    }
}

/// What a shadow copy owns to run after its request has been answered.
pub(crate) struct ShadowCopy {
    pub(crate) shared: Arc<Shared>,
    pub(crate) snapshot: Arc<Snapshot>,
    pub(crate) entry: Arc<RouteEntry>,
    pub(crate) message: InferMessage,
    pub(crate) headers: HeaderMap,
    pub(crate) random: u64,
    pub(crate) deadline: Deadline,
    /// The request's span, when it is traced: the copy's span hangs under it.
    pub(crate) trace: Option<opentelemetry::trace::SpanContext>,
}

impl ShadowCopy {
    /// Runs `plan` as a shadow: marked for the backends, with its own draws.
    pub(crate) async fn run(self, plan: PlanId) -> Result<Answer, GatewayError> {
        let tracing = self.shared.tracing.as_ref();
        let request = Cx::new(tracing, self.trace.as_ref(), None);
        let span = request.child(
            || "shadow copy".to_owned(),
            SpanKind::Internal,
            || {
                vec![KeyValue::new(
                    "switchyard.shadow.plan",
                    self.entry.route.plan_name(plan).to_string(),
                )]
            },
        );
        let span_cx = trace::context(&span);
        let exec = Executor {
            trace: Cx::new(tracing, span_cx.as_ref(), None),
            shadow: true,
            // A shadow copy gets the lowest class's room: a full pool refuses it first.
            class: Class::ONLY,
            ..Executor::new(
                &self.shared,
                &self.snapshot,
                &self.entry,
                (&self.message, &self.headers),
                // The request's number decided that this copy runs; its splits draw anew.
                remix(self.random),
                self.deadline,
            )
        };
        let result = exec.plan(plan, self.deadline.at).await;
        trace::end(
            span,
            || {
                vec![KeyValue::new(
                    "switchyard.outcome",
                    match &result {
                        Ok(_) => "ok",
                        Err(e) => e.outcome().label(),
                    },
                )]
            },
            result.as_ref().err().map(|e| e.outcome().label()),
        );
        result
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
