//! Shadow traffic: a sampled copy of a request runs on the shadow plan in the background,
//! bounded in concurrency, and its answer is compared with the primary's (top-1 agreement,
//! largest absolute difference per output, latency difference). The primary never waits
//! for it and never sees it.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{Answer, tensors};
use crate::error::GatewayError;
use crate::metrics::ShadowMetrics;

/// The metrics of one route's shadow, plus its in-flight bound.
#[derive(Debug)]
pub(crate) struct ShadowStats {
    pub(crate) metrics: ShadowMetrics,
    /// Shared across reloads of the route, so a reload cannot double the bound.
    pub(crate) in_flight: Arc<AtomicU32>,
    pub(crate) max_in_flight: u32,
}

/// Comparisons a rollout's `shadow_agreement` gate counts: those of its baseline's
/// requests with the candidate's shadow answers (an answer that cannot be compared is a
/// disagreement: the candidate did not give the baseline's answer).
#[derive(Debug, Default)]
pub(crate) struct Agreement {
    pub(crate) agree: AtomicU64,
    pub(crate) disagree: AtomicU64,
}

/// Whether a request is sampled: `random` against a threshold out of 2^32.
pub(crate) fn sampled(threshold: u64, random: u64) -> bool {
    (random >> 32) < threshold
}

/// What the primary reports to its shadow: its answer and how long it took.
pub(crate) type PrimaryReport = oneshot::Sender<(Bytes, Duration)>;

/// Starts a shadow run of `call` unless `max_in_flight` copies are running (then the copy
/// is dropped and counted). Returns the sender the primary reports its answer on, or
/// `None` when dropped. The primary never awaits anything of the shadow.
pub(crate) fn start<F>(
    stats: Arc<ShadowStats>,
    gate: Option<Arc<Agreement>>,
    call: F,
) -> Option<PrimaryReport>
where
    F: Future<Output = Result<Answer, GatewayError>> + Send + 'static,
{
    let admitted = stats
        .in_flight
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < stats.max_in_flight).then_some(n + 1)
        });
    if admitted.is_err() {
        stats.metrics.dropped.inc();
        return None;
    }
    let (report, primary) = oneshot::channel::<(Bytes, Duration)>();
    tokio::spawn(async move {
        // Let the primary's request go out first.
        tokio::task::yield_now().await;
        let started = Instant::now();
        let result = call.await;
        let took = started.elapsed();
        match result {
            Err(_) => stats.metrics.error.inc(),
            Ok(answer) => {
                stats.metrics.ok.inc();
                // A primary that failed sends nothing: there is nothing to compare.
                if let Ok((primary_response, primary_took)) = primary.await {
                    record(
                        &stats,
                        gate.as_deref(),
                        &primary_response,
                        &answer.response,
                        primary_took,
                        took,
                    );
                }
            }
        }
        stats.in_flight.fetch_sub(1, Ordering::AcqRel);
    });
    Some(report)
}

fn record(
    stats: &ShadowStats,
    gate: Option<&Agreement>,
    primary: &Bytes,
    shadow: &Bytes,
    primary_took: Duration,
    shadow_took: Duration,
) {
    let compared = tensors::decode(primary)
        .and_then(|(_, p)| tensors::decode(shadow).and_then(|(_, s)| tensors::compare(&p, &s)));
    if let Some(gate) = gate {
        let agreed = compared.as_ref().is_ok_and(|c| c.agree);
        let counter = if agreed { &gate.agree } else { &gate.disagree };
        counter.fetch_add(1, Ordering::Relaxed);
    }
    match compared {
        Ok(c) => {
            if c.agree {
                stats.metrics.agree.inc()
            } else {
                stats.metrics.disagree.inc()
            }
            if let Some(d) = c.max_abs_diff.iter().map(|(_, d)| *d).reduce(f64::max) {
                stats.metrics.max_abs_diff.observe(d);
            }
            stats
                .metrics
                .latency_delta
                .observe(shadow_took.as_secs_f64() - primary_took.as_secs_f64());
        }
        Err(reason) => {
            stats.metrics.uncomparable.inc();
            tracing::debug!(%reason, "shadow answer not comparable with the primary's");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::tensors::{encode, tests::probs};
    use prometheus::{Histogram, IntCounter};

    fn stats(max: u32) -> Arc<ShadowStats> {
        let c = |n: &str| IntCounter::new(format!("s_{n}"), "t").unwrap();
        let h = |n: &str| {
            Histogram::with_opts(prometheus::HistogramOpts::new(format!("h_{n}"), "t")).unwrap()
        };
        Arc::new(ShadowStats {
            metrics: ShadowMetrics {
                ok: c("ok"),
                error: c("error"),
                dropped: c("dropped"),
                agree: c("agree"),
                disagree: c("disagree"),
                uncomparable: c("unc"),
                max_abs_diff: h("d"),
                latency_delta: h("l"),
            },
            in_flight: Arc::new(AtomicU32::new(0)),
            max_in_flight: max,
        })
    }

    fn answer(row: &[f64]) -> Answer {
        Answer {
            response: encode("m", "1", "", &probs(&[row])),
            by: super::super::AnsweredBy::Target(crate::routing::TargetId(0)),
            label: "m/1".into(),
            cascade: None,
            degraded: false,
            pipeline: None,
            switch: None,
            overflow: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_or_failing_shadow_never_delays_or_fails_the_primary() {
        let s = stats(4);
        let start = Instant::now();
        let report = start_shadow(&s, 10_000, Ok(answer(&[0.1, 0.9])));
        // The primary finishes at once and reports; nothing waited on the shadow.
        assert_eq!(start.elapsed(), Duration::ZERO);
        report
            .unwrap()
            .send((answer(&[0.2, 0.8]).response, Duration::from_millis(1)))
            .unwrap();
        let failing = start_shadow(&s, 5, Err("down"));
        drop(failing); // a primary that failed reports nothing
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!(
            (
                s.metrics.ok.get(),
                s.metrics.error.get(),
                s.metrics.agree.get()
            ),
            (1, 1, 1)
        );
        assert_eq!(s.in_flight.load(Ordering::SeqCst), 0);
        assert_eq!(s.metrics.latency_delta.get_sample_count(), 1);
        assert!((s.metrics.max_abs_diff.get_sample_sum() - 0.1).abs() < 1e-6);
    }

    #[tokio::test(start_paused = true)]
    async fn copies_beyond_max_in_flight_are_dropped_and_counted() {
        let s = stats(2);
        let a = start_shadow(&s, 1000, Ok(answer(&[0.5, 0.5])));
        let b = start_shadow(&s, 1000, Ok(answer(&[0.5, 0.5])));
        let c = start_shadow(&s, 1000, Ok(answer(&[0.5, 0.5])));
        assert!(a.is_some() && b.is_some() && c.is_none());
        assert_eq!(s.metrics.dropped.get(), 1);
        // The primaries finish (here: fail) and report nothing; the copies then end.
        drop((a, b));
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(
            start_shadow(&s, 1, Ok(answer(&[0.5, 0.5]))).is_some(),
            "slots come back"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn disagreements_are_counted() {
        let s = stats(2);
        let r = start_shadow(&s, 1, Ok(answer(&[0.9, 0.1]))).unwrap();
        r.send((answer(&[0.1, 0.9]).response, Duration::from_millis(3)))
            .unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!((s.metrics.agree.get(), s.metrics.disagree.get()), (0, 1));
    }

    fn start_shadow(
        s: &Arc<ShadowStats>,
        ms: u64,
        result: Result<Answer, &'static str>,
    ) -> Option<PrimaryReport> {
        start(s.clone(), None, async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            result.map_err(|e| GatewayError::Upstream {
                code: 14,
                message: e.into(),
            })
        })
    }
}
