//! Node-to-node endpoints under `/internal`: replication of record batches and reads of this
//! node's own entries. Not for clients.

use crate::error::ApiError;
use crate::request::{check_not_ahead, parse_key};
use crate::routes::AppState;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use kv_cluster::antientropy::{ArcsQuery, SegmentsQuery, MAX_ARCS_PER_CALL, MAX_SEGMENTS_PER_CALL};
use kv_cluster::peer::{
    decode_batch, decode_keys, encode_batch, encode_entries, encode_versions, PageQuery,
    BATCH_REQUEST_IDS_HEADER, ENTRY_PATH, MAX_BATCH_BYTES, PAGE_FULL_HEADER,
};
use kv_cluster::recent_writes::{decode_write_ids, BATCH_WRITE_IDS_HEADER};
use kv_cluster::{WriteId, WRITE_ID_WINDOW};
use kv_core::Record;
use std::time::Duration;
use tracing::{debug, warn};

/// Reads a binary request body of at most [`MAX_BATCH_BYTES`].
async fn body(request: Request, what: &'static str) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(request.into_body(), MAX_BATCH_BYTES)
        .await
        .map_err(|_| ApiError::PayloadTooLarge {
            what,
            limit: MAX_BATCH_BYTES,
        })
}

/// An encoded binary answer.
fn octets(body: impl Into<axum::body::Body>) -> Response {
    let mut response = (StatusCode::OK, body.into()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    response
}

/// `POST /internal/replicate`: applies a batch of records durably, then answers with the version
/// held for each record's key (`ReplicateAnswer`). The records' write ids, when the batch
/// carries them (`x-kv-write-ids`), are remembered for the ones this node holds.
pub async fn replicate(
    State(app): State<AppState>,
    request: Request,
) -> Result<Response, ApiError> {
    let ids = request.headers().get(BATCH_REQUEST_IDS_HEADER).cloned();
    let write_ids = request.headers().get(BATCH_WRITE_IDS_HEADER).cloned();
    let body = body(request, "replication batch").await?;
    let records = decode_batch(&body).map_err(|e| ApiError::bad_request("invalid_batch", e))?;
    let write_ids = match write_ids {
        None => Vec::new(),
        Some(raw) => raw
            .to_str()
            .map_err(|_| "not ASCII".to_owned())
            .and_then(|text| decode_write_ids(text, records.len()))
            .map_err(|e| {
                ApiError::bad_request("invalid_batch", format!("{BATCH_WRITE_IDS_HEADER}: {e}"))
            })?,
    };
    refuse_future_versions(&records, 2 * app.config().max_clock_offset)?;
    if let Some(ids) = ids {
        debug!(
            records = records.len(),
            request_ids = ids.to_str().unwrap_or_default(),
            "replication batch"
        );
    }
    let answer = app.cluster().apply_replicated(records, write_ids).await?;
    Ok(axum::Json(answer).into_response())
}

/// Body of `POST /internal/seen`.
#[derive(serde::Deserialize)]
struct SeenQuery {
    key: String,
    id: String,
    /// How far back the answer's "complete" must reach (default: the whole window).
    horizon_ms: Option<u64>,
}

/// `POST /internal/seen` `{"key": K, "id": "<write id>", "horizon_ms": H}`: whether this node
/// stored that write (`{"seen": "<version>"|null, "complete": bool}`, complete when its memory
/// reaches `H` ms back), for a resend's coordinator.
pub async fn seen(State(app): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let query: SeenQuery = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            "invalid_json",
            format!("expected {{\"key\": ..., \"id\": ...}}: {e}"),
        )
    })?;
    if query.key.is_empty() || query.key.len() > app.config().max_key_bytes {
        return Err(ApiError::bad_request(
            "invalid_key",
            format!("the key must be 1 to {} bytes", app.config().max_key_bytes),
        ));
    }
    let id: WriteId = query
        .id
        .parse()
        .map_err(|e| ApiError::bad_request("invalid_write_id", e))?;
    let horizon = query
        .horizon_ms
        .map_or(WRITE_ID_WINDOW, Duration::from_millis);
    let seen = app.cluster().write_id_seen(&query.key, id, horizon);
    Ok(axum::Json(seen).into_response())
}

/// Refuses a batch holding a version further ahead of this node's clock than `max_ahead`: it
/// would win over every later write and drag this node's clock (and snapshots) along. Honest
/// peers stay within twice `MAX_CLOCK_OFFSET_MS`: their clock is at most that far ahead, and it
/// may have observed a client's version that far ahead of theirs.
fn refuse_future_versions(records: &[Record], max_ahead: Duration) -> Result<(), ApiError> {
    for record in records {
        if let Err(ahead_ms) = check_not_ahead(record.version, max_ahead) {
            warn!(
                key = %record.key,
                version = %record.version,
                ahead_ms,
                "refused a replicated record from the future"
            );
            return Err(ApiError::bad_request(
                "invalid_version",
                format!(
                    "record {:?} has version {} from {ahead_ms} ms ahead of this node's clock; \
                     at most {} ms is accepted (2 x MAX_CLOCK_OFFSET_MS)",
                    record.key,
                    record.version,
                    max_ahead.as_millis()
                ),
            ));
        }
    }
    Ok(())
}

/// `POST /internal/entries`: this node's entries for a list of keys (tombstones included; none
/// for a key it does not hold), in the order asked.
pub async fn entries(State(app): State<AppState>, request: Request) -> Result<Response, ApiError> {
    let keys = key_list(&app, request, "entries batch").await?;
    let cluster = app.cluster();
    let entries: Vec<_> = keys.iter().map(|key| cluster.local_record(key)).collect();
    Ok(octets(encode_entries(&entries)))
}

/// `POST /internal/versions`: the version of this node's entry for each key of a list
/// (tombstones included; none for a key it does not hold), in the order asked, without values:
/// the digest read of a coordinator that holds the value itself.
pub async fn versions(State(app): State<AppState>, request: Request) -> Result<Response, ApiError> {
    let keys = key_list(&app, request, "versions batch").await?;
    let cluster = app.cluster();
    let versions: Vec<_> = keys.iter().map(|key| cluster.local_version(key)).collect();
    Ok(octets(encode_versions(&versions)))
}

/// The key list of a batched peer read (`decode_keys`), logged at debug level as `what` with
/// the request ids of the reads merged into it.
async fn key_list(app: &AppState, request: Request, what: &str) -> Result<Vec<String>, ApiError> {
    let ids = request.headers().get(BATCH_REQUEST_IDS_HEADER).cloned();
    let body = body(request, "key list").await?;
    let keys = decode_keys(&body, app.config().max_key_bytes)
        .map_err(|e| ApiError::bad_request("invalid_batch", e))?;
    if let Some(ids) = ids {
        debug!(
            keys = keys.len(),
            request_ids = ids.to_str().unwrap_or_default(),
            "{what}"
        );
    }
    Ok(keys)
}

/// `GET /internal/entry/{key}`: this node's entry for the key as an encoded record (tombstones
/// included), or 404 when it has none.
pub async fn entry(State(app): State<AppState>, request: Request) -> Result<Response, ApiError> {
    let key = parse_key(request.uri().path(), ENTRY_PATH, app.config().max_key_bytes)?;
    match app.cluster().local_record(&key) {
        Some(record) => {
            let mut body = Vec::with_capacity(key.len() + 64);
            record.encode(&mut body);
            Ok(octets(body))
        }
        None => Err(ApiError::NotFound(format!("no local entry for {key:?}"))),
    }
}

/// `GET /internal/keys?prefix=&after=&limit=[&values=true]`: this node's page of entries
/// (tombstones included), in key order, as a record batch of at most `SEND_BATCH_BYTES`. Live
/// entries carry an empty value unless `values=true`; [`PAGE_FULL_HEADER`] says whether the node
/// holds more keys after the page.
pub async fn keys(State(app): State<AppState>, request: Request) -> Result<Response, ApiError> {
    let (mut prefix, mut after, mut limit, mut values) = (String::new(), None, 100usize, false);
    for (name, value) in
        url::form_urlencoded::parse(request.uri().query().unwrap_or_default().as_bytes())
    {
        match name.as_ref() {
            "prefix" => prefix = value.into_owned(),
            "after" => after = Some(value.into_owned()),
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|l| (1..=10_000).contains(l))
                    .ok_or_else(|| {
                        ApiError::bad_request("invalid_query", format!("limit={value}"))
                    })?
            }
            "values" => {
                values = match value.as_ref() {
                    "true" => true,
                    "false" => false,
                    _ => {
                        return Err(ApiError::bad_request(
                            "invalid_query",
                            format!("values={value}: expected true or false"),
                        ))
                    }
                }
            }
            _ => {}
        }
    }
    let query = PageQuery {
        prefix: &prefix,
        after: after.as_deref(),
        limit,
        values,
    };
    let page = app.cluster().local_page(&query);
    let mut response = octets(encode_batch(&page.records));
    let full = HeaderValue::from_static(if page.full { "true" } else { "false" });
    response.headers_mut().insert(PAGE_FULL_HEADER, full);
    Ok(response)
}

/// Decodes the JSON body of an anti-entropy call, refusing lists longer than `max`.
async fn aae_body<T: serde::de::DeserializeOwned>(
    request: Request,
    what: &'static str,
) -> Result<T, ApiError> {
    let body = body(request, what).await?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("{what}: {e}")))
}

fn too_many(what: &str, count: usize, max: usize) -> Result<(), ApiError> {
    if count > max {
        return Err(ApiError::bad_request(
            "too_many",
            format!("{count} {what} asked for; at most {max} per call"),
        ));
    }
    Ok(())
}

/// `POST /internal/aae/roots` `{"epoch", "digest", "arcs": [...]}`: this node's hash-tree roots
/// of those arcs, its view and its tombstone horizon (anti-entropy, `antientropy.rs`).
pub async fn aae_roots(
    State(app): State<AppState>,
    request: Request,
) -> Result<Response, ApiError> {
    let query: ArcsQuery = aae_body(request, "arc list").await?;
    too_many("arcs", query.arcs.len(), MAX_ARCS_PER_CALL)?;
    Ok(axum::Json(app.cluster().aae_roots(&query).await).into_response())
}

/// `POST /internal/aae/leaves` `{"epoch", "digest", "arcs": [...]}`: the leaves of those arcs.
pub async fn aae_leaves(
    State(app): State<AppState>,
    request: Request,
) -> Result<Response, ApiError> {
    let query: ArcsQuery = aae_body(request, "arc list").await?;
    too_many("arcs", query.arcs.len(), MAX_ARCS_PER_CALL)?;
    Ok(axum::Json(app.cluster().aae_leaves(&query).await).into_response())
}

/// `POST /internal/aae/keys` `{"epoch", "digest", "segments": [...]}`: the keys and versions in
/// those tree segments, cut at whole segments near the batch byte cap.
pub async fn aae_keys(State(app): State<AppState>, request: Request) -> Result<Response, ApiError> {
    let query: SegmentsQuery = aae_body(request, "segment list").await?;
    too_many("segments", query.segments.len(), MAX_SEGMENTS_PER_CALL)?;
    Ok(axum::Json(app.cluster().aae_keys(query).await).into_response())
}
