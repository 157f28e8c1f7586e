//! Node-to-node endpoints under `/internal`: replication of record batches and reads of this
//! node's own entry for a key. Not for clients.

use crate::error::ApiError;
use crate::request::parse_key;
use crate::routes::AppState;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use kv_cluster::peer::{decode_batch, encode_batch, ENTRY_PATH, MAX_BATCH_BYTES};

/// `POST /internal/replicate`: applies a batch of records durably, then answers.
pub async fn replicate(
    State(app): State<AppState>,
    request: Request,
) -> Result<Response, ApiError> {
    let body: Bytes = axum::body::to_bytes(request.into_body(), MAX_BATCH_BYTES)
        .await
        .map_err(|_| ApiError::PayloadTooLarge {
            what: "replication batch",
            limit: MAX_BATCH_BYTES,
        })?;
    let records = decode_batch(&body).map_err(|e| ApiError::bad_request("invalid_batch", e))?;
    let applied = app.cluster().apply_replicated(records).await?;
    Ok(axum::Json(serde_json::json!({ "applied": applied })).into_response())
}

/// `GET /internal/entry/{key}`: this node's entry for the key as an encoded record (tombstones
/// included), or 404 when it has none.
pub async fn entry(State(app): State<AppState>, request: Request) -> Result<Response, ApiError> {
    let key = parse_key(request.uri().path(), ENTRY_PATH, app.config().max_key_bytes)?;
    match app.cluster().local_record(&key) {
        Some(record) => {
            let mut body = Vec::with_capacity(key.len() + 64);
            record.encode(&mut body);
            let mut response = (StatusCode::OK, body).into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            Ok(response)
        }
        None => Err(ApiError::NotFound(format!("no local entry for {key:?}"))),
    }
}

/// `GET /internal/keys?prefix=&after=&limit=`: this node's page of entries (tombstones included),
/// in key order, as a record batch.
pub async fn keys(State(app): State<AppState>, request: Request) -> Result<Response, ApiError> {
    let (mut prefix, mut after, mut limit) = (String::new(), None, 100usize);
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
            _ => {}
        }
    }
    let page = app.cluster().local_page(&prefix, after.as_deref(), limit);
    let mut response = (StatusCode::OK, encode_batch(&page)).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    Ok(response)
}
