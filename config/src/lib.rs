//! Switchyard's configuration files: `gateway.yaml` (the deployment) and the policy files
//! ML teams edit (`policies/*.yaml`, one route each).
//!
//! # Overview
//! * [`gateway`] and [`policy`]: serde wire types with `deny_unknown_fields`, a doc comment
//!   on every field (units and defaults), and JSON Schema derives.
//! * [`validate`]: semantic checks that report every problem with file, line and path.
//! * [`load_gateway_config`], [`load_policies`]: read, parse and validate from disk; the
//!   same code runs for `switchyard check`, start-up and every hot reload.
//!
//! # Invariants
//! * This crate knows YAML and nothing of tokio, pingora or the proto: the policy schema
//!   does not move when the protocol does.
//! * The YAML library is used behind [`parse_yaml`] only. It is `serde-saphyr`: pure Rust,
//!   maintained, precise error positions, and `Spanned` values for semantic errors;
//!   `serde_yaml`, which the design card names, is archived by its author.

mod diagnostic;
pub mod finish;
pub mod gateway;
pub mod policy;
pub mod rules;
mod units;
pub mod validate;

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

pub use diagnostic::{Diagnostic, Diagnostics};
pub use gateway::GatewayConfig;
pub use policy::PolicyFile;
pub use units::{At, ByteSize, HumanDuration};

/// Parses YAML text into `T`; a syntax or type error becomes one diagnostic with its line,
/// column and field path.
pub fn parse_yaml<T: DeserializeOwned>(file: &Path, text: &str) -> Result<T, Diagnostic> {
    let mut path = String::new();
    let result = serde_saphyr::with_deserializer_from_str(text, |de| {
        serde_path_to_error::deserialize::<_, T>(de).map_err(|e| {
            path = e.path().to_string();
            e.into_inner()
        })
    });
    result.map_err(|err| {
        let (line, column) = err.location().map_or((0, 0), |l| (l.line(), l.column()));
        // `At<T>` wraps values in serde-saphyr's `Spanned`, which adds a `value` segment.
        let path: Vec<&str> = path
            .split('.')
            .filter(|s| !matches!(*s, "value" | "?" | ""))
            .collect();
        let path = path.join(".");
        Diagnostic::new(file, line, column, path, first_line(&err.to_string()))
    })
}

/// serde-saphyr renders a source snippet under its message; a diagnostic keeps the message.
fn first_line(message: &str) -> String {
    let line = message.lines().next().unwrap_or_default();
    // "error: line 4 column 30: unknown field ..." -> "unknown field ..."
    let line = line.strip_prefix("error: ").unwrap_or(line);
    match line.split_once(": ") {
        Some((pos, rest)) if pos.starts_with("line ") => rest.to_owned(),
        _ => line.to_owned(),
    }
}

/// Reads and validates `gateway.yaml`; `policies` comes back resolved against the file's folder.
pub fn load_gateway_config(file: &Path) -> Result<GatewayConfig, Diagnostics> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| Diagnostics(vec![Diagnostic::file(file, format!("cannot read: {e}"))]))?;
    let mut config: GatewayConfig = parse_yaml(file, &text).map_err(|d| Diagnostics(vec![d]))?;
    let mut problems = Vec::new();
    for (name, backend) in &config.backends {
        if backend.value.endpoints.is_empty() {
            problems.push(Diagnostic::new(
                file,
                backend.line,
                backend.column,
                format!("backends.{name}.endpoints"),
                "a backend pool needs at least one endpoint",
            ));
        }
        let at = |field: String, message: String| {
            Diagnostic::new(file, backend.line, backend.column, field, message)
        };
        let b = &backend.value;
        for (i, e) in b.endpoints.iter().enumerate() {
            let field = |f: &str| match e {
                gateway::EndpointConfig::Address(_) => format!("backends.{name}.endpoints[{i}]"),
                gateway::EndpointConfig::Detailed(_) => {
                    format!("backends.{name}.endpoints[{i}].{f}")
                }
            };
            if !gateway::is_host_port(e.address()) {
                problems.push(at(
                    field("address"),
                    format!("'{}' is not host:port", e.address()),
                ));
            }
            match e.metrics() {
                Some(m) if !gateway::is_host_port(m) && !gateway::is_port_only(m) => {
                    problems.push(at(
                        field("metrics"),
                        format!("'{m}' is not host:port or :port"),
                    ));
                }
                None if b.balance() == gateway::Balance::QueueAware => problems.push(at(
                    field("metrics"),
                    format!(
                        "balance: queue_aware reads every endpoint's queue depth from its /metrics, \
                         and '{}' names none: write {{ address: {}, metrics: host:port }} (or \
                         metrics: ':port' on the same host)",
                        e.address(),
                        e.address()
                    ),
                )),
                _ => {}
            }
        }
        if b.max_in_flight == Some(0) {
            problems.push(at(
                format!("backends.{name}.max_in_flight"),
                "max_in_flight must be at least 1 (leave it out for no limit)".into(),
            ));
        }
        for (what, d) in [
            ("scrape_interval", b.scrape_interval),
            ("resolve_interval", b.resolve_interval),
        ] {
            let what = format!("backends.{name}.{what}");
            if let Some(d) = d
                && let Err(e) = rules::within(&what, d.0, rules::MAX_PERIOD)
            {
                problems.push(at(what, e));
            }
        }
    }
    if let Some(shared) = &config.shared_state {
        let at = |field: String, message: String| Diagnostic::new(file, 0, 0, field, message);
        if !shared.redis.starts_with("redis://") {
            problems.push(at(
                "shared_state.redis".into(),
                format!(
                    "'{}' is not a Redis URL: write redis://host:port (rediss:// with TLS is not supported)",
                    shared.redis
                ),
            ));
        }
        if shared.prefix.is_empty() || shared.prefix.contains(char::is_whitespace) {
            problems.push(at(
                "shared_state.prefix".into(),
                format!(
                    "'{}' is not a key prefix: use letters, digits, ':', '-' or '_'",
                    shared.prefix
                ),
            ));
        }
        for (what, d) in [
            ("shared_state.sync_interval", shared.sync_interval),
            ("shared_state.timeout", shared.timeout),
        ] {
            if let Err(e) = rules::within(what, d.0, rules::MAX_PERIOD) {
                problems.push(at(what.into(), e));
            }
        }
    }
    if let Some(t) = &config.tracing {
        let at = |field: &str, message: String| Diagnostic::new(file, 0, 0, field, message);
        if t.otlp_endpoint.starts_with("https://") {
            problems.push(at(
                "tracing.otlp_endpoint",
                format!(
                    "'{}': TLS to the receiver is not built in; send to a collector on the same host or pod over http:// (it may forward over TLS)",
                    t.otlp_endpoint
                ),
            ));
        } else if !t.otlp_endpoint.starts_with("http://") {
            problems.push(at(
                "tracing.otlp_endpoint",
                format!(
                    "'{}' is not an OTLP/gRPC URL: write http://host:4317",
                    t.otlp_endpoint
                ),
            ));
        }
        if !(0.0..=1.0).contains(&t.sample_ratio) {
            problems.push(at(
                "tracing.sample_ratio",
                format!("{} is not a share: expected 0 to 1", t.sample_ratio),
            ));
        }
        if t.max_queue == 0 || t.max_queue > 1 << 20 {
            problems.push(at(
                "tracing.max_queue",
                format!("{} spans: expected 1 to 1048576", t.max_queue),
            ));
        }
    }
    if let Some(log) = &config.access_log {
        let at = |field: &str, message: String| Diagnostic::new(file, 0, 0, field, message);
        if log.path.is_empty() {
            problems.push(at(
                "access_log.path",
                "write `stderr` or a file path".into(),
            ));
        }
        if log.buffer == 0 || log.buffer > 1 << 20 {
            problems.push(at(
                "access_log.buffer",
                format!("{} lines: expected 1 to 1048576", log.buffer),
            ));
        }
    }
    let periods = [
        (
            "limits.default_deadline",
            config.limits.default_deadline.0,
            rules::MAX_DEADLINE,
        ),
        (
            "limits.shutdown_grace",
            config.limits.shutdown_grace.0,
            rules::MAX_DEADLINE,
        ),
        (
            "limits.idle_timeout",
            config.limits.idle_timeout.0,
            rules::MAX_PERIOD,
        ),
        (
            "limits.header_timeout",
            config.limits.header_timeout.0,
            rules::MAX_PERIOD,
        ),
        (
            "limits.body_timeout",
            config.limits.body_timeout.0,
            rules::MAX_PERIOD,
        ),
        (
            "limits.tcp_keepalive",
            config.limits.tcp_keepalive.0,
            rules::MAX_PERIOD,
        ),
        (
            "limits.upstream_ping_interval",
            config.limits.upstream_ping_interval.0,
            rules::MAX_PERIOD,
        ),
        (
            "breaker.base_ejection",
            config.breaker.base_ejection.0,
            rules::MAX_PERIOD,
        ),
        (
            "breaker.max_ejection",
            config.breaker.max_ejection.0,
            rules::MAX_PERIOD,
        ),
        (
            "health_check.interval",
            config.health_check.interval.0,
            rules::MAX_PERIOD,
        ),
        (
            "health_check.timeout",
            config.health_check.timeout.0,
            rules::MAX_TIMEOUT,
        ),
        (
            "reload.debounce",
            config.reload.debounce.0,
            rules::MAX_PERIOD,
        ),
    ];
    for (what, d, max) in periods {
        if let Err(e) = rules::within(what, d, max) {
            problems.push(Diagnostic::new(file, 0, 0, what, e));
        }
    }
    if config.breaker.base_ejection.0 > config.breaker.max_ejection.0 {
        problems.push(Diagnostic::new(
            file,
            0,
            0,
            "breaker.base_ejection",
            "base_ejection must be at most max_ejection",
        ));
    }
    for (name, backend) in &config.backends {
        if let Some(t) = backend.value.connect_timeout
            && let Err(e) = rules::within("connect_timeout", t.0, rules::MAX_TIMEOUT)
        {
            problems.push(Diagnostic::new(
                file,
                backend.line,
                backend.column,
                format!("backends.{name}.connect_timeout"),
                e,
            ));
        }
    }
    if config.limits.max_in_flight == 0 {
        problems.push(Diagnostic::new(
            file,
            0,
            0,
            "limits.max_in_flight",
            "max_in_flight must be at least 1",
        ));
    }
    if config.limits.max_response_bytes.0 < 1024 {
        problems.push(Diagnostic::new(
            file,
            0,
            0,
            "limits.max_response_bytes",
            "max_response_bytes must be at least 1KiB: no reply would fit",
        ));
    }
    if config.limits.max_connections == 0 {
        problems.push(Diagnostic::new(
            file,
            0,
            0,
            "limits.max_connections",
            "max_connections must be at least 1",
        ));
    }
    if config.breaker.consecutive_failures == 0 || config.breaker.half_open_probes == 0 {
        problems.push(Diagnostic::new(
            file,
            0,
            0,
            "breaker",
            "consecutive_failures and half_open_probes must be at least 1",
        ));
    }
    if !problems.is_empty() {
        return Err(Diagnostics::sorted(problems));
    }
    let base = file.parent().unwrap_or(Path::new("."));
    if config.policies.is_relative() {
        config.policies = base.join(&config.policies);
    }
    if let Some(dir) = config.state_dir.as_mut()
        && dir.is_relative()
    {
        *dir = base.join(&*dir);
    }
    if let Some(token) = config.admin.token_file.as_mut()
        && token.is_relative()
    {
        *token = base.join(&*token);
    }
    if let Some(log) = config.access_log.as_mut()
        && log.path != "stderr"
        && Path::new(&log.path).is_relative()
    {
        log.path = base.join(&log.path).display().to_string();
    }
    config.file = Some(file.to_path_buf());
    Ok(config)
}

/// A validated set of policy files, one route each.
#[derive(Debug, Clone)]
pub struct PolicySet {
    /// The files, sorted by path.
    pub files: Vec<LoadedPolicy>,
}

/// One validated policy file.
#[derive(Debug, Clone)]
pub struct LoadedPolicy {
    /// Where it was read from.
    pub file: PathBuf,
    /// Its contents.
    pub policy: PolicyFile,
}

/// Whether a directory entry is a policy file: `*.yaml` or `*.yml`, not hidden (editor
/// swap files, Kubernetes' `..data` links and `.tmp` files of atomic writers are skipped).
pub fn is_policy_file(path: &Path) -> bool {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    !name.starts_with('.') && (name.ends_with(".yaml") || name.ends_with(".yml"))
}

/// Reads every policy file in `dir`, parses and validates all of them; either the whole
/// set is good, or every problem of every file comes back.
pub fn load_policies(dir: &Path, gateway: &GatewayConfig) -> Result<PolicySet, Diagnostics> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        Diagnostics(vec![Diagnostic::file(
            dir,
            format!("cannot read the policy folder: {e}"),
        )])
    })?;
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| is_policy_file(p))
        .collect();
    paths.sort();
    let mut problems = Vec::new();
    let mut texts = Vec::new();
    for file in paths {
        // Only regular files (a symlink to one, as Kubernetes mounts a ConfigMap, is one):
        // opening a FIFO or a device would block the reload.
        if !std::fs::metadata(&file).is_ok_and(|m| m.is_file()) {
            problems.push(Diagnostic::file(
                &file,
                "not a regular file (a FIFO, socket, device, folder or dangling link); policies are read from regular files only",
            ));
            continue;
        }
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) => {
                problems.push(Diagnostic::file(&file, format!("cannot read: {e}")));
                continue;
            }
        };
        texts.push((file, text));
    }
    match load_policy_texts(texts, gateway) {
        Ok(set) if problems.is_empty() => Ok(set),
        Ok(_) => Err(Diagnostics::sorted(problems)),
        Err(Diagnostics(more)) => {
            problems.extend(more);
            Err(Diagnostics::sorted(problems))
        }
    }
}

/// Parses and validates policy files already read, `(path, text)` sorted by path, as
/// [`load_policies`] does once it has read them: what `check`, start-up and every reload
/// run (and what the policy fuzz target drives).
pub fn load_policy_texts(
    texts: Vec<(PathBuf, String)>,
    gateway: &GatewayConfig,
) -> Result<PolicySet, Diagnostics> {
    let mut problems = Vec::new();
    let mut files = Vec::new();
    for (file, text) in texts {
        if text
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
        {
            problems.push(Diagnostic::file(
                &file,
                "the file is empty; a policy file holds one route",
            ));
            continue;
        }
        match parse_yaml::<PolicyFile>(&file, &text) {
            Ok(policy) => {
                problems.extend(validate::validate_policy(&file, &policy, gateway));
                files.push(LoadedPolicy { file, policy });
            }
            Err(d) => problems.push(d),
        }
    }
    let mut routes: std::collections::HashMap<&str, &Path> = std::collections::HashMap::new();
    for f in &files {
        let route = &f.policy.route;
        if let Some(first) = routes.insert(&route.value, &f.file) {
            problems.push(Diagnostic::new(
                &f.file,
                route.line,
                route.column,
                "route",
                format!(
                    "route '{}' is already defined in {}; one file per route",
                    route.value,
                    first.display()
                ),
            ));
        }
    }
    // Plans may delegate to other routes: each must exist, and no chain may come back.
    let known: std::collections::HashMap<&str, &LoadedPolicy> = files
        .iter()
        .map(|f| (f.policy.route.value.as_str(), f))
        .collect();
    let refs_of = |f: &LoadedPolicy| {
        let mut refs = Vec::new();
        for plan in validate::all_plans(&f.policy) {
            validate::route_refs(&plan, &mut refs);
        }
        refs
    };
    for f in &files {
        for (route, line, column) in refs_of(f) {
            if !known.contains_key(route.as_str()) {
                let mut names: Vec<&str> = known.keys().copied().collect();
                names.sort_unstable();
                problems.push(Diagnostic::new(
                    &f.file,
                    line,
                    column,
                    "{ route: .. }",
                    format!(
                        "plan refers to unknown route '{route}'; the policies define: {}",
                        names.join(", ")
                    ),
                ));
            }
        }
    }
    let edges = |route: &str| -> Vec<String> {
        known
            .get(route)
            .map(|f| refs_of(f).into_iter().map(|r| r.0).collect())
            .unwrap_or_default()
    };
    let routes: Vec<String> = files.iter().map(|f| f.policy.route.value.clone()).collect();
    for cycle in validate::find_cycles(&routes, &edges) {
        let described: Vec<String> = cycle
            .iter()
            .map(|r| {
                format!(
                    "{r} ({})",
                    known
                        .get(r.as_str())
                        .map_or(String::new(), |f| f.file.display().to_string())
                )
            })
            .collect();
        let Some(f) = known.get(cycle[0].as_str()) else {
            continue;
        };
        let route = &f.policy.route;
        problems.push(Diagnostic::new(
            &f.file,
            route.line,
            route.column,
            "route",
            format!(
                "routes delegate to each other in a cycle: {}",
                described.join(" -> ")
            ),
        ));
    }
    if problems.is_empty() {
        Ok(PolicySet { files })
    } else {
        Err(Diagnostics::sorted(problems))
    }
}

/// The JSON Schema of policy files (what `policies/schema.json` holds).
pub fn policy_schema() -> String {
    let schema = schemars::generate::SchemaSettings::draft2020_12()
        .into_generator()
        .into_root_schema_for::<PolicyFile>();
    let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
    text.push('\n');
    text
}
