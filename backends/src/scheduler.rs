//! The dynamic batcher and the model instances, with Triton's scheduling semantics, on
//! dedicated OS threads so that inference never runs on a tokio worker.
//!
//! Per model version there is one thread per instance (`instance_group.count`) and one
//! batcher token. Requests wait in the version's queue. An idle instance takes the token,
//! forms the next batch from the queue, passes the token on and runs the batch, so a
//! request crosses one thread boundary each way. Batches follow Triton's rules:
//! * without `dynamic_batching`, a batch is one request;
//! * with it, requests with the same non-batch shapes are merged, up to `max_batch_size`
//!   rows. The batch leaves at once when it reaches the maximum, or when the queued
//!   requests can form a preferred size (the largest one they can form); otherwise the
//!   batch waits until the oldest request has waited `max_queue_delay_microseconds`.
//!
//! Forming the batch only once an instance is free is what makes batches grow under load:
//! requests that arrive while every instance is busy all join the next batch.
//! `max_queue_size` bounds the queue; a request beyond it is refused at once. So does
//! `--max-queue-bytes`: the input bytes all the backend's requests hold, queued or running,
//! across every model.
//!
//! A batch that fails is run again one request at a time, so a request that the model
//! cannot run fails alone: when some of its batch mates then succeed, its failure is the
//! request's (INVALID_ARGUMENT); when every one fails, it is the model's (INTERNAL).

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use tokio::sync::oneshot;
use tracing::{debug, warn};

use crate::error::BackendError;
use crate::runtime::{InputBatch, Instance, OutputTensor};
use crate::spec::ModelSpec;
use crate::stats::{ExecTimes, VersionStats};

/// One inference request, validated, waiting for a batch.
#[derive(Debug)]
pub(crate) struct Job {
    /// Rows this request contributes to a batch (its batch size; 1 without batching).
    pub(crate) rows: usize,
    /// Input bytes in the order of `ModelSpec::inputs`.
    pub(crate) inputs: Vec<Bytes>,
    /// Full input shapes, same order.
    pub(crate) shapes: Vec<Vec<usize>>,
    pub(crate) enqueued: Instant,
    /// The request's `timeout` parameter, as an instant.
    pub(crate) deadline: Option<Instant>,
    pub(crate) reply: oneshot::Sender<Result<JobOutput, BackendError>>,
    /// Its input bytes, counted against `--max-queue-bytes` while the job lives (set by
    /// `submit`).
    pub(crate) held: Option<Held>,
}

/// The input bytes that every model's jobs hold, and the most they may.
#[derive(Debug)]
pub(crate) struct QueuedBytes {
    held: AtomicUsize,
    max: usize,
}

impl QueuedBytes {
    pub(crate) fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            held: AtomicUsize::new(0),
            max,
        })
    }

    /// Counts `n` more bytes, or refuses them over the limit.
    fn hold(self: &Arc<Self>, n: usize) -> Option<Held> {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| {
                h.checked_add(n).filter(|&t| t <= self.max)
            })
            .ok()?;
        Some(Held(self.clone(), n))
    }
}

/// Bytes a job holds; given back when it is dropped.
#[derive(Debug)]
pub(crate) struct Held(Arc<QueuedBytes>, usize);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.held.fetch_sub(self.1, Ordering::AcqRel);
    }
}

/// Why a job was not queued.
#[derive(Debug)]
pub(crate) enum Refused {
    /// The version's queue holds `max_queue_size` jobs.
    Count(usize),
    /// The backend's jobs hold `--max-queue-bytes` bytes.
    Bytes(usize),
}

/// What a finished job gets back.
#[derive(Debug)]
pub(crate) struct JobOutput {
    /// Outputs in the order of `ModelSpec::outputs`, sliced to this request's rows.
    pub(crate) outputs: Vec<OutputTensor>,
    pub(crate) queue: Duration,
    pub(crate) exec: ExecTimes,
    /// Rows of the batch the job ran in.
    pub(crate) batch_rows: usize,
}

/// The queue of one model version and the threads that drain it. Dropping it closes the
/// queue; the threads finish the jobs already queued, then exit.
#[derive(Debug)]
pub(crate) struct Scheduler {
    queue: Sender<Job>,
    depth: Arc<AtomicUsize>,
    max_queue_size: usize,
    stats: Arc<VersionStats>,
    bytes: Arc<QueuedBytes>,
}

impl Scheduler {
    /// Starts one thread per instance.
    pub(crate) fn start(
        spec: Arc<ModelSpec>,
        version: u64,
        instances: Vec<Box<dyn Instance>>,
        stats: Arc<VersionStats>,
        bytes: Arc<QueuedBytes>,
    ) -> std::io::Result<Self> {
        let (queue, jobs) = crossbeam_channel::unbounded();
        let depth = Arc::new(AtomicUsize::new(0));
        // The batcher state is a token: the idle instance holding it forms the next batch,
        // then passes it on and runs that batch.
        let (token_tx, token_rx) = crossbeam_channel::bounded::<Batcher>(1);
        let batcher = Batcher {
            spec: spec.clone(),
            jobs,
            depth: depth.clone(),
            stats: stats.clone(),
            pending: VecDeque::new(),
        };
        // Invariant: the channel is empty and has room for exactly this one token.
        let _ = token_tx.send(batcher);
        for (index, instance) in instances.into_iter().enumerate() {
            let worker = Worker {
                spec: spec.clone(),
                version,
                stats: stats.clone(),
                instance,
            };
            let (token_tx, token_rx) = (token_tx.clone(), token_rx.clone());
            thread::Builder::new()
                .name(format!("sy-{}-v{version}-i{index}", spec.name))
                .spawn(move || worker.run(&token_tx, &token_rx))?;
        }
        let max_queue_size = spec.batching.as_ref().map_or(0, |b| b.max_queue_size);
        Ok(Self {
            queue,
            depth,
            max_queue_size,
            stats,
            bytes,
        })
    }

    /// Queues a job, unless the queue is at `max_queue_size` or the backend's jobs hold
    /// `--max-queue-bytes`.
    pub(crate) fn submit(&self, mut job: Job) -> Result<(), Refused> {
        let n = job.inputs.iter().map(Bytes::len).sum();
        job.held = Some(self.bytes.hold(n).ok_or(Refused::Bytes(self.bytes.max))?);
        let admitted = self
            .depth
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| {
                (self.max_queue_size == 0 || d < self.max_queue_size).then_some(d + 1)
            });
        if admitted.is_err() {
            return Err(Refused::Count(self.max_queue_size));
        }
        self.stats.pending(1);
        self.queue.send(job).map_err(|_| {
            // Unreachable while `self` lives (the batcher holds the receiver), kept total.
            self.depth.fetch_sub(1, Ordering::AcqRel);
            self.stats.pending(-1);
            Refused::Count(self.max_queue_size)
        })
    }
}

struct Batcher {
    spec: Arc<ModelSpec>,
    jobs: Receiver<Job>,
    depth: Arc<AtomicUsize>,
    stats: Arc<VersionStats>,
    /// Jobs taken off the queue but not yet in a batch, oldest first.
    pending: VecDeque<Job>,
}

impl Batcher {
    fn take(&mut self, job: Job) {
        self.pending.push_back(job);
    }

    /// Removes the first `n` pending jobs as a batch; they leave the queue only now, so
    /// `max_queue_size` and the queue-depth gauge count jobs the batcher holds too.
    fn dispatch(&mut self, n: usize) -> Vec<Job> {
        self.depth.fetch_sub(n, Ordering::AcqRel);
        self.stats.pending(-(n as i64));
        self.pending.drain(..n).collect()
    }

    /// Blocks until a batch is ready; `None` once the queue is closed and drained.
    fn next_batch(&mut self) -> Option<Vec<Job>> {
        let mut closed = false;
        loop {
            if self.pending.is_empty() {
                let job = self.jobs.recv().ok()?;
                self.take(job);
            }
            let max_rows = self.spec.max_batch_size.max(1);
            // Everything already queued joins the decision (up to a full batch).
            let mut queued_rows: usize = self.pending.iter().map(|j| j.rows).sum();
            while queued_rows < max_rows {
                match self.jobs.try_recv() {
                    Ok(job) => {
                        queued_rows += job.rows;
                        self.take(job);
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
            }
            self.drop_dead_jobs();
            if self.pending.is_empty() {
                continue;
            }
            let Some(batching) = &self.spec.batching else {
                return Some(self.dispatch(1));
            };
            let (len, rows, blocked) = self.mergeable_prefix(max_rows);
            if rows == max_rows || blocked {
                return Some(self.dispatch(len));
            }
            if let Some(n) = self.largest_preferred_prefix(len, &batching.preferred_batch_sizes) {
                return Some(self.dispatch(n));
            }
            let deadline = self.pending[0].enqueued + batching.max_queue_delay;
            if closed || Instant::now() >= deadline {
                return Some(self.dispatch(len));
            }
            // Wake for a new job, the batch deadline, or the first request timeout.
            let wake = self
                .pending
                .iter()
                .filter_map(|j| j.deadline)
                .fold(deadline, Instant::min);
            match self.jobs.recv_deadline(wake) {
                Ok(job) => self.take(job),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => closed = true,
            }
        }
    }

    /// How many leading pending jobs can share one batch: same non-batch shapes as the
    /// first, at most `max_rows` rows. `blocked` is true when the next job cannot join,
    /// so waiting longer cannot grow this batch.
    fn mergeable_prefix(&self, max_rows: usize) -> (usize, usize, bool) {
        let first = &self.pending[0];
        let mut rows = 0;
        for (i, job) in self.pending.iter().enumerate() {
            let same_shape = job
                .shapes
                .iter()
                .zip(&first.shapes)
                .all(|(a, b)| a.get(1..) == b.get(1..));
            if !same_shape || rows + job.rows > max_rows {
                return (i, rows, true);
            }
            rows += job.rows;
        }
        (self.pending.len(), rows, false)
    }

    /// The length of the longest prefix (within `len`) whose rows add up to a preferred size.
    fn largest_preferred_prefix(&self, len: usize, preferred: &[usize]) -> Option<usize> {
        let mut rows = 0;
        let mut best = None;
        for (i, job) in self.pending.iter().take(len).enumerate() {
            rows += job.rows;
            if preferred.binary_search(&rows).is_ok() {
                best = Some(i + 1);
            }
        }
        best
    }

    /// Answers jobs whose timeout passed while queued, and forgets those whose client left.
    fn drop_dead_jobs(&mut self) {
        let now = Instant::now();
        let dead = |job: &Job| job.reply.is_closed() || job.deadline.is_some_and(|d| d <= now);
        if !self.pending.iter().any(dead) {
            return;
        }
        let mut kept = VecDeque::with_capacity(self.pending.len());
        for job in self.pending.drain(..) {
            if !dead(&job) {
                kept.push_back(job);
                continue;
            }
            self.depth.fetch_sub(1, Ordering::AcqRel);
            self.stats.pending(-1);
            if let Some(deadline) = job.deadline.filter(|_| !job.reply.is_closed()) {
                let _ = job.reply.send(Err(BackendError::Timeout {
                    model: self.spec.name.clone(),
                    waited: now.saturating_duration_since(job.enqueued),
                    allowed: deadline.saturating_duration_since(job.enqueued),
                }));
            }
        }
        self.pending = kept;
    }
}

struct Worker {
    spec: Arc<ModelSpec>,
    version: u64,
    stats: Arc<VersionStats>,
    instance: Box<dyn Instance>,
}

impl Worker {
    fn run(mut self, token_tx: &Sender<Batcher>, token_rx: &Receiver<Batcher>) {
        loop {
            let Ok(mut batcher) = token_rx.recv() else {
                break;
            };
            let batch = batcher.next_batch();
            // Invariant: this thread took the only token, so there is room to put it back.
            let _ = token_tx.send(batcher);
            match batch {
                Some(batch) => self.execute(batch),
                // The queue is closed and drained; the token goes back so that the
                // other instances see the same and stop too.
                None => break,
            }
        }
        debug!(model = %self.spec.name, version = self.version, "instance stopped");
    }

    fn execute(&mut self, jobs: Vec<Job>) {
        let start = Instant::now();
        let rows: usize = jobs.iter().map(|j| j.rows).sum();
        let result = self.run_batch(&jobs, rows);
        match result {
            Ok((per_job, exec)) => self.answer(jobs, per_job, exec, start, rows),
            Err(message) if jobs.len() == 1 => {
                warn!(model = %self.spec.name, version = self.version, %message, "inference failed");
                self.fail(jobs, &message);
            }
            Err(message) => {
                // Which request did it? Each runs alone; the model's fault is everyone's.
                warn!(model = %self.spec.name, version = self.version, %message, jobs = jobs.len(), "batch failed; running its requests one by one");
                let mut failed = Vec::new();
                let mut any_ok = false;
                for job in jobs {
                    let (start, rows) = (Instant::now(), job.rows);
                    match self.run_batch(std::slice::from_ref(&job), rows) {
                        Ok((per_job, exec)) => {
                            any_ok = true;
                            self.answer(vec![job], per_job, exec, start, rows);
                        }
                        Err(message) => failed.push((job, message)),
                    }
                }
                for (job, message) in failed {
                    let error = if any_ok {
                        BackendError::InvalidRequest(format!(
                            "model '{}' version {} cannot run this request, while the other requests of its batch ran: {message}",
                            self.spec.name, self.version
                        ))
                    } else {
                        self.runtime_error(&message)
                    };
                    let _ = job.reply.send(Err(error));
                }
            }
        }
    }

    /// Sends each job its outputs, and records the execution.
    fn answer(
        &self,
        jobs: Vec<Job>,
        per_job: Vec<Vec<OutputTensor>>,
        mut exec: ExecTimes,
        start: Instant,
        rows: usize,
    ) {
        exec.compute_output = start
            .elapsed()
            .saturating_sub(exec.compute_input + exec.compute_infer);
        self.stats.record_execution(rows, exec);
        for (job, outputs) in jobs.into_iter().zip(per_job) {
            let queue = start.saturating_duration_since(job.enqueued);
            let _ = job.reply.send(Ok(JobOutput {
                outputs,
                queue,
                exec,
                batch_rows: rows,
            }));
        }
    }

    fn runtime_error(&self, message: &str) -> BackendError {
        BackendError::Runtime {
            model: self.spec.name.clone(),
            version: self.version,
            message: message.to_owned(),
        }
    }

    fn fail(&self, jobs: Vec<Job>, message: &str) {
        for job in jobs {
            let _ = job.reply.send(Err(self.runtime_error(message)));
        }
    }

    /// Runs one batch; returns each job's outputs and the input and infer durations.
    fn run_batch(
        &mut self,
        jobs: &[Job],
        rows: usize,
    ) -> Result<(Vec<Vec<OutputTensor>>, ExecTimes), String> {
        let t0 = Instant::now();
        let batched = self.spec.max_batch_size > 0;
        let shapes: Vec<Vec<usize>> = (0..self.spec.inputs.len())
            .map(|i| {
                let mut shape = jobs[0].shapes[i].clone();
                if batched {
                    shape[0] = rows;
                }
                shape
            })
            .collect();
        let chunks: Vec<Vec<&[u8]>> = (0..self.spec.inputs.len())
            .map(|i| jobs.iter().map(|j| &j.inputs[i][..]).collect())
            .collect();
        let inputs: Vec<InputBatch<'_>> = self
            .spec
            .inputs
            .iter()
            .enumerate()
            .map(|(i, spec)| InputBatch {
                element: spec.element,
                shape: &shapes[i],
                chunks: &chunks[i],
            })
            .collect();
        let t1 = Instant::now();
        // A runtime panic must cost one batch, never the instance thread.
        let outputs = catch_unwind(AssertUnwindSafe(|| self.instance.run(&inputs)))
            .map_err(|_| "the runtime panicked while running the model".to_owned())??;
        let t2 = Instant::now();
        let exec = ExecTimes {
            compute_input: t1 - t0,
            compute_infer: t2 - t1,
            compute_output: Duration::ZERO,
        };
        if outputs.len() != self.spec.outputs.len() {
            return Err(format!(
                "the model returned {} outputs, expected {}",
                outputs.len(),
                self.spec.outputs.len()
            ));
        }
        if !batched {
            return Ok((vec![outputs], exec));
        }
        let mut per_job: Vec<Vec<OutputTensor>> = jobs
            .iter()
            .map(|_| Vec::with_capacity(outputs.len()))
            .collect();
        for (spec, output) in self.spec.outputs.iter().zip(outputs) {
            if output.shape.first() != Some(&rows) {
                return Err(format!(
                    "output '{}' has shape {:?}, whose first dimension should be the batch size {rows}",
                    spec.name, output.shape
                ));
            }
            let row_bytes = output.data.len() / rows;
            let mut at = 0;
            for (job, outs) in jobs.iter().zip(per_job.iter_mut()) {
                let len = job.rows * row_bytes;
                let mut shape = output.shape.clone();
                shape[0] = job.rows;
                outs.push(OutputTensor {
                    element: output.element,
                    shape,
                    data: output.data.slice(at..at + len),
                });
                at += len;
            }
        }
        Ok((per_job, exec))
    }
}
