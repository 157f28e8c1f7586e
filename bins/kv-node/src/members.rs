//! Membership endpoints: `GET /admin/members` (the view, its epoch and the progress of a change),
//! `POST /admin/members` (plan, then apply: add, remove, replace, or abort the change in
//! progress), and the node-to-node `/internal/members`, `/internal/transfer`,
//! `/internal/estimate` and `/internal/propose` they rely on.

use crate::config::canonical_url;
use crate::error::ApiError;
use crate::routes::AppState;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{Extensions, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kv_cluster::peer::FROM_HEADER;
use kv_cluster::proposal::{PromiseAnswer, Proposal};
use kv_cluster::rebalance::ChangeRequest;
use kv_cluster::{TransferState, View};
use serde::Deserialize;
use serde_json::{json, Value};
use std::net::SocketAddr;

/// The body of `POST /admin/members`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChangeBody {
    #[serde(default)]
    add: Vec<String>,
    #[serde(default)]
    remove: Vec<String>,
    /// Old URL -> new URL.
    #[serde(default)]
    replace: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    force: bool,
    #[serde(default)]
    abort: bool,
}

/// The query of `POST /admin/members`.
#[derive(Debug, Default, Deserialize)]
pub struct ChangeQuery {
    #[serde(default)]
    dry_run: Option<String>,
}

/// `GET /admin/members`: the view, its epoch, and every data-holding node's transfer progress.
pub async fn show(State(app): State<AppState>) -> Json<Value> {
    let cluster = app.cluster();
    let view = cluster.topology().view.clone();
    let progress = cluster.transfer_progress().await;
    Json(json!({
        "epoch": view.epoch,
        "members": view.members,
        "in_transition": view.in_transition(),
        "coordinator": view.coordinator,
        "down": view.down,
        "promised": cluster.promised(),
        "transfer": progress,
    }))
}

/// `POST /admin/members?dry_run=true` with `{"add": [url...], "remove": [url...], "replace":
/// {old: new}, "force": bool}`: the plan, and unless it is a dry run, its start. `{"abort": true}`
/// (alone) aborts the change in progress.
pub async fn change(
    State(app): State<AppState>,
    Query(query): Query<ChangeQuery>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let dry_run = match query.dry_run.as_deref() {
        None | Some("false" | "0") => false,
        Some("true" | "1" | "") => true,
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("dry_run={other}: expected true or false"),
            ))
        }
    };
    let parsed: ChangeBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            "invalid_json",
            format!(
                r#"expected {{"add": [url...], "remove": [url...], "replace": {{old: new}}, "force": bool}} or {{"abort": true}}: {e}"#
            ),
        )
    })?;
    if parsed.abort {
        if !(parsed.add.is_empty() && parsed.remove.is_empty() && parsed.replace.is_empty()) {
            return Err(ApiError::bad_request(
                "invalid_plan",
                "abort takes no add, remove or replace: abort first, then plan again",
            ));
        }
        let view = app.cluster().abort_change(dry_run).await?;
        return Ok(
            Json(json!({"aborted": !dry_run, "applied": !dry_run, "view": view})).into_response(),
        );
    }
    let canonical = |urls: Vec<String>| -> Result<Vec<String>, ApiError> {
        urls.iter()
            .map(|u| {
                canonical_url("add/remove", u)
                    .map_err(|e| ApiError::bad_request("invalid_plan", e.to_string()))
            })
            .collect()
    };
    let (add, remove) = (canonical(parsed.add)?, canonical(parsed.remove)?);
    let (old, new): (Vec<String>, Vec<String>) = parsed.replace.into_iter().unzip();
    let replace = canonical(old)?.into_iter().zip(canonical(new)?).collect();
    let request = ChangeRequest {
        add,
        remove,
        replace,
        force: parsed.force,
    };
    let report = app.cluster().plan_change(request, dry_run).await?;
    Ok(Json(report).into_response())
}

/// `GET /internal/members`: this node's view.
pub async fn view(State(app): State<AppState>) -> Json<View> {
    Json(app.cluster().topology().view.clone())
}

/// `POST /internal/members`: a peer offers a view; adopted when it is a step this node can
/// check (see `kv_cluster::admission`). A refusal is logged with the sender: the URL it names in
/// `x-kv-from` and the connection's address.
pub async fn offer(
    State(app): State<AppState>,
    headers: HeaderMap,
    extensions: Extensions,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let named = headers
        .get(FROM_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.chars().take(256).collect::<String>())
        .unwrap_or_else(|| "unnamed".to_owned());
    let address = extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map_or_else(|| "unknown address".to_owned(), |c| c.0.to_string());
    let sender = format!("{named} from {address}");
    let view = View::decode(&body).inspect_err(|e| {
        tracing::warn!(sender, error = %e, "refused a membership view");
    })?;
    let adopted = app.cluster().adopt_view(view, &sender)?;
    Ok(Json(json!({ "adopted": adopted })))
}

/// `GET /internal/transfer`: this node's part in the change in progress.
pub async fn transfer(State(app): State<AppState>) -> Json<TransferState> {
    Json(app.cluster().transfer_state())
}

/// `POST /internal/estimate`: what a proposed view would move of this node's keys.
pub async fn estimate(
    State(app): State<AppState>,
    Json(view): Json<View>,
) -> Json<kv_cluster::rebalance::Estimate> {
    let cluster = app.cluster().clone();
    Json(
        tokio::task::spawn_blocking(move || cluster.estimate(&view))
            .await
            .unwrap_or_default(),
    )
}

/// `POST /internal/propose`: a peer proposes a next view (or gives back its promise); this node
/// promises it or says why not (`kv_cluster::proposal`). Always 200 with `{"granted": bool}`
/// for a well-formed proposal.
pub async fn propose(
    State(app): State<AppState>,
    body: Bytes,
) -> Result<Json<PromiseAnswer>, ApiError> {
    let proposal: Proposal = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request("invalid_json", format!("not a membership proposal: {e}"))
    })?;
    proposal
        .view
        .check_shape()
        .map_err(|reason| kv_cluster::Error::MalformedView { reason })?;
    Ok(Json(app.cluster().consider_proposal(&proposal)))
}
