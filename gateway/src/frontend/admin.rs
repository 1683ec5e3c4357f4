//! The admin API (loopback by default): the dashboard (`GET /`, polling
//! `GET /admin/overview`), `/metrics`, `GET /admin/policy`,
//! `POST /admin/reload` (bearer token), `GET /admin/targets`, `GET /admin/shadow` (running
//! shadow agreement per route), `GET /admin/rollouts[/ROUTE]` and
//! `POST /admin/rollouts/ROUTE/(pause|resume|promote|abort)` (bearer token), and the
//! health endpoints. The topology reads need the
//! bearer token too unless `admin.topology` lets them be open (by default: on a loopback
//! listener).

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use pingora_proxy::Session;
use serde_json::json;

use super::{RequestCtx, respond};
use crate::{Shared, dashboard};

/// Serves one admin request.
pub(crate) async fn serve(shared: &Arc<Shared>, session: &mut Session, ctx: &mut RequestCtx) {
    let method = session.req_header().method.clone();
    let path = session.req_header().uri.path().to_owned();
    let snapshot = &ctx.snapshot;
    let said = &ctx.reply;
    let json_reply = |status: u16, v: serde_json::Value| {
        (status, "application/json", Bytes::from(v.to_string()))
    };
    let bearer = session
        .req_header()
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let authorized = shared.admin_token.as_deref().is_some_and(|token| {
        bearer.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes()))
    });
    let topology = matches!(
        path.as_str(),
        "/admin/policy" | "/admin/targets" | "/admin/shadow" | "/admin/overview"
    ) || path.starts_with("/admin/rollouts");
    let (status, content_type, body) = match (method.as_str(), path.as_str()) {
        ("GET", _) if topology && shared.topology_needs_token && !authorized => json_reply(
            401,
            json!({ "error": format!(
                "GET {path} reveals the routing topology: send `Authorization: Bearer <token>` (admin.token_env or admin.token_file; admin.topology decides who may read it)"
            ) }),
        ),
        ("GET", "/") => (
            200,
            "text/html; charset=utf-8",
            Bytes::from_static(dashboard::PAGE.as_bytes()),
        ),
        ("GET", "/admin/overview") => json_reply(200, dashboard::overview(shared, snapshot)),
        ("GET", "/metrics") => (
            200,
            "text/plain; version=0.0.4",
            Bytes::from(shared.metrics.render()),
        ),
        ("GET", "/v2/health/live") => json_reply(200, json!({ "live": true })),
        ("GET", "/v2/health/ready") => {
            let ready = shared.is_ready();
            json_reply(if ready { 200 } else { 503 }, json!({ "ready": ready }))
        }
        ("GET", "/admin/policy") => {
            let last = dashboard::last_reload(shared);
            let mut routes: Vec<&str> = snapshot.routes.keys().map(|k| &**k).collect();
            routes.sort_unstable();
            json_reply(
                200,
                json!({
                    "version": snapshot.version,
                    "loaded_at": snapshot.loaded_at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
                    "policies": shared.config.policies.display().to_string(),
                    "files": snapshot.files,
                    "routes": routes,
                    "last_reload": last,
                    "watching": **shared.reloads.watching.load(),
                }),
            )
        }
        ("GET", "/admin/targets") => {
            let mut rows = Vec::new();
            for entry in snapshot.routes.values() {
                for (i, t) in entry.targets.iter().enumerate() {
                    let spec = &entry.route.targets[i];
                    rows.push(json!({
                        "route": &*entry.route.name,
                        "target": &*spec.name,
                        "backend": &*spec.backend,
                        "model": &*spec.model,
                        "version": &*spec.version,
                        "breaker": t.state.breaker.state().name(),
                        "available": t.state.available(&t.pool),
                        "endpoints": t.pool.members().endpoints.iter().map(|e| json!({ "address": e.address, "healthy": e.is_healthy() })).collect::<Vec<_>>(),
                    }));
                }
            }
            json_reply(200, json!({ "targets": rows }))
        }
        ("GET", "/admin/shadow") => {
            let mut rows = Vec::new();
            for entry in snapshot.routes.values() {
                let (Some(spec), Some(s)) = (&entry.route.shadow, &entry.shadow) else {
                    continue;
                };
                let (agreed, disagreed) = (s.metrics.agree.get(), s.metrics.disagree.get());
                let compared = agreed + disagreed;
                rows.push(json!({
                    "route": &*entry.route.name,
                    "shadow": &*spec.name,
                    "percent": switchyard_config::rules::threshold_percent(spec.threshold),
                    "compared": compared,
                    "agreed": agreed,
                    "agreement_rate": if compared == 0 { None } else { Some(agreed as f64 / compared as f64) },
                    "mean_max_abs_difference": (compared > 0).then(|| s.metrics.max_abs_diff.get_sample_sum() / s.metrics.max_abs_diff.get_sample_count().max(1) as f64),
                    "mean_latency_delta_seconds": (compared > 0).then(|| s.metrics.latency_delta.get_sample_sum() / s.metrics.latency_delta.get_sample_count().max(1) as f64),
                    "ok": s.metrics.ok.get(),
                    "errors": s.metrics.error.get(),
                    "dropped": s.metrics.dropped.get(),
                    "uncomparable": s.metrics.uncomparable.get(),
                    "in_flight": s.in_flight.load(std::sync::atomic::Ordering::Relaxed),
                    "max_in_flight": s.max_in_flight,
                }));
            }
            rows.sort_by(|a, b| a["route"].as_str().cmp(&b["route"].as_str()));
            json_reply(200, json!({ "shadows": rows }))
        }
        ("GET", "/admin/rollouts") => {
            let mut rows: Vec<serde_json::Value> = snapshot
                .routes
                .values()
                .filter_map(|e| e.rollout.as_ref().map(|r| r.status(&e.route.file)))
                .collect();
            rows.sort_by(|a, b| a["route"].as_str().cmp(&b["route"].as_str()));
            json_reply(200, json!({ "rollouts": rows }))
        }
        (_, p) if p.starts_with("/admin/rollouts/") => {
            let rest = &p["/admin/rollouts/".len()..];
            let (route, command) = match rest.split_once('/') {
                Some((r, c)) => (r, Some(c)),
                None => (rest, None),
            };
            let entry = snapshot.routes.get(route);
            let rollout = entry.and_then(|e| e.rollout.as_ref().map(|r| (e, r)));
            match (method.as_str(), command, rollout) {
                (_, _, None) => json_reply(
                    404,
                    json!({ "error": match entry {
                        None => format!("no route '{route}'; routes: {}", snapshot.route_list),
                        Some(_) => format!("route '{route}' has no rollout section"),
                    } }),
                ),
                ("GET", None, Some((e, r))) => json_reply(200, r.status(&e.route.file)),
                ("POST", Some(command), Some((e, r))) => match &shared.admin_token {
                    None => json_reply(
                        403,
                        json!({ "error": "rollout commands are disabled: set admin.token_env in gateway.yaml and export that variable" }),
                    ),
                    Some(_) if !authorized => {
                        json_reply(401, json!({ "error": "missing or wrong bearer token" }))
                    }
                    Some(_) => match r.command(command, "the admin API") {
                        Ok(()) => json_reply(200, r.status(&e.route.file)),
                        Err(error) => json_reply(409, json!({ "error": error })),
                    },
                },
                _ => json_reply(
                    405,
                    json!({ "error": format!("use GET /admin/rollouts/{route} or POST /admin/rollouts/{route}/(pause|resume|promote|abort)") }),
                ),
            }
        }
        ("POST", "/admin/reload") => match &shared.admin_token {
            None => json_reply(
                403,
                json!({ "error": "POST /admin/reload is disabled: set admin.token_env in gateway.yaml and export that variable" }),
            ),
            Some(_) => {
                if !authorized {
                    json_reply(401, json!({ "error": "missing or wrong bearer token" }))
                } else {
                    match shared.reload("admin API").await {
                        Ok(version) => {
                            json_reply(200, json!({ "result": "ok", "version": version }))
                        }
                        Err(d) => json_reply(
                            422,
                            json!({
                                "result": "error",
                                "version": shared.snapshot.load().version,
                                "errors": d.0.iter().map(ToString::to_string).collect::<Vec<_>>(),
                            }),
                        ),
                    }
                }
            }
        },
        _ => json_reply(
            404,
            json!({ "error": format!("no admin endpoint {method} {path}") }),
        ),
    };
    let extra: &[(&str, String)] = if path == "/" {
        &[
            ("content-security-policy", dashboard::PAGE_CSP.to_owned()),
            ("cache-control", "no-store".to_owned()),
        ]
    } else {
        &[]
    };
    respond(session, status, content_type, said, extra, body).await;
}

/// Compares tokens without an early exit, so timing says nothing about the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
