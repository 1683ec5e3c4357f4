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
