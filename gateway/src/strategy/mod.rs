//! The multi-model strategies: cascades, ensembles, pipelines, shadow traffic and the
//! response cache (a switch, a first answer choosing the next plan, runs in `execute.rs`).
//!
//! Cascades, ensembles and pipelines run plans through an [`Invoker`], which the gateway implements
//! over its upstreams (`execute.rs`) and tests fake, so every rule here is tested without
//! sockets and under paused time. None of this code knows pingora or HTTP.

pub(crate) mod cache;
pub(crate) mod pipeline;
pub(crate) mod shadow;
pub(crate) mod tensors;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::time::Instant;

use crate::error::GatewayError;
use crate::metrics::CascadeMetrics;
use crate::routing::{Ensemble, PlanId, Stage, TargetId};
use tensors::Tensor;

/// An answer from one plan: the encoded `ModelInferResponse` and what produced it.
#[derive(Debug, Clone)]
pub(crate) struct Answer {
    pub(crate) response: Bytes,
    /// Which of the route's targets or plans answered.
    pub(crate) by: AnsweredBy,
    /// `model/version` of the target that answered, or a description of a combination.
    pub(crate) label: Arc<str>,
    /// The cascade stage that answered and why, when a cascade did.
    pub(crate) cascade: Option<(usize, Verdict)>,
    /// Whether the answer is less than the plan asks for: a fallback target answered, a
    /// cascade answered with its best so far, an ensemble without a failed member. Such an
    /// answer is returned but never cached.
    pub(crate) degraded: bool,
    /// The pipeline that composed the answer, when one did (`x-switchyard-pipeline`).
    pub(crate) pipeline: Option<PlanId>,
    /// The switch that chose the plan that answered and the case it took (`cases.len()`
    /// for its default), when one did (`x-switchyard-switch`).
    pub(crate) switch: Option<(PlanId, u16)>,
    /// The target that was full, when its overflow plan answered (`x-switchyard-overflow`).
    pub(crate) overflow: Option<TargetId>,
}

/// Who answered, by identity within the request's route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AnsweredBy {
    /// One of the route's targets.
    Target(TargetId),
    /// A plan that combined answers, or ran another route.
    Plan(PlanId),
}

/// Runs a plan of the current route to completion.
pub(crate) trait Invoker: Send + Sync {
    /// Runs `plan`, as `part` of a strategy, on the client's request.
    fn run<'a>(
        &'a self,
        plan: PlanId,
        deadline: Instant,
        part: Part<'a>,
    ) -> Pin<Box<dyn Future<Output = Result<Answer, GatewayError>> + Send + 'a>>;

    /// Runs `plan`, as `part` of a strategy, on another request (a pipeline step's).
    fn run_with<'a>(
        &'a self,
        plan: PlanId,
        message: &'a switchyard_proto::wire::InferMessage,
        deadline: Instant,
        part: Part<'a>,
    ) -> Pin<Box<dyn Future<Output = Result<Answer, GatewayError>> + Send + 'a>>;
}

/// What a plan runs as inside a strategy (its span in the request's trace).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part<'a> {
    /// A cascade's stage, 0-based.
    Stage(usize),
    /// An ensemble's member, 0-based.
    Member(usize),
    /// A pipeline's step, 0-based, with its name.
    Step(usize, &'a str),
}

/// Why a cascade answered from the stage it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The stage's answer passed its test.
    Accepted,
    /// The last stage answered.
    Last,
    /// The remaining deadline could not cover the next stage: the best answer so far.
    Deadline,
    /// Later stages failed: the best answer so far.
    Fallback,
}

/// A cascade's answer.
#[derive(Debug, Clone)]
pub(crate) struct CascadeAnswer {
    pub(crate) answer: Answer,
    /// 0-based stage that produced it.
    pub(crate) stage: usize,
    pub(crate) verdict: Verdict,
}

/// A moving average of each stage's (or step's) latency, µs (0: not yet measured), which
/// cascades and pipelines compare with the time left.
#[derive(Debug)]
pub(crate) struct Latencies(Box<[AtomicU64]>);

impl Latencies {
    pub(crate) fn new(n: usize) -> Self {
        Self((0..n).map(|_| AtomicU64::new(0)).collect())
    }

    pub(crate) fn observe(&self, i: usize, took: Duration) {
        let sample = took.as_micros() as u64;
        let slot = &self.0[i];
        let old = slot.load(Ordering::Relaxed);
        // An exponential moving average (1/8 weight on the new sample); a race only
        // loses one sample.
        let new = if old == 0 {
            sample
        } else {
            old - old / 8 + sample / 8
        };
        slot.store(new.max(1), Ordering::Relaxed);
    }

    pub(crate) fn estimate(&self, i: usize) -> Duration {
        Duration::from_micros(self.0[i].load(Ordering::Relaxed))
    }
}

/// Per-stage counters and latency estimates of one cascade.
#[derive(Debug)]
pub(crate) struct CascadeStats {
    pub(crate) metrics: CascadeMetrics,
    latency: Latencies,
}

impl CascadeStats {
    pub(crate) fn new(metrics: CascadeMetrics) -> Self {
        let stages = metrics.answered.len();
        Self {
            metrics,
            latency: Latencies::new(stages),
        }
    }
}

/// Runs stages in order until one's answer passes its test (the last always answers).
/// A failing stage falls through to the next. When the time left cannot cover the next
/// stage's usual latency, the most confident answer so far is returned.
pub(crate) async fn cascade(
    stages: &[Stage],
    invoker: &dyn Invoker,
    deadline: Instant,
    stats: &CascadeStats,
) -> Result<CascadeAnswer, GatewayError> {
    let mut best: Option<(f64, CascadeAnswer)> = None;
    let mut last_error = None;
    let last = stages.len() - 1;
    for (i, stage) in stages.iter().enumerate() {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if let Some((_, b)) = &best
            && (remaining.is_zero() || remaining < stats.latency.estimate(i))
        {
            stats.metrics.skipped_deadline[i].inc();
            return Ok(CascadeAnswer {
                verdict: Verdict::Deadline,
                ..b.clone()
            });
        }
        let started = Instant::now();
        let answer = match invoker.run(stage.plan, deadline, Part::Stage(i)).await {
            Ok(a) => a,
            Err(e) => {
                stats.metrics.failed[i].inc();
                last_error = Some(e);
                continue;
            }
        };
        stats.latency.observe(i, started.elapsed());
        let Some(accept) = stage.accept.as_ref().filter(|_| i < last) else {
            stats.metrics.answered[i].inc();
            return Ok(CascadeAnswer {
                answer,
                stage: i,
                verdict: Verdict::Last,
            });
        };
        let checked = tensors::decode(&answer.response)
            .and_then(|(_, ts)| tensors::confidence(&ts, accept, stage.output.as_deref()));
        match checked {
            Ok((_, true)) => {
                stats.metrics.answered[i].inc();
                return Ok(CascadeAnswer {
                    answer,
                    stage: i,
                    verdict: Verdict::Accepted,
                });
            }
            Ok((confidence, false)) => {
                stats.metrics.escalated[i].inc();
                if best.as_ref().is_none_or(|(c, _)| confidence > *c) {
                    best = Some((
                        confidence,
                        CascadeAnswer {
                            answer,
                            stage: i,
                            verdict: Verdict::Fallback,
                        },
                    ));
                }
            }
            Err(reason) => {
                // An answer the test cannot read is a failed stage.
                stats.metrics.failed[i].inc();
                last_error = Some(GatewayError::UpstreamFailed {
                    route: String::new(),
                    reason: format!("cascade stage {i}: {reason}"),
                });
            }
        }
    }
    match (best, last_error) {
        (Some((_, b)), _) => Ok(b),
        (None, Some(e)) => Err(e),
        (None, None) => Err(GatewayError::UpstreamFailed {
            route: String::new(),
            reason: "the cascade has no stages".into(),
        }),
    }
}

/// Runs the members in parallel and combines the first `quorum` answers; members that
/// fail or exceed `member_timeout` are tolerated down to the quorum. `names` name the
/// members in errors.
pub(crate) async fn ensemble(
    e: &Ensemble,
    invoker: &dyn Invoker,
    deadline: Instant,
    names: &[Arc<str>],
) -> Result<Combined, GatewayError> {
    let mut running: FuturesUnordered<_> = e
        .members
        .iter()
        .enumerate()
        .map(|(i, (plan, _))| {
            let until = e
                .member_timeout
                .map_or(deadline, |t| deadline.min(Instant::now() + t));
            async move {
                let result = match tokio::time::timeout_at(
                    until,
                    invoker.run(*plan, until, Part::Member(i)),
                )
                .await
                {
                    Ok(r) => r,
                    Err(_) => Err(GatewayError::Deadline {
                        route: String::new(),
                        after: until.saturating_duration_since(Instant::now()),
                        detail: String::new(),
                    }),
                };
                (i, result)
            }
        })
        .collect();
    let mut answers: Vec<(usize, Vec<Tensor>, Arc<str>)> = Vec::new();
    let mut id = String::new();
    let mut failed: Vec<String> = Vec::new();
    while let Some((i, result)) = running.next().await {
        let name = names.get(i).map_or("?", |n| n);
        match result.and_then(|a| {
            tensors::decode(&a.response)
                .map(|(resp, ts)| (resp.id, ts, a.label))
                .map_err(|reason| GatewayError::UpstreamFailed {
                    route: String::new(),
                    reason,
                })
        }) {
            Ok((echoed, ts, label)) => {
                id = echoed;
                answers.push((i, ts, label));
            }
            Err(GatewayError::Deadline { .. }) => failed.push(format!("{name}: timed out")),
            Err(err) => failed.push(format!("{name}: {err}")),
        }
        if answers.len() >= e.quorum {
            break;
        }
        if answers.len() + running.len() < e.quorum {
            break;
        }
    }
    drop(running);
    if answers.len() < e.quorum {
        return Err(GatewayError::NoTarget {
            route: String::new(),
            detail: format!(
                "ensemble below quorum: {} of {} needed answered; failed: {}",
                answers.len(),
                e.quorum,
                failed.join("; ")
            ),
        });
    }
    answers.sort_by_key(|(i, _, _)| *i);
    let weighted: Vec<(Vec<Tensor>, f64)> = answers
        .iter()
        .map(|(i, ts, _)| (ts.clone(), e.members[*i].1))
        .collect();
    let combined =
        tensors::combine(&weighted, e.combine).map_err(|reason| GatewayError::UpstreamFailed {
            route: String::new(),
            reason,
        })?;
    Ok(Combined {
        tensors: combined,
        labels: answers.into_iter().map(|(_, _, l)| l).collect(),
        id,
        degraded: !failed.is_empty(),
    })
}

/// An ensemble's combined outputs.
#[derive(Debug)]
pub(crate) struct Combined {
    pub(crate) tensors: Vec<Tensor>,
    /// Labels of the members that answered, in member order.
    pub(crate) labels: Vec<Arc<str>>,
    /// The request id the members echoed.
    pub(crate) id: String,
    /// Whether a member failed (the quorum answered without it).
    pub(crate) degraded: bool,
}
#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;
    use std::sync::atomic::AtomicUsize;

    use super::tensors::{encode, tests::probs};
    use super::*;
    use crate::routing::{Accept, Combine};
    use prometheus::IntCounter;

    /// A scripted invoker: per plan, a delay and an answer (probabilities) or an error.
    pub(crate) struct Fake {
        pub(crate) script: HashMap<u16, (Duration, Result<Vec<f64>, String>)>,
        pub(crate) calls: Vec<AtomicUsize>,
    }

    /// Per plan: its id, a delay in ms and an answer or an error.
    type Script<'a> = Vec<(u16, u64, Result<Vec<f64>, &'a str>)>;

    impl Fake {
        pub(crate) fn new(script: Script<'_>) -> Self {
            let calls = (0..16).map(|_| AtomicUsize::new(0)).collect();
            let script = script
                .into_iter()
                .map(|(p, ms, r)| (p, (Duration::from_millis(ms), r.map_err(str::to_owned))))
                .collect();
            Self { script, calls }
        }
        pub(crate) fn calls(&self, plan: u16) -> usize {
            self.calls[plan as usize].load(Ordering::SeqCst)
        }
    }

    impl Invoker for Fake {
        fn run<'a>(
            &'a self,
            plan: PlanId,
            deadline: Instant,
            _: Part<'a>,
        ) -> Pin<Box<dyn Future<Output = Result<Answer, GatewayError>> + Send + 'a>> {
            self.calls[plan.0 as usize].fetch_add(1, Ordering::SeqCst);
            let (delay, result) = self.script[&plan.0].clone();
            Box::pin(async move {
                if Instant::now() + delay > deadline {
                    tokio::time::sleep_until(deadline).await;
                    return Err(GatewayError::Deadline {
                        route: "r".into(),
                        after: delay,
                        detail: String::new(),
                    });
                }
                tokio::time::sleep(delay).await;
                match result {
                    Ok(row) => Ok(Answer {
                        response: encode("m", &plan.0.to_string(), "", &probs(&[&row])),
                        by: AnsweredBy::Plan(plan),
                        label: format!("m/{}", plan.0).into(),
                        cascade: None,
                        degraded: false,
                        pipeline: None,
                        switch: None,
                        overflow: None,
                    }),
                    Err(e) => Err(GatewayError::Upstream {
                        code: 14,
                        message: e,
                    }),
                }
            })
        }

        fn run_with<'a>(
            &'a self,
            plan: PlanId,
            _: &'a switchyard_proto::wire::InferMessage,
            deadline: Instant,
            part: Part<'a>,
        ) -> Pin<Box<dyn Future<Output = Result<Answer, GatewayError>> + Send + 'a>> {
            self.run(plan, deadline, part)
        }
    }

    fn stats(n: usize) -> CascadeStats {
        CascadeStats::new(crate::metrics::CascadeMetrics::new(n, &|i, what| {
            IntCounter::new(format!("c_{i}_{what}"), "test").unwrap()
        }))
    }

    fn stages(threshold: f64) -> Vec<Stage> {
        vec![
            Stage {
                plan: PlanId(0),
                accept: Some(Accept::MaxProbability(threshold)),
                output: None,
            },
            Stage {
                plan: PlanId(1),
                accept: None,
                output: None,
            },
        ]
    }

    #[tokio::test(start_paused = true)]
    async fn a_cascade_stops_at_the_threshold() {
        let fake = Fake::new(vec![
            (0, 5, Ok(vec![0.95, 0.05])),
            (1, 50, Ok(vec![0.2, 0.8])),
        ]);
        let s = stats(2);
        let a = cascade(
            &stages(0.9),
            &fake,
            Instant::now() + Duration::from_secs(1),
            &s,
        )
        .await
        .unwrap();
        assert_eq!((a.stage, a.verdict), (0, Verdict::Accepted));
        assert_eq!(fake.calls(1), 0, "the big model never ran");
        assert_eq!(s.metrics.answered[0].get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cascade_escalates_below_the_threshold_and_on_errors() {
        let fake = Fake::new(vec![
            (0, 5, Ok(vec![0.6, 0.4])),
            (1, 50, Ok(vec![0.2, 0.8])),
        ]);
        let s = stats(2);
        let a = cascade(
            &stages(0.9),
            &fake,
            Instant::now() + Duration::from_secs(1),
            &s,
        )
        .await
        .unwrap();
        assert_eq!(
            (a.stage, a.verdict, &*a.answer.label),
            (1, Verdict::Last, "m/1")
        );
        assert_eq!(
            (s.metrics.escalated[0].get(), s.metrics.answered[1].get()),
            (1, 1)
        );

        let failing = Fake::new(vec![(0, 5, Err("down")), (1, 50, Ok(vec![0.2, 0.8]))]);
        let s = stats(2);
        let a = cascade(
            &stages(0.9),
            &failing,
            Instant::now() + Duration::from_secs(1),
            &s,
        )
        .await
        .unwrap();
        assert_eq!(a.stage, 1, "a failing stage falls through");
        assert_eq!(s.metrics.failed[0].get(), 1);

        let last_fails = Fake::new(vec![(0, 5, Ok(vec![0.6, 0.4])), (1, 50, Err("down"))]);
        let a = cascade(
            &stages(0.9),
            &last_fails,
            Instant::now() + Duration::from_secs(1),
            &stats(2),
        )
        .await
        .unwrap();
        assert_eq!(
            (a.stage, a.verdict),
            (0, Verdict::Fallback),
            "the best answer so far"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_cascade_that_cannot_make_the_deadline_returns_the_best_so_far() {
        let fake = Fake::new(vec![
            (0, 5, Ok(vec![0.6, 0.4])),
            (1, 80, Ok(vec![0.2, 0.8])),
        ]);
        let s = stats(2);
        // Teach the estimate that stage 1 takes 80 ms.
        cascade(
            &stages(0.9),
            &fake,
            Instant::now() + Duration::from_secs(1),
            &s,
        )
        .await
        .unwrap();
        let a = cascade(
            &stages(0.9),
            &fake,
            Instant::now() + Duration::from_millis(40),
            &s,
        )
        .await
        .unwrap();
        assert_eq!((a.stage, a.verdict), (0, Verdict::Deadline));
        assert_eq!(s.metrics.skipped_deadline[1].get(), 1);
        assert_eq!(fake.calls(1), 1, "stage 1 ran only the first time");
    }

    fn ensemble_of(quorum: usize, timeout_ms: Option<u64>) -> Ensemble {
        Ensemble {
            members: vec![(PlanId(0), 1.0), (PlanId(1), 1.0), (PlanId(2), 1.0)].into(),
            combine: Combine::Mean,
            quorum,
            member_timeout: timeout_ms.map(Duration::from_millis),
        }
    }

    fn names() -> Vec<Arc<str>> {
        vec!["a".into(), "b".into(), "c".into()]
    }

    #[tokio::test(start_paused = true)]
    async fn an_ensemble_runs_members_in_parallel_and_combines() {
        let fake = Fake::new(vec![
            (0, 30, Ok(vec![0.6, 0.4])),
            (1, 50, Ok(vec![0.2, 0.8])),
            (2, 40, Ok(vec![0.4, 0.6])),
        ]);
        let start = Instant::now();
        let Combined {
            tensors: out,
            labels,
            ..
        } = ensemble(
            &ensemble_of(3, None),
            &fake,
            start + Duration::from_secs(1),
            &names(),
        )
        .await
        .unwrap();
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(50),
            "the slowest member, not the sum"
        );
        assert!((out[0].values[0] - 0.4).abs() < 1e-6 && (out[0].values[1] - 0.6).abs() < 1e-6);
        assert_eq!(labels.len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn an_ensemble_answers_at_quorum_and_tolerates_failures_down_to_it() {
        let fake = Fake::new(vec![
            (0, 10, Ok(vec![0.6, 0.4])),
            (1, 500, Ok(vec![0.2, 0.8])),
            (2, 20, Err("down")),
        ]);
        let start = Instant::now();
        let err = ensemble(
            &ensemble_of(3, None),
            &fake,
            start + Duration::from_secs(1),
            &names(),
        )
        .await
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("ensemble below quorum: 1 of 3 needed answered; failed: c: down"),
            "{err}"
        );
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(20),
            "gives up as soon as the quorum is out of reach"
        );

        let fast = Fake::new(vec![
            (0, 10, Ok(vec![0.6, 0.4])),
            (1, 500, Ok(vec![0.2, 0.8])),
            (2, 20, Ok(vec![0.8, 0.2])),
        ]);
        let start = Instant::now();
        let out = ensemble(
            &ensemble_of(2, None),
            &fast,
            start + Duration::from_secs(1),
            &names(),
        )
        .await
        .unwrap()
        .tensors;
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(20),
            "answers at the quorum without the slow member"
        );
        assert!((out[0].values[0] - 0.7).abs() < 1e-6);
    }

    #[tokio::test(start_paused = true)]
    async fn a_member_timeout_counts_as_a_failure() {
        let fake = Fake::new(vec![
            (0, 10, Ok(vec![0.6, 0.4])),
            (1, 500, Ok(vec![0.2, 0.8])),
            (2, 20, Ok(vec![0.4, 0.6])),
        ]);
        let err = ensemble(
            &ensemble_of(3, Some(100)),
            &fake,
            Instant::now() + Duration::from_secs(1),
            &names(),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("b: timed out"), "{err}");
        let out = ensemble(
            &ensemble_of(2, Some(100)),
            &fake,
            Instant::now() + Duration::from_secs(1),
            &names(),
        )
        .await
        .unwrap()
        .tensors;
        assert!((out[0].values[0] - 0.5).abs() < 1e-6);
    }
}
