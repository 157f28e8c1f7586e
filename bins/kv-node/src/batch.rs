//! `POST /batch`: several key operations in one request, each applied with the request's
//! consistency exactly as if sent alone, with a result per operation. Not a transaction: some
//! operations may succeed while others fail, and other clients may see them one by one.

use crate::api::{execute, KeyOp, OpKind, Outcome};
use crate::error::ApiError;
use crate::request::{parse_key, parse_query, MAX_TTL_SECS};
use crate::routes::{request_id, AppState};
use axum::extract::{Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use kv_cluster::Precondition;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use std::collections::HashMap;

/// Most operations one batch may carry.
pub const MAX_BATCH_OPS: usize = 1000;
/// Operations of one batch run at once.
const BATCH_CONCURRENCY: usize = 16;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchBody<'a> {
    #[serde(borrow)]
    ops: Vec<BatchOp<'a>>,
}

#[derive(Deserialize)]
struct BatchOp<'a> {
    op: String,
    key: String,
    #[serde(borrow, default)]
    value: Option<&'a RawValue>,
    #[serde(default)]
    ttl_secs: Option<u64>,
}

/// Parses and checks every operation first: one bad operation refuses the whole batch, so a
/// rejected batch changes nothing.
fn parse_ops(app: &AppState, body: &[u8], query: Option<&str>) -> Result<Vec<KeyOp>, ApiError> {
    let parsed: BatchBody<'_> = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request("invalid_json", format!(r#"the body is not {{"ops": [{{"op": "put", "key": ..., "value": ...}}, ...]}}: {e}"#))
    })?;
    if parsed.ops.len() > MAX_BATCH_OPS {
        return Err(ApiError::bad_request(
            "invalid_batch",
            format!(
                "{} operations; the limit is {MAX_BATCH_OPS}",
                parsed.ops.len()
            ),
        ));
    }
    let config = app.config();
    let cluster = app.cluster();
    let options = parse_query(
        query,
        cluster.default_consistency(),
        cluster.replication_factor(),
    )?;
    let (w, r) = (options.w, options.r);
    parsed
        .ops
        .into_iter()
        .enumerate()
        .map(|(i, op)| {
            let at =
                |e: ApiError| ApiError::bad_request("invalid_batch", format!("operation {i}: {e}"));
            let key = parse_key(&op.key, "", config.max_key_bytes).map_err(at)?;
            let kind = match (op.op.as_str(), op.value) {
                ("put", Some(value)) => {
                    if value.get().len() > config.max_value_bytes {
                        return Err(ApiError::PayloadTooLarge {
                            what: "value",
                            limit: config.max_value_bytes,
                        });
                    }
                    let ttl_secs = op.ttl_secs.or(options.ttl_secs);
                    if ttl_secs.is_some_and(|t| !(1..=MAX_TTL_SECS).contains(&t)) {
                        return Err(at(ApiError::bad_request(
                            "invalid_ttl",
                            format!("ttl_secs: expected whole seconds from 1 to {MAX_TTL_SECS}"),
                        )));
                    }
                    OpKind::Put {
                        value: Bytes::copy_from_slice(value.get().as_bytes()),
                        ttl_secs,
                    }
                }
                ("put", None) => {
                    return Err(at(ApiError::bad_request(
                        "missing_value",
                        "a put needs a \"value\"",
                    )))
                }
                ("delete", _) => OpKind::Delete,
                ("get", _) => OpKind::Get,
                (other, _) => {
                    return Err(at(ApiError::bad_request(
                        "invalid_batch",
                        format!("unknown op {other:?}; expected put, delete or get"),
                    )))
                }
            };
            Ok(KeyOp {
                kind,
                key,
                w,
                r,
                precondition: Precondition::Always,
                version: None,
                write_id: None,
                resend: None,
            })
        })
        .collect()
}

/// The result entry of one operation: its status and the body it would have answered alone.
async fn result_of(outcome: Result<Outcome, ApiError>) -> Value {
    match outcome {
        Ok(Outcome::Forwarded(answer)) => {
            let body: Value = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
            merge(answer.status.as_u16(), body)
        }
        Ok(outcome) => {
            let response = outcome.into_response();
            let status = response.status().as_u16();
            let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .unwrap_or_default();
            merge(
                status,
                serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            )
        }
        Err(e) => {
            let (status, body) = e.status_and_body();
            merge(status.as_u16(), body)
        }
    }
}

fn merge(status: u16, body: Value) -> Value {
    let mut result = json!({ "status": status });
    if let (Some(result), Value::Object(fields)) = (result.as_object_mut(), body) {
        result.extend(fields);
    }
    result
}

/// `POST /batch` with `{"ops": [{"op": "put", "key": k, "value": v}, {"op": "delete", "key": k}]}`:
/// `200 {"results": [{"status": 200, "key": k, ...}, ...]}` in the order of the operations.
pub async fn batch(State(app): State<AppState>, request: Request) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let limit = MAX_BATCH_OPS
        .saturating_mul(1024)
        .max(app.config().max_value_bytes)
        * 4;
    let body = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::PayloadTooLarge {
            what: "batch body",
            limit,
        })?;
    let ops = parse_ops(&app, &body, parts.uri.query())?;
    let rid = request_id(&parts.headers);
    let auth = parts.headers.get(header::AUTHORIZATION);
    // Operations on one key run in order, one after the other; different keys run at once.
    let mut chains: Vec<Vec<(usize, KeyOp)>> = Vec::new();
    let mut chain_of_key: HashMap<String, usize> = HashMap::new();
    for (i, op) in ops.into_iter().enumerate() {
        let chain = *chain_of_key.entry(op.key.clone()).or_insert_with(|| {
            chains.push(Vec::new());
            chains.len() - 1
        });
        chains[chain].push((i, op));
    }
    let mut results = vec![Value::Null; chain_of_key.values().map(|c| chains[*c].len()).sum()];
    let done: Vec<Vec<(usize, Value)>> = futures::stream::iter(chains)
        .map(|chain| {
            let (app, rid) = (&app, &rid);
            async move {
                let mut out = Vec::with_capacity(chain.len());
                for (i, op) in chain {
                    out.push((i, result_of(execute(app, op, auth, rid, false).await).await));
                }
                out
            }
        })
        .buffer_unordered(BATCH_CONCURRENCY)
        .collect()
        .await;
    for (i, result) in done.into_iter().flatten() {
        results[i] = result;
    }
    Ok(axum::Json(json!({ "results": results })).into_response())
}
