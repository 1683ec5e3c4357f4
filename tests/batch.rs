//! `switchyard batch` end to end: the real binary against the real gateway and backends on
//! the sample models. 100,000 held-out rows through a cascade and a split (every row
//! against the reference probabilities of the target that answered it, the counts against
//! the gateway's metrics), SIGKILL and Ctrl-C halfway then `--resume` (each row once, equal
//! to an uninterrupted run), a backend killed and restarted mid-run (nothing lost, retries
//! counted), every input and output format, and malformed inputs named by file, row and
//! column with nothing recorded as done.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::gateway::TestGateway;
use common::{BackendProcess, holdout, margin, metric, sample_repo};

/// The held-out rows repeated to `n`.
fn rows(n: usize) -> Vec<Vec<f32>> {
    let h = holdout();
    (0..n)
        .map(|i| h.features[i % h.features.len()].clone())
        .collect()
}

/// A `.npy` file of FP32 rows.
fn npy_bytes(rows: &[Vec<f32>]) -> Vec<u8> {
    let cols = rows[0].len();
    let mut header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {cols}), }}",
        rows.len()
    );
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for r in rows {
        for v in r {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

fn write_npy(path: &Path, rows: &[Vec<f32>]) {
    std::fs::write(path, npy_bytes(rows)).unwrap();
}

struct Run {
    code: i32,
    stderr: String,
    summary: serde_json::Value,
}

/// The arguments of a job: `input` through `model` at `url` into `out`, then `extra`.
fn job(input: &Path, out: &Path, model: &str, url: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "-i",
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "-m",
        model,
        "-u",
        url,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

fn batch_command(args: &[String]) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"));
    c.arg("batch")
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c
}

async fn batch(args: &[String]) -> Run {
    let out = batch_command(args).output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    Run {
        code: out.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        summary: serde_json::from_str(&stdout).unwrap_or(serde_json::Value::Null),
    }
}

/// A JSON Lines output: (row, target, probabilities) per line, in file order.
fn read_jsonl(path: &Path) -> Vec<(u64, String, Vec<f32>)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let p = v["probabilities"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            (
                v["row"].as_u64().unwrap(),
                v["target"].as_str().unwrap().to_owned(),
                p,
            )
        })
        .collect()
}

fn close(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-5)
}

/// Rows `0..n`, once each and in order.
fn assert_every_row_once(got: &[(u64, String, Vec<f32>)], n: usize) {
    assert_eq!(got.len(), n, "rows in the output");
    for (i, (row, _, _)) in got.iter().enumerate() {
        assert_eq!(*row, i as u64, "row ids in order, each once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_rows_through_a_cascade_and_a_split_match_the_references() {
    let gw = TestGateway::digits()
        .sample("digits-cascade.yaml")
        .sample("digits.yaml")
        .start()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let n = 100_000;
    let input = dir.path().join("rows.npy");
    write_npy(&input, &rows(n));
    let h = holdout();
    let reference = |model: &str, i: usize| &h.models[model].probabilities[i % h.features.len()];
    let url = gw.grpc.to_string();

    // The cascade: a chunk is answered by the linear model when every row of it is sure
    // (margin 0.2), by the MLP otherwise. 11.7% of rows are unsure, so at the route's
    // max_batch_size (64) nearly every chunk would escalate; 8 rows per request keep both
    // stages busy.
    let out = dir.path().join("cascade.jsonl");
    let run = batch(&job(
        &input,
        &out,
        "digits-cascade",
        &url,
        &["--json", "-c", "8", "--batch-size", "8"],
    ))
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let s = &run.summary;
    assert_eq!(s["rows_ok"], n as u64);
    assert_eq!(s["rows_failed"], 0);
    assert_eq!(s["chunk_rows"], 8);
    let got = read_jsonl(&out);
    assert_every_row_once(&got, n);
    let linear_margin: Vec<f32> = (0..h.features.len())
        .map(|i| margin(reference("digits_linear/1", i)))
        .collect();
    let mut by_target = std::collections::BTreeMap::<String, u64>::new();
    for chunk in got.chunks(8) {
        let target = &chunk[0].1;
        let sure = chunk
            .iter()
            .all(|(r, _, _)| linear_margin[*r as usize % h.features.len()] >= 0.2);
        for (row, t, p) in chunk {
            assert_eq!(t, target, "one target per chunk");
            // x-switchyard-target names the model and version that answered.
            assert!(
                ["digits_linear/1", "digits_mlp/2"].contains(&t.as_str()),
                "target {t}"
            );
            assert!(
                close(p, reference(t, *row as usize)),
                "row {row} from {t}: {p:?}"
            );
        }
        assert_eq!(
            target == "digits_linear/1",
            sure,
            "chunk at row {}: answered by {target}",
            chunk[0].0
        );
        *by_target.entry(target.clone()).or_default() += 1;
    }
    let metrics = gw.metrics().await;
    // The metrics count by the policy's target names and cascade stages.
    let stage = |s: &str, outcome: &str| {
        metric(
            &metrics,
            "switchyard_cascade_stage_total",
            &[
                ("route", "digits-cascade"),
                ("stage", s),
                ("outcome", outcome),
            ],
        ) as u64
    };
    assert_eq!(
        stage("1", "answered"),
        by_target["digits_linear/1"],
        "{metrics}"
    );
    assert_eq!(stage("1", "escalated"), by_target["digits_mlp/2"]);
    assert_eq!(stage("2", "answered"), by_target["digits_mlp/2"]);
    for (target, requests) in &by_target {
        assert_eq!(s["targets"][target]["requests"], *requests);
    }
    assert!(by_target.len() == 2, "both stages answered: {by_target:?}");
    eprintln!("cascade, 8-row chunks: {by_target:?}");

    // The 90/10 split (no x-user-id: each request is drawn), written as Parquet.
    let out = dir.path().join("split.parquet");
    let run = batch(&job(&input, &out, "digits", &url, &["--json"])).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let got = read_parquet(&out);
    assert_every_row_once(&got, n);
    let mut requests = std::collections::BTreeMap::<String, u64>::new();
    for chunk in got.chunks(64) {
        *requests.entry(chunk[0].1.clone()).or_default() += 1;
        for (row, t, p) in chunk {
            assert!(
                ["digits_mlp/1", "digits_mlp/2"].contains(&t.as_str()),
                "target {t}"
            );
            assert!(close(p, reference(t, *row as usize)), "row {row} from {t}");
        }
    }
    let metrics = gw.metrics().await;
    for (target, n) in &requests {
        assert_eq!(run.summary["targets"][target]["requests"], *n);
        let counted = metric(
            &metrics,
            "switchyard_requests_total",
            &[
                ("route", "digits"),
                ("target", target),
                ("result", "ok"),
                ("protocol", "grpc"),
            ],
        );
        assert_eq!(
            counted as u64,
            *n,
            "gateway metrics for {target}: {}",
            metrics
                .lines()
                .filter(|l| l.starts_with("switchyard_requests_total"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let v2 = requests.get("digits_mlp/2").copied().unwrap_or(0) as f64
        / requests.values().sum::<u64>() as f64;
    assert!((0.04..0.18).contains(&v2), "mlp-v2 share {v2}");
    gw.gw.stop().await;
}

/// A Parquet output: (row, target, probabilities) per row.
fn read_parquet(path: &Path) -> Vec<(u64, String, Vec<f32>)> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float32Type, UInt64Type};
    let file = std::fs::File::open(path).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.unwrap();
        let row = batch
            .column_by_name("row")
            .unwrap()
            .as_primitive::<UInt64Type>()
            .clone();
        let target = batch
            .column_by_name("target")
            .unwrap()
            .as_string::<i32>()
            .clone();
        let probs = batch
            .column_by_name("probabilities")
            .unwrap()
            .as_fixed_size_list()
            .clone();
        for i in 0..batch.num_rows() {
            let p = probs.value(i);
            let p = p.as_primitive::<Float32Type>().values().to_vec();
            out.push((row.value(i), target.value(i).to_owned(), p));
        }
    }
    out
}

/// Waits until the checkpoint says at least `rows` are done.
async fn until_done(checkpoint: &Path, rows: u64, child: &mut tokio::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(text) = std::fs::read_to_string(checkpoint)
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
            && v["rows_done"].as_u64().unwrap_or(0) >= rows
        {
            return;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the batch ended before it was interrupted"
        );
        assert!(Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_or_interrupted_halfway_then_resumed_equals_an_uninterrupted_run() {
    let backend = BackendProcess::start(&sample_repo(), "127.0.0.1:0".parse().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let n = 30_000;
    let input = dir.path().join("rows.npy");
    write_npy(&input, &rows(n));
    let url = backend.addr.to_string();
    let args = |out: &Path| {
        job(
            &input,
            out,
            "digits_mlp",
            &url,
            &["--batch-size", "4", "-c", "2", "--json"],
        )
    };
    let whole = dir.path().join("whole.jsonl");
    let run = batch(&args(&whole)).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let reference = read_jsonl(&whole);
    assert_every_row_once(&reference, n);

    for (signal, name) in [(SIGKILL, "SIGKILL"), (SIGINT, "SIGINT")] {
        let out = dir.path().join(format!("{name}.jsonl"));
        let checkpoint = PathBuf::from(format!("{}.checkpoint.json", out.display()));
        let a = args(&out);
        let mut child = batch_command(&a).spawn().unwrap();
        until_done(&checkpoint, n as u64 / 2, &mut child).await;
        send_signal(child.id().unwrap(), signal);
        let status = child.wait().await.unwrap();
        let stderr = {
            use tokio::io::AsyncReadExt;
            let mut s = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut s)
                .await
                .unwrap();
            s
        };
        if name == "SIGINT" {
            assert_eq!(status.code(), Some(130), "{stderr}");
            assert!(stderr.contains("--resume"), "{stderr}");
        } else {
            assert_eq!(status.code(), None, "killed by the signal");
        }
        assert!(!out.exists(), "{name}: no output before the job is done");
        let saved: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&checkpoint).unwrap()).unwrap();
        let done = saved["rows_done"].as_u64().unwrap();
        assert!(
            done >= n as u64 / 2 && done < n as u64,
            "{name}: {done} rows done"
        );

        // Without --resume the unfinished job is not clobbered.
        let refused = batch(&a).await;
        assert_eq!(refused.code, 1);
        assert!(refused.stderr.contains("--resume"), "{}", refused.stderr);

        let mut resume = a.clone();
        resume.push("--resume".into());
        let run = batch(&resume).await;
        assert_eq!(run.code, 0, "{name}: {}", run.stderr);
        let resumed = run.summary["rows_resumed"].as_u64().unwrap();
        assert!(
            resumed >= done && resumed < n as u64,
            "{name}: resumed from {resumed}"
        );
        assert_eq!(run.summary["rows_ok"], n as u64);
        let got = read_jsonl(&out);
        assert_every_row_once(&got, n);
        for (g, r) in got.iter().zip(&reference) {
            assert_eq!(g.1, r.1);
            assert!(close(&g.2, &r.2), "{name}: row {}", g.0);
        }
        assert!(
            !checkpoint.exists(),
            "the checkpoint goes once the output is in place"
        );
    }
    backend.kill();
}

const SIGKILL: i32 = 9;
const SIGINT: i32 = 2;

fn send_signal(pid: u32, signal: i32) {
    let ok = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{signal} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_and_restarted_mid_run_loses_no_row() {
    let addr = free_addr();
    let backend = BackendProcess::start(&sample_repo(), addr);
    let dir = tempfile::tempdir().unwrap();
    let n = 30_000;
    let input = dir.path().join("rows.npy");
    write_npy(&input, &rows(n));
    let out = dir.path().join("out.jsonl");
    let checkpoint = PathBuf::from(format!("{}.checkpoint.json", out.display()));
    let url = addr.to_string();
    let mut child = batch_command(&job(
        &input,
        &out,
        "digits_mlp",
        &url,
        &[
            "--batch-size",
            "8",
            "-c",
            "4",
            "--json",
            "--backoff",
            "50ms",
            "--max-backoff",
            "500ms",
            "--attempts",
            "40",
        ],
    ))
    .spawn()
    .unwrap();
    until_done(&checkpoint, n as u64 / 4, &mut child).await;
    backend.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let backend = BackendProcess::start(&sample_repo(), addr);
    let output = child.wait_with_output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{stderr} {}",
        String::from_utf8_lossy(&output.stdout)
    );
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(summary["rows_ok"], n as u64, "{summary}");
    assert_eq!(summary["rows_failed"], 0);
    let retries = summary["retries"].as_u64().unwrap();
    assert!(
        retries > 0,
        "the calls made while the backend was down were retried: {summary}"
    );
    assert_eq!(
        summary["requests"].as_u64().unwrap(),
        summary["chunks"].as_u64().unwrap() + retries
    );
    let h = holdout();
    let got = read_jsonl(&out);
    assert_every_row_once(&got, n);
    for (row, _, p) in &got {
        let r = &h.models["digits_mlp/2"].probabilities[*row as usize % h.features.len()];
        assert!(close(p, r), "row {row}");
    }
    backend.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_are_not_retried_and_land_in_the_errors_file() {
    // `x-bad` sends a request to a model the backend does not have: NOT_FOUND, a client
    // error. The route's config (its default target's) reads fine.
    let policy = "version: 1\nroute: mixed\ntargets:\n  good: { backend: stable, model: digits_linear, version: 1 }\n  gone: { backend: stable, model: digits_gone, version: 1 }\nrules:\n  - match: { headers: { x-bad: { present: true } } }\n    plan: gone\ndefault: good\n";
    let gw = TestGateway::digits()
        .policy("mixed.yaml", policy)
        .start()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("rows.npy");
    write_npy(&input, &rows(100));
    let out = dir.path().join("out.jsonl");
    let url = gw.grpc.to_string();
    let common = job(
        &input,
        &out,
        "mixed",
        &url,
        &["--json", "--batch-size", "10"],
    );

    let mut args = common.to_vec();
    args.extend(["-H".to_owned(), "x-bad:1".to_owned()]);
    let run = batch(&args).await;
    assert_eq!(run.code, 3, "some rows failed: {}", run.stderr);
    let s = &run.summary;
    assert_eq!(s["rows_failed"], 100, "{s}");
    assert_eq!(s["rows_ok"], 0);
    assert_eq!(s["retries"], 0, "client errors are not retried");
    assert_eq!(s["requests"], 10);
    assert_eq!(s["failures"]["NOT_FOUND"], 100, "{s}");
    let errors = PathBuf::from(format!("{}.errors.jsonl", out.display()));
    assert_eq!(s["errors"], errors.to_str().unwrap());
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&errors)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 100);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["row"], i as u64);
        assert_eq!(l["status"], "NOT_FOUND");
        assert_eq!(l["attempts"], 1);
        assert!(
            l["message"].as_str().unwrap().contains("digits_gone"),
            "{l}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "",
        "no row answered"
    );

    // The same job answered: the stale errors file goes.
    let run = batch(&common).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(!errors.exists());
    assert_eq!(read_jsonl(&out).len(), 100);

    // A model the server does not have: refused before anything is sent.
    let run = batch(&job(&input, &out, "nothing", &url, &[])).await;
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("cannot read the config of `nothing`"),
        "{}",
        run.stderr
    );
    gw.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_input_and_output_format_gives_the_same_rows() {
    let backend = BackendProcess::start(&sample_repo(), "127.0.0.1:0".parse().unwrap());
    let url = backend.addr.to_string();
    let dir = tempfile::tempdir().unwrap();
    let h = holdout();
    let x = &h.features;
    let d = dir.path();
    write_npy(&d.join("x.npy"), x);
    // .npz: the array under the input's name.
    {
        let file = std::fs::File::create(d.join("x.npz")).unwrap();
        let mut zip = zip::ZipWriter::new(file);
        zip.start_file("INPUT__0.npy", zip::write::FileOptions::default())
            .unwrap();
        std::io::Write::write_all(&mut zip, &npy_bytes(x)).unwrap();
        zip.finish().unwrap();
    }
    // JSON Lines in the KServe v2 shape.
    let jsonl: String = x
        .iter()
        .map(|r| format!("{}\n", serde_json::json!({"inputs": [{"name": "INPUT__0", "shape": [1, 64], "datatype": "FP32", "data": r}]})))
        .collect();
    std::fs::write(d.join("x.jsonl"), jsonl).unwrap();
    // CSV with an id column that --columns leaves out.
    let mut csv = String::from("id");
    for i in 0..64 {
        csv.push_str(&format!(",px{i}"));
    }
    csv.push('\n');
    for (i, r) in x.iter().enumerate() {
        csv.push_str(&format!("id-{i}"));
        for v in r {
            csv.push_str(&format!(",{v}"));
        }
        csv.push('\n');
    }
    std::fs::write(d.join("x.csv"), csv).unwrap();
    // Parquet both ways: a fixed-size list column named after the input, and a column per
    // feature (float64, as pandas writes).
    write_parquet_list(&d.join("list.parquet"), x);
    write_parquet_columns(&d.join("cols.parquet"), x);

    let reference = &h.models["digits_mlp/2"].probabilities;
    let inputs: [(&str, &[&str]); 6] = [
        ("x.npy", &[]),
        ("x.npz", &[]),
        ("x.jsonl", &[]),
        ("x.csv", &["--columns", "px0..px63"]),
        ("list.parquet", &[]),
        ("cols.parquet", &[]),
    ];
    for (file, extra) in inputs {
        for output in ["jsonl", "csv", "npz", "parquet"] {
            let out = d.join(format!("{file}.out.{output}"));
            let mut args = job(
                &d.join(file),
                &out,
                "digits_mlp",
                &url,
                &["--json", "--batch-size", "50"],
            );
            args.extend(extra.iter().map(|s| (*s).to_owned()));
            let run = batch(&args).await;
            assert_eq!(run.code, 0, "{file} → {output}: {}", run.stderr);
            let got = match output {
                "jsonl" => read_jsonl(&out),
                "parquet" => read_parquet(&out),
                "csv" => read_csv_output(&out),
                _ => read_npz_output(&out),
            };
            assert_every_row_once(&got, x.len());
            for (row, target, p) in &got {
                assert_eq!(target, "digits_mlp/2");
                assert!(
                    close(p, &reference[*row as usize]),
                    "{file} → {output}: row {row}"
                );
            }
        }
    }
    backend.kill();
}

fn write_parquet_list(path: &Path, x: &[Vec<f32>]) {
    use arrow_array::{FixedSizeListArray, Float32Array, RecordBatch};
    use std::sync::Arc;
    let values = Float32Array::from_iter_values(x.iter().flatten().copied());
    let item = Arc::new(arrow_schema::Field::new(
        "item",
        arrow_schema::DataType::Float32,
        false,
    ));
    let list = FixedSizeListArray::try_new(item, 64, Arc::new(values), None).unwrap();
    let batch = RecordBatch::try_from_iter([("INPUT__0", Arc::new(list) as arrow_array::ArrayRef)])
        .unwrap();
    write_batch(path, &batch);
}

fn write_parquet_columns(path: &Path, x: &[Vec<f32>]) {
    use arrow_array::{ArrayRef, Float64Array, RecordBatch};
    use std::sync::Arc;
    let cols: Vec<(String, ArrayRef)> = (0..64)
        .map(|c| {
            (
                format!("px{c}"),
                Arc::new(Float64Array::from_iter_values(
                    x.iter().map(|r| f64::from(r[c])),
                )) as ArrayRef,
            )
        })
        .collect();
    write_batch(path, &RecordBatch::try_from_iter(cols).unwrap());
}

fn write_batch(path: &Path, batch: &arrow_array::RecordBatch) {
    let file = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    w.write(batch).unwrap();
    w.close().unwrap();
}

fn read_csv_output(path: &Path) -> Vec<(u64, String, Vec<f32>)> {
    let mut r = csv::Reader::from_path(path).unwrap();
    let header = r.headers().unwrap().clone();
    assert_eq!(&header[0], "row");
    assert_eq!(&header[1], "target");
    assert_eq!(&header[2], "probabilities_0");
    r.records()
        .map(|rec| {
            let rec = rec.unwrap();
            let p = (2..12).map(|k| rec[k].parse::<f32>().unwrap()).collect();
            (rec[0].parse().unwrap(), rec[1].to_owned(), p)
        })
        .collect()
}

fn read_npz_output(path: &Path) -> Vec<(u64, String, Vec<f32>)> {
    let mut z = npyz::npz::NpzArchive::open(path).unwrap();
    let rows: Vec<i64> = z.by_name("row").unwrap().unwrap().into_vec().unwrap();
    let targets: Vec<String> = z.by_name("target").unwrap().unwrap().into_vec().unwrap();
    let probs = z.by_name("probabilities").unwrap().unwrap();
    assert_eq!(probs.shape(), &[rows.len() as u64, 10]);
    let probs: Vec<f32> = probs.into_vec().unwrap();
    rows.iter()
        .zip(targets)
        .zip(probs.chunks(10))
        .map(|((r, t), p)| (*r as u64, t, p.to_vec()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_inputs_name_the_file_row_and_column_and_nothing_is_done() {
    let backend = BackendProcess::start(&sample_repo(), "127.0.0.1:0".parse().unwrap());
    let url = backend.addr.to_string();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let x = rows(20);
    let header: String = (0..64)
        .map(|i| format!("px{i}"))
        .collect::<Vec<_>>()
        .join(",");
    let line = |r: &[f32]| r.iter().map(f32::to_string).collect::<Vec<_>>().join(",");
    // A ragged row: line 5 (row 3) has 63 fields.
    let mut ragged = format!("{header}\n");
    for (i, r) in x.iter().enumerate() {
        ragged.push_str(&if i == 3 { line(&r[..63]) } else { line(r) });
        ragged.push('\n');
    }
    std::fs::write(d.join("ragged.csv"), ragged).unwrap();
    // A word in a number column: row 7, column px12.
    let mut words = format!("{header}\n");
    for (i, r) in x.iter().enumerate() {
        let mut cells: Vec<String> = r.iter().map(f32::to_string).collect();
        if i == 7 {
            cells[12] = "twelve".into();
        }
        words.push_str(&cells.join(","));
        words.push('\n');
    }
    std::fs::write(d.join("words.csv"), words).unwrap();
    // A .npy cut short: 20 rows announced, 11 rows and 5 values present.
    let full = npy_bytes(&x);
    let cut = full.len() - (8 * 64 + 59) * 4;
    std::fs::write(d.join("cut.npy"), &full[..cut]).unwrap();
    // Parquet whose px5 column holds strings.
    {
        use arrow_array::{ArrayRef, Float32Array, RecordBatch, StringArray};
        use std::sync::Arc;
        let cols: Vec<(String, ArrayRef)> = (0..64)
            .map(|c| {
                let a: ArrayRef = if c == 5 {
                    Arc::new(StringArray::from_iter_values(
                        x.iter().map(|r| r[c].to_string()),
                    ))
                } else {
                    Arc::new(Float32Array::from_iter_values(x.iter().map(|r| r[c])))
                };
                (format!("px{c}"), a)
            })
            .collect();
        write_batch(
            &d.join("schema.parquet"),
            &RecordBatch::try_from_iter(cols).unwrap(),
        );
    }
    let cases: [(&str, &[&str]); 4] = [
        (
            "ragged.csv",
            &["line 5 (row 3)", "63 fields", "column `px63`"],
        ),
        (
            "words.csv",
            &[
                "line 9 (row 7)",
                "column `px12`",
                "`twelve` is not a number",
            ],
        ),
        ("cut.npy", &["truncated", "row 11 is cut at column 5"]),
        ("schema.parquet", &["row 0, column `px5`", "Utf8", "FP32"]),
    ];
    for (file, expect) in cases {
        let out = d.join(format!("{file}.jsonl"));
        let run = batch(&job(&d.join(file), &out, "digits_mlp", &url, &[])).await;
        assert_eq!(run.code, 1, "{file}: {}", run.stderr);
        assert!(
            run.stderr.contains(file),
            "{file}: names the file: {}",
            run.stderr
        );
        for e in expect {
            assert!(
                run.stderr.contains(e),
                "{file}: expected `{e}` in: {}",
                run.stderr
            );
        }
        assert!(!out.exists(), "{file}: no output");
        assert!(
            !PathBuf::from(format!("{}.checkpoint.json", out.display())).exists(),
            "{file}: nothing recorded as done"
        );
        assert!(
            !PathBuf::from(format!("{}.journal", out.display())).exists(),
            "{file}: no journal"
        );
    }
    backend.kill();
}
