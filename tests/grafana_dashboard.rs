//! The Grafana dashboard (`deploy/grafana/switchyard.json`) against what the processes
//! really export: the real gateway, with every sample policy and a rollout, in front of
//! real backends; traffic through every route and the events that create the remaining
//! label sets; then every metric a query names must be in the scrapes, and every
//! `switchyard_*` and `nv_*` family scraped must be on the dashboard.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::gateway::*;
use common::*;
use serde_json::Value;

/// The route with a rollout, written into the test's own policy folder.
const ROLLOUT_ROUTE: &str = "dashboard-rollout";

/// A rollout whose candidate (`digits_shuffled`, confidently wrong) is rolled back on
/// shadow agreement at its first step: the rollout's families, its transitions and its
/// gate failures included (as in tests/rollout.rs).
fn rollout_policy() -> String {
    format!(
        "version: 1\nroute: {ROLLOUT_ROUTE}\ntargets:\n  stable: {{ backend: stable, model: digits_mlp, version: 1 }}\n  cand: {{ backend: canary, model: digits_shuffled, version: 1 }}\ndefault: stable\nfallback: [stable]\nretry: {{ attempts: 1, idempotent: true }}\ndeadline: 5s\nshadow: {{ target: cand, percent: 100 }}\nrollout:\n  candidate: cand\n  baseline: stable\n  steps: [10, 50, 100]\n  interval: 60s\n  min_requests: 10\n  gates:\n    error_rate: {{ max_increase: 0.01 }}\n    latency_p99: {{ max_ratio: 10 }}\n    shadow_agreement: {{ min: 0.95 }}\n"
    )
}

/// Gateway settings that create the label sets traffic alone does not: a pool whose
/// queue-depth scrapes fail (`switchyard_discovery_errors_total`) and a shared rollout
/// state nobody serves (`switchyard_shared_state_errors_total`). Port 1 on loopback
/// refuses connections. The lines continue the harness's `backends:` map, so `admin:`
/// is written here too.
const EXTRA: &str = "  lost: { endpoints: [{ address: \"127.0.0.1:1\", metrics: \"127.0.0.1:1\" }], scrape_interval: 50ms }\nadmin: { token_file: admin-token }\nshared_state: { redis: \"redis://127.0.0.1:1\", sync_interval: 100ms, timeout: 200ms }\n";

fn dashboard() -> Value {
    let path = root().join("deploy/grafana/switchyard.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Every panel, those nested in (collapsed) rows included, rows themselves too.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for panel in list.as_array().into_iter().flatten() {
            out.push(panel);
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// Panels that show data (rows left out).
fn data_panels(dashboard: &Value) -> Vec<&Value> {
    panels(dashboard)
        .into_iter()
        .filter(|p| p["type"] != "row")
        .collect()
}

/// One PromQL query of the dashboard and where it is.
struct Query {
    /// `panel 'TITLE'` or `variable 'NAME'`.
    place: String,
    expr: String,
}

/// Every panel query and every query variable's query.
fn queries(dashboard: &Value) -> Vec<Query> {
    let mut out = Vec::new();
    for panel in data_panels(dashboard) {
        let title = panel["title"].as_str().unwrap_or("(untitled)");
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.push(Query {
                place: format!("panel '{title}'"),
                expr: target["expr"].as_str().unwrap_or_default().to_owned(),
            });
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if variable["type"] != "query" {
            continue;
        }
        // Grafana writes a query variable's query as a string or as `{ query: ... }`.
        let query = &variable["query"];
        let expr = query.as_str().or_else(|| query["query"].as_str());
        out.push(Query {
            place: format!(
                "variable '{}'",
                variable["name"].as_str().unwrap_or_default()
            ),
            expr: expr.unwrap_or_default().to_owned(),
        });
    }
    out
}

/// The metric names in a query: identifiers that start with `switchyard_` or `nv_`
/// (scanned by hand: the root crate has no regex dependency).
fn metric_names(expr: &str) -> BTreeSet<&str> {
    let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let bytes = expr.as_bytes();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < bytes.len() {
        if !is_ident(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && is_ident(bytes[i]) {
            i += 1;
        }
        let word = &expr[start..i];
        if word.starts_with("switchyard_") || word.starts_with("nv_") {
            names.insert(word);
        }
    }
    names
}

/// The families of a text exposition, from its `# TYPE NAME TYPE` lines.
fn families(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            Some((words.next()?.to_owned(), words.next()?.to_owned()))
        })
        .collect()
}

/// The family a series name belongs to: itself, or a histogram's (`_bucket`, `_sum`,
/// `_count`) or a summary's (`_sum`, `_count`). A histogram's bare name is no series.
fn family_of<'a>(families: &'a BTreeMap<String, String>, name: &str) -> Option<&'a str> {
    if let Some((family, kind)) = families.get_key_value(name) {
        return (kind != "histogram" && kind != "summary").then_some(family.as_str());
    }
    ["_bucket", "_sum", "_count"]
        .into_iter()
        .find_map(|suffix| {
            let (family, kind) = families.get_key_value(name.strip_suffix(suffix)?)?;
            let fits = kind == "histogram" || (kind == "summary" && suffix != "_bucket");
            fits.then_some(family.as_str())
        })
}

/// What the gateway and the backends export now: every family of both scrapes.
async fn scrape(gw: &DigitsGateway) -> BTreeMap<String, String> {
    let mut all = families(&gw.metrics().await);
    for backend in [&gw.stable, &gw.canary] {
        all.extend(families(&backend.metrics_text().await));
    }
    all
}

/// `(place, metric)` for every metric a query names that `families` lacks.
fn missing(queries: &[Query], families: &BTreeMap<String, String>) -> Vec<(String, String)> {
    queries
        .iter()
        .flat_map(|q| {
            metric_names(&q.expr)
                .into_iter()
                .filter(move |name| family_of(families, name).is_none())
                .map(move |name| (q.place.clone(), name.to_owned()))
        })
        .collect()
}

#[test]
fn the_dashboard_is_well_formed() {
    let d = dashboard();
    assert_eq!(d["schemaVersion"], 39);
    assert_eq!(d["uid"], "switchyard");
    assert_eq!(d["title"], "Switchyard");
    let variables = d["templating"]["list"].as_array().expect("templating.list");
    let variable = |name: &str| {
        variables
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no template variable '{name}'"))
    };
    let datasource = variable("datasource");
    assert_eq!(datasource["type"], "datasource");
    assert_eq!(datasource["query"], "prometheus");
    let route = variable("route");
    assert_eq!(route["multi"], true, "route: several routes at once");
    assert_eq!(route["includeAll"], true, "route: an All option");
    assert!(
        variables.iter().all(|v| v["name"] != "job"),
        "the dashboard should not depend on Prometheus job names"
    );

    let shown = data_panels(&d);
    assert!(shown.len() >= 20, "only {} panels", shown.len());
    let want_ds = serde_json::json!({ "type": "prometheus", "uid": "${datasource}" });
    let mut ids = BTreeSet::new();
    for p in panels(&d) {
        let title = p["title"].as_str().unwrap_or_default();
        assert!(!title.is_empty(), "a panel without a title: {p}");
        let id = p["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("panel '{title}' has no id"));
        assert!(ids.insert(id), "panel '{title}': id {id} is used twice");
        if p["type"] == "row" {
            continue;
        }
        let described = p["description"]
            .as_str()
            .is_some_and(|s| !s.trim().is_empty());
        assert!(described, "panel '{title}' has no description");
        assert_eq!(p["datasource"], want_ds, "panel '{title}'");
        let targets = p["targets"].as_array();
        assert!(
            targets.is_some_and(|t| !t.is_empty()),
            "panel '{title}' has no queries"
        );
        for t in targets.into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or_default();
            assert!(
                !expr.trim().is_empty(),
                "panel '{title}' has an empty query"
            );
            if !t["datasource"].is_null() {
                assert_eq!(
                    t["datasource"], want_ds,
                    "panel '{title}': a query's data source"
                );
            }
        }
    }

    // The 24-column grid: every panel inside it; top-level panels never overlap (those in
    // collapsed rows are laid out when the row opens).
    let grid = |p: &Value| {
        let title = p["title"].as_str().unwrap_or_default().to_owned();
        let g = &p["gridPos"];
        let [x, y, w, h] = ["x", "y", "w", "h"].map(|k| {
            g[k].as_u64()
                .unwrap_or_else(|| panic!("panel '{title}': gridPos.{k}"))
        });
        assert!(
            w > 0 && h > 0 && x + w <= 24,
            "panel '{title}' is off the grid: {g}"
        );
        (title, x, y, w, h)
    };
    for p in panels(&d) {
        grid(p);
    }
    let mut taken: BTreeMap<(u64, u64), String> = BTreeMap::new();
    for p in d["panels"].as_array().into_iter().flatten() {
        let (title, x, y, w, h) = grid(p);
        for cx in x..x + w {
            for cy in y..y + h {
                if let Some(other) = taken.insert((cx, cy), title.clone()) {
                    panic!("panels '{other}' and '{title}' overlap at x={cx}, y={cy}");
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_query_names_a_metric_the_gateway_or_the_backends_export() {
    let d = dashboard();
    let queries = queries(&d);
    for q in &queries {
        assert!(!q.expr.trim().is_empty(), "{} has an empty query", q.place);
        assert!(
            !metric_names(&q.expr).is_empty(),
            "{} names no switchyard_ or nv_ metric: {}",
            q.place,
            q.expr
        );
    }

    let mut samples: Vec<String> = std::fs::read_dir(root().join("policies"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    samples.sort();
    assert!(samples.len() >= 7, "sample policies: {samples:?}");
    let mut builder = TestGateway::digits();
    for file in &samples {
        builder = builder.sample(file);
    }
    let gw = builder
        .policy(&format!("{ROLLOUT_ROUTE}.yaml"), &rollout_policy())
        .extra(EXTRA)
        .start()
        .await;

    // A reload: switchyard_policy_reload_total has no series before the first one.
    let (status, body) = gw.admin_reload().await;
    assert_eq!(status, 200, "reload: {body}");

    // One request through every sample route (digits shadows to mlp-v2), digits-cached
    // twice for a hit, and one over REST.
    let data = holdout();
    let row = std::slice::from_ref(&data.features[0]);
    let mut client = gw.client().await;
    for route in [
        "digits",
        "digits-cascade",
        "digits-ensemble",
        "digits-pipeline",
        "digits-switch",
        "digits-cached",
        "digits-cached",
        "digits-linear",
    ] {
        client
            .model_infer(infer_request(route, "", row))
            .await
            .unwrap_or_else(|s| panic!("{route}: {s:?}"));
    }
    let r = http(
        gw.http,
        "POST",
        "/v2/models/digits/infer",
        &[],
        &rest_infer_body(row),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    // The rollout route until its shadow-agreement gate rolls it back: a transition and
    // a gate failure.
    let start = Instant::now();
    for i in 0.. {
        let row = std::slice::from_ref(&data.features[i % data.features.len()]);
        client
            .model_infer(infer_request(ROLLOUT_ROUTE, "", row))
            .await
            .unwrap_or_else(|s| panic!("{ROLLOUT_ROUTE}: {s:?}"));
        if i % 10 == 9 {
            let status = rollout_status(&gw, ROLLOUT_ROUTE).await;
            if status["state"] == "rolled_back" {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the rollout was not rolled back after {} requests: {status:#}",
                i + 1
            );
        }
    }

    // The failed scrapes and shared-state exchanges come on their own ticks: wait until
    // nothing is missing, or 30s.
    let start = Instant::now();
    let (families, absent) = loop {
        let families = scrape(&gw).await;
        let absent = missing(&queries, &families);
        if absent.is_empty() || start.elapsed() > Duration::from_secs(30) {
            break (families, absent);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let report: Vec<String> = absent
        .iter()
        .map(|(place, name)| format!("{place}: {name} is not exported"))
        .collect();
    assert!(
        report.is_empty(),
        "the dashboard names metrics neither the gateway nor the backends export:\n{}\nexported: {:?}",
        report.join("\n"),
        families.keys().collect::<Vec<_>>()
    );

    // And the other way: every family of the gateway and the backends has a panel.
    let shown: BTreeSet<&str> = queries
        .iter()
        .flat_map(|q| metric_names(&q.expr))
        .filter_map(|name| family_of(&families, name))
        .collect();
    let unshown: Vec<&String> = families
        .keys()
        .filter(|f| f.starts_with("switchyard_") || f.starts_with("nv_"))
        .filter(|f| !shown.contains(f.as_str()))
        .collect();
    assert!(
        unshown.is_empty(),
        "families exported but on no panel of deploy/grafana/switchyard.json: {unshown:?}"
    );
    gw.gw.stop().await;
}
