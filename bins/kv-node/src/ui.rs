//! The live dashboard of one node: `GET /ui` (the page, open to anyone: it holds no data) and
//! `GET /ui/stats` (the JSON it polls every second, behind `AUTH_TOKEN` like `/v1`).
//!
//! The stats are this node's own view: its `GET /` figures for itself, its failure detector's
//! view of the peers (health, latency, hints), each member's share of the ring as primary, the
//! membership change in progress (as `GET /admin/members`), its anti-entropy state, and its
//! own per-route window and recent warnings (`kv_http::dashboard`).

use crate::routes::AppState;
use crate::{members, status};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use kv_cluster::MemberState;
use serde_json::{json, Value};

/// `GET /ui`: the page.
pub async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        kv_http::dashboard::PAGE,
    )
        .into_response()
}

/// `GET /ui/stats`: this node's view as JSON.
pub async fn stats(State(app): State<AppState>) -> Json<Value> {
    let own = status::status(State(app.clone())).await.0;
    let membership = members::show(State(app.clone())).await.0;
    let cluster = app.cluster().status();
    let view = app.cluster().topology().view.clone();
    let me = kv_ring::normalize_node(&app.config().url).to_owned();
    let owners: Vec<&str> = view
        .members
        .iter()
        .filter(|m| m.state != MemberState::Joining)
        .map(|m| m.url.as_str())
        .collect();
    let ring = kv_ring::Ring::new(&owners, cluster.vnodes);
    let shares = ring.primary_shares();
    let share_of = |url: &str| ring.position(url).and_then(|i| shares.get(i).copied());
    let nodes: Vec<Value> = view
        .members
        .iter()
        .map(|member| {
            let url = kv_ring::normalize_node(&member.url);
            if url == me {
                let disk = own["value_bytes"].as_u64().unwrap_or(0)
                    + own["wal_bytes"].as_u64().unwrap_or(0);
                return json!({
                    "url": url,
                    "self": true,
                    "healthy": true,
                    "status": if own["read_only"].is_null() { "up" } else { "degraded" },
                    "state": member.state,
                    "latency_ms": 0.0,
                    "share": share_of(url),
                    "keys": own["keys"],
                    "disk_bytes": disk,
                    "hints_pending": Value::Null,
                });
            }
            let peer = cluster
                .peers
                .iter()
                .find(|p| kv_ring::normalize_node(&p.health.url) == url);
            json!({
                "url": url,
                "healthy": peer.is_none_or(|p| p.health.state != kv_cluster::PeerState::Down),
                "state": member.state,
                "latency_ms": peer.and_then(|p| p.health.latency_ms),
                "share": share_of(url),
                "keys": Value::Null,
                "disk_bytes": Value::Null,
                "hints_pending": peer.map(|p| p.hints_pending),
            })
        })
        .collect();
    Json(json!({
        "source": "kv-node",
        "name": own["name"],
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": own["uptime_secs"],
        "nodes": nodes,
        "membership": membership,
        "repair": [{
            "node": me,
            "syncing": own["anti_entropy"]["syncing"],
            "last_round": own["anti_entropy"]["last_round"],
        }],
        "routes": kv_http::dashboard::routes_json(),
        "warnings": kv_http::dashboard::warnings_json(),
    }))
}
