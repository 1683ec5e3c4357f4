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
