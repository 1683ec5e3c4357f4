//! Instructions and heap allocations per request of a process run under
//! `valgrind --tool=callgrind`, counted between two points the bench chooses: a count that
//! does not move with the machine's load, unlike time.

use std::path::{Path, PathBuf};
use std::process::Command;

/// What one instrumented window cost.
pub(crate) struct Count {
    /// Instructions executed (callgrind's `Ir`).
    pub(crate) instructions: u64,
    /// Calls to `malloc`, `calloc` and `realloc` (Rust's system allocator goes through them).
    pub(crate) allocations: u64,
    /// The dump, for `callgrind_annotate --inclusive=yes <file>`.
    pub(crate) file: PathBuf,
}

/// Whether valgrind and callgrind_control are installed.
pub(crate) fn available() -> bool {
    ["valgrind", "callgrind_control"].iter().all(|tool| {
        Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// The command prefix that runs a program under callgrind with instrumentation off until
/// [`start`]; dumps land in `dir`.
pub(crate) fn command(dir: &Path) -> Vec<String> {
    vec![
        "valgrind".into(),
        "--tool=callgrind".into(),
        "--instr-atstart=no".into(),
        format!("--callgrind-out-file={}/callgrind.out.%p", dir.display()),
    ]
}

fn control(pid: u32, flag: &str) {
    let out = Command::new("callgrind_control")
        .args([flag, &pid.to_string()])
        .output()
        .expect("callgrind_control");
    assert!(
        out.status.success(),
        "callgrind_control {flag} {pid}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Turns instrumentation on; the counted window starts here.
pub(crate) fn instrument_on(pid: u32) {
    let out = Command::new("callgrind_control")
        .args(["-i", "on", &pid.to_string()])
        .output()
        .expect("callgrind_control");
    assert!(out.status.success(), "callgrind_control -i on");
}

/// Turns instrumentation off again (a later window starts with [`instrument_on`]).
pub(crate) fn instrument_off(pid: u32) {
    let out = Command::new("callgrind_control")
        .args(["-i", "off", &pid.to_string()])
        .output()
        .expect("callgrind_control");
    assert!(out.status.success(), "callgrind_control -i off");
}

/// Dumps the counts since [`instrument_on`] and reads them back.
pub(crate) fn dump(pid: u32, dir: &Path) -> Count {
    control(pid, "-d");
    let file = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("callgrind.out.{pid}.")))
        })
        .expect("a callgrind dump");
    let text = std::fs::read_to_string(&file).unwrap();
    let (instructions, allocations) = parse(&text);
    Count {
        instructions,
        allocations,
        file,
    }
}

/// `(total Ir, calls into the allocator)` of one callgrind profile. Function names are
/// compressed (`cfn=(12) malloc` once, then `cfn=(12)`); a `calls=N …` line counts N
/// calls of the last `cfn`.
fn parse(text: &str) -> (u64, u64) {
    let mut names = std::collections::HashMap::<&str, &str>::new();
    let (mut total, mut allocations) = (0u64, 0u64);
    let mut callee_is_alloc = false;
    for line in text.lines() {
        if let Some(v) = line
            .strip_prefix("totals: ")
            .or(line.strip_prefix("summary: "))
        {
            total = v
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        } else if let Some(f) = line.strip_prefix("fn=").or(line.strip_prefix("cfn=")) {
            let name = match f.split_once(") ") {
                Some((id, name)) => {
                    names.insert(id, name);
                    name
                }
                None => names.get(f.trim_end_matches(')')).copied().unwrap_or(f),
            };
            if line.starts_with("cfn=") {
                callee_is_alloc = matches!(name, "malloc" | "calloc" | "realloc");
            }
        } else if let Some(calls) = line.strip_prefix("calls=")
            && callee_is_alloc
        {
            allocations += calls
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    (total, allocations)
}

/// Instructions and allocations per request of each of `routes` (held-out rows, batch 1,
/// concurrency 1, 200 uncounted warm-up calls each) in one `switchyard gateway --config
/// config` under callgrind; prints a table and keeps each profile under `target/loadgen/`
/// as `callgrind.out.<tag>-<route>`. `None` when valgrind is not installed.
pub(crate) fn per_route(
    n: usize,
    runtime: &tokio::runtime::Runtime,
    dir: &Path,
    config: &str,
    routes: &[&str],
    tag: &str,
    note: &str,
) -> Option<Vec<f64>> {
    if !available() {
        println!("\n(valgrind not found: no instruction counts)");
        return None;
    }
    let out = dir.join("callgrind");
    std::fs::create_dir_all(&out).unwrap();
    let mut argv = command(&out);
    argv.extend([
        env!("CARGO_BIN_EXE_switchyard").into(),
        "gateway".into(),
        "--config".into(),
        config.into(),
    ]);
    let gateway = super::Server::start_program(&argv);
    let (addr, pid) = (gateway.addr("grpc"), gateway.child.id());
    let run = |route: &str, count: usize| {
        let requests = super::holdout_requests(route);
        runtime.block_on(async {
            let mut client = super::client(addr).await;
            for i in 0..count {
                client
                    .model_infer(requests[i % requests.len()].clone())
                    .await
                    .expect("infer");
            }
        })
    };
    println!(
        "\ninstructions per request under callgrind, one gateway, {n} requests per route at concurrency 1 ({note}):\n\n| route | instructions / request | allocations / request | profile |\n| --- | --- | --- | --- |"
    );
    let mut counts = Vec::new();
    for route in routes {
        run(route, 200);
        instrument_on(pid);
        run(route, n);
        let count = dump(pid, &out);
        // The next route's warm-up is not counted.
        instrument_off(pid);
        // Kept for `callgrind_annotate`; moved out so the next dump is the only one here.
        let keep = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target/loadgen")
            .join(format!("callgrind.out.{tag}-{route}"));
        let _ = std::fs::create_dir_all(keep.parent().unwrap());
        let _ = std::fs::copy(&count.file, &keep);
        let _ = std::fs::remove_file(&count.file);
        println!(
            "| {route} | {:.0} | {:.1} | {} |",
            count.instructions as f64 / n as f64,
            count.allocations as f64 / n as f64,
            keep.strip_prefix(env!("CARGO_MANIFEST_DIR"))
                .unwrap_or(&keep)
                .display()
        );
        counts.push(count.instructions as f64 / n as f64);
    }
    Some(counts)
}
