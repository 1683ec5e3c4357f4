//! Data-driven routing tests: each file in `tests/routing/` holds a policy and cases
//! (headers, `model_version`, random draw, unavailable targets) with the expected target,
//! reason or error. The decision code is the one live traffic uses.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use switchyard_gateway::routing::{self, Reason, Route, TargetId};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Fixture {
    policy: String,
    cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    model_version: String,
    #[serde(default)]
    random: u64,
    #[serde(default)]
    unavailable: Vec<String>,
    expect: Option<String>,
    reason: Option<String>,
    error: Option<String>,
    candidates: Option<Vec<String>>,
    expect_same_as: Option<Box<Case>>,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn route_of(policy: &str) -> Route {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::write(dir.path().join("policies/r.yaml"), policy).unwrap();
    let gateway_yaml = dir.path().join("gateway.yaml");
    std::fs::write(&gateway_yaml, "policies: policies\nbackends:\n  stable: { endpoints: [\"127.0.0.1:1\"] }\n  canary: { endpoints: [\"127.0.0.1:2\"] }\n").unwrap();
    let config = switchyard_config::load_gateway_config(&gateway_yaml).unwrap();
    let table = routing::load(&config.policies, &config).unwrap_or_else(|d| panic!("{d}"));
    (**table.get("r").expect("route r")).clone()
}

fn decide(route: &Route, case: &Case) -> Result<(String, Reason), String> {
    let mut headers = HeaderMap::new();
    for (k, v) in &case.headers {
        headers.append(
            HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    let unavailable: Vec<TargetId> = case
        .unavailable
        .iter()
        .map(|n| {
            TargetId(
                route
                    .targets
                    .iter()
                    .position(|t| &*t.name == n)
                    .expect("known target") as u16,
            )
        })
        .collect();
    let healthy = |t: TargetId| !unavailable.contains(&t);
    let d = route
        .decide(&headers, &case.model_version, case.random, &healthy)
        .map_err(|e| e.to_string())?;
    if let Some(want) = &case.candidates {
        let got: Vec<&str> = route
            .candidates(&d)
            .map(|t| &*route.target(t).name)
            .collect();
        assert_eq!(&got, want, "candidates for {case:?}");
    }
    // A decision names the target it chose, or the plan (cascade, ensemble) it runs.
    let chosen = match d.target {
        Some(t) => route.target(t).name.to_string(),
        None => route.plan_name(d.plan).to_string(),
    };
    Ok((chosen, d.reason))
}

fn reason(r: Reason) -> String {
    match r {
        Reason::Pinned => "pinned".into(),
        Reason::Rule(i) => format!("rule {i}"),
        Reason::Default => "default".into(),
    }
}

#[test]
fn routing_fixtures() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("tests/routing"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 4);
    let mut failures = Vec::new();
    for file in files {
        let fixture: Fixture = serde_saphyr::from_str(&std::fs::read_to_string(&file).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let route = route_of(&fixture.policy);
        for (i, case) in fixture.cases.iter().enumerate() {
            let name = format!("{}#{i}", file.file_name().unwrap().to_string_lossy());
            let got = decide(&route, case);
            match (&case.error, &got) {
                (Some(want), Err(e)) if e.contains(want.as_str()) => continue,
                (Some(want), _) => {
                    failures.push(format!("{name}: expected error {want:?}, got {got:?}"));
                    continue;
                }
                (None, Err(e)) => {
                    failures.push(format!("{name}: unexpected error {e}"));
                    continue;
                }
                (None, Ok(_)) => {}
            }
            let Ok((target, why)) = got else { continue };
            if let Some(want) = &case.expect
                && &target != want
            {
                failures.push(format!("{name}: expected {want}, got {target}"));
            }
            if let Some(want) = &case.reason
                && &reason(why) != want
            {
                failures.push(format!(
                    "{name}: expected reason {want}, got {}",
                    reason(why)
                ));
            }
            if let Some(other) = &case.expect_same_as {
                let other = decide(&route, other).map(|(t, _)| t);
                if other.as_deref() != Ok(target.as_str()) {
                    failures.push(format!("{name}: {target} differs from {other:?}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A split inside a split draws afresh: among requests the outer split sends to the inner
/// one, the inner members get their weights' shares, not a slice tied to the outer draw.
#[test]
fn nested_splits_draw_independently() {
    let fixture: Fixture = serde_saphyr::from_str(
        &std::fs::read_to_string(root().join("tests/routing/plans.yaml")).unwrap(),
    )
    .unwrap();
    let route = route_of(&fixture.policy);
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    let n = 4000u64;
    for i in 0..n {
        // Evenly spread draws over the 32-bit range the outer split reads.
        let case = Case {
            random: (i << 32) / n,
            ..serde_saphyr::from_str("{}").unwrap()
        };
        *counts.entry(decide(&route, &case).unwrap().0).or_default() += 1;
    }
    assert_eq!(counts["a"], 2000, "{counts:?}");
    for inner in ["b", "c"] {
        let share = f64::from(counts[inner]) / 2000.0;
        assert!((0.45..0.55).contains(&share), "{counts:?}");
    }
}
