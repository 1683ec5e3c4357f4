//! `switchyard rollout`: a running gateway's rollouts from its admin API (`status`,
//! `pause`, `resume`, `promote`, `abort`), and `finish`, which prints (or writes) the
//! policy that makes a finished rollout's result permanent.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use switchyard_config::GatewayConfig;
use switchyard_config::finish::{Ending, finish};

/// `switchyard rollout ...`.
#[derive(Debug, clap::Args)]
pub(crate) struct RolloutArgs {
    #[command(subcommand)]
    command: RolloutCommand,
    /// The deployment file: the admin address and token come from it.
    #[arg(long, global = true, default_value = "config/gateway.yaml")]
    config: PathBuf,
    /// The admin API's address (default: `listen.admin` of the deployment file).
    #[arg(long, global = true)]
    admin: Option<SocketAddr>,
    /// Print the admin API's JSON as it is.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, clap::Subcommand)]
enum RolloutCommand {
    /// State, step, weight, time in step, each gate against its threshold, history.
    Status {
        /// One route (default: every route under rollout).
        route: Option<String>,
    },
    /// Hold the current step (its share stays) until resumed.
    Pause { route: String },
    /// Go on with a paused step (its interval and counts start afresh).
    Resume { route: String },
    /// Go to the next step now.
    Promote { route: String },
    /// Roll back now: the candidate gets nothing from the next request on.
    Abort { route: String },
    /// Print the policy that makes a complete or rolled-back rollout permanent.
    Finish {
        route: String,
        /// Write it to the policy file (the gateway reloads it) instead of printing it.
        #[arg(long)]
        write: bool,
    },
}

impl RolloutArgs {
    /// The deployment file.
    pub(crate) fn config(&self) -> &Path {
        &self.config
    }
}

pub(crate) fn run(args: RolloutArgs, config: &GatewayConfig) -> Result<()> {
    let admin = Admin {
        addr: args.admin.unwrap_or(config.listen.admin),
        token: token(config),
    };
    let verb = match &args.command {
        RolloutCommand::Pause { .. } => "pause",
        RolloutCommand::Resume { .. } => "resume",
        RolloutCommand::Promote { .. } => "promote",
        _ => "abort",
    };
    match args.command {
        RolloutCommand::Status { route } => {
            let body = match &route {
                Some(r) => admin.call("GET", &format!("/admin/rollouts/{r}"))?,
                None => admin.call("GET", "/admin/rollouts")?,
            };
            if args.json {
                println!("{}", serde_json::to_string_pretty(&body)?);
                return Ok(());
            }
            let rows = match &route {
                Some(_) => vec![body],
                None => body["rollouts"].as_array().cloned().unwrap_or_default(),
            };
            if rows.is_empty() {
                println!("no route is under rollout");
            }
            for r in &rows {
                print!("{}", describe(r));
            }
            Ok(())
        }
        RolloutCommand::Pause { route }
        | RolloutCommand::Resume { route }
        | RolloutCommand::Promote { route }
        | RolloutCommand::Abort { route } => {
            let body = admin.call("POST", &format!("/admin/rollouts/{route}/{verb}"))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&body)?);
            } else {
                print!("{}", describe(&body));
            }
            Ok(())
        }
        RolloutCommand::Finish { route, write } => {
            let status = admin.call("GET", &format!("/admin/rollouts/{route}"))?;
            finish_route(&route, &status, config, write)
        }
    }
}

fn token(config: &GatewayConfig) -> Option<String> {
    let from_env = config
        .admin
        .token_env
        .as_ref()
        .and_then(|v| std::env::var(v).ok());
    let from_file = || {
        config
            .admin
            .token_file
            .as_ref()
            .and_then(|f| std::fs::read_to_string(f).ok())
    };
    from_env
        .or_else(from_file)
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
}

/// The admin API over plain HTTP/1.1 (it listens on loopback; one request per connection).
struct Admin {
    addr: SocketAddr,
    token: Option<String>,
}

impl Admin {
    fn call(&self, method: &str, path: &str) -> Result<Value> {
        let mut stream = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))
            .with_context(|| format!("cannot reach the gateway's admin API at {} (is the gateway running? --admin sets the address)", self.addr))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let auth = self
            .token
            .as_ref()
            .map(|t| format!("authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nhost: {}\r\n{auth}content-length: 0\r\nconnection: close\r\n\r\n",
            self.addr
        )?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw)?;
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .context("the admin API's reply has no header end")?;
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .context("the admin API's reply has no status")?;
        let value: Value = serde_json::from_str(body)
            .with_context(|| format!("the admin API answered {status} with: {body}"))?;
        if status != 200 {
            let error = value["error"].as_str().unwrap_or(body);
            bail!("{method} {path}: {status}: {error}");
        }
        Ok(value)
    }
}

fn num(v: &Value, digits: usize) -> String {
    v.as_f64().map_or("-".into(), |x| format!("{x:.digits$}"))
}

fn ms(v: &Value) -> String {
    v.as_f64()
        .map_or("-".into(), |x| format!("{:.2}ms", x * 1000.0))
}

/// A rollout's status in words.
fn describe(r: &Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let state = r["state"].as_str().unwrap_or("?");
    let steps = r["steps"].as_array().map_or(0, Vec::len);
    let step = r["step"]
        .as_u64()
        .map_or(String::new(), |s| format!(", step {s}/{steps}"));
    let _ = writeln!(
        out,
        "route {}: {state}{step}: {} takes {}% of {}'s default-plan requests",
        r["route"].as_str().unwrap_or("?"),
        r["candidate"].as_str().unwrap_or("?"),
        num(&r["weight"], 1).trim_end_matches(".0"),
        r["baseline"].as_str().unwrap_or("?"),
    );
    let _ = writeln!(
        out,
        "  {:.1}s in this step of {}s; gates judged after {} requests; on failure: {}",
        r["time_in_step_seconds"].as_f64().unwrap_or(0.0),
        r["interval_seconds"],
        r["min_requests"],
        r["on_failure"].as_str().unwrap_or("?"),
    );
    if let Some(reason) = r["reason"].as_str() {
        let _ = writeln!(out, "  why: {reason}");
    }
    if let Some(e) = r["state_error"].as_str() {
        let _ = writeln!(out, "  state file: {e}");
    }
    let gates = r["gates"].as_array().cloned().unwrap_or_default();
    if !gates.is_empty() {
        let _ = writeln!(out, "  gates:");
    }
    for g in &gates {
        let gate = g["gate"].as_str().unwrap_or("?");
        let bound = if gate == "shadow_agreement" {
            "min"
        } else {
            "max"
        };
        let _ = writeln!(
            out,
            "    {gate:<17} {:>8}  {bound} {:<6} {:<14} ({}/{} {})",
            num(&g["value"], 4),
            g["threshold"],
            g["verdict"].as_str().unwrap_or("?"),
            g["have"],
            g["need"],
            if gate == "shadow_agreement" {
                "comparisons"
            } else {
                "candidate requests"
            },
        );
    }
    let c = &r["counts"];
    if !c.is_null() {
        let side = |s: &Value| {
            format!(
                "{} requests, {} errors, p99 {}",
                s["requests"],
                s["errors"],
                ms(&s["p99_seconds"])
            )
        };
        let _ = writeln!(
            out,
            "  this step: candidate {}; baseline {}; shadow {} of {} agreed",
            side(&c["candidate"]),
            side(&c["baseline"]),
            c["agreed"],
            c["compared"],
        );
    }
    let history = r["history"].as_array().cloned().unwrap_or_default();
    if !history.is_empty() {
        let _ = writeln!(out, "  history:");
    }
    for h in &history {
        let at = UNIX_EPOCH + Duration::from_millis(h["at_ms"].as_u64().unwrap_or(0));
        let _ = writeln!(
            out,
            "    {}  {} -> {}: {}",
            humantime::format_rfc3339_seconds(at),
            h["from"].as_str().unwrap_or("?"),
            h["to"].as_str().unwrap_or("?"),
            h["reason"].as_str().unwrap_or(""),
        );
    }
    out
}

/// Prints or writes the policy that makes the rollout's result permanent, checked as a
/// reload would check it (with the other policy files of the folder).
fn finish_route(route: &str, status: &Value, config: &GatewayConfig, write: bool) -> Result<()> {
    let ending = match status["state"].as_str() {
        Some("complete") => Ending::Promoted,
        Some("rolled_back") => Ending::RolledBack,
        Some(other) => bail!(
            "the rollout of route '{route}' is {other}{}: finish it once it is complete or rolled back (`switchyard rollout promote` or `abort` decide it now)",
            status["step"]
                .as_u64()
                .map_or(String::new(), |s| format!(" at step {s}"))
        ),
        None => bail!("the admin API did not say the rollout's state"),
    };
    let file = PathBuf::from(
        status["file"]
            .as_str()
            .context("the admin API did not say the route's policy file")?,
    );
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let policy: switchyard_config::PolicyFile =
        switchyard_config::parse_yaml(&file, &text).map_err(|d| anyhow::anyhow!("{d}"))?;
    if policy.route.value != route {
        bail!(
            "{} now defines route '{}', not '{route}'",
            file.display(),
            policy.route.value
        );
    }
    let (new, changes) =
        finish(&text, &policy, ending).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    check_with_folder(&file, &new, config)?;
    for c in &changes {
        eprintln!("{}: {c}", file.display());
    }
    if write {
        let tmp = file.with_extension("yaml.finish-tmp");
        std::fs::write(&tmp, &new).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &file).with_context(|| format!("replacing {}", file.display()))?;
        eprintln!("{}: written; the gateway reloads it", file.display());
    } else {
        print!("{new}");
    }
    Ok(())
}

/// Validates the folder's policies with `file` holding `text`, as a reload would.
fn check_with_folder(file: &Path, text: &str, config: &GatewayConfig) -> Result<()> {
    let mut texts = Vec::new();
    let dir = file.parent().unwrap_or(Path::new("."));
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = entry?.path();
        if !switchyard_config::is_policy_file(&p) {
            continue;
        }
        let t = if p.file_name() == file.file_name() {
            text.to_owned()
        } else {
            std::fs::read_to_string(&p)?
        };
        texts.push((p, t));
    }
    switchyard_config::load_policy_texts(texts, config)
        .map(|_| ())
        .map_err(|d| anyhow::anyhow!("the finished policy would not load:\n{d}"))
}
