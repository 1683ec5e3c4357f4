//! Policy files as users write them: every shipped example loads, every file of the
//! invalid corpus (`tests/policies/invalid/`) is rejected with its expected message, and
//! `policies/schema.json` is what the types generate.

use std::path::{Path, PathBuf};

use switchyard_config::{load_gateway_config, load_policies, policy_schema};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[test]
fn shipped_policies_and_gateway_config_load() {
    let gateway = load_gateway_config(&root().join("config/gateway.yaml")).unwrap();
    assert_eq!(
        gateway.backends.keys().collect::<Vec<_>>(),
        ["stable", "canary"]
    );
    assert!(gateway.policies.ends_with("../policies"));
    let set = load_policies(&gateway.policies, &gateway).unwrap_or_else(|e| panic!("{e}"));
    let routes: Vec<&str> = set
        .files
        .iter()
        .map(|f| f.policy.route.value.as_str())
        .collect();
    assert!(routes.contains(&"digits"), "{routes:?}");
}

#[test]
fn every_invalid_policy_is_rejected_with_its_message() {
    let gateway = load_gateway_config(&root().join("config/gateway.yaml")).unwrap();
    let corpus = root().join("tests/policies/invalid");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&corpus)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 15, "the corpus holds {} files", files.len());
    let mut failures = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let expect = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} has no '# expect: ' line", file.display()));
        let line: Option<u64> = text
            .lines()
            .find_map(|l| l.strip_prefix("# line: ")?.parse().ok());
        // The corpus file joins a copy of the shipped policies, as it would in production.
        let dir = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(&gateway.policies).unwrap() {
            let p = entry.unwrap().path();
            if switchyard_config::is_policy_file(&p) {
                std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
            }
        }
        let name = file.file_name().unwrap();
        std::fs::copy(&file, dir.path().join(name)).unwrap();
        let Err(errors) = load_policies(dir.path(), &gateway) else {
            failures.push(format!("{}: accepted", file.display()));
            continue;
        };
        let ours: Vec<String> = errors
            .0
            .iter()
            .filter(|d| d.file.file_name() == Some(name))
            .map(ToString::to_string)
            .collect();
        let found = errors.0.iter().any(|d| {
            d.file.file_name() == Some(name)
                && d.to_string().contains(expect)
                && line.is_none_or(|l| d.line == l)
        });
        if !found {
            failures.push(format!(
                "{}: expected {expect:?} (line {line:?}), got {ours:#?}",
                file.display()
            ));
        }
        assert_eq!(
            ours.len(),
            errors.0.len(),
            "{}: the shipped files stay valid: {errors}",
            file.display()
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_problem_of_a_file_is_reported_at_once() {
    let gateway = load_gateway_config(&root().join("config/gateway.yaml")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("many.yaml"),
        "version: 1\nroute: many\ntargets:\n  a: { backend: nope, model: m, release: x }\ndefault: { split: { weights: { a: 0, z: 1 } } }\n",
    )
    .unwrap();
    let errors = load_policies(dir.path(), &gateway).unwrap_err().to_string();
    for words in [
        "unknown backend 'nope'",
        "'x' is not a release label",
        "got 0",
        "unknown target 'z'",
    ] {
        assert!(errors.contains(words), "{words:?} missing from:\n{errors}");
    }
    assert!(
        errors.contains("many.yaml:4:6: targets.a.backend"),
        "positions: {errors}"
    );
}

#[test]
fn policy_schema_json_is_fresh() {
    let path = root().join("policies/schema.json");
    let want = policy_schema();
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    if have != want {
        // rust-analyzer's habit: regenerate, then fail so the change gets committed.
        std::fs::write(&path, &want).unwrap();
        panic!("policies/schema.json was stale and has been regenerated; commit it");
    }
}

/// A gateway.yaml beside a policy folder holding `policies`.
fn setup(gateway_extra: &str, policies: &[(&str, String)]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    for (name, text) in policies {
        std::fs::write(dir.path().join("policies").join(name), text).unwrap();
    }
    let gateway = dir.path().join("gateway.yaml");
    std::fs::write(
        &gateway,
        format!("policies: policies\nbackends:\n  stable: {{ endpoints: [\"127.0.0.1:1\"] }}\n{gateway_extra}"),
    )
    .unwrap();
    (dir, gateway)
}

#[test]
fn every_duration_of_gateway_yaml_has_a_range() {
    for (extra, want) in [
        (
            "health_check: { interval: 0s }\n",
            "health_check.interval must be above 0 and at most 3600s, got 0s",
        ),
        (
            "health_check: { timeout: 2h }\n",
            "health_check.timeout must be above 0 and at most 60s",
        ),
        (
            "breaker: { base_ejection: 10m, max_ejection: 1m }\n",
            "base_ejection must be at most max_ejection",
        ),
        (
            "limits: { default_deadline: 1h }\n",
            "limits.default_deadline must be above 0 and at most 600s",
        ),
        (
            "reload: { debounce: 0s }\n",
            "reload.debounce must be above 0",
        ),
        (
            "limits: { max_response_bytes: 100 }\n",
            "max_response_bytes must be at least 1KiB",
        ),
    ] {
        let (_dir, gateway) = setup(extra, &[]);
        let e = load_gateway_config(&gateway).unwrap_err().to_string();
        assert!(e.contains(want), "{extra}: {e}");
    }
}

#[test]
fn a_fifo_in_the_policy_folder_is_refused_not_opened() {
    let (dir, gateway) = setup("", &[]);
    let fifo = dir.path().join("policies/stuck.yaml");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let config = load_gateway_config(&gateway).unwrap();
    // Opening the FIFO for reading would block until a writer came: this returns at once.
    let e = load_policies(&config.policies, &config)
        .unwrap_err()
        .to_string();
    assert!(e.contains("stuck.yaml"), "{e}");
    assert!(e.contains("not a regular file"), "{e}");
}

#[test]
fn the_plan_cycle_check_is_linear_in_a_deep_dag_of_named_plans() {
    // p0 splits over p1 and q1, each of which splits over p2 and q2, and so on: 2^40
    // paths, which a search that revisits shared plans would walk one by one.
    let depth = 40;
    let mut plans = String::from("plans:\n");
    for i in 0..depth {
        for n in ["p", "q"] {
            plans.push_str(&format!(
                "  {n}{i}: {{ split: {{ weights: {{ p{next}: 1, q{next}: 1 }} }} }}\n",
                next = i + 1
            ));
        }
    }
    plans.push_str(&format!("  p{depth}: a\n  q{depth}: a\n"));
    let policy = format!(
        "version: 1\nroute: deep\ntargets:\n  a: {{ backend: stable, model: digits_mlp, version: 1 }}\n{plans}default: p0\n"
    );
    let (_dir, gateway) = setup("", &[("deep.yaml", policy.clone())]);
    let config = load_gateway_config(&gateway).unwrap();
    let set = load_policies(&config.policies, &config).unwrap_or_else(|d| panic!("{d}"));
    assert_eq!(set.files.len(), 1);
    // And a cycle at the bottom of it is found and named.
    let cyclic = policy.replace(&format!("  p{depth}: a\n"), &format!("  p{depth}: p0\n"));
    let (_dir, gateway) = setup("", &[("deep.yaml", cyclic)]);
    let config = load_gateway_config(&gateway).unwrap();
    let e = load_policies(&config.policies, &config)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("plans refer to each other in a cycle: p0 -> p1"),
        "{e}"
    );
}

#[test]
fn tracing_and_access_log_values_that_would_fail_at_start_are_refused_by_check() {
    let dir = tempfile::tempdir().unwrap();
    let check = |extra: &str| {
        let file = dir.path().join("gateway.yaml");
        std::fs::write(
            &file,
            format!(
                "policies: policies\nbackends:\n  stable: {{ endpoints: [\"127.0.0.1:9001\"] }}\n{extra}"
            ),
        )
        .unwrap();
        load_gateway_config(&file).map(|c| (c.tracing, c.access_log))
    };
    let (tracing, log) = check(
        "tracing: { otlp_endpoint: \"http://127.0.0.1:4317\", sample_ratio: 0.25 }\naccess_log: { path: logs/access.jsonl }\n",
    )
    .unwrap();
    let tracing = tracing.unwrap();
    assert_eq!(tracing.sample_ratio, 0.25);
    assert_eq!(tracing.service_name, "switchyard-gateway");
    let log = log.unwrap();
    assert_eq!(log.buffer, 8192);
    assert!(
        std::path::Path::new(&log.path).starts_with(dir.path()),
        "a relative log path is the config's folder's: {}",
        log.path
    );
    assert_eq!(
        check("access_log: { path: stderr }\n")
            .unwrap()
            .1
            .unwrap()
            .path,
        "stderr"
    );
    for (extra, field, says) in [
        (
            "tracing: { otlp_endpoint: \"https://collector:4317\" }\n",
            "tracing.otlp_endpoint",
            "TLS to the receiver is not built in",
        ),
        (
            "tracing: { otlp_endpoint: \"collector:4317\" }\n",
            "tracing.otlp_endpoint",
            "write http://host:4317",
        ),
        (
            "tracing: { otlp_endpoint: \"http://c:4317\", sample_ratio: 1.5 }\n",
            "tracing.sample_ratio",
            "expected 0 to 1",
        ),
        (
            "tracing: { otlp_endpoint: \"http://c:4317\", max_queue: 0 }\n",
            "tracing.max_queue",
            "expected 1 to 1048576",
        ),
        (
            "access_log: { path: stderr, buffer: 0 }\n",
            "access_log.buffer",
            "expected 1 to 1048576",
        ),
        ("access_log: { path: \"\" }\n", "access_log.path", "stderr"),
        (
            "access_log: { path: stderr, format: text }\n",
            "",
            "unknown field",
        ),
    ] {
        let e = check(extra).expect_err(extra).to_string();
        assert!(e.contains(field) && e.contains(says), "{extra}: {e}");
    }
}
