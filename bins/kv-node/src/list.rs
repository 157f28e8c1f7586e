//! Listing, `GET /v1?prefix=p&limit=100&after=k[&values=true]`: one page of the cluster's live
//! keys in order, gathered from every node and merged.

use crate::error::ApiError;
use crate::routes::{request_id, AppState};
use crate::watch;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use serde_json::value::RawValue;
use serde_json::{json, Value};

/// Keys per page when `limit` is not given.
const DEFAULT_LIMIT: usize = 100;
/// Largest page a client may ask for.
const MAX_LIMIT: usize = 1000;

/// What a listing asks for.
#[derive(Debug, Default)]
struct ListQuery {
    prefix: String,
    after: Option<String>,
    limit: usize,
    values: bool,
}

fn parse_query(query: Option<&str>) -> Result<ListQuery, ApiError> {
    let mut parsed = ListQuery {
        limit: DEFAULT_LIMIT,
        ..ListQuery::default()
    };
    for (name, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match name.as_ref() {
            "prefix" => parsed.prefix = value.into_owned(),
            "after" => parsed.after = Some(value.into_owned()).filter(|a| !a.is_empty()),
            "limit" => {
                parsed.limit = value
                    .parse()
                    .ok()
                    .filter(|l| (1..=MAX_LIMIT).contains(l))
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "invalid_query",
                            format!("limit={value}: expected a whole number from 1 to {MAX_LIMIT}"),
                        )
                    })?;
            }
            "values" => {
                parsed.values = match value.as_ref() {
                    "true" | "1" => true,
                    "false" | "0" => false,
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
    Ok(parsed)
}

/// `GET /v1` (and `GET /v1/`): a page of keys, `{"keys": [...], "next": cursor-or-null}`; with
/// `values=true` also `"items": [{"key", "value", "version"}...]`.
pub async fn list(State(app): State<AppState>, request: Request) -> Result<Response, ApiError> {
    let (parts, _) = request.into_parts();
    if parts.method != axum::http::Method::GET && parts.method != axum::http::Method::HEAD {
        return Err(ApiError::bad_request(
            "invalid_key",
            "the key is empty; use /v1/<key>",
        ));
    }
    let query = parse_query(parts.uri.query())?;
    if parts.method == axum::http::Method::GET && watch::wants_watch(parts.uri.query())? {
        return watch_prefix(&app, query.prefix, &parts.headers).await;
    }
    let rid = request_id(&parts.headers);
    let page_query = kv_cluster::peer::PageQuery {
        prefix: &query.prefix,
        after: query.after.as_deref(),
        limit: query.limit,
        values: query.values,
    };
    let page = app.cluster().list(&page_query, &rid).await?;
    let keys: Vec<&str> = page.records.iter().map(|r| r.key.as_str()).collect();
    let mut body = json!({ "keys": keys, "next": page.next, "incomplete": page.incomplete });
    if query.values {
        let items: Vec<Value> = page
            .records
            .iter()
            .filter_map(|r| {
                let value = r.value.as_ref()?;
                let raw: &RawValue = serde_json::from_slice(value).ok()?;
                Some(json!({ "key": r.key, "value": raw, "version": r.version.to_string() }))
            })
            .collect();
        body["items"] = Value::Array(items);
    }
    Ok(axum::Json(body).into_response())
}

/// `GET /v1?prefix=P&watch=true`: the changes of every key under the prefix, from this node's
/// feed merged with every peer's (`watch_merge.rs`).
async fn watch_prefix(
    app: &AppState,
    prefix: String,
    headers: &axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let after = watch::last_event_id(headers)?;
    Ok(
        crate::watch_merge::merged(app.cluster().clone(), watch::Filter::Prefix(prefix), after)
            .await,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_defaults_and_limits() {
        let q = parse_query(None).unwrap();
        assert_eq!(
            (q.prefix.as_str(), q.after, q.limit, q.values),
            ("", None, DEFAULT_LIMIT, false)
        );
        let q = parse_query(Some("prefix=user%2F&after=user%2F9&limit=5&values=true")).unwrap();
        assert_eq!(
            (q.prefix.as_str(), q.after.as_deref(), q.limit, q.values),
            ("user/", Some("user/9"), 5, true)
        );
        for bad in ["limit=0", "limit=1001", "limit=x", "values=maybe"] {
            assert!(parse_query(Some(bad)).is_err(), "{bad}");
        }
    }
}
