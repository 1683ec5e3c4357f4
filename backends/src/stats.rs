//! Inference statistics: the per-version counters behind the ModelStatistics RPC and the
//! Prometheus metrics with Triton's names and labels (`model`, `version`).
//!
//! Everything on the request path is an atomic add on a handle resolved when the version
//! loads, so recording a request formats no label and takes no lock.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use switchyard_proto::inference::{
    InferBatchStatistics, InferStatistics, ModelStatistics, StatisticDuration,
};

/// The backend's Prometheus registry and metric families.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    success: IntCounterVec,
    failure: IntCounterVec,
    count: IntCounterVec,
    exec_count: IntCounterVec,
    request_duration: IntCounterVec,
    queue_duration: IntCounterVec,
    compute_input_duration: IntCounterVec,
    compute_infer_duration: IntCounterVec,
    compute_output_duration: IntCounterVec,
    pending: IntGaugeVec,
}

impl Metrics {
    /// A fresh registry with Triton's metric families registered.
    pub fn new() -> Self {
        let registry = Registry::new();
        let labels = &["model", "version"];
        let counter = |name: &str, help: &str| {
            let vec =
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
            registry
                .register(Box::new(vec.clone()))
                .expect("metric names are unique");
            vec
        };
        Self {
            success: counter(
                "nv_inference_request_success",
                "Number of successful inference requests, all batch sizes",
            ),
            failure: counter(
                "nv_inference_request_failure",
                "Number of failed inference requests, all batch sizes",
            ),
            count: counter(
                "nv_inference_count",
                "Number of inferences performed (a request of batch 8 counts 8)",
            ),
            exec_count: counter(
                "nv_inference_exec_count",
                "Number of model executions performed (a dynamic batch counts 1)",
            ),
            request_duration: counter(
                "nv_inference_request_duration_us",
                "Cumulative inference request duration in microseconds",
            ),
            queue_duration: counter(
                "nv_inference_queue_duration_us",
                "Cumulative inference queuing duration in microseconds",
            ),
            compute_input_duration: counter(
                "nv_inference_compute_input_duration_us",
                "Cumulative compute input duration in microseconds",
            ),
            compute_infer_duration: counter(
                "nv_inference_compute_infer_duration_us",
                "Cumulative compute inference duration in microseconds",
            ),
            compute_output_duration: counter(
                "nv_inference_compute_output_duration_us",
                "Cumulative inference compute output duration in microseconds",
            ),
            pending: {
                let vec = IntGaugeVec::new(
                    Opts::new("nv_inference_pending_request_count", "Instantaneous number of pending requests awaiting execution (the scheduler queue depth)"),
                    labels,
                )
                .expect("valid metric definition");
                registry
                    .register(Box::new(vec.clone()))
                    .expect("metric names are unique");
                vec
            },
            registry,
        }
    }

    /// The registry, for the `/metrics` endpoint.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    fn handles(&self, model: &str, version: u64) -> VersionMetrics {
        let v = version.to_string();
        let l = [model, v.as_str()];
        VersionMetrics {
            success: self.success.with_label_values(&l),
            failure: self.failure.with_label_values(&l),
            count: self.count.with_label_values(&l),
            exec_count: self.exec_count.with_label_values(&l),
            request_duration: self.request_duration.with_label_values(&l),
            queue_duration: self.queue_duration.with_label_values(&l),
            compute_input_duration: self.compute_input_duration.with_label_values(&l),
            compute_infer_duration: self.compute_infer_duration.with_label_values(&l),
            compute_output_duration: self.compute_output_duration.with_label_values(&l),
            pending: self.pending.with_label_values(&l),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug)]
struct VersionMetrics {
    success: IntCounter,
    failure: IntCounter,
    count: IntCounter,
    exec_count: IntCounter,
    request_duration: IntCounter,
    queue_duration: IntCounter,
    compute_input_duration: IntCounter,
    compute_infer_duration: IntCounter,
    compute_output_duration: IntCounter,
    pending: IntGauge,
}

/// A cumulative count and duration (Triton's `StatisticDuration`).
#[derive(Debug, Default)]
struct DurationStat {
    count: AtomicU64,
    ns: AtomicU64,
}

impl DurationStat {
    fn add(&self, d: Duration) {
        self.count.fetch_add(1, Relaxed);
        self.ns.fetch_add(saturating_ns(d), Relaxed);
    }

    fn snapshot(&self) -> Option<StatisticDuration> {
        Some(StatisticDuration {
            count: self.count.load(Relaxed),
            ns: self.ns.load(Relaxed),
        })
    }
}

#[derive(Debug, Default)]
struct BatchStat {
    compute_input: DurationStat,
    compute_infer: DurationStat,
    compute_output: DurationStat,
}

/// Durations of one model execution, shared by every request in the batch.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ExecTimes {
    pub(crate) compute_input: Duration,
    pub(crate) compute_infer: Duration,
    pub(crate) compute_output: Duration,
}

/// Statistics of one model version; lives across reloads of the same version.
#[derive(Debug)]
pub(crate) struct VersionStats {
    model: String,
    version: u64,
    last_inference_ms: AtomicU64,
    inference_count: AtomicU64,
    execution_count: AtomicU64,
    success: DurationStat,
    fail: DurationStat,
    queue: DurationStat,
    compute_input: DurationStat,
    compute_infer: DurationStat,
    compute_output: DurationStat,
    /// Indexed by batch size; index 0 unused.
    batches: Box<[BatchStat]>,
    metrics: VersionMetrics,
}

impl VersionStats {
    pub(crate) fn new(metrics: &Metrics, model: &str, version: u64, max_batch_size: usize) -> Self {
        Self {
            model: model.to_owned(),
            version,
            last_inference_ms: AtomicU64::new(0),
            inference_count: AtomicU64::new(0),
            execution_count: AtomicU64::new(0),
            success: DurationStat::default(),
            fail: DurationStat::default(),
            queue: DurationStat::default(),
            compute_input: DurationStat::default(),
            compute_infer: DurationStat::default(),
            compute_output: DurationStat::default(),
            batches: (0..=max_batch_size.max(1))
                .map(|_| BatchStat::default())
                .collect(),
            metrics: metrics.handles(model, version),
        }
    }

    /// The largest batch size these statistics can record.
    pub(crate) fn max_batch(&self) -> usize {
        self.batches.len() - 1
    }

    /// A request finished successfully after `total`, having waited `queue` and shared an
    /// execution that took `exec`.
    pub(crate) fn record_success(
        &self,
        rows: usize,
        total: Duration,
        queue: Duration,
        exec: ExecTimes,
    ) {
        self.last_inference_ms.store(now_ms(), Relaxed);
        self.inference_count.fetch_add(rows as u64, Relaxed);
        self.success.add(total);
        self.queue.add(queue);
        self.compute_input.add(exec.compute_input);
        self.compute_infer.add(exec.compute_infer);
        self.compute_output.add(exec.compute_output);
        let m = &self.metrics;
        m.success.inc();
        m.count.inc_by(rows as u64);
        m.request_duration.inc_by(micros(total));
        m.queue_duration.inc_by(micros(queue));
        m.compute_input_duration.inc_by(micros(exec.compute_input));
        m.compute_infer_duration.inc_by(micros(exec.compute_infer));
        m.compute_output_duration
            .inc_by(micros(exec.compute_output));
    }

    /// A request that reached this version failed after `total`.
    pub(crate) fn record_failure(&self, total: Duration) {
        self.last_inference_ms.store(now_ms(), Relaxed);
        self.fail.add(total);
        self.metrics.failure.inc();
        self.metrics.request_duration.inc_by(micros(total));
    }

    /// One model execution of `batch_size` rows.
    pub(crate) fn record_execution(&self, batch_size: usize, exec: ExecTimes) {
        self.execution_count.fetch_add(1, Relaxed);
        self.metrics.exec_count.inc();
        if let Some(b) = self.batches.get(batch_size) {
            b.compute_input.add(exec.compute_input);
            b.compute_infer.add(exec.compute_infer);
            b.compute_output.add(exec.compute_output);
        }
    }

    /// The scheduler queue depth changed by `delta`.
    pub(crate) fn pending(&self, delta: i64) {
        self.metrics.pending.add(delta);
    }

    /// The ModelStatistics entry.
    pub(crate) fn snapshot(&self) -> ModelStatistics {
        ModelStatistics {
            name: self.model.clone(),
            version: self.version.to_string(),
            last_inference: self.last_inference_ms.load(Relaxed),
            inference_count: self.inference_count.load(Relaxed),
            execution_count: self.execution_count.load(Relaxed),
            inference_stats: Some(InferStatistics {
                success: self.success.snapshot(),
                fail: self.fail.snapshot(),
                queue: self.queue.snapshot(),
                compute_input: self.compute_input.snapshot(),
                compute_infer: self.compute_infer.snapshot(),
                compute_output: self.compute_output.snapshot(),
                cache_hit: Some(StatisticDuration::default()),
                cache_miss: Some(StatisticDuration::default()),
            }),
            batch_stats: self
                .batches
                .iter()
                .enumerate()
                .filter(|(_, b)| b.compute_infer.count.load(Relaxed) > 0)
                .map(|(size, b)| InferBatchStatistics {
                    batch_size: size as u64,
                    compute_input: b.compute_input.snapshot(),
                    compute_infer: b.compute_infer.snapshot(),
                    compute_output: b.compute_output.snapshot(),
                })
                .collect(),
            ..Default::default()
        }
    }
}

fn saturating_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
