//! The live dashboard: `GET /ui` (the page, open to anyone: it holds no data) and
//! `GET /ui/stats` (the JSON it polls every second, behind `AUTH_TOKEN` like the data routes).
//!
//! The stats are the load balancer's view: its health table and ring (each node's share as
//! primary), each node's own `GET /` (keys, disk, hints, state, repair) read concurrently with a
//! short deadline, the membership change in progress (`GET /admin/members` of a healthy node),
//! the load balancer's own per-route window and its recent warnings (`kv_http::dashboard`).

use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::app::SharedState;

/// Deadline of each call to a node made for one `/ui/stats` answer.
const NODE_DEADLINE: Duration = Duration::from_millis(800);

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

/// `GET /ui/stats`: the load balancer's view of the cluster as JSON.
pub async fn stats(State(state): State<SharedState>) -> Json<Value> {
    let routing = state.routing();
    let shares = routing.ring.primary_shares();
    let report = routing.health.report();
    let fetches = report.iter().map(|node| {
        let upstream = state.upstream.clone();
        let url = node.url.clone();
        async move { upstream.get_json(&url, "/", NODE_DEADLINE).await }
    });
    let statuses = futures_join_all(fetches).await;
    let mut nodes = Vec::new();
    let mut repair = Vec::new();
    let mut membership_from = None;
    for (index, (node, fetched)) in report.iter().zip(statuses).enumerate() {
        let status: Option<Value> = fetched
            .ok()
            .and_then(|body| serde_json::from_slice(&body).ok());
        let state_of = status.as_ref().and_then(|s| member_state(s, &node.url));
        if node.healthy && status.is_some() && membership_from.is_none() {
            membership_from = Some(node.url.clone());
        }
        let field = |name: &str| status.as_ref().map_or(Value::Null, |s| s[name].clone());
        let disk = status
            .as_ref()
            .map(|s| s["value_bytes"].as_u64().unwrap_or(0) + s["wal_bytes"].as_u64().unwrap_or(0));
        nodes.push(json!({
            "url": node.url,
            "healthy": node.healthy,
            "status": if status.as_ref().is_some_and(|s| !s["read_only"].is_null()) { "degraded" } else { "up" },
            "latency_ms": node.latency_ms,
            "share": shares.get(index),
            "state": state_of,
            "keys": field("keys"),
            "disk_bytes": disk,
            "hints_pending": field("hints_pending"),
        }));
        if let Some(s) = &status {
            repair.push(json!({
                "node": node.url,
                "syncing": s["anti_entropy"]["syncing"],
                "last_round": s["anti_entropy"]["last_round"],
            }));
        }
    }
    let membership = match membership_from {
        Some(url) => state
            .upstream
            .get_json(&url, "/admin/members", NODE_DEADLINE)
            .await
            .ok()
            .and_then(|body| serde_json::from_slice::<Value>(&body).ok()),
        None => None,
    };
    Json(json!({
        "source": "kv-lb",
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": state.started.elapsed().as_secs(),
        "nodes": nodes,
        "membership": membership,
        "repair": repair,
        "routes": kv_http::dashboard::routes_json(),
        "warnings": kv_http::dashboard::warnings_json(),
    }))
}

/// The state of `url` in the membership view of a node's `GET /`.
fn member_state(status: &Value, url: &str) -> Option<String> {
    let wanted = kv_ring::normalize_node(url);
    status["membership"]["members"]
        .as_array()?
        .iter()
        .find(|m| m["url"].as_str().map(kv_ring::normalize_node) == Some(wanted))
        .and_then(|m| m["state"].as_str())
        .map(str::to_owned)
}

/// Runs every future concurrently, answers in order.
async fn futures_join_all<F, T>(futures: impl IntoIterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut answers = Vec::with_capacity(handles.len());
    for handle in handles {
        match handle.await {
            Ok(answer) => answers.push(answer),
            Err(e) => tracing::warn!(error = %e, "a dashboard fetch task failed"),
        }
    }
    answers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_state_matches_normalized_urls() {
        let status = json!({"membership": {"members": [
            {"url": "http://127.0.0.1:1", "state": "active"},
            {"url": "http://127.0.0.1:2", "state": "leaving"},
        ]}});
        assert_eq!(
            member_state(&status, "http://127.0.0.1:2/").as_deref(),
            Some("leaving")
        );
        assert_eq!(member_state(&status, "http://127.0.0.1:3"), None);
        assert_eq!(member_state(&json!({}), "http://127.0.0.1:1"), None);
    }
}
