//! `switchyard batch`: a whole data set through a gateway route, or straight to a backend
//! or a Triton server, as a client would call them: rows grouped into requests of the
//! model's `max_batch_size`, sent over gRPC with bounded concurrency, retried while the
//! failure passes, journaled so that a crash or Ctrl-C resumes with no row lost or repeated,
//! with a progress bar and a summary.
//!
//! The steps: the model's config is read (`ModelConfig`), the input file is read and checked
//! whole (`data`), chunks of rows are sent (`send`) and each finished chunk is appended to the
//! journal, whose durable length the checkpoint records (`journal`); when every chunk is done,
//! the output and errors files are written from the journal in row order (`output`).

mod data;
mod journal;
mod output;
mod send;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use data::{ColumnMap, Format};
use journal::{ChunkRecord, Job, Journal};

/// `switchyard batch`.
#[derive(Debug, clap::Args)]
pub(crate) struct BatchArgs {
    /// The input: .jsonl (KServe v2 `inputs` per line), .csv, .npy, .npz or .parquet.
    #[arg(long, short = 'i')]
    input: PathBuf,
    /// The output: .jsonl, .csv, .npz or .parquet (one row per input row, in order).
    #[arg(long, short = 'o')]
    output: PathBuf,
    /// The route (through a gateway) or the model (a backend or Triton) to call.
    #[arg(long, short = 'm')]
    model: String,
    /// The model version or release label (default: the route's plan, or the latest).
    #[arg(long, default_value = "")]
    model_version: String,
    /// The gRPC address of the gateway, backend or Triton server.
    #[arg(long, short = 'u', default_value = "127.0.0.1:8001")]
    url: String,
    /// Input format, when the extension does not say it.
    #[arg(long, value_parser = Format::parse)]
    input_format: Option<Format>,
    /// Output format, when the extension does not say it.
    #[arg(long, value_parser = Format::parse)]
    output_format: Option<Format>,
    /// Which CSV or Parquet columns feed an input: `[INPUT=]a,b,c`, where `px0..px63`
    /// stands for px0, px1, … px63. Repeat for each input. Default: every column, in order,
    /// into the model's only input (Parquet: a list column named after the input).
    #[arg(long, value_name = "[INPUT=]COLUMNS")]
    columns: Vec<String>,
    /// The outputs to keep, comma-separated (default: every output of the model's config).
    #[arg(long, value_delimiter = ',')]
    outputs: Vec<String>,
    /// Rows per request (default and most: the model's max_batch_size).
    #[arg(long)]
    batch_size: Option<u32>,
    /// Requests in flight at once.
    #[arg(long, short = 'c', default_value_t = 8)]
    concurrency: usize,
    /// Calls per chunk at most, the first included, while the failure is UNAVAILABLE,
    /// RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED or ABORTED.
    #[arg(long, default_value_t = 10)]
    attempts: u32,
    /// The first retry's wait at most; it doubles per retry (full jitter).
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    backoff: Duration,
    /// The longest wait between two calls of a chunk.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    max_backoff: Duration,
    /// Each call's deadline (sent as grpc-timeout).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Request metadata for every call, `name:value` (e.g. x-user-id for a sticky split).
    #[arg(short = 'H', long = "header", value_name = "NAME:VALUE")]
    headers: Vec<String>,
    /// Where failed rows go (JSON Lines: row, status, message). Default: <output>.errors.jsonl.
    #[arg(long)]
    errors: Option<PathBuf>,
    /// The checkpoint file. Default: <output>.checkpoint.json (the journal is <output>.journal).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Continue the unfinished run that the checkpoint records.
    #[arg(long)]
    resume: bool,
    /// Start again even though an unfinished run's checkpoint exists.
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// Keep the journal and checkpoint after the output is written.
    #[arg(long)]
    keep_journal: bool,
    /// Print the summary as JSON on stdout (and no progress bar).
    #[arg(long)]
    json: bool,
    /// No progress bar (a line every few seconds when stderr is not a terminal).
    #[arg(long)]
    no_progress: bool,
}

/// The summary of a job.
#[derive(Debug, Serialize)]
struct Summary {
    status: &'static str,
    model: String,
    url: String,
    output: String,
    errors: Option<String>,
    rows: u64,
    rows_ok: u64,
    rows_failed: u64,
    /// Rows done by earlier runs of a resumed job.
    rows_resumed: u64,
    chunks: u64,
    chunk_rows: u64,
    concurrency: usize,
    /// Calls made (all runs), the retries included.
    requests: u64,
    retries: u64,
    /// Per answering target: rows and requests (answered chunks).
    targets: BTreeMap<String, TargetCount>,
    /// Failed rows by final gRPC status.
    failures: BTreeMap<String, u64>,
    /// Latency of the answered calls, ms.
    latency_ms: Latency,
    /// This run's wall time, from start to the output in place, and its rows per second.
    wall_s: f64,
    rows_per_s: f64,
    /// Where this run's time went.
    phases: Phases,
}

#[derive(Debug, Default, Serialize)]
struct Phases {
    /// The model's config and the whole input, read and checked.
    read_s: f64,
    /// The calls, from the first sent to the last journaled.
    score_s: f64,
    /// The output and errors files written from the journal.
    write_s: f64,
}

#[derive(Debug, Default, Serialize)]
struct TargetCount {
    rows: u64,
    requests: u64,
}

#[derive(Debug, Default, Serialize)]
struct Latency {
    p50: f64,
    p99: f64,
    max: f64,
}

/// Exit status when the job finished but some rows failed (in the errors file).
const SOME_ROWS_FAILED: i32 = 3;
/// Exit status when the job was stopped (Ctrl-C, SIGTERM) before it finished.
const STOPPED: i32 = 130;

/// Runs the job; the process's exit status.
pub(crate) async fn run(args: BatchArgs) -> Result<i32> {
    let started = Instant::now();
    let in_format = match args.input_format {
        Some(f) => f,
        None => Format::of_path(&args.input)?,
    };
    let out_format = match args.output_format {
        Some(f) => f,
        None => Format::of_path(&args.output)?,
    };
    if out_format == Format::Npy {
        bail!(
            "{}: a .npy file holds one array, with no row ids or targets; write .npz (one array per output, plus `row` and `target`)",
            args.output.display()
        );
    }
    if args.concurrency == 0 || args.attempts == 0 {
        bail!("--concurrency and --attempts must be at least 1");
    }
    let mut map = ColumnMap::default();
    for c in &args.columns {
        map.add(c).map_err(|e| anyhow!("--columns: {e}"))?;
    }
    let mut headers = Vec::new();
    for h in &args.headers {
        let (k, v) = h
            .split_once(':')
            .ok_or_else(|| anyhow!("-H `{h}`: expected NAME:VALUE"))?;
        let key =
            tonic::metadata::AsciiMetadataKey::from_bytes(k.trim().to_ascii_lowercase().as_bytes())
                .map_err(|_| anyhow!("-H `{h}`: `{k}` is not a header name"))?;
        let value = v
            .trim()
            .parse()
            .map_err(|_| anyhow!("-H `{h}`: the value is not printable ASCII"))?;
        headers.push((key, value));
    }
    let policy = send::Policy {
        attempts: args.attempts,
        backoff: args.backoff,
        max_backoff: args.max_backoff,
        timeout: args.timeout,
        headers,
    };
    let journal_path = data::beside(&args.output, ".journal");
    let checkpoint_path = args
        .checkpoint
        .clone()
        .unwrap_or_else(|| data::beside(&args.output, ".checkpoint.json"));
    let errors_path = args
        .errors
        .clone()
        .unwrap_or_else(|| data::beside(&args.output, ".errors.jsonl"));
    if !args.resume && !args.overwrite && checkpoint_path.exists() {
        bail!(
            "{} exists: an earlier run of this job did not finish. Pass --resume to continue it, or --overwrite to start again",
            checkpoint_path.display()
        );
    }

    let mut client = send::connect(&args.url)?;
    let model = send::model(
        &mut client,
        &args.model,
        &args.model_version,
        &policy,
        &args.url,
    )
    .await?;
    let outputs = if args.outputs.is_empty() {
        model.outputs.clone()
    } else {
        for o in &args.outputs {
            if !model.outputs.contains(o) {
                bail!(
                    "--outputs: `{}` has no output `{o}`; its outputs are {}",
                    args.model,
                    model
                        .outputs
                        .iter()
                        .map(|o| format!("`{o}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        args.outputs.clone()
    };
    if outputs.is_empty() {
        bail!(
            "`{}`: its config lists no outputs; name them with --outputs",
            args.model
        );
    }
    let batched = model.max_batch_size > 0;
    let chunk_rows = if batched {
        let most = model.max_batch_size;
        match args.batch_size {
            Some(0) => bail!("--batch-size must be at least 1"),
            Some(b) if b > most => bail!(
                "--batch-size {b} is above `{}`'s max_batch_size ({most})",
                args.model
            ),
            Some(b) => b,
            None => most,
        }
    } else {
        if args.batch_size.is_some_and(|b| b > 1) {
            bail!(
                "`{}` does not batch (max_batch_size 0): each request is one row",
                args.model
            );
        }
        1
    };

    let (input, wants, in_map) = (args.input.clone(), model.inputs.clone(), map);
    let dataset =
        tokio::task::spawn_blocking(move || data::read(&input, in_format, &wants, &in_map))
            .await
            .context("reading the input")??;
    let dataset = Arc::new(dataset);
    let read = started.elapsed();
    let rows = dataset.rows as u64;
    let chunk_rows = u64::from(chunk_rows);
    let chunks_total = rows.div_ceil(chunk_rows);
    let meta = std::fs::metadata(&args.input)?;
    let job = Job {
        url: args.url.clone(),
        model: args.model.clone(),
        model_version: args.model_version.clone(),
        input: std::fs::canonicalize(&args.input)
            .unwrap_or_else(|_| args.input.clone())
            .display()
            .to_string(),
        input_bytes: meta.len(),
        input_modified_ns: meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos()),
        rows,
        chunk_rows,
        outputs: outputs.clone(),
    };
    let mut journal = if args.resume {
        Journal::resume(journal_path, checkpoint_path, job, chunks_total)?
    } else {
        Journal::create(journal_path, checkpoint_path, job, chunks_total)?
    };
    let rows_resumed = journal.rows_done;
    let todo: Vec<u64> = (0..chunks_total)
        .filter(|i| !journal.done.contains_key(i))
        .collect();

    // Ctrl-C or SIGTERM: no new chunk starts, the calls in flight finish and are journaled;
    // a second one leaves at once (the checkpoint already covers what is durable).
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        for n in 0..2 {
            let term_recv = async {
                match term.as_mut() {
                    Some(t) => {
                        t.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                () = term_recv => {}
            }
            if n == 0 {
                eprintln!(
                    "stopping: the requests in flight finish and are recorded; press Ctrl-C again to leave now"
                );
                let _ = stop_tx.send(true);
            } else {
                std::process::exit(STOPPED);
            }
        }
    });

    let mut show = Progress::new(&args, rows, rows_resumed);
    let (tx, mut rx) = mpsc::channel::<ChunkRecord>(args.concurrency * 2);
    let todo = Arc::new(todo);
    let next = Arc::new(AtomicUsize::new(0));
    let outputs = Arc::new(outputs);
    for _ in 0..args.concurrency.min(todo.len().max(1)) {
        let (tx, todo, next, dataset, outputs) = (
            tx.clone(),
            todo.clone(),
            next.clone(),
            dataset.clone(),
            outputs.clone(),
        );
        let (mut client, policy, mut stop) = (client.clone(), policy.clone(), stop_rx.clone());
        let (name, version) = (args.model.clone(), args.model_version.clone());
        tokio::spawn(async move {
            loop {
                if *stop.borrow() {
                    return;
                }
                let Some(&index) = todo.get(next.fetch_add(1, Ordering::Relaxed)) else {
                    return;
                };
                let span = send::rows_of(index, chunk_rows, rows);
                let make =
                    || send::request(&dataset, &name, &version, &outputs, batched, span.0, span.1);
                match send::chunk(&mut client, &policy, make, index, span, &mut stop).await {
                    Some(rec) => {
                        if tx.send(rec).await.is_err() {
                            return;
                        }
                    }
                    None => return,
                }
            }
        });
    }
    drop(tx);

    // The journal is written on a thread of its own: an fsync never holds up the calls.
    let writer = tokio::task::spawn_blocking(move || -> Result<_> {
        let mut last_sync = Instant::now();
        let mut run_rows = 0u64;
        while let Some(rec) = rx.blocking_recv() {
            journal.append(&rec)?;
            run_rows += u64::from(rec.rows);
            show.chunk(&rec);
            if last_sync.elapsed() >= Duration::from_millis(250) {
                journal.sync()?;
                last_sync = Instant::now();
            }
        }
        journal.sync()?;
        Ok((journal, show, run_rows))
    });
    let (mut journal, show, run_rows) = writer.await.context("the journal writer")??;
    let wall = started.elapsed();
    show.finish();

    let done = journal.done.len() as u64;
    if done < chunks_total {
        let left = rows - journal.rows_done;
        eprintln!(
            "stopped: {} of {rows} rows done ({left} left); the checkpoint is {}. Run the same command with --resume to finish",
            journal.rows_done,
            journal.checkpoint().display()
        );
        return Ok(STOPPED);
    }

    let plan = output::Plan {
        path: args.output.clone(),
        format: out_format,
        errors: errors_path.clone(),
        outputs: outputs.to_vec(),
        meta: journal.counts.headers.iter().cloned().collect(),
    };
    let records = journal.records()?;
    let write = tokio::task::spawn_blocking(move || output::write(&plan, records));
    let written = write.await.context("writing the output")??;
    let total = started.elapsed();
    let mut summary = survey(&journal.counts, &args, rows, chunk_rows);
    summary.rows_resumed = rows_resumed;
    summary.wall_s = total.as_secs_f64();
    summary.rows_per_s = run_rows as f64 / total.as_secs_f64().max(1e-9);
    summary.phases = Phases {
        read_s: read.as_secs_f64(),
        score_s: (wall - read).as_secs_f64(),
        write_s: (total - wall).as_secs_f64(),
    };
    summary.status = if written.rows_failed > 0 {
        "finished with failed rows"
    } else {
        "ok"
    };
    summary.errors = (written.rows_failed > 0).then(|| errors_path.display().to_string());
    if !args.keep_journal {
        journal.remove()?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        eprint!("{}", render(&summary));
    }
    Ok(if written.rows_failed > 0 {
        SOME_ROWS_FAILED
    } else {
        0
    })
}

/// The job's counts from every record of the journal (earlier runs' included).
fn survey(counts: &journal::Counts, args: &BatchArgs, rows: u64, chunk_rows: u64) -> Summary {
    let ms = |us: u64| us as f64 / 1000.0;
    let h = &counts.latency;
    Summary {
        status: "ok",
        model: args.model.clone(),
        url: args.url.clone(),
        output: args.output.display().to_string(),
        errors: None,
        rows,
        rows_ok: counts.rows_ok,
        rows_failed: counts.rows_failed,
        rows_resumed: 0,
        chunks: counts.chunks,
        chunk_rows,
        concurrency: args.concurrency,
        requests: counts.requests,
        retries: counts.retries,
        targets: counts
            .targets
            .iter()
            .map(|(t, &(rows, requests))| (t.clone(), TargetCount { rows, requests }))
            .collect(),
        failures: counts
            .failures
            .iter()
            .map(|(&c, &n)| (code_name(c), n))
            .collect(),
        latency_ms: if h.is_empty() {
            Latency::default()
        } else {
            Latency {
                p50: ms(h.value_at_quantile(0.5)),
                p99: ms(h.value_at_quantile(0.99)),
                max: ms(h.max()),
            }
        },
        wall_s: 0.0,
        rows_per_s: 0.0,
        phases: Phases::default(),
    }
}

/// A gRPC status code as the protocol spells it: `NOT_FOUND`.
pub(crate) fn code_name(code: i32) -> String {
    let camel = format!("{:?}", tonic::Code::from_i32(code));
    let mut out = String::with_capacity(camel.len() + 4);
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

fn render(s: &Summary) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}: {} rows through `{}` at {} in {:.2} s ({:.0} rows/s this run: read {:.2} s, scored {:.2} s, written {:.2} s)",
        s.status,
        s.rows,
        s.model,
        s.url,
        s.wall_s,
        s.rows_per_s,
        s.phases.read_s,
        s.phases.score_s,
        s.phases.write_s
    );
    let _ = writeln!(
        out,
        "  ok {}  failed {}  (resumed with {} already done)",
        s.rows_ok, s.rows_failed, s.rows_resumed
    );
    let _ = writeln!(
        out,
        "  {} chunks of up to {} rows, {} requests, {} retries; latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        s.chunks,
        s.chunk_rows,
        s.requests,
        s.retries,
        s.latency_ms.p50,
        s.latency_ms.p99,
        s.latency_ms.max
    );
    for (target, c) in &s.targets {
        let share = c.rows as f64 * 100.0 / s.rows_ok.max(1) as f64;
        let _ = writeln!(
            out,
            "  {target}: {} rows ({share:.1}%), {} requests",
            c.rows, c.requests
        );
    }
    for (code, n) in &s.failures {
        let _ = writeln!(out, "  failed with {code}: {n} rows");
    }
    let _ = writeln!(out, "  output: {}", s.output);
    if let Some(e) = &s.errors {
        let _ = writeln!(out, "  errors: {e}");
    }
    out
}

/// The progress bar (indicatif) on a terminal, a line every five seconds otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    lines: bool,
    state: Tally,
}

struct Tally {
    done: u64,
    /// Rows done by this run.
    run: u64,
    total: u64,
    failed: u64,
    retries: u64,
    targets: BTreeMap<String, u64>,
    last_line: Option<Instant>,
    started: Instant,
}

impl Progress {
    fn new(args: &BatchArgs, total: u64, done: u64) -> Self {
        let quiet = args.json || args.no_progress;
        let terminal = std::io::stderr().is_terminal();
        let bar = (!quiet && terminal).then(|| {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{elapsed_precise} [{wide_bar:.cyan/blue}] {human_pos}/{human_len} rows ETA {eta} {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.set_position(done);
            bar.reset_eta();
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Self {
            bar,
            lines: !quiet && !terminal,
            state: Tally {
                done,
                run: 0,
                total,
                failed: 0,
                retries: 0,
                targets: BTreeMap::new(),
                last_line: None,
                started: Instant::now(),
            },
        }
    }

    fn chunk(&mut self, rec: &ChunkRecord) {
        let t = &mut self.state;
        t.done += u64::from(rec.rows);
        t.run += u64::from(rec.rows);
        t.retries += u64::from(rec.attempts.saturating_sub(1));
        if rec.code == 0 {
            *t.targets.entry(rec.target()).or_default() += u64::from(rec.rows);
        } else {
            t.failed += u64::from(rec.rows);
        }
        let line_due = self.lines
            && t.last_line
                .is_none_or(|l| l.elapsed() >= Duration::from_secs(5));
        let bar_due = self.bar.is_some()
            && t.last_line
                .is_none_or(|l| l.elapsed() >= Duration::from_millis(100));
        if !(line_due || bar_due) {
            return;
        }
        t.last_line = Some(Instant::now());
        let rate = t.run as f64 / t.started.elapsed().as_secs_f64().max(1e-9);
        let ok: u64 = t.targets.values().sum();
        let mut msg = format!(
            "{rate:.0} rows/s · failed {} · retries {}",
            t.failed, t.retries
        );
        for (target, n) in &t.targets {
            let _ = write!(
                msg,
                " · {target} {:.0}%",
                *n as f64 * 100.0 / ok.max(1) as f64
            );
        }
        match &self.bar {
            Some(bar) => {
                bar.set_position(t.done);
                bar.set_message(msg);
            }
            None => eprintln!("progress: {}/{} rows, {msg}", t.done, t.total),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
